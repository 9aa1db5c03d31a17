"""The evaluation report: greedy policy, sparse execution, the original's figures.

    python -m blockdrop.evaluate --preset R110_C10 --checkpoint ckpt.pt [--json]

prints Accuracy, Block Usage (mean +- std), FLOPs/img (mean +- std, policy network included),
Unique Policies, and the full model's accuracy and FLOPs on the same images.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from blockdrop.baselines import BASELINES, RANDOM_SEEDS, Chooser, chooser, greedy_order
from blockdrop.checkpoints import load_models
from blockdrop.data import DATASETS, add_unreadable_flag, check_unreadable, check_unreadable_share, load_dataset
from blockdrop.errors import UserError, run_cli
from blockdrop.execution import run_sparse
from blockdrop.flops import CostModel, cost_model
from blockdrop.models.resnet import FlatResNet, PolicyNet
from blockdrop.reinforce import force_undecided, greedy
from blockdrop.presets import PRESETS, get_preset


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

    def add(self, correct: torch.Tensor, full_correct: torch.Tensor, actions: torch.Tensor,
            flops: torch.Tensor, labels: torch.Tensor | None = None, predictions: torch.Tensor | None = None) -> None:
        self.correct += int(correct.sum())
        self.full_correct += int(full_correct.sum())
        self.blocks.add(actions.sum(1))
        self.flops.add(flops)
        bits = actions.bool().cpu().numpy()
        self.policies.update(row.tobytes() for row in np.packbits(bits, axis=1))
        if self.rows is not None and labels is not None:
            self.rows.append((bits, labels.cpu().numpy(), predictions.cpu().numpy()))

    def merge(self, other: Tally) -> None:
        self.correct += other.correct
        self.full_correct += other.full_correct
        self.blocks.merge(other.blocks)
        self.flops.merge(other.flops)
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

    def text(self) -> str:
        lines = [
            f"Accuracy: {self.accuracy:.3f}",
            f"Block Usage: {self.blocks_mean:.3f} +- {self.blocks_std:.3f}",
            f"FLOPs/img: {self.flops_mean:.2E} +- {self.flops_std:.2E}",
            f"Unique Policies: {self.unique_policies}",
            f"This checkpoint's ResNet, all blocks: accuracy {self.full_accuracy:.3f}, FLOPs/img {self.full_flops:.2E}",
            f"FLOPs speedup: {self.speedup:.2f}x  ({self.images} images)",
        ]
        if self.reference_accuracy is not None:
            lines.append(f"Your ResNet ({self.reference or 'the reference'}), all blocks: accuracy "
                         f"{self.reference_accuracy:.3f}; this model {100 * (self.accuracy - self.reference_accuracy):+.1f} "
                         "points against it")
        return "\n".join(lines)


@torch.inference_mode()
def tally(backbone: FlatResNet, policy: PolicyNet | Chooser | None, loader: Iterable, costs: CostModel,
          device: torch.device, progress: bool = False, decided: torch.Tensor | None = None,
          records: bool = False) -> Tally:
    """The policy with sparse execution, and the full model, over `loader` (one shard or all).

    `policy`: a policy network (its greedy decisions; FLOPs include the network), a function from
    images to a 0/1 policy (an image-blind baseline: no policy network to pay for), or None (the full
    model). `decided` (a K-vector of 0/1) forces the other
    blocks on, as during the curriculum stage. `records` keeps every image's outcome.
    """
    backbone.eval()
    if isinstance(policy, torch.nn.Module):
        policy.eval()
    result = Tally(rows=[] if records else None)
    channels_last = backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    for images, labels in tqdm(loader, desc="evaluate", unit="batch", disable=None if progress else True,
                               file=sys.stderr):
        images, labels = images.to(device, memory_format=layout), labels.to(device)
        full_logits = backbone(images)
        if policy is None:
            actions = torch.ones(len(images), backbone.num_blocks, device=device)
            logits, flops = full_logits, torch.full((len(images),), float(costs.full))
        else:
            learned = isinstance(policy, PolicyNet)
            actions = greedy(policy(images)) if learned else policy(images)
            if decided is not None:
                actions = force_undecided(actions, decided.to(device))
            # an image-blind policy runs no policy network: it does not pay for one
            flops = costs.per_image(actions, with_policy=learned)
            logits = run_sparse(backbone, images, actions)
        predictions = logits.argmax(1)
        result.add(predictions == labels, full_logits.argmax(1) == labels, actions, flops, labels, predictions)
    return result


def evaluate(backbone: FlatResNet, policy: PolicyNet | Chooser | None, loader: Iterable, costs: CostModel,
             device: torch.device, progress: bool = True) -> Report:
    """The report over the whole of `loader`."""
    return tally(backbone, policy, loader, costs, device, progress).report(costs.full)


def load_pruned(preset, path: str) -> tuple[int, FlatResNet, torch.Tensor]:
    """A prune-and-finetune checkpoint as (K, its ResNet, its 0/1 row), or a UserError."""
    backbone, policy, _ = load_models(preset, path)
    if policy is None or isinstance(policy, PolicyNet):
        raise UserError(f"--pruned {path} is not a pruned ResNet (train_job.py --stage prune writes those)")
    return int(policy.row.sum()), backbone, policy.row


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but this machine has no CUDA GPU")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, limit: int | None = None) -> DataLoader:
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {batch_size}")
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m blockdrop.evaluate",
        description="Evaluate a BlockDrop checkpoint: the greedy policy (s >= 0.5) with sparse execution, "
                    "reported as in the paper. A checkpoint without a policy evaluates the full ResNet.",
        epilog="Checkpoints: this project's files, original BlockDrop files (agent/resnet), or pretrained "
               "ResNets in torchvision layout.",
    )
    parser.add_argument("--preset", required=True, help=f"one of: {', '.join(PRESETS)}")
    parser.add_argument("--checkpoint", help="checkpoint file to evaluate; without it, the preset's untrained "
                                             "initialisation (a smoke test of data, policy and sparse execution)")
    parser.add_argument("--backbone", help="pretrained ResNet file, for a checkpoint that holds only a policy")
    parser.add_argument("--dataset", choices=DATASETS, help="default: the preset's dataset")
    parser.add_argument("--data-dir", help="dataset folder (CIFAR: downloaded here when missing; default ./data)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N test images")
    parser.add_argument("--num-workers", type=int, help="data loader processes (default: 0 for in-memory sets, "
                                                        "else up to 4)")
    add_unreadable_flag(parser)
    parser.add_argument("--device", default="auto", help="auto (default: cuda if present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--no-download", action="store_true", help="never download a missing dataset")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    parser.add_argument("--baseline", choices=BASELINES,
                        help="evaluate an image-blind policy on the checkpoint's ResNet instead of its policy network: "
                             "firstk (the first K blocks), randomk (K random blocks per image, "
                             f"{RANDOM_SEEDS} draws), distributek (K spread over the stages), greedy (drop the "
                             "least useful block, on a slice of the training images, until K are left)")
    parser.add_argument("--keep", type=int, help="K, the blocks an image-blind --baseline keeps")
    parser.add_argument("--compare", action="store_true",
                        help="also evaluate every --baseline at the policy's FLOPs: does the per-image policy beat "
                             "the image-blind ones?")
    parser.add_argument("--pruned", type=lambda text: [p for p in text.split(",") if p], metavar="FILE[,FILE]",
                        help="with --compare: prune-and-finetune checkpoints (train_job.py --stage prune; a job "
                             "writes them as NAME-prune-K*.pt) to compare with too, at equal FLOPs")
    parser.add_argument("--report-dir", help="write the policy pictures (blocks per image, per class, frequent "
                                             "policies with sample images, ...) and report.json into this folder")
    args = parser.parse_args(argv)
    if (args.baseline is None) != (args.keep is None):
        raise UserError("--baseline and --keep go together: --baseline greedy --keep 8")
    check_unreadable_share(args.max_bad_images)
    if args.baseline and args.compare:
        raise UserError("--compare compares the checkpoint's own policy with the baselines; leave out --baseline")

    preset = get_preset(args.preset)
    device = pick_device(args.device)
    if args.checkpoint is None:
        print(f"no --checkpoint: evaluating an untrained {preset.name} (random weights, seed 0)", file=sys.stderr)
        torch.manual_seed(0)
        backbone, policy, source = preset.build_backbone(), preset.build_policy(), "untrained"
    else:
        backbone, policy, ckpt = load_models(preset, args.checkpoint, args.backbone)
        source = ckpt.source
    dataset = load_dataset(preset, "test", args.dataset, args.data_dir, download=not args.no_download)
    if args.num_workers is None:  # the in-memory digits gain nothing from worker processes
        args.num_workers = 0 if (args.dataset or preset.dataset) == "digits" else min(4, os.cpu_count() or 1)
    loader = make_loader(dataset, args.batch_size, args.num_workers, args.limit)
    backbone = backbone.to(device, memory_format=torch.channels_last)  # as training evaluates: the same logits
    costs = cost_model(preset, policy)
    if args.compare and not isinstance(policy, PolicyNet):
        raise UserError(f"--compare needs a policy network; {args.checkpoint} holds "
                        f"{'a pruned ResNet' if policy is not None else 'only a ResNet'}")
    if args.pruned and not args.compare:
        raise UserError("--pruned lists competitors of --compare: add --compare")
    pruned = [load_pruned(preset, path) for path in args.pruned or []]
    train = None
    if args.baseline == "greedy" or args.compare:
        train = load_dataset(preset, "train", args.dataset, args.data_dir, download=not args.no_download, augment=False)
    label = "policy network"
    if args.baseline:
        order = None
        if args.baseline == "greedy":
            from blockdrop.analysis import holdout

            order = greedy_order(backbone, make_loader(holdout(train), args.batch_size, args.num_workers), device,
                                 drops=backbone.num_blocks - args.keep)
        seeds = range(RANDOM_SEEDS) if args.baseline == "randomk" else [0]
        result = Tally(rows=[] if args.report_dir else None)
        for seed in seeds:  # RandomK: every draw of every image counts
            result.merge(tally(backbone, chooser(args.baseline, args.keep, backbone, order, seed), loader, costs,
                               device, progress=not args.json, records=bool(args.report_dir)))
        label = f"{args.baseline} baseline, K = {args.keep}"
    else:
        if policy is None:
            print(f"{args.checkpoint} has no policy network: evaluating the full ResNet", file=sys.stderr)
            label = "full ResNet"
        elif not isinstance(policy, PolicyNet):
            label = f"pruned ResNet, the same {int(policy.row.sum())} blocks for every image"
        result = tally(backbone, policy and policy.to(device), loader, costs, device, progress=not args.json,
                       records=bool(args.report_dir))
    report = result.report(costs.full)
    if args.checkpoint is not None and ckpt.meta.get("reference"):  # the user's ResNet, as the job measured it
        report.reference_accuracy = ckpt.meta["reference"]["accuracy"]
        report.reference = ckpt.meta["reference"]["source"]
    skipped = check_unreadable(dataset, args.max_bad_images)
    if skipped:
        print(f"skipped {skipped} unreadable image(s) (named above); the next image stood in for each", file=sys.stderr)
    comparison = None
    if args.compare:
        from blockdrop.analysis import compare

        test = dataset if args.limit is None else Subset(dataset, range(min(args.limit, len(dataset))))
        from blockdrop.prune import pruned_curve

        curve = pruned_curve(pruned, test, costs, device, args.batch_size) if pruned else None
        comparison, _ = compare(backbone, policy, test, train, costs, device, args.batch_size, records=False,
                                pruned=curve)
    if args.report_dir:
        from blockdrop.analysis import class_names, write
        from blockdrop.pictures import draw_all

        records = result.records()
        if args.baseline == "randomk":  # pictures of the first draw: one record per image
            records = Records(*(part[:len(loader.dataset)] for part in (records.policies, records.labels,
                                                                         records.predictions)))
        stages = [stage for stage, _ in preset.backbone.block_index]
        draw_all(records, loader.dataset, preset.mean, preset.std, stages, class_names(dataset), args.report_dir)
        (Path(args.report_dir) / "report.json").write_text(json.dumps({"policy": label, **asdict(report)}, indent=2))
        if comparison is not None:
            write(comparison, args.report_dir)
    if args.json:
        print(json.dumps({"preset": preset.name, "checkpoint": args.checkpoint, "source": source, "policy": label,
                          **asdict(report), "skipped_images": skipped}
                         | ({"comparison": comparison.to_json()} if comparison else {})))
    else:
        print(f"{preset.name}  {args.checkpoint or '(untrained)'}  ({source}; {label})")
        print(report.text())
        if comparison is not None:
            print(comparison.text())
        if args.report_dir:
            print(f"pictures and report.json in {args.report_dir}")


if __name__ == "__main__":
    run_cli(main)
