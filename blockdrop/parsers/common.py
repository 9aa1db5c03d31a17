"""The flags train_job.py and tune_penalty.py share: how training runs, and where data, Ray and MLflow are."""
from __future__ import annotations

import argparse
import math

from blockdrop.choices import DATASETS, TRAIN_EXECUTIONS, add_unreadable_flag
from blockdrop.errors import UserError


def budget_range(text: str) -> tuple[float, float]:
    """LOW,HIGH: the mean budgets a budget policy's finetune draws from (checked by check_budget_range)."""
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (shares of the full ResNet's FLOPs, e.g. 0.2,1.0), "
                                         f"not {text!r}") from None
    return low, high


def check_budget_range(flag: str, low: float, high: float) -> None:
    """A budget range: shares of the full ResNet's FLOPs in (0, 1], low before high."""
    for what, value in ((f"{flag}'s low end", low), (f"{flag}'s high end", high)):
        check_share(what, value)
    if not low < high:
        raise UserError(f"{flag} goes from low to high, not {low:g},{high:g}")


def check_share(what: str, value: float) -> None:
    if not (math.isfinite(value) and 0 < value <= 1):
        raise UserError(f"{what} must be a share of the full ResNet's FLOPs in (0, 1] (0.25: 4x faster), not {value:g}")


def add_training_args(parser: argparse.ArgumentParser) -> None:
    """How training runs (the flags train_job.py and tune_penalty.py share)."""
    parser.add_argument("--train-execution", choices=TRAIN_EXECUTIONS, default="sparse",
                        help="finetuning and stochastic depth: sparse (default) runs each block on the images whose "
                             "policy keeps it, so a step costs what the policy keeps and each block's BatchNorm "
                             "sees the images it runs on; masked runs every block on every image and blends, as "
                             "the original code (benchmarks/results/finetune_cpu.md compares them)")
    parser.add_argument("--eval-every", type=int, default=1, metavar="N",
                        help="evaluate on the test set every N epochs and after the last (default 1); on ImageNet "
                             "an evaluation is 50k images, and on CIFAR's curriculum a third of an epoch's time")


def check_run_name(name: str | None) -> None:
    """--name names Ray's folders, MLflow runs (searched by it) and checkpoint files: one path part, printable,
    not both kinds of quote."""
    if name is None:
        return
    if (not name.strip() or name in (".", "..") or any(c in name for c in "/\\`") or not name.isprintable()
            or ("'" in name and '"' in name) or len(name) > 200):
        raise UserError(f"--name {name!r}: a name is one folder name of printable characters (no / \\ or `, not "
                        "both ' and \", at most 200), e.g. r32-c10-run1")


def check_training_args(args: argparse.Namespace) -> None:
    check_run_name(args.name)
    if args.eval_every < 1:
        raise UserError(f"--eval-every is a number of epochs >= 1, not {args.eval_every}")


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    """Where data, Ray and MLflow are: the flags train_job.py and tune_penalty.py share."""
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--dataset", choices=DATASETS, help="default: the preset's dataset")
    parser.add_argument("--data-dir", help="dataset folder; on a cluster, shared storage every node sees")
    add_unreadable_flag(parser)
    parser.add_argument("--mlflow-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--address", help="Ray cluster address: HOST:PORT, ray://HOST:PORT, or auto (the Ray a "
                                          "`ray start` runs on this machine); default $RAY_ADDRESS, else a local "
                                          "Ray of this command's own, even where another runs")
    parser.add_argument("--storage-path", help="Ray run storage (default ./ray_results; shared storage on a cluster)")
