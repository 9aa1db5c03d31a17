"""After training: does the learned policy beat image-blind policies at equal FLOPs, and what does
it do per image? The comparison table and the policy pictures of a model on a test set.

`analyse` runs the learned policy once over the test set (keeping every image's outcome for the
pictures), finds the greedy static policy on a slice of the training images, and evaluates each
baseline of blockdrop.baselines at the block counts that bracket the learned policy's FLOPs.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from blockdrop import baselines as B
from blockdrop.evaluate import Report, tally
from blockdrop.flops import CostModel
from blockdrop.models.resnet import FlatResNet, PolicyNet

HOLDOUT_IMAGES = 500  # training images the greedy static policy is chosen on (at most)
TIE = 0.002  # accuracy differences below 0.2 points, or below 2 test images, count as a tie


def holdout(train_unaugmented: Dataset, limit: int = HOLDOUT_IMAGES) -> Dataset:
    """A fixed, evenly spread slice of the training images (seen without augmentation)."""
    step = max(1, len(train_unaugmented) // limit)
    return Subset(train_unaugmented, range(0, len(train_unaugmented), step)[:limit])


def baseline_curve(name: str, backbone: FlatResNet, loader: DataLoader, costs: CostModel, device: torch.device,
                   keeps: list[int], order: list[int] | None = None) -> list[B.CurvePoint]:
    """Accuracy and FLOPs of baseline `name` at each block count in `keeps` (RandomK: mean of draws)."""
    points = []
    for keep in keeps:
        seeds = range(B.RANDOM_SEEDS) if name == "randomk" else [0]
        reports = [tally(backbone, B.chooser(name, keep, backbone, order, seed), loader, costs, device).report(costs.full)
                   for seed in seeds]
        points.append(B.CurvePoint(keep, sum(r.accuracy for r in reports) / len(reports),
                                   sum(r.flops_mean for r in reports) / len(reports)))
    return points


@dataclass
class Comparison:
    """The learned policy against each baseline at the learned policy's mean FLOPs."""

    learned: Report
    at_equal_flops: dict[str, float]  # baseline -> accuracy at the learned FLOPs
    curves: dict[str, list[B.CurvePoint]] = field(default_factory=dict)
    greedy_order: list[int] = field(default_factory=list)

    @property
    def best_baseline(self) -> str:
        return max(self.at_equal_flops, key=self.at_equal_flops.get)

    @property
    def gain(self) -> float:
        """Accuracy of the learned policy minus the best baseline's, at equal FLOPs."""
        return self.learned.accuracy - self.at_equal_flops[self.best_baseline]

    @property
    def tie(self) -> float:
        return max(TIE, 2 / self.learned.images)

    def verdict(self) -> str:
        best, gain, tie = LABELS[self.best_baseline], self.gain, self.tie
        if self.learned.unique_policies == 1:
            return (f"The learned policy gives every image the same blocks: it is a static policy, and "
                    f"{'beats' if gain > tie else 'does not beat'} the best image-blind one ({best}) by "
                    f"{100 * gain:+.1f} points.")
        if gain > tie:
            return f"Per-image policies pay here: {100 * gain:+.1f} points over the best image-blind policy ({best})."
        if gain >= -tie:
            return (f"A static policy is as good on this data: the best image-blind policy ({best}) is within "
                    f"{100 * abs(gain):.1f} points of the learned one at the same FLOPs.")
        return (f"A static policy is better on this data: the best image-blind policy ({best}) is "
                f"{100 * -gain:.1f} points more accurate at the same FLOPs.")

    def text(self) -> str:
        r = self.learned
        lines = [f"At the learned policy's FLOPs ({r.flops_mean:.2E}/img, {r.blocks_mean:.2f} blocks, "
                 f"{r.unique_policies} unique policies):",
                 f"  {'learned policy':<22} {100 * r.accuracy:6.2f}%"]
        for name, accuracy in sorted(self.at_equal_flops.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {LABELS[name]:<22} {100 * accuracy:6.2f}%  ({100 * (r.accuracy - accuracy):+.2f})")
        lines.append(self.verdict())
        return "\n".join(lines)

    def metrics(self) -> dict[str, float]:
        out = {f"baseline_{name}_accuracy": a for name, a in self.at_equal_flops.items()}
        return out | {"gain_over_static": self.gain}

    @classmethod
    def from_json(cls, data: dict) -> Comparison:
        return cls(Report(**data["learned"]), data["at_equal_flops"],
                   {n: [B.CurvePoint(**p) for p in c] for n, c in data["curves"].items()}, data["greedy_order"])

    def to_json(self) -> dict:
        return {"learned": asdict(self.learned), "at_equal_flops": self.at_equal_flops, "best_baseline": self.best_baseline,
                "gain_over_static": self.gain, "verdict": self.verdict(), "greedy_order": self.greedy_order,
                "curves": {n: [asdict(p) for p in c] for n, c in self.curves.items()}}


LABELS = {"firstk": "FirstK", "randomk": "RandomK", "distributek": "DistributeK", "greedy": "greedy static"}


def compare(backbone: FlatResNet, policy: PolicyNet, test: Dataset, train_unaugmented: Dataset, costs: CostModel,
            device: torch.device, batch_size: int = 256, records: bool = True):
    """The comparison, and (with `records`) the tally of the learned policy with per-image records."""
    loader = DataLoader(test, batch_size=batch_size)
    learned = tally(backbone, policy, loader, costs, device, records=records)
    report = learned.report(costs.full)
    keeps = B.keeps_around(costs, report.flops_mean)
    order = B.greedy_order(backbone, DataLoader(holdout(train_unaugmented), batch_size=batch_size), device,
                           drops=backbone.num_blocks - min(keeps))
    curves = {name: baseline_curve(name, backbone, loader, costs, device, keeps, order) for name in B.BASELINES}
    at = {name: B.accuracy_at(curve, report.flops_mean) for name, curve in curves.items()}
    return Comparison(report, at, curves, order), learned


def write(comparison: Comparison, folder: str | Path) -> Path:
    path = Path(folder) / "baselines.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(comparison.to_json(), indent=2))
    return path


def class_names(dataset: Dataset) -> list[str]:
    """The dataset's class names (an ImageFolder's folders, CIFAR's labels), else the class indices."""
    while isinstance(dataset, Subset) and not hasattr(dataset, "classes"):
        dataset = dataset.dataset
    return list(getattr(dataset, "classes", [])) or [str(i) for i in range(1000)]


def analyse(preset, backbone: FlatResNet, policy: PolicyNet, dataset: str | None, data_dir: str | None,
            device: torch.device, folder: str | Path) -> Comparison:
    """The comparison with the baselines (baselines.json) and the policy pictures, into `folder`."""
    from blockdrop.data import load_dataset
    from blockdrop.flops import cost_model
    from blockdrop.pictures import draw_all

    test = load_dataset(preset, "test", dataset, data_dir, download=False)
    train = load_dataset(preset, "train", dataset, data_dir, download=False, augment=False)
    comparison, learned = compare(backbone.to(device), policy.to(device), test, train, cost_model(preset), device)
    write(comparison, folder)
    stages = [stage for stage, _ in preset.backbone.block_index]
    draw_all(learned.records(), test, preset.mean, preset.std, stages, class_names(test), folder)
    return comparison


def curves(preset, backbone: FlatResNet, dataset: str | None, data_dir: str | None, device: torch.device,
           points: int = 12) -> dict[str, list[B.CurvePoint]]:
    """Every baseline over about `points` block counts from 0 to K: the curves a sweep plots."""
    from blockdrop.data import load_dataset
    from blockdrop.flops import cost_model

    test = load_dataset(preset, "test", dataset, data_dir, download=False)
    train = load_dataset(preset, "train", dataset, data_dir, download=False, augment=False)
    backbone = backbone.to(device)
    order = B.greedy_order(backbone, DataLoader(holdout(train), batch_size=256), device)
    loader = DataLoader(test, batch_size=256)
    keeps = B.keep_grid(preset.num_blocks, points)
    return {name: baseline_curve(name, backbone, loader, cost_model(preset), device, keeps, order)
            for name in B.BASELINES}
