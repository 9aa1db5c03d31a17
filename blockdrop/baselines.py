"""Policies that do not look at the image: what a learned policy must beat at equal FLOPs.

The paper compares BlockDrop with FirstK (the first K blocks), RandomK (K blocks drawn at random
per image) and DistributeK (K blocks spread evenly over the stages). A fourth, stronger one is the
greedy static policy: starting from every block, repeatedly drop the block whose removal costs the
least accuracy (ties: the least cross-entropy) on a fixed slice of the training images. All four
give one set of blocks for every image (RandomK: a fresh draw per image); none looks at the image.

Comparing at equal FLOPs: a static policy with K blocks has one FLOPs figure; a learned policy has
a mean. Running the K-block policy on a fraction of the images and the (K+1)-block one on the rest
is itself an image-blind policy, and its accuracy is the linear interpolation between the two, so a
baseline's accuracy at any FLOPs is read off its curve by linear interpolation (`accuracy_at`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from blockdrop.choices import BASELINES, RANDOM_SEEDS  # noqa: F401 (the names the CLIs offer; re-exported)
from blockdrop.errors import UserError
from blockdrop.flops import CostModel
from blockdrop.models.resnet import FlatResNet

Chooser = Callable[[torch.Tensor], torch.Tensor]  # images -> (batch, K) 0/1 policy


def first_k(keep: int, num_blocks: int) -> torch.Tensor:
    """The first `keep` blocks."""
    return (torch.arange(num_blocks) < keep).float()


def distribute_k(keep: int, layers: Sequence[int]) -> torch.Tensor:
    """`keep` blocks spread over the stages as evenly as their sizes allow, the first of each stage
    first (earlier stages take the remainder)."""
    share = [0] * len(layers)
    for _ in range(keep):  # round-robin over the stages that still have blocks left
        open_stages = [s for s in range(len(layers)) if share[s] < layers[s]]
        share[min(open_stages, key=lambda s: (share[s], s))] += 1
    return torch.tensor([float(b < share[s]) for s, count in enumerate(layers) for b in range(count)])


def random_k(keep: int, num_blocks: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """For each image, `keep` blocks drawn uniformly without replacement."""
    ranks = torch.rand(batch, num_blocks, generator=generator).argsort(1).argsort(1)
    return (ranks < keep).float()


def _run_static(backbone: FlatResNet, x: torch.Tensor, kept: torch.Tensor, start: int) -> torch.Tensor:
    """Logits of blocks start..K-1 under one 0/1 row `kept`, from `x`, the input of block `start`."""
    for k in range(start, backbone.num_blocks):
        residual = backbone.shortcut(k, x)
        x = F.relu(residual + backbone.block(k)(x)) if kept[k] else residual
    return backbone.head(x)


def greedy_order(backbone: FlatResNet, loader: Iterable, device: torch.device, drops: int | None = None) -> list[int]:
    """Blocks in the order the greedy static policy drops them (first = least useful), `drops` of
    them (default all K).

    Each round tries dropping every remaining block on the images of `loader` and drops the one
    that keeps accuracy highest, cross-entropy lowest on ties. Trying block k reuses the input of
    block k under the current policy, so a round costs about K/2 passes over `loader`, not K.
    """
    batches = [(x.to(device), y.to(device)) for x, y in loader]
    backbone.eval()
    num_blocks = backbone.num_blocks
    kept = [True] * num_blocks
    order: list[int] = []
    with torch.inference_mode():
        for _ in range(num_blocks if drops is None else drops):
            candidates = [k for k in range(num_blocks) if kept[k]]
            scores = {k: [0, 0.0] for k in candidates}  # correct, -loss
            for x, y in batches:
                inputs, h = [], backbone.seed(x)
                for k in range(num_blocks):  # the input of every block under the current policy
                    inputs.append(h)
                    residual = backbone.shortcut(k, h)
                    h = F.relu(residual + backbone.block(k)(h)) if kept[k] else residual
                for k in candidates:
                    trial = list(kept)
                    trial[k] = False
                    logits = _run_static(backbone, inputs[k], trial, k)
                    scores[k][0] += int((logits.argmax(1) == y).sum())
                    scores[k][1] -= float(F.cross_entropy(logits, y, reduction="sum"))
            best = max(candidates, key=lambda k: tuple(scores[k]))
            kept[best] = False
            order.append(best)
    return order


def from_order(keep: int, order: Sequence[int], num_blocks: int | None = None) -> torch.Tensor:
    """The static policy that keeps all but the first K - keep blocks of `order` (which may list
    only the first drops)."""
    num_blocks = len(order) if num_blocks is None else num_blocks
    if num_blocks - keep > len(order):
        raise ValueError(f"the greedy order lists {len(order)} drops; keeping {keep} of {num_blocks} needs more")
    policy = torch.ones(num_blocks)
    policy[list(order[:num_blocks - keep])] = 0
    return policy


def chooser(name: str, keep: int, backbone: FlatResNet, order: Sequence[int] | None = None,
            seed: int = 0) -> Chooser:
    """The baseline `name` keeping `keep` blocks, as a function from a batch of images to its policy.
    `order` (from greedy_order) is needed for "greedy"."""
    num_blocks = backbone.num_blocks
    if name not in BASELINES:
        raise UserError(f"unknown baseline {name!r}; choose one of: {', '.join(BASELINES)}")
    if not 0 <= keep <= num_blocks:
        raise UserError(f"--keep must be between 0 and {num_blocks} (the blocks of this ResNet), not {keep}")
    if name == "randomk":
        generator = torch.Generator().manual_seed(seed)
        return lambda images: random_k(keep, num_blocks, len(images), generator).to(images.device)
    if name == "firstk":
        row = first_k(keep, num_blocks)
    elif name == "distributek":
        row = distribute_k(keep, backbone.spec.layers)
    else:
        if order is None:
            raise ValueError("the greedy baseline needs the greedy drop order")
        row = from_order(keep, order, num_blocks)
    return lambda images: row.to(images.device).expand(len(images), -1)


@dataclass(frozen=True)
class CurvePoint:
    keep: int
    accuracy: float
    flops: float


def accuracy_at(curve: Sequence[CurvePoint], flops: float) -> float:
    """A baseline's accuracy at `flops` by linear interpolation along its curve (clamped at its ends)."""
    points = sorted(curve, key=lambda p: p.flops)
    if flops <= points[0].flops:
        return points[0].accuracy
    for lo, hi in zip(points, points[1:]):
        if flops <= hi.flops:
            t = (flops - lo.flops) / (hi.flops - lo.flops) if hi.flops > lo.flops else 1.0
            return lo.accuracy + t * (hi.accuracy - lo.accuracy)
    return points[-1].accuracy


def keeps_around(costs: CostModel, flops: float) -> list[int]:
    """Block counts whose image-blind policies (no policy network to pay for) bracket `flops` whichever
    blocks they keep (stage transitions are cheaper than the other blocks): for an equal-FLOPs comparison."""
    blocks = costs.backbone.blocks
    estimate = (flops - (costs.fixed - costs.policy)) / (sum(blocks) / len(blocks))
    lo = int(estimate) - 1
    return sorted({min(max(k, 0), len(blocks)) for k in range(lo, lo + 4)})


def keep_grid(num_blocks: int, points: int = 12) -> list[int]:
    """About `points` block counts from 0 to K, for a baseline curve."""
    return sorted({round(i * num_blocks / (points - 1)) for i in range(points)})
