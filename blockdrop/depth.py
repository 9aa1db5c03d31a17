"""The depth policy's math: per image, how many blocks of one fixed order to run.

BlockDrop's policy decides every block of every image on its own (2^K choices) and learns from one
sampled choice per image (REINFORCE). The depth policy restricts the choice to the first d blocks of
one order, the greedy static order of the user's ResNet (most useful block first), d = 0..K per
image. With K+1 choices the outcome of every choice can be measured on every training image, so the
policy network is trained by supervision instead: it predicts, for each depth d, the probability
p_d that the ResNet run with those d blocks classifies the image correctly. At test time each image
takes the depth of the largest expected reward,

    p_d * (1 - c_d) + (1 - p_d) * gamma,

BlockDrop's reward (gamma: a misclassified image's) with the cost c_d measured in FLOPs (the share of
the ResNet's FLOPs the d blocks cost) rather than the square of the share of blocks: a linear cost
prices a block the same for every image, so blocks go where they buy the most accuracy; the square
charges an image more for its next block the more it already has, which pushes every image towards
the same count.

Pure functions over tensors; blockdrop.stages composes them.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

DISTILL = 0.5  # weight of the user's ResNet's soft labels in the ResNet's loss (the rest: the labels)
TEMPERATURE = 2.0  # of those soft labels


def ranks(order: Sequence[int]) -> torch.Tensor:
    """rank[k]: block k's place in the keep order (0: kept first). `order` is the greedy static order,
    least useful block first (blockdrop.baselines.greedy_order), so the keep order is its reverse."""
    rank = torch.empty(len(order), dtype=torch.long)
    rank[torch.as_tensor(list(order), dtype=torch.long)] = torch.arange(len(order) - 1, -1, -1)
    return rank


def rows(depths: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """(batch, K) 0/1 policy: image i runs the blocks whose rank is below depths[i]."""
    return (rank.to(depths.device).unsqueeze(0) < depths.unsqueeze(1)).to(torch.float32)


def depth_costs(order: Sequence[int], block_flops: Sequence[float], full_flops: float) -> torch.Tensor:
    """(K+1,) the share of the full ResNet's FLOPs the first d blocks of the keep order cost, d = 0..K."""
    keep_order = list(reversed(list(order)))
    spent = torch.tensor([0.0] + [float(block_flops[k]) for k in keep_order], dtype=torch.float64).cumsum(0)
    return (spent / full_flops).to(torch.float32)


def choose(correct_prob: torch.Tensor, costs: torch.Tensor, gamma: float) -> torch.Tensor:
    """Each image's depth: argmax over d of p_d (1 - c_d) + (1 - p_d) gamma. (batch, K+1) -> (batch,)."""
    value = correct_prob * (1 - costs.to(correct_prob)) + (1 - correct_prob) * gamma
    return value.argmax(1)


def sample_depths(batch: int, num_blocks: int, generator: torch.Generator | None = None,
                  device: torch.device | None = None) -> torch.Tensor:
    """Depths drawn uniformly from 1..K, one per image: the nest stage trains every prefix of the order."""
    return torch.randint(1, num_blocks + 1, (batch,), generator=generator).to(device)


def distill_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
                 weight: float = DISTILL, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Cross-entropy, mixed with the KL divergence from the user's ResNet's softened predictions (scaled by
    T^2 so that its gradients keep their size): the ResNet run with fewer blocks learns to answer as the
    whole ResNet did, which the labels alone do not say. Only on the images the user's ResNet classifies
    correctly: where it is wrong its soft labels teach the mistake (a weak ResNet, 47% on the mixed folder,
    cost its distilled students 5-17 points in an early single-seed run, read on test images before the
    validation split existed; every competitor gets the same rule, so the comparisons stay fair)."""
    ce = F.cross_entropy(logits, labels, reduction="none")
    if teacher_logits is None or weight == 0:
        return ce.mean()
    kl = F.kl_div(F.log_softmax(logits / temperature, 1), F.log_softmax(teacher_logits / temperature, 1),
                  reduction="none", log_target=True).sum(1) * temperature ** 2
    right = (teacher_logits.argmax(1) == labels).to(ce.dtype)
    return (ce * (1 - weight * right) + weight * right * kl).mean()


def correct_prob_targets(logits_per_depth: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """(batch, K+1) soft targets: the ResNet's probability of the true class at each depth. Softer than
    right/wrong, which on training images the ResNet has learned is nearly always "right" at every depth."""
    return torch.stack([F.softmax(logits, 1).gather(1, labels[:, None])[:, 0] for logits in logits_per_depth], 1)
