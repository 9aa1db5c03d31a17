"""Turning the policy network's keep-probabilities into block decisions."""
from __future__ import annotations

import torch


def greedy_policy(probs: torch.Tensor) -> torch.Tensor:
    """The test-time policy: run block k when its keep-probability is at least 0.5."""
    return (probs >= 0.5).to(probs.dtype)
