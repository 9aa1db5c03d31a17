"""Prune and finetune: the image-blind competitor a skeptic runs first, and BlockDrop must beat.

Take the ResNet the user brought, choose K blocks by the greedy static order on it (drop, one at a
time, the block whose removal costs least on a slice of the training images: blockdrop.baselines),
and finetune the ResNet with every image running those K blocks, for as many optimisation steps as
the learned policy's stages train the ResNet. No policy network runs at test time. The training is the
`prune` stage of train_job.py (`--stage prune --keep K`); a job that finetunes a policy trains it
at the block counts that bracket the learned policy's FLOPs, and the comparison reads its accuracy
there, image by image (blockdrop.analysis.pruned_curve).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from blockdrop import baselines as B
from blockdrop.flops import CostModel


class StaticPolicy(nn.Module):
    """A pruned ResNet's policy: the same 0/1 `row` for every image, no network to run or pay for. What
    load_models returns for a `prune` checkpoint, so evaluation, the MLflow model and the server run it
    under its blocks like any policy."""

    def __init__(self, row: torch.Tensor):
        super().__init__()
        self.register_buffer("row", torch.as_tensor(row, dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.row.to(images.device).expand(len(images), -1)


def static_chooser(row: torch.Tensor) -> B.Chooser:
    """The image-blind policy that runs the blocks of the 0/1 `row` for every image."""
    return lambda images: row.to(images.device).expand(len(images), -1)


def keeps_bracketing(costs: CostModel, order: Sequence[int], flops: float) -> list[int]:
    """The block counts K, K+1 whose greedy static policies (no policy network) bracket `flops` (one
    count at the ends of the range): the prune-and-finetune models an equal-FLOPs comparison needs."""
    num_blocks = len(costs.backbone.blocks)
    cost = [static_flops(costs, B.from_order(keep, order, num_blocks)) for keep in range(num_blocks + 1)]
    above = next((keep for keep in range(num_blocks + 1) if cost[keep] >= flops), num_blocks)
    return sorted({max(above - 1, 0), above})


def static_flops(costs: CostModel, row: torch.Tensor) -> float:
    """FLOPs per image of the static policy `row`: no policy network to pay for."""
    return float(costs.per_image(row.unsqueeze(0), with_policy=False)[0])
