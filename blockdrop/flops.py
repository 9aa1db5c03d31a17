"""Analytic cost model in the paper's convention: the one source of every FLOPs number printed.

conv: 2 * Cin * Cout * kh * kw * Hout * Wout; linear: 2 * in * out; BatchNorm, ReLU, pooling and
the parameter-free CIFAR shortcut are free. The cost of an image under a policy u is
`fixed + sum_k u_k * block_k`, where `fixed` holds the stem, the classifier, the shortcut convs
(they run whether or not their block does) and the policy network.

`python -m blockdrop.flops --preset R110_C10 [--json]` prints the per-block table and totals.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from blockdrop.errors import run_cli
from blockdrop.models.resnet import DepthPolicy, FlatResNet, ResNetSpec, full_mids
from blockdrop.presets import Preset, get_preset


def conv_flops(cin: int, cout: int, kernel: int, hout: int, wout: int) -> int:
    return 2 * cin * cout * kernel * kernel * hout * wout


def linear_flops(fin: int, fout: int) -> int:
    return 2 * fin * fout


def _out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@dataclass(frozen=True)
class ResNetCost:
    """FLOPs of one flat ResNet at one input size, split the way a policy can change them."""

    stem: int
    blocks: tuple[int, ...]  # residual branch of each block
    shortcuts: int  # 1x1 conv shortcuts: always run
    head: int  # the final linear layer

    @property
    def total(self) -> int:
        return self.stem + sum(self.blocks) + self.shortcuts + self.head


def resnet_cost(spec: ResNetSpec, image_size: int, num_outputs: int) -> ResNetCost:
    """Walk the network's shapes; no tensors are made."""
    size = image_size
    width = spec.widths[0]
    if spec.stem == "cifar":
        stem = conv_flops(spec.in_channels, width, 3, size, size)
    else:
        size = _out(size, 7, 2, 3)
        stem = conv_flops(spec.in_channels, width, 7, size, size)
        size = _out(size, 3, 2, 1)  # maxpool

    expansion = 4 if spec.block == "bottleneck" else 1
    blocks: list[int] = []
    shortcuts = 0
    inplanes = width
    mids = iter(spec.mids or full_mids(spec))  # a channel-pruned ResNet's inner widths
    for stage, (planes, count) in enumerate(zip(spec.widths, spec.layers)):
        for b in range(count):
            stride = 2 if stage > 0 and b == 0 else 1
            out = _out(size, 3, stride, 1)
            inner = next(mids)
            if spec.block == "bottleneck":
                first, second = inner
                cost = (conv_flops(inplanes, first, 1, size, size)
                        + conv_flops(first, second, 3, out, out)
                        + conv_flops(second, planes * 4, 1, out, out))
            else:
                cost = conv_flops(inplanes, inner[0], 3, out, out) + conv_flops(inner[0], planes, 3, out, out)
            blocks.append(cost)
            outplanes = planes * expansion
            if b == 0 and spec.shortcut == "conv" and (stride != 1 or inplanes != outplanes):
                shortcuts += conv_flops(inplanes, outplanes, 1, _out(size, 1, stride, 0), _out(size, 1, stride, 0))
            inplanes, size = outplanes, out
    return ResNetCost(stem, tuple(blocks), shortcuts, linear_flops(inplanes, num_outputs))


@dataclass(frozen=True)
class CostModel:
    """Per-image FLOPs of a preset under any policy, policy network included."""

    backbone: ResNetCost
    policy: int
    reference: int | None = None  # a channel-pruned ResNet's: the unpruned ResNet's total

    @property
    def full(self) -> int:
        """The pretrained ResNet alone, every block run, no policy network: the user's ResNet, the one every
        speedup is measured against (for a channel-pruned ResNet: before it was pruned)."""
        return self.reference or self.backbone.total

    @property
    def fixed(self) -> int:
        """What every image costs under BlockDrop whatever the policy."""
        b = self.backbone
        return b.stem + b.shortcuts + b.head + self.policy

    def per_image(self, policy: torch.Tensor, with_policy: bool = True) -> torch.Tensor:
        """FLOPs of each row of a (batch, K) 0/1 policy matrix, as float64; `with_policy` False for a
        policy that runs no network (image-blind, a pruned ResNet's)."""
        blocks = torch.tensor(self.backbone.blocks, dtype=torch.float64, device=policy.device)
        return self.fixed - (0 if with_policy else self.policy) + policy.to(torch.float64) @ blocks


def cost_model(preset: Preset, policy: torch.nn.Module | None = None, backbone: FlatResNet | None = None) -> CostModel:
    """The preset's costs with its BlockDrop policy network, or with the depth policy when `policy` is one;
    `backbone`: the ResNet itself where channel pruning narrowed it (its blocks cost less, its speedups are
    against the preset's unpruned ResNet)."""
    spec = preset.backbone if backbone is None else backbone.spec
    blocks = resnet_cost(spec, preset.image_size, preset.num_classes)
    reference = None if spec.mids is None else resnet_cost(preset.backbone, preset.image_size, preset.num_classes).total
    if isinstance(policy, DepthPolicy):
        spec, pool = preset.depth_policy_spec
        return CostModel(blocks, resnet_cost(spec, preset.image_size // pool, preset.num_blocks + 1).total, reference)
    return CostModel(blocks, resnet_cost(preset.policy, preset.image_size // preset.policy_pool,
                                         preset.num_blocks).total, reference)


def describe(preset: Preset) -> dict:
    """The cost table of a preset as a JSON-able dict."""
    costs = cost_model(preset)
    b = costs.backbone
    index = preset.backbone.block_index
    return {
        "preset": preset.name,
        "blocks": [
            {"k": k, "stage": s, "index": i, "flops": f} for k, ((s, i), f) in enumerate(zip(index, b.blocks))
        ],
        "stem_flops": b.stem,
        "shortcut_flops": b.shortcuts,
        "head_flops": b.head,
        "full_flops": costs.full,
        "policy_flops": costs.policy,
        "fixed_flops": costs.fixed,
        "min_flops": costs.fixed,
        "max_flops": costs.fixed + sum(b.blocks),
    }


def _print_table(info: dict) -> None:
    print(f"{info['preset']}: per-block FLOPs (paper convention: 2 x multiply-adds, BN/ReLU/pool free)")
    print(f"{'k':>4} {'stage':>5} {'block':>5} {'FLOPs':>11}")
    for row in info["blocks"]:
        print(f"{row['k']:>4} {row['stage']:>5} {row['index']:>5} {row['flops']:>11.3E}")
    print(f"stem {info['stem_flops']:.3E}  shortcut convs {info['shortcut_flops']:.3E}  "
          f"classifier {info['head_flops']:.3E}")
    print(f"full model:      {info['full_flops']:.3E}")
    print(f"policy network:  {info['policy_flops']:.3E}")
    print(f"BlockDrop range: {info['min_flops']:.3E} (no block) .. {info['max_flops']:.3E} (every block)")


def report(args) -> None:
    """The table (or JSON with --json) of `python -m blockdrop.flops` for parsed flags (blockdrop.parsers.flops)."""
    info = describe(get_preset(args.preset))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_table(info)


if __name__ == "__main__":
    from blockdrop.cli import run_flops  # the command's one path (cli imports this module inside run_flops)

    run_cli(run_flops)
