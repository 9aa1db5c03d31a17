"""The budget policy's math: one depth policy, any compute budget at request time.

The depth policy (blockdrop.depth) predicts, per image, p_d: the probability that the ResNet run with
the first d blocks of its keep order classifies the image correctly, for every d = 0..K. That is all a
budget needs: the budget enters the decision, not the network. For a mean budget B (a share of the full
ResNet's FLOPs) the best choice of depths maximises the expected number of correct images subject to
their mean cost; its Lagrangian relaxation decides each image on its own,

    d_i = argmax_d  p_id - price * c_d,

with one price for the budget (c_d: the share of the full ResNet's FLOPs the first d blocks cost). A
higher price buys fewer blocks; the images that gain least from a block drop it first. The price of a
budget is read off a table measured on the validation split at the end of training (`spend`: the mean
share spent at each of PRICES, on images the model did not train on), so an image's choice depends on its
budget alone, never on the other images of its batch: a served answer equals the evaluation's, whatever
the batch.

Two kinds of budget, each named for what it is:
- a mean target (`budget`, `mean_flops`): the images' MEAN cost is held to it (on images like the
  training images; single images spend more or less), up to the model's ceiling: where more blocks buy
  no accuracy (p_d stops rising), even a free block is not taken, and a larger budget is not spent;
- a per-image cap (`max_flops`): no image exceeds it; below it an image decides as under a mean target
  of the same size, so easy images still stop early.

Budgets are shares of the full ResNet's FLOPs, the cost every image pays whatever its blocks (stem,
shortcuts, head and the policy network: `base`) included: budget 0.25 is a 4x speedup.

Pure functions over tensors; blockdrop.models.resnet.BudgetPolicy holds the table.
"""
from __future__ import annotations

import math

import torch

from blockdrop.choices import DEFAULT_BUDGET_RANGE as DEFAULT_RANGE  # noqa: F401 (re-exported)

# The prices the table is measured at: 0 (every image takes its most accurate depth) then log-spaced up
# to a price at which every block costs more than any image can gain (p_d is in [0, 1]).
PRICES = torch.cat([torch.zeros(1), torch.logspace(-4, 3, 223)])
TOLERANCE = 1e-6  # float32 costs against a cap
# The budgets a budget model's front is reported at (those above what an image costs with no block)
CURVE = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.8, 1.0)


def ceiling(base: float, mean_spend: torch.Tensor) -> float:
    """What the model spends on average when blocks are free (price 0: each image at its most accurate
    depth): a mean budget above it is not binding, the model spends less."""
    return base + float(mean_spend[0])


def gap(asked: float, spent: float, most: float) -> float:
    """How far a mean target is missed: |spent - asked| where the target binds (below `most`, the ceiling),
    else only what is spent over it."""
    return abs(spent - asked) if asked < most else max(spent - asked, 0.0)


def curve_budgets(base: float, budgets=CURVE) -> list[float]:
    """The budgets of `budgets` a model whose images cost at least `base` can meet."""
    return [b for b in budgets if b > base + 0.01]


def check_budget(value, what: str = "budget") -> float:
    """A budget share in (0, 1], or a ValueError that says what a budget is."""
    try:
        share = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number in (0, 1] (a share of the full ResNet's FLOPs), not {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(share) or not 0 < share <= 1:
        raise ValueError(f"{what} must be in (0, 1] (a share of the full ResNet's FLOPs: 0.25 is a 4x speedup), "
                         f"not {value!r}")
    return share


def check_range(low: float, high: float) -> tuple[float, float]:
    check_budget(low, "the budget range's low end")
    check_budget(high, "the budget range's high end")
    if not low < high:
        raise ValueError(f"a budget range goes from low to high, not {low:g} to {high:g}")
    return low, high


def choose(correct_prob: torch.Tensor, costs: torch.Tensor, price: torch.Tensor,
           allowance: torch.Tensor | None = None) -> torch.Tensor:
    """Each image's depth at its own price: argmax_d p_d - price c_d, over the depths whose cost is within
    its `allowance` (a per-image cap on the blocks' share; None: no cap). (N, K+1) -> (N,)."""
    costs = costs.to(correct_prob)
    value = correct_prob - price.to(correct_prob).unsqueeze(1) * costs.unsqueeze(0)
    if allowance is not None:
        over = costs.unsqueeze(0) > allowance.to(correct_prob).unsqueeze(1) + TOLERANCE
        value = value.masked_fill(over, -math.inf)
    return value.argmax(1)


def spend(correct_prob: torch.Tensor, costs: torch.Tensor, prices: torch.Tensor = PRICES) -> torch.Tensor:
    """(len(prices),) the blocks' share each image spends at each price, summed over the images."""
    costs = costs.to(correct_prob)
    value = correct_prob.unsqueeze(0) - prices.to(correct_prob)[:, None, None] * costs[None, None, :]
    return costs[value.argmax(2)].double().sum(1)


def price_of(target: torch.Tensor, mean_spend: torch.Tensor, prices: torch.Tensor = PRICES) -> torch.Tensor:
    """The price at which the mean blocks' share spent is `target` (per image, a share), interpolated in
    a table of `mean_spend` at `prices` (non-increasing: a higher price never buys more)."""
    target = target.to(mean_spend.dtype)
    spent = mean_spend.to(target.device)
    prices = prices.to(target.device, mean_spend.dtype)
    within = spent.unsqueeze(0) <= target.unsqueeze(1) + TOLERANCE  # (N, G): prices at which the target holds
    j = torch.where(within.any(1), within.float().argmax(1), torch.full_like(target, len(prices) - 1, dtype=torch.long))
    before = (j - 1).clamp(min=0)
    gap = (spent[before] - spent[j]).clamp(min=1e-12)
    t = ((spent[before] - target) / gap).clamp(0, 1)
    price = prices[before] + t * (prices[j] - prices[before])
    return torch.where(j == 0, prices[0].expand_as(price), price)


def depths(correct_prob: torch.Tensor, costs: torch.Tensor, base: float, mean_spend: torch.Tensor,
           budget: torch.Tensor, cap: torch.Tensor | None = None) -> torch.Tensor:
    """Each image's depth under its mean `budget` (a share of the full ResNet's FLOPs) and optional per-image
    `cap` (a share too: its own price is the cap's as a mean target, and no image's cost passes it)."""
    n = len(correct_prob)
    budget = torch.as_tensor(budget, dtype=torch.float64, device=correct_prob.device).expand(n)
    if cap is not None:
        cap = torch.as_tensor(cap, dtype=torch.float64, device=correct_prob.device).expand(n)
        budget = torch.minimum(budget, cap)
    price = price_of(budget - base, mean_spend)
    return choose(correct_prob, costs, price, None if cap is None else cap - base)


def draw_budgets(n: int, budget_range: tuple[float, float], sampling: str = "uniform",
                 device: torch.device | None = None) -> torch.Tensor:
    """Training's mean budgets for `n` images drawn from `budget_range`: "uniform", "log" (log-uniform: as
    much training per factor of speedup) or "sandwich" (uniform, then each image again at the range's low
    end: 2n budgets, the cheapest configuration trained at every step, as slimmable networks' sandwich
    rule does for their smallest width)."""
    low, high = budget_range
    draw = torch.rand(n, device=device, dtype=torch.float64)
    if sampling == "log":
        return low * (high / low) ** draw
    budgets = low + (high - low) * draw
    return torch.cat([budgets, torch.full_like(budgets, low)]) if sampling == "sandwich" else budgets


def batch_depths(correct_prob: torch.Tensor, costs: torch.Tensor, base: float, budget: torch.Tensor) -> torch.Tensor:
    """Training: each image's depth under its mean `budget`, priced on its batch's own spending table (the
    policy's table is measured after training)."""
    mean = spend(correct_prob, costs) / max(len(correct_prob), 1)
    return choose(correct_prob, costs, price_of(budget.double() - base, mean))


def cap_rows(policies: torch.Tensor, values: torch.Tensor, block_flops: torch.Tensor, allowance: torch.Tensor
             ) -> torch.Tensor:
    """A per-image cap on any policy: of each image's chosen blocks, keep those it values most (`values`,
    per image and block) while their FLOPs stay within its `allowance`; (N, K) 0/1 in and out."""
    chosen = policies > 0
    ranked = torch.where(chosen, values.to(torch.float64), torch.full_like(values, -math.inf, dtype=torch.float64))
    order = ranked.argsort(1, descending=True)
    flops = block_flops.to(device=policies.device, dtype=torch.float64).expand_as(ranked)
    cumulative = torch.where(chosen, flops, torch.zeros_like(flops)).gather(1, order).cumsum(1)
    fits = cumulative <= allowance.to(torch.float64).unsqueeze(1) * (1 + TOLERANCE)
    keep = torch.zeros_like(chosen).scatter(1, order, fits) & chosen
    return keep.to(policies.dtype)
