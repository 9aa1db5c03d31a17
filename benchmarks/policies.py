"""Policies for the benchmarks: seeded 0/1 matrices, and a policy network whose decisions are set
per image (its cost is paid, its output replaced), so that trained-policy-like variety (a policy of
its own per image: the paper reports 469 unique policies over CIFAR-10's test set for R110) can be
timed without a trained policy."""
from __future__ import annotations

import torch
from torch import nn


def make_policies(family: str, batch: int, blocks: int, keep: float, patterns: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if family == "random":
        return (torch.rand(batch, blocks, generator=g) < keep).float()
    if family == "patterned":
        base = (torch.rand(patterns, blocks, generator=g) < keep).float()
        return base[torch.randint(patterns, (batch,), generator=g)]
    raise SystemExit(f"unknown policy family {family!r}; use random or patterned")


class PerImagePolicy(nn.Module):
    """The policy network's cost, with outputs fixed per image: `probs[i]` (0.99 keep / 0.01 drop)."""

    def __init__(self, net: nn.Module, probs: torch.Tensor):
        super().__init__()
        self.net, self.probs = net, probs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * 0 + self.probs


def per_image_probs(batch: int, blocks: int, sampled_keep: float, alpha: float, seed: int = 0) -> torch.Tensor:
    """Probabilities whose alpha-bounded samples keep `sampled_keep` of the blocks on average, each
    image with a policy of its own."""
    hi, lo = 0.99, 0.01
    b_hi, b_lo = alpha * hi + (1 - alpha) * (1 - hi), alpha * lo + (1 - alpha) * (1 - lo)
    share = min(max((sampled_keep - b_lo) / (b_hi - b_lo), 0.0), 1.0)
    g = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(batch, blocks, generator=g) < share, hi, lo)


