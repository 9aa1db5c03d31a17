"""Channel pruning: the static competitor a practitioner reaches for first. A dense, narrower ResNet: every
image runs every block, no router, and its speed needs no gather.

The user's ResNet keeps its blocks and its residual stream; inside each block the channels that only the
block itself reads (basic block: conv1's outputs, which its BatchNorm and conv2 read; bottleneck: conv1's
and conv2's) are pruned to the same share of their width in every block, the least important first.
Importance is torch-pruning's (DepGraph, Fang et al., CVPR 2023): the dependency graph gives the group of
parameters a channel couples, and a criterion scores each channel over its group. The share is the
largest whose FLOPs stay within a target (the learned policy's, for an equal-FLOPs comparison); the
criterion is the one whose pruned ResNet is most accurate on the validation split, before finetuning
(`choose`). The pruned ResNet is then finetuned as prune-and-finetune is (the `prune` stage: as many steps,
the same schedule and distillation), with `StageConfig.channels` holding the kept channels (`narrow`).
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from blockdrop.choices import CHANNEL_CRITERIA
from blockdrop.flops import resnet_cost
from blockdrop.models.resnet import FlatResNet, ResNetSpec, full_mids

# each block's kept channels: per inner layer (basic: one, bottleneck: two), the sorted indices kept
Kept = list[list[list[int]]]


def _importance(criterion: str):
    import torch_pruning as tp  # imported where channels are scored: only the driver's planning task needs it

    return {"l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
            "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
            "bn_scale": lambda: tp.importance.BNScaleImportance(),
            "fpgm": lambda: tp.importance.FPGMImportance(p=2)}[criterion]()


def inner_layers(backbone: FlatResNet, k: int) -> list[nn.Conv2d]:
    """Block k's convolutions whose outputs only the block reads (the channels pruning may take)."""
    block = backbone.block(k)
    return [block.conv1, block.conv2] if backbone.spec.block == "bottleneck" else [block.conv1]


def scores(backbone: FlatResNet, criterion: str, image_size: int) -> list[list[torch.Tensor]]:
    """Each block's channels scored by `criterion` (CHANNEL_CRITERIA) over their dependency groups: per
    block, per inner layer, one score per output channel (higher: more important)."""
    import torch_pruning as tp

    model = copy.deepcopy(backbone).cpu().eval()
    example = torch.zeros(1, model.spec.in_channels, image_size, image_size)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    importance = _importance(criterion)
    out = []
    for k in range(model.num_blocks):
        per_layer = []
        for conv in inner_layers(model, k):
            group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(conv.out_channels)))
            with torch.no_grad():
                per_layer.append(importance(group).detach().cpu())
        out.append(per_layer)
    return out


def widths_at(spec: ResNetSpec, share: float) -> tuple[tuple[int, ...], ...]:
    """Every block's inner widths at `share` of the full ones (at least one channel each)."""
    return tuple(tuple(max(1, round(w * share)) for w in block) for block in full_mids(spec))


def widths_within(spec: ResNetSpec, image_size: int, num_classes: int, flops: float) -> tuple[tuple[int, ...], ...]:
    """The inner widths of the largest common share whose ResNet costs at most `flops` per image (one channel
    a layer when even that costs more)."""
    def cost(share: float) -> int:
        return resnet_cost(dataclasses.replace(spec, mids=widths_at(spec, share)), image_size, num_classes).total

    low, high = 0.0, 1.0
    if cost(high) <= flops:
        return widths_at(spec, high)
    for _ in range(40):  # the cost only changes where a rounded width does: bisection settles in ~20 steps
        middle = (low + high) / 2
        low, high = (middle, high) if cost(middle) <= flops else (low, middle)
    return widths_at(spec, low)


def keep_top(block_scores: list[list[torch.Tensor]], widths: Iterable[tuple[int, ...]]) -> Kept:
    """The `widths` highest-scored channels of each inner layer, as sorted indices."""
    return [[sorted(torch.argsort(s, descending=True, stable=True)[:w].tolist()) for s, w in zip(layers, ws)]
            for layers, ws in zip(block_scores, widths)]


def narrow(state: dict, spec: ResNetSpec, kept: Kept) -> dict:
    """A backbone state dict with only the `kept` inner channels of every block: the weights of the narrower
    ResNet (blockdrop.models.resnet.narrowed_spec reads its shape back from them)."""
    out = dict(state)
    for (stage, b), layers in zip(spec.block_index, kept):
        prefix = f"blocks.{stage}.{b}."
        convs = ("conv1", "conv2", "conv3") if spec.block == "bottleneck" else ("conv1", "conv2")
        for i, idx in enumerate(layers):
            idx = torch.as_tensor(idx, dtype=torch.long)
            made, norm, read = convs[i], f"bn{i + 1}", convs[i + 1]
            out[prefix + f"{made}.weight"] = out[prefix + f"{made}.weight"].index_select(0, idx)
            for name in ("weight", "bias", "running_mean", "running_var"):
                out[prefix + f"{norm}.{name}"] = out[prefix + f"{norm}.{name}"].index_select(0, idx)
            out[prefix + f"{read}.weight"] = out[prefix + f"{read}.weight"].index_select(1, idx)
    return {k: v.clone() for k, v in out.items()}


def pruned(backbone: FlatResNet, kept: Kept, num_classes: int) -> FlatResNet:
    """The narrower ResNet with `backbone`'s weights for the `kept` channels."""
    state = narrow(backbone.state_dict(), backbone.spec, kept)
    from blockdrop.models.resnet import narrowed_spec

    model = FlatResNet(narrowed_spec(backbone.spec, state), num_classes)
    model.load_state_dict(state)
    return model


@dataclasses.dataclass
class Choice:
    """A channel pruning chosen on the validation split: the criterion, the kept channels, and each
    criterion's validation accuracy before finetuning."""

    criterion: str
    kept: Kept
    accuracy: dict[str, float]
    flops: float  # per image, the pruned ResNet's


def choose(backbone: FlatResNet, flops: float, image_size: int, num_classes: int, val_loader: Iterable,
           device: torch.device, criteria: Iterable[str] = CHANNEL_CRITERIA) -> Choice:
    """Prune `backbone`'s channels to at most `flops` per image by each criterion; the one whose pruned ResNet
    is most accurate on `val_loader` (the validation split) wins (ties: the first in `criteria`)."""
    widths = widths_within(backbone.spec, image_size, num_classes, flops)
    found: dict[str, tuple[float, Kept]] = {}
    for criterion in criteria:
        kept = keep_top(scores(backbone, criterion, image_size), widths)
        model = pruned(backbone, kept, num_classes).to(device).eval()
        right = seen = 0
        with torch.no_grad():
            for images, labels in val_loader:
                right += int((model(images.to(device)).argmax(1) == labels.to(device)).sum())
                seen += len(labels)
        found[criterion] = (right / max(seen, 1), kept)
    best = max(found, key=lambda c: found[c][0])  # max keeps the first of equals
    cost = resnet_cost(dataclasses.replace(backbone.spec, mids=widths), image_size, num_classes).total
    return Choice(best, found[best][1], {c: a for c, (a, _) in found.items()}, float(cost))
