"""What an evaluation accumulates, and the evaluation itself: `tally` runs a model over a loader
through blockdrop.inference.predict and counts accuracy, blocks, FLOPs and unique policies, in
pieces that merge exactly across batches and workers; `Report` is the paper's report of it.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from blockdrop.budget import ceiling
from blockdrop.errors import UserError
from blockdrop.flops import CostModel
from blockdrop.inference import Policy, predict
from blockdrop.models.resnet import FlatResNet


@dataclass
class Moments:
    """Count, mean and sum of squared deviations; merges exactly across batches and workers (Chan)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, values: torch.Tensor) -> None:
        values = values.double()
        n = len(values)
        if n:
            self.merge(Moments(n, values.mean().item(), ((values - values.mean()) ** 2).sum().item()))

    def merge(self, other: Moments) -> None:
        if other.n == 0:
            return
        total = self.n + other.n
        delta = other.mean - self.mean
        self.mean += delta * other.n / total
        self.m2 += other.m2 + delta * delta * self.n * other.n / total
        self.n = total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.m2, 0.0) / self.n) if self.n else 0.0


@dataclass
class Records:
    """Each image's outcome, in the loader's order: what the policy pictures are drawn from."""

    policies: np.ndarray  # (N, K) bool
    labels: np.ndarray  # (N,)
    predictions: np.ndarray  # (N,)

    @property
    def correct(self) -> np.ndarray:
        return self.labels == self.predictions

    @property
    def blocks(self) -> np.ndarray:
        return self.policies.sum(1)


@dataclass
class Tally:
    """What an evaluation accumulates; tallies of shards merge into the tally of the whole set.
    With `records` on it also keeps every image's policy, label and prediction."""

    correct: int = 0
    full_correct: int = 0
    blocks: Moments = field(default_factory=Moments)
    flops: Moments = field(default_factory=Moments)
    policies: set[bytes] = field(default_factory=set)
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
    flops_max: float = 0.0  # the costliest image's FLOPs (a per-image cap holds when it is within the cap)

    def add(self, correct: torch.Tensor, full_correct: torch.Tensor, actions: torch.Tensor,
            flops: torch.Tensor, labels: torch.Tensor | None = None, predictions: torch.Tensor | None = None) -> None:
        self.correct += int(correct.sum())
        self.full_correct += int(full_correct.sum())
        self.blocks.add(actions.sum(1))
        self.flops.add(flops)
        if len(flops):
            self.flops_max = max(self.flops_max, float(flops.max()))
        bits = actions.bool().cpu().numpy()
        self.policies.update(row.tobytes() for row in np.packbits(bits, axis=1))
        if self.rows is not None and labels is not None:
            self.rows.append((bits, labels.cpu().numpy(), predictions.cpu().numpy()))

    def merge(self, other: Tally) -> None:
        self.correct += other.correct
        self.full_correct += other.full_correct
        self.blocks.merge(other.blocks)
        self.flops.merge(other.flops)
        self.flops_max = max(self.flops_max, other.flops_max)
        self.policies |= other.policies
        if self.rows is not None and other.rows is not None:
            self.rows += other.rows

    def records(self) -> Records:
        if not self.rows:
            raise ValueError("this tally kept no per-image records (tally(..., records=True))")
        policies, labels, predictions = (np.concatenate(part) for part in zip(*self.rows))
        return Records(policies, labels, predictions)

    def report(self, full_flops: int) -> Report:
        n = self.blocks.n
        if n == 0:
            raise UserError("the evaluation set is empty")
        return Report(
            images=n, accuracy=self.correct / n, blocks_mean=self.blocks.mean, blocks_std=self.blocks.std,
            flops_mean=self.flops.mean, flops_std=self.flops.std, unique_policies=len(self.policies),
            full_accuracy=self.full_correct / n, full_flops=full_flops, speedup=full_flops / self.flops.mean,
        )


@dataclass
class Report:
    images: int
    accuracy: float
    blocks_mean: float
    blocks_std: float
    flops_mean: float
    flops_std: float
    unique_policies: int
    full_accuracy: float
    full_flops: int
    speedup: float  # full_flops / flops_mean
    # the ResNet the user started from (a job's --init, or its pretrain stage), run in full on the same
    # images: what BlockDrop is measured against. `full_accuracy` is this checkpoint's own ResNet in full.
    reference_accuracy: float | None = None
    reference: str = ""  # where that ResNet came from
    # the same model on the validation split (carved from the training images): what choices are made on
    val_accuracy: float | None = None
    val_flops: float | None = None

    def text(self) -> str:
        lines = [
            f"Accuracy: {self.accuracy:.3f}",
            f"Block Usage: {self.blocks_mean:.3f} +- {self.blocks_std:.3f}",
            f"FLOPs/img: {self.flops_mean:.2E} +- {self.flops_std:.2E}",
            f"Unique Policies: {self.unique_policies}",
            f"This checkpoint's ResNet, all blocks: accuracy {self.full_accuracy:.3f}, FLOPs/img {self.full_flops:.2E}",
            f"FLOPs speedup: {self.speedup:.2f}x  ({self.images} images)",
        ]
        if self.val_accuracy is not None:
            lines.append(f"Validation split (held out of training; what choices are made on): accuracy "
                         f"{self.val_accuracy:.3f}, FLOPs/img {self.val_flops:.2E}")
        if self.reference_accuracy is not None:
            lines.append(f"Your ResNet ({self.reference or 'the reference'}), all blocks: accuracy "
                         f"{self.reference_accuracy:.3f}; this model {100 * (self.accuracy - self.reference_accuracy):+.1f} "
                         "points against it")
        return "\n".join(lines)


def final_report(meta: dict, full_flops: int) -> Report:
    """The report of a stage's last epoch from its checkpoint's metadata, as its workers computed it over
    the whole test set: no second evaluation pass on the driver."""
    m, reference = meta["metrics"], meta.get("reference") or {}
    return Report(images=int(m["test_images"]), accuracy=m["test_accuracy"], blocks_mean=m["blocks_used"],
                  blocks_std=m["blocks_used_std"], flops_mean=m["flops_per_image"],
                  flops_std=m["flops_per_image_std"], unique_policies=int(m["unique_policies"]),
                  full_accuracy=m["full_accuracy"], full_flops=full_flops, speedup=m["speedup"],
                  reference_accuracy=reference.get("accuracy"), reference=reference.get("source", ""),
                  val_accuracy=m.get("val_accuracy"), val_flops=m.get("val_flops_per_image"))


def tally(backbone: FlatResNet, policy: Policy, loader: Iterable, costs: CostModel, device: torch.device,
          progress: bool = False, decided: torch.Tensor | None = None, records: bool = False,
          budget: float | None = None, cap: float | None = None) -> Tally:
    """The policy with sparse execution, and the full model, over `loader` (one shard or all).

    `policy`: as blockdrop.inference.predict takes it (a policy network, an image-blind function, or
    None: the full model). `decided` (a K-vector of 0/1) forces the other blocks on, as during the
    curriculum stage. `records` keeps every image's outcome. `budget`, `cap`: a mean target, a per-image
    cap (blockdrop.budget).
    """
    return tallies(backbone, policy, loader, costs, device, [(budget, cap)], progress, decided, records)[0]


def tallies(backbone: FlatResNet, policy: Policy, loader: Iterable, costs: CostModel, device: torch.device,
            budgets: list[tuple[float | None, float | None]], progress: bool = False,
            decided: torch.Tensor | None = None, records: bool = False) -> list[Tally]:
    """`tally` at each (mean budget, cap) of `budgets`, in one pass over `loader` (the full model run once)."""
    backbone.eval()
    if isinstance(policy, torch.nn.Module):
        policy.eval()
    results = [Tally(rows=[] if records else None) for _ in budgets]
    channels_last = backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    for images, labels in tqdm(loader, desc="evaluate", unit="batch", disable=None if progress else True,
                               file=sys.stderr):
        images, labels = images.to(device, memory_format=layout), labels.to(device)
        full = predict(backbone, None, images, costs)
        for result, (budget, cap) in zip(results, budgets):
            out = full if policy is None else predict(backbone, policy, images, costs, decided, budget, cap)
            predictions = out.classes
            result.add(predictions == labels, full.classes == labels, out.policies, out.flops, labels, predictions)
    return results


@dataclass
class BudgetPoint:
    """A budget model at one budget: what was asked (a share of the full ResNet's FLOPs; `kind` "mean" or
    "cap"), the report there, and how the achieved cost tracks the ask."""

    budget: float
    kind: str
    report: Report
    flops_max: float
    ceiling: float = math.inf  # the mean share the model spends when blocks are free (budget.ceiling)

    @property
    def spent(self) -> float:
        """The mean share of the full ResNet's FLOPs spent."""
        return self.report.flops_mean / self.report.full_flops

    @property
    def gap(self) -> float:
        """Mean target: |mean spent - asked| where it binds (below the ceiling; above it, only overspending
        counts); cap: how far the costliest image passes it (0 when it holds)."""
        if self.kind == "mean":
            return abs(self.spent - self.budget) if self.budget < self.ceiling else max(self.spent - self.budget, 0.0)
        return max(self.flops_max / self.report.full_flops - self.budget, 0.0)

    def to_json(self) -> dict:
        return {"budget": self.budget, "kind": self.kind, "spent": self.spent, "gap": self.gap,
                "flops_max": self.flops_max, "ceiling": self.ceiling if math.isfinite(self.ceiling) else None,
                **asdict(self.report)}

    def line(self) -> str:
        r = self.report
        asked = f"{'mean' if self.kind == 'mean' else 'cap '} {self.budget:.2f}"
        if self.kind == "mean" and self.budget >= self.ceiling:
            asked += " (above what it spends when blocks are free)"
        return (f"{asked}  spent {self.spent:.3f} (max {self.flops_max / r.full_flops:.3f})  accuracy {r.accuracy:.3f}  "
                f"blocks {r.blocks_mean:.2f} +- {r.blocks_std:.2f}  FLOPs {r.flops_mean:.2E} ({r.speedup:.2f}x)  "
                f"{r.unique_policies} policies")


def budget_curve(backbone: FlatResNet, policy: Policy, loader: Iterable, costs: CostModel, device: torch.device,
                 budgets: list[float], kind: str = "mean", progress: bool = False) -> list[BudgetPoint]:
    """A budget model's front: its report at each budget (mean targets, or per-image caps)."""
    asks = [(b, None) if kind == "mean" else (None, b) for b in budgets]
    found = tallies(backbone, policy, loader, costs, device, asks, progress)
    most = ceiling(float(policy.base), policy.spend) if hasattr(policy, "spend") else math.inf
    return [BudgetPoint(b, kind, t.report(costs.full), t.flops_max, most) for b, t in zip(budgets, found)]


def curve_gap(points: list[BudgetPoint]) -> float:
    """The mean absolute gap between the cost asked and the cost achieved over a curve."""
    return sum(p.gap for p in points) / max(len(points), 1)


def evaluate(backbone: FlatResNet, policy: Policy, loader: Iterable, costs: CostModel, device: torch.device,
             progress: bool = True) -> Report:
    """The report over the whole of `loader`."""
    return tally(backbone, policy, loader, costs, device, progress).report(costs.full)
