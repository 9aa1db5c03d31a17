"""After training: does the learned policy beat image-blind policies at equal FLOPs, and what does
it do per image? The comparison table and the policy pictures of a model on a test set.

`analyse` runs the learned policy once over the test set (keeping every image's outcome for the
pictures), finds the greedy static policy on a slice of the training images, and evaluates each
baseline of blockdrop.baselines at the block counts that bracket the learned policy's FLOPs.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from blockdrop import baselines as B
from blockdrop.choices import CHANNELS, PRUNED, SHUFFLED
from blockdrop.data import difficulties, load_dataset
from blockdrop.flops import CostModel, cost_model
from blockdrop.inference import predict
from blockdrop.metrics import Report, tally
from blockdrop.models.resnet import FlatResNet, PolicyNet
from blockdrop.pictures import draw_all
from blockdrop.prune import static_chooser, static_flops
from blockdrop.stats import CONFIDENCE, PairedDifference, paired_difference

HOLDOUT_IMAGES = 500  # training images the greedy static policy is chosen on (at most)


def holdout(train_unaugmented: Dataset, limit: int = HOLDOUT_IMAGES) -> Dataset:
    """A fixed, evenly spread slice of the training images (seen without augmentation)."""
    step = max(1, len(train_unaugmented) // limit)
    return Subset(train_unaugmented, range(0, len(train_unaugmented), step)[:limit])


@dataclass
class Curve:
    """A competitor's points (block count, accuracy, FLOPs) and, per point, each test image's score
    (1 right, 0 wrong; RandomK: the share of its draws that were right)."""

    points: list[B.CurvePoint]
    scores: list[np.ndarray]
    names: list[str] | None = None  # how each point is named where it is read off (default "K=<keep>")

    def at(self, flops: float) -> tuple[np.ndarray, str]:
        """Each image's score at `flops`, read off the curve as `B.accuracy_at` reads its accuracy (running
        the cheaper policy on a share of the images, the dearer one on the rest), and where on the curve."""
        order = sorted(range(len(self.points)), key=lambda i: self.points[i].flops)
        points = [self.points[i] for i in order]
        scores = [self.scores[i] for i in order]
        names = [self.names[i] if self.names else f"K={self.points[i].keep}" for i in order]
        if flops <= points[0].flops:
            return scores[0], names[0]
        for i, (lo, hi) in enumerate(zip(points, points[1:])):
            if flops <= hi.flops:
                t = (flops - lo.flops) / (hi.flops - lo.flops) if hi.flops > lo.flops else 1.0
                return (1 - t) * scores[i] + t * scores[i + 1], f"{names[i]}..{names[i + 1].removeprefix('K=')}"
        return scores[-1], names[-1]


def baseline_curve(name: str, backbone: FlatResNet, loader: DataLoader, costs: CostModel, device: torch.device,
                   keeps: list[int], order: list[int] | None = None) -> Curve:
    """Accuracy, FLOPs and per-image scores of baseline `name` at each block count in `keeps` (RandomK: the
    mean of its draws)."""
    points, scores = [], []
    for keep in keeps:
        seeds = range(B.RANDOM_SEEDS) if name == "randomk" else [0]
        tallies = [tally(backbone, B.chooser(name, keep, backbone, order, seed), loader, costs, device, records=True)
                   for seed in seeds]
        reports = [t.report(costs.full) for t in tallies]
        points.append(B.CurvePoint(keep, sum(r.accuracy for r in reports) / len(reports),
                                   sum(r.flops_mean for r in reports) / len(reports)))
        scores.append(np.mean([t.records().correct for t in tallies], axis=0))
    return Curve(points, scores)


def pruned_curve(models: list[tuple[int, FlatResNet, torch.Tensor]], test: Dataset, preset,
                 device: torch.device, batch_size: int = 256) -> Curve:
    """A pruned competitor's curve on `test`: for each (K, finetuned ResNet, its 0/1 row), the accuracy,
    FLOPs and each image's outcome. Channel-pruned ResNets (every block, narrower) are named by their share of
    the FLOPs, block-pruned ones by K."""
    loader = DataLoader(test, batch_size=batch_size)
    points, scores, names = [], [], []
    for keep, backbone, row in sorted(models, key=lambda m: (m[0], cost_model(preset, None, m[1]).backbone.total)):
        costs = cost_model(preset, None, backbone)
        result = tally(backbone.to(device), static_chooser(row), loader, costs, device, records=True)
        report = result.report(costs.full)
        points.append(B.CurvePoint(keep, report.accuracy, report.flops_mean))
        scores.append(result.records().correct.astype(np.float64))
        names.append(f"{report.flops_mean / costs.full:.2f} of the FLOPs" if backbone.spec.mids else f"K={keep}")
    return Curve(points, scores, names)


def competitor_curves(models: list[tuple[int, FlatResNet, torch.Tensor]], test: Dataset, preset,
                      device: torch.device, batch_size: int = 256) -> dict[str, Curve]:
    """The pruned competitors' curves on `test`, by kind: block-pruned ResNets (PRUNED) and channel-pruned
    ones (CHANNELS), each where some were trained."""
    kinds = {PRUNED: [m for m in models if m[1].spec.mids is None], CHANNELS: [m for m in models if m[1].spec.mids]}
    return {name: pruned_curve(found, test, preset, device, batch_size) for name, found in kinds.items() if found}


class Shuffled:
    """The shuffled-policy control: each image runs the blocks the learned policy chose for another image of
    the same set (a fixed permutation), so the FLOPs and the histogram of policies are the learned policy's
    but the choice ignores the image. What routing per image buys is the learned policy minus this."""

    def __init__(self, policies: np.ndarray, seed: int = 0):
        order = np.random.default_rng(seed).permutation(len(policies))
        self.rows = torch.as_tensor(policies[order], dtype=torch.float32)
        self.next = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        rows = self.rows[self.next:self.next + len(images)].to(images.device)
        self.next += len(images)
        return rows


@dataclass(frozen=True)
class Versus:
    """The learned policy against one competitor at the learned policy's mean FLOPs."""

    accuracy: float  # the competitor's, at those FLOPs
    interval: PairedDifference  # learned minus competitor, per image, with its interval
    where: str = ""  # the competitor's block counts read off ("K=5..6")


@dataclass(frozen=True)
class Group:
    """Blocks and accuracy of the learned policy on the test images of one difficulty."""

    images: int
    blocks: float
    accuracy: float


@dataclass
class Comparison:
    """The learned policy against each competitor at the learned policy's mean FLOPs: the image-blind
    policies on its own ResNet, prune-and-finetune where it was trained, each with a paired interval."""

    learned: Report
    versus: dict[str, Versus]
    curves: dict[str, list[B.CurvePoint]] = field(default_factory=dict)
    greedy_order: list[int] = field(default_factory=list)
    groups: dict[str, Group] = field(default_factory=dict)  # "easy", "hard": where the data says which
    # wall-clock milliseconds per image ("learned", and each trained competitor's model nearest its FLOPs):
    # blockdrop.analysis.ms_per_image, on the device the analysis ran on
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def at_equal_flops(self) -> dict[str, float]:
        return {name: v.accuracy for name, v in self.versus.items()}

    @property
    def best_baseline(self) -> str:
        """The strongest competitor at the learned policy's FLOPs."""
        return max(self.versus, key=lambda name: self.versus[name].accuracy)

    @property
    def best_static(self) -> str:
        """The strongest image-blind policy on the learned policy's own ResNet."""
        return max((n for n in self.versus if n not in TRAINED), key=lambda name: self.versus[name].accuracy)

    @property
    def gain(self) -> float:
        """Accuracy of the learned policy minus the strongest competitor's, at equal FLOPs."""
        return self.versus[self.best_baseline].interval.difference

    def verdict(self) -> str:
        best = self.best_baseline
        label, interval = LABELS[best], self.versus[best].interval
        if self.learned.unique_policies == 1:
            return (f"The learned policy gives every image the same blocks: it is a static policy, "
                    f"{interval.text()} against the strongest competitor ({label}).")
        if interval.verdict == "better":
            return (f"Per-image policies pay here: {interval.text()} over the strongest competitor ({label}) at "
                    "equal FLOPs.")
        serve = (f" The simpler model to serve is the pruned ResNet ({label}): a dense network, no policy to run; "
                 "its checkpoint and MLflow model are kept beside the job's." if best in TRAINED else "")
        if interval.verdict == "tie":
            return (f"A static policy is as good on this data: against the strongest competitor ({label}) the "
                    f"learned policy is {interval.text()} at equal FLOPs, an interval that holds 0.{serve}")
        return (f"A static policy is better on this data: {label} is {100 * -interval.difference:.2f} points more "
                f"accurate at the same FLOPs ({interval.text()}).{serve}")

    def text(self) -> str:
        r = self.learned
        lines = [f"At the learned policy's FLOPs ({r.flops_mean:.2E}/img, {r.blocks_mean:.2f} +- {r.blocks_std:.2f} "
                 f"blocks, {r.unique_policies} unique policies), learned minus competitor per image, "
                 f"{100 * CONFIDENCE:.0f}% paired bootstrap interval:",
                 f"  {'learned policy':<24} {100 * r.accuracy:6.2f}%"]
        for name, v in sorted(self.versus.items(), key=lambda kv: -kv[1].accuracy):
            lines.append(f"  {LABELS[name]:<24} {100 * v.accuracy:6.2f}%  {v.interval.text()}  ({v.where})")
        if self.timing:
            lines.append("Wall-clock per image (a batch of the test images, sparse execution, on this analysis's "
                         "device): " + ", ".join(f"{'learned policy' if n == 'learned' else LABELS[n]} {ms:.3f} ms"
                                                 for n, ms in self.timing.items()))
        if self.groups:
            lines.append("Per difficulty: " + "; ".join(f"{name} images {g.blocks:.2f} blocks, {100 * g.accuracy:.1f}% "
                                                       f"({g.images})" for name, g in self.groups.items()))
        lines.append(self.verdict())
        return "\n".join(lines)

    def metrics(self) -> dict[str, float]:
        out = {f"baseline_{name}_accuracy": v.accuracy for name, v in self.versus.items()}
        static = self.versus[self.best_static].interval
        out |= {"gain_over_static": static.difference, "gain_over_static_low": static.low,
                "gain_over_static_high": static.high}
        for name, key in GAINS.items():
            if name in self.versus:
                interval = self.versus[name].interval
                out |= {key: interval.difference, f"{key}_low": interval.low, f"{key}_high": interval.high}
        for name, g in self.groups.items():
            out |= {f"blocks_{name}": g.blocks, f"accuracy_{name}": g.accuracy}
        return out | {f"ms_per_image_{name}": ms for name, ms in self.timing.items()}

    @classmethod
    def from_json(cls, data: dict) -> Comparison:
        versus = {n: Versus(v["accuracy"], PairedDifference(**v["interval"]), v["where"]) for n, v in data["versus"].items()}
        return cls(Report(**data["learned"]), versus,
                   {n: [B.CurvePoint(**p) for p in c] for n, c in data["curves"].items()}, data["greedy_order"],
                   {n: Group(**g) for n, g in data.get("groups", {}).items()}, data.get("timing", {}))

    def to_json(self) -> dict:
        return {"learned": asdict(self.learned), "versus": {n: asdict(v) for n, v in self.versus.items()},
                "at_equal_flops": self.at_equal_flops, "best_baseline": self.best_baseline,
                "gain_over_static": self.versus[self.best_static].interval.difference, "verdict": self.verdict(),
                "greedy_order": self.greedy_order, "groups": {n: asdict(g) for n, g in self.groups.items()},
                "timing": self.timing,
                "curves": {n: [asdict(p) for p in c] for n, c in self.curves.items()}}


LABELS = {"firstk": "FirstK", "randomk": "RandomK", "distributek": "DistributeK", "greedy": "greedy static",
          SHUFFLED: "shuffled policies", PRUNED: "prune and finetune", CHANNELS: "channel pruning"}
# the competitors that are other models (trained beside the policy), not image-blind policies on its ResNet
TRAINED = (PRUNED, CHANNELS)
# the metrics each competitor's interval is logged as (gain_over_*, *_low, *_high)
GAINS = {PRUNED: "gain_over_pruning", CHANNELS: "gain_over_channel_pruning", SHUFFLED: "gain_over_shuffled"}


def versus(learned: np.ndarray, curve: Curve, flops: float) -> Versus:
    scores, where = curve.at(flops)
    return Versus(float(scores.mean()), paired_difference(learned, scores), where)


def difficulty_groups(records, hard: np.ndarray | None) -> dict[str, Group]:
    """Blocks and accuracy of easy and hard images, when the test set records which is which."""
    if hard is None or len(hard) != len(records.labels):
        return {}
    groups = {}
    for name, members in (("easy", ~hard), ("hard", hard)):
        if members.any():
            groups[name] = Group(int(members.sum()), float(records.blocks[members].mean()),
                                 float(records.correct[members].mean()))
    return groups


def shuffled_scores(backbone: FlatResNet, learned, loader: DataLoader, costs: CostModel,
                    device: torch.device) -> np.ndarray:
    """Each image's outcome under the shuffled-policy control of the learned policy (its tally with records,
    over `loader` in order)."""
    control = tally(backbone, Shuffled(learned.records().policies), loader, costs, device, records=True)
    return control.records().correct.astype(np.float64)


def shuffled_versus(backbone: FlatResNet, learned, loader: DataLoader, costs: CostModel,
                    device: torch.device) -> Versus:
    """The learned policy against the shuffled-policy control."""
    scores = shuffled_scores(backbone, learned, loader, costs, device)
    return Versus(float(scores.mean()), paired_difference(learned.records().correct.astype(np.float64), scores),
                  "the same policies, shuffled across images")


def compare(backbone: FlatResNet, policy: PolicyNet, test: Dataset, train_unaugmented: Dataset, costs: CostModel,
            device: torch.device, batch_size: int = 256, records: bool = True, pruned: dict[str, Curve] | None = None):
    """The comparison, and the tally of the learned policy (with per-image records when `records`).
    `pruned`: the trained competitors' curves on the same test images (competitor_curves: prune-and-finetune,
    channel pruning)."""
    loader = DataLoader(test, batch_size=batch_size)
    learned = tally(backbone, policy, loader, costs, device, records=True)
    report = learned.report(costs.full)
    keeps = B.keeps_around(costs, report.flops_mean)
    order = B.greedy_order(backbone, DataLoader(holdout(train_unaugmented), batch_size=batch_size), device,
                           drops=backbone.num_blocks - min(keeps))
    curves = {name: baseline_curve(name, backbone, loader, costs, device, keeps, order) for name in B.BASELINES}
    curves |= pruned or {}
    correct = learned.records().correct.astype(np.float64)
    against = {name: versus(correct, curve, report.flops_mean) for name, curve in curves.items()}
    against[SHUFFLED] = shuffled_versus(backbone, learned, loader, costs, device)
    comparison = Comparison(report, against, {name: curve.points for name, curve in curves.items()}, order,
                            difficulty_groups(learned.records(), difficulties(test)))
    if not records:
        learned.rows = None
    return comparison, learned


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
            device: torch.device, folder: str | Path, pruned: list | None = None) -> Comparison:
    """The comparison with the baselines (baselines.json) and the policy pictures, into `folder`.
    `pruned`: prune-and-finetune models, (K, finetuned ResNet, 0/1 row) each."""
    test = load_dataset(preset, "test", dataset, data_dir, download=False)
    train = load_dataset(preset, "train", dataset, data_dir, download=False, augment=False)
    costs = cost_model(preset, policy, backbone)
    curve = competitor_curves(pruned, test, preset, device) if pruned else None
    # channels_last, as the workers evaluate: the same layout gives the same logits, to the last image
    layout = {"memory_format": torch.channels_last}
    comparison, learned = compare(backbone.to(device, **layout), policy.to(device, **layout), test, train, costs, device,
                                  pruned=curve)
    comparison.timing = timing(preset, backbone, policy, pruned or [], test, comparison.learned.flops_mean, device)
    write(comparison, folder)
    stages = [stage for stage, _ in preset.backbone.block_index]
    draw_all(learned.records(), test, preset.mean, preset.std, stages, class_names(test), folder)
    return comparison


TIMED_IMAGES = 256  # the batch of test images wall-clock time is measured on
TIMED_REPEATS = 3  # its best of this many passes (after one to warm up)


def ms_per_image(backbone: FlatResNet, policy, images: torch.Tensor, costs: CostModel, device: torch.device) -> float:
    """Wall-clock milliseconds per image of predicting `images` (one batch, sparse execution): the best of
    TIMED_REPEATS passes after a warm-up, so that a busy machine's interruptions count as little as they can."""
    images = images.to(device, memory_format=torch.channels_last)
    predict(backbone, policy, images, costs)
    best = float("inf")
    for _ in range(TIMED_REPEATS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        predict(backbone, policy, images, costs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - began)
    return 1000 * best / len(images)


def timing(preset, backbone: FlatResNet, policy, pruned: list, test: Dataset, flops: float,
           device: torch.device) -> dict[str, float]:
    """Milliseconds per image of the learned policy and, of each kind of trained competitor, the model nearest
    its FLOPs (`pruned`: (K, ResNet, 0/1 row) each), on the same batch of test images."""
    images = next(iter(DataLoader(test, batch_size=TIMED_IMAGES)))[0]
    out = {"learned": ms_per_image(backbone, policy, images, cost_model(preset, policy, backbone), device)}
    for kind, models in ((PRUNED, [m for m in pruned if m[1].spec.mids is None]),
                         (CHANNELS, [m for m in pruned if m[1].spec.mids])):
        if models:
            _, resnet, row = min(models, key=lambda m: abs(static_flops(cost_model(preset, None, m[1]), m[2]) - flops))
            resnet = resnet.to(device, memory_format=torch.channels_last).eval()
            out[kind] = ms_per_image(resnet, static_chooser(row), images, cost_model(preset, None, resnet), device)
    return out


def greedy_order_on(preset, backbone: FlatResNet, dataset: str | None, data_dir: str | None,
                    device: torch.device) -> list[int]:
    """The greedy static order of every block of `backbone`, on the holdout slice of the training images."""
    train = load_dataset(preset, "train", dataset, data_dir, download=False, augment=False)
    return B.greedy_order(backbone.to(device), DataLoader(holdout(train), batch_size=256), device)


def curves(preset, backbone: FlatResNet, dataset: str | None, data_dir: str | None, device: torch.device,
           points: int = 12) -> dict[str, list[B.CurvePoint]]:
    """Every baseline over about `points` block counts from 0 to K: the curves a sweep plots."""
    test = load_dataset(preset, "test", dataset, data_dir, download=False)
    backbone = backbone.to(device)
    order = greedy_order_on(preset, backbone, dataset, data_dir, device)
    loader = DataLoader(test, batch_size=256)
    keeps = B.keep_grid(preset.num_blocks, points)
    return {name: baseline_curve(name, backbone, loader, cost_model(preset, None, backbone), device, keeps, order).points
            for name in B.BASELINES}
