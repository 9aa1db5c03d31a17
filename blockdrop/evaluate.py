"""The evaluation report: greedy policy, sparse execution, the original's figures.

    python -m blockdrop.evaluate --preset R110_C10 --checkpoint ckpt.pt [--json]

prints Accuracy, Block Usage (mean +- std), FLOPs/img (mean +- std, policy network included),
Unique Policies, and the full model's accuracy and FLOPs on the same images.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from blockdrop import inference
from blockdrop.analysis import Comparison, class_names, compare, competitor_curves, holdout, timing, write
from blockdrop.baselines import RANDOM_SEEDS, chooser, greedy_order
from blockdrop.data import check_unreadable, load_dataset
from blockdrop.errors import UserError, run_cli
from blockdrop.flops import CostModel, cost_model
from blockdrop.metrics import BudgetPoint, Records, Report, Tally, budget_curve, curve_gap, tally
from blockdrop.models.resnet import FlatResNet, PolicyNet
from blockdrop.parsers.evaluate import build_parser, check_flags
from blockdrop.pictures import draw_all
from blockdrop.presets import Preset, get_preset


def load_pruned(preset: Preset, path: str) -> tuple[int, FlatResNet, torch.Tensor]:
    """A pruned ResNet's checkpoint (blocks or channels pruned) as (K, its ResNet, its 0/1 row), or a UserError."""
    model = inference.load(path, preset.name)
    if model.policy is None or isinstance(model.policy, PolicyNet):
        raise UserError(f"--pruned {path} is not a pruned ResNet (train_job.py --stage prune writes those, a job "
                        "NAME-prune-K*.pt and NAME-channels-*.pt)")
    return int(model.policy.row.sum()), model.backbone, model.policy.row


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
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


@dataclass
class Evaluated:
    """What is evaluated: the ResNet (channels_last, as training evaluates: the same logits), its policy,
    their costs, and where they came from."""

    backbone: FlatResNet
    policy: torch.nn.Module | None
    costs: CostModel
    source: str  # the checkpoint's format, or "untrained"
    meta: dict


def load(preset: Preset, args: argparse.Namespace, device: torch.device) -> Evaluated:
    """--checkpoint (with --backbone), else the preset's untrained initialisation (a smoke test of data,
    policy and sparse execution)."""
    if args.checkpoint is None:
        print(f"no --checkpoint: evaluating an untrained {preset.name} (random weights, seed 0)", file=sys.stderr)
        torch.manual_seed(0)
        backbone, policy = preset.build_backbone(), preset.build_policy().to(device)
        source, meta = "untrained", {}
    else:
        model = inference.load(args.checkpoint, preset.name, args.backbone, device)
        backbone, policy, source, meta = model.backbone, model.policy, model.checkpoint.source, model.checkpoint.meta
    if args.compare and not isinstance(policy, PolicyNet):
        raise UserError(f"--compare needs a policy network; {args.checkpoint} holds "
                        f"{'a pruned ResNet' if policy is not None else 'only a ResNet'}")
    return Evaluated(backbone.to(device, memory_format=torch.channels_last), policy, cost_model(preset, policy, backbone),
                     source, meta)


def evaluate_baseline(model: Evaluated, args: argparse.Namespace, loader: DataLoader, train: Dataset | None,
                      device: torch.device) -> Tally:
    """The image-blind --baseline at --keep on the checkpoint's ResNet (RandomK: every draw counts)."""
    order = None
    if args.baseline == "greedy":
        order = greedy_order(model.backbone, make_loader(holdout(train), args.batch_size, args.num_workers), device,
                             drops=model.backbone.num_blocks - args.keep)
    result = Tally(rows=[] if args.report_dir else None)
    for seed in range(RANDOM_SEEDS) if args.baseline == "randomk" else [0]:
        result.merge(tally(model.backbone, chooser(args.baseline, args.keep, model.backbone, order, seed), loader,
                           model.costs, device, progress=not args.json, records=bool(args.report_dir)))
    return result


def describe_policy(model: Evaluated, args: argparse.Namespace) -> str:
    """What the report is of, in words."""
    if args.baseline:
        return f"{args.baseline} baseline, K = {args.keep}"
    if model.policy is None:
        print(f"{args.checkpoint} has no policy network: evaluating the full ResNet", file=sys.stderr)
        return "full ResNet"
    if not isinstance(model.policy, PolicyNet):
        return f"pruned ResNet, the same {int(model.policy.row.sum())} blocks for every image"
    return "policy network"


def write_report_dir(preset: Preset, args: argparse.Namespace, result: Tally, report: Report, label: str,
                     loader: DataLoader, test: Dataset, comparison: Comparison | None) -> None:
    """The policy pictures, report.json (and baselines.json with --compare) into --report-dir."""
    records = result.records()
    if args.baseline == "randomk":  # pictures of the first draw: one record per image
        n = len(loader.dataset)
        records = Records(records.policies[:n], records.labels[:n], records.predictions[:n])
    stages = [stage for stage, _ in preset.backbone.block_index]
    draw_all(records, loader.dataset, preset.mean, preset.std, stages, class_names(test), args.report_dir)
    (Path(args.report_dir) / "report.json").write_text(json.dumps({"policy": label, **asdict(report)}, indent=2))
    if comparison is not None:
        write(comparison, args.report_dir)


def check_budgets(model: Evaluated, args: argparse.Namespace) -> None:
    """Budgets the checkpoint can run at: a mean target needs a budget policy, any budget one above the cost
    of an image that runs no block."""
    asked = [args.budget, args.cap, *(args.budgets or [])]
    if all(b is None for b in asked):
        return
    if not isinstance(model.policy, PolicyNet):
        raise UserError(f"--budget, --cap and --budgets need a policy network; {args.checkpoint} holds "
                        f"{'a pruned ResNet' if model.policy is not None else 'no policy'}")
    mean = args.budget is not None or (args.budgets and not args.cap_curve)
    if mean and not inference.is_budget_model(model.policy):
        raise UserError(f"a mean budget (--budget, --budgets) needs a budget policy (train_job.py --policy budget); "
                        f"{args.checkpoint} holds another policy: give it a per-image --cap, or --budgets with --cap-curve")
    cheapest = model.costs.fixed / model.costs.full
    low = min(b for b in asked if b is not None)
    if low < cheapest:
        raise UserError(f"a budget of {low:g} is below what any image costs under this model with no block run "
                        f"({cheapest:.3f} of the full ResNet's FLOPs: stem, shortcuts, head and policy network)")


def print_curve(preset: Preset, args: argparse.Namespace, model: Evaluated, points: list[BudgetPoint], label: str) -> None:
    """The front of a budget model (--budgets): a line or a JSON object per budget, and the mean gap."""
    kind = "per-image caps" if args.cap_curve else "mean budgets"
    if args.json:
        print(json.dumps({"preset": preset.name, "checkpoint": args.checkpoint, "policy": label, "kind": kind,
                          "mean_gap": curve_gap(points), "curve": [p.to_json() for p in points]}))
        return
    print(f"{preset.name}  {args.checkpoint}  ({model.source}; {label}), at {kind} (shares of the full ResNet's "
          f"FLOPs, {model.costs.full:.2E})")
    for point in points:
        print(point.line())
    what = ("mean miss (|spent - asked| where the budget binds; above its ceiling only overspending counts)"
            if not args.cap_curve else "mean excess of the costliest image over its cap")
    print(f"{what}: {curve_gap(points):.4f}")


def run(args: argparse.Namespace) -> None:
    """The report of --checkpoint (or of --baseline on its ResNet), printed as text or JSON."""
    check_flags(args)
    preset, device = get_preset(args.preset), pick_device(args.device)
    if args.keep is not None and args.keep > preset.num_blocks:
        raise UserError(f"--keep must be between 0 and {preset.num_blocks} (the blocks of {preset.name}), not {args.keep}")
    model = load(preset, args, device)
    test = load_dataset(preset, "test", args.dataset, args.data_dir, download=not args.no_download)
    if args.num_workers is None:  # the in-memory digits gain nothing from worker processes
        args.num_workers = 0 if (args.dataset or preset.dataset) == "digits" else min(4, os.cpu_count() or 1)
    loader = make_loader(test, args.batch_size, args.num_workers, args.limit)
    pruned = [load_pruned(preset, path) for path in args.pruned or []]
    train = None
    if args.baseline == "greedy" or args.compare:
        train = load_dataset(preset, "train", args.dataset, args.data_dir, download=not args.no_download, augment=False)
    label = describe_policy(model, args)
    check_budgets(model, args)
    if args.budgets:
        return print_curve(preset, args, model, budget_curve(model.backbone, model.policy, loader, model.costs, device,
                                                             args.budgets, "cap" if args.cap_curve else "mean",
                                                             progress=not args.json), label)
    if args.budget is not None or args.cap is not None:
        label += "".join(f", {what} {value:g}" for what, value in (("mean budget", args.budget),
                                                                   ("per-image cap", args.cap)) if value is not None)
    if args.baseline:
        result = evaluate_baseline(model, args, loader, train, device)
    else:
        result = tally(model.backbone, model.policy, loader, model.costs, device, progress=not args.json,
                       records=bool(args.report_dir), budget=args.budget, cap=args.cap)
    report = result.report(model.costs.full)
    if model.meta.get("reference"):  # the user's ResNet, as the job measured it
        report.reference_accuracy = model.meta["reference"]["accuracy"]
        report.reference = model.meta["reference"]["source"]
    skipped = check_unreadable(test, args.max_bad_images)
    if skipped:
        print(f"skipped {skipped} unreadable image(s) (named above); the next image stood in for each", file=sys.stderr)
    comparison = None
    if args.compare:
        curves = competitor_curves(pruned, loader.dataset, preset, device, args.batch_size) if pruned else None
        comparison, _ = compare(model.backbone, model.policy, loader.dataset, train, model.costs, device,
                                args.batch_size, records=False, pruned=curves)
        comparison.timing = timing(preset, model.backbone, model.policy, pruned, loader.dataset,
                                   comparison.learned.flops_mean, device)
    if args.report_dir:
        write_report_dir(preset, args, result, report, label, loader, test, comparison)
    if args.json:
        print(json.dumps({"preset": preset.name, "checkpoint": args.checkpoint, "source": model.source, "policy": label,
                          **asdict(report), "skipped_images": skipped}
                         | ({"comparison": comparison.to_json()} if comparison else {})))
        return
    print(f"{preset.name}  {args.checkpoint or '(untrained)'}  ({model.source}; {label})")
    print(report.text())
    if comparison is not None:
        print(comparison.text())
    if args.report_dir:
        print(f"pictures and report.json in {args.report_dir}")


def main(argv: list[str] | None = None) -> None:
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
