"""The method's math: reward, bounded sampling, self-critical REINFORCE loss, curriculum masks.

Pure functions over tensors; the training stages (blockdrop.stages) compose them.

Normalisation, chosen on purpose: every loss term is a mean over the batch (a sum over blocks).
The original divides by the batch size in the curriculum stage but sums over the batch when
finetuning, which ties the policy's step size to the batch size and lets it swamp the
cross-entropy term; the mean keeps both stages and both terms on one scale at any batch size.
"""
from __future__ import annotations

import torch

from blockdrop.choices import ENTROPIES  # noqa: F401 (re-exported)

ALPHA = 0.8  # bounds keep-probabilities to [0.2, 0.8] while sampling
BETA = 0.1  # entropy bonus weight in the curriculum stage


def validate_penalty(gamma: float) -> float:
    """gamma is the reward of a misclassified image: it must be negative."""
    if not gamma < 0:
        raise ValueError(f"penalty gamma must be negative (the paper uses -10 on CIFAR, -5 on ImageNet), not {gamma}")
    return gamma


def bound(probs: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """s' = alpha*s + (1-alpha)*(1-s): keeps exploration alive however sure the policy gets."""
    return alpha * probs + (1 - alpha) * (1 - probs)


def sample(bounded: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """u ~ Bernoulli(s'), as 0/1 floats."""
    return torch.bernoulli(bounded.detach(), generator=generator)


def greedy(probs: torch.Tensor) -> torch.Tensor:
    """The baseline and test-time policy: keep block k when s_k >= 0.5."""
    return (probs.detach() >= 0.5).to(probs.dtype)


def reward(correct: torch.Tensor, policy: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per image: 1 - (|u|/K)^2 when classified correctly, gamma otherwise."""
    usage = policy.sum(1) / policy.shape[1]
    return torch.where(correct, 1 - usage ** 2, torch.full_like(usage, gamma))


def curriculum_mask(num_blocks: int, index: int, device: torch.device | None = None) -> torch.Tensor:
    """1 for the blocks the policy decides at curriculum step `index` (0-based): the last min(index+1, K).
    The original advances `index` once per epoch; blockdrop.stages once per `pace` optimisation steps."""
    decided = min(index + 1, num_blocks)
    mask = torch.zeros(num_blocks, device=device)
    mask[num_blocks - decided:] = 1
    return mask


def force_undecided(policy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Blocks outside the curriculum mask run for every image."""
    return torch.where(mask.bool(), policy, torch.ones_like(policy))


def log_prob(bounded: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    """log p(u_k) under Bernoulli(s'), per image and block."""
    return policy * torch.log(bounded) + (1 - policy) * torch.log1p(-bounded)


def reinforce_loss(bounded: torch.Tensor, policy: torch.Tensor, advantage: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """-sum_k log p(u_k) * advantage, over the decided blocks, averaged over the batch."""
    logp = log_prob(bounded, policy)
    if mask is not None:
        logp = logp * mask
    return -(logp.sum(1) * advantage.detach()).mean()


def curriculum_index(step: int, pace: int) -> int:
    """The curriculum step of optimisation step `step` when a new block is decided every `pace` steps."""
    return step // max(pace, 1)


def entropy_original(bounded: torch.Tensor) -> torch.Tensor:
    """The original's bonus: -s' log s' summed over ALL blocks (undecided ones too), batch mean.

    Only half of the Bernoulli entropy: it peaks at s' = 1/e, so it pulls every block, those the
    curriculum has not reached included, towards "drop": blocks enter the curriculum dropped and
    must earn "keep". Which is what lets a short curriculum find savings.
    """
    return -(bounded * torch.log(bounded)).sum(1).mean()


def entropy(bounded: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Bernoulli entropy of the bounded probabilities, summed over decided blocks, batch mean.

    The whole entropy -(s log s + (1-s) log(1-s)); the original used only -s log s. It is a bonus:
    the loss *subtracts* beta times this, pushing the policy away from premature certainty.
    """
    h = -(bounded * torch.log(bounded) + (1 - bounded) * torch.log1p(-bounded))
    if mask is not None:
        h = h * mask
    return h.sum(1).mean()
