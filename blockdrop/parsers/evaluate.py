"""`python -m blockdrop.evaluate`'s flags and the checks they allow before anything is loaded."""
from __future__ import annotations

import argparse
import math
import os

from blockdrop.choices import (BASELINES, DATASETS, PRESET_NAMES, RANDOM_SEEDS, add_unreadable_flag, check_preset_name,
                               check_unreadable_share)
from blockdrop.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m blockdrop.evaluate",
        description="Evaluate a BlockDrop checkpoint: the greedy policy (s >= 0.5) with sparse execution, "
                    "reported as in the paper. A checkpoint without a policy evaluates the full ResNet.",
        epilog="Checkpoints: this project's files, original BlockDrop files (agent/resnet), or pretrained "
               "ResNets in torchvision layout.",
    )
    parser.add_argument("--preset", required=True, help=f"one of: {', '.join(PRESET_NAMES)}")
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
                        help="with --compare: pruned ResNets to compare with too, at equal FLOPs: prune-and-finetune "
                             "(blocks) and channel-pruned checkpoints (train_job.py --stage prune; a job writes them "
                             "as NAME-prune-K*.pt and NAME-channels-*.pt)")
    parser.add_argument("--budget", type=float, metavar="SHARE",
                        help="a budget policy (train_job.py --policy budget): run at this mean budget, a share of the "
                             "full ResNet's FLOPs in (0, 1] (0.25: 4x faster); the images' mean cost is held to it")
    parser.add_argument("--cap", type=float, metavar="SHARE",
                        help="a per-image cap, a share of the full ResNet's FLOPs: no image costs more (any policy "
                             "network: each image keeps the blocks it values most until the cap is reached)")
    parser.add_argument("--budgets", type=share_list, metavar="B,B,...",
                        help="a budget policy's front: its report at each of these mean budgets (with --cap-curve: "
                             "per-image caps), and how far the cost it spends is from each")
    parser.add_argument("--cap-curve", action="store_true", help="--budgets are per-image caps, not mean targets")
    parser.add_argument("--report-dir", help="write the policy pictures (blocks per image, per class, frequent "
                                             "policies with sample images, ...) and report.json into this folder")
    return parser


def share_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected shares of the full ResNet's FLOPs, e.g. 0.2,0.3,0.5, "
                                         f"not {text!r}") from None


def check_share(flag: str, value: float) -> None:
    if not (math.isfinite(value) and 0 < value <= 1):
        raise UserError(f"{flag} must be a share of the full ResNet's FLOPs in (0, 1] (0.25: 4x faster), not {value:g}")


def check_flags(args: argparse.Namespace) -> None:
    """Every check of the flags alone (no file read, no torch): a bad one answers at once."""
    check_preset_name(args.preset)
    for flag in ("budget", "cap"):
        if getattr(args, flag) is not None:
            check_share(f"--{flag}", getattr(args, flag))
    for value in args.budgets or []:
        check_share("--budgets", value)
    if args.budgets is not None and not args.budgets:
        raise UserError("--budgets lists at least one share: --budgets 0.2,0.3,0.5")
    if args.budgets and (args.budget is not None or args.cap is not None or args.baseline or args.compare):
        raise UserError("--budgets draws a front on its own: leave out --budget, --cap, --baseline and --compare")
    if args.cap_curve and not args.budgets:
        raise UserError("--cap-curve goes with --budgets")
    if (args.budget is not None or args.cap is not None) and args.baseline:
        raise UserError("--budget and --cap run the checkpoint's policy; leave out --baseline")
    if (args.baseline is None) != (args.keep is None):
        raise UserError("--baseline and --keep go together: --baseline greedy --keep 8")
    check_unreadable_share(args.max_bad_images)
    if args.baseline and args.compare:
        raise UserError("--compare compares the checkpoint's own policy with the baselines; leave out --baseline")
    if args.pruned and not args.compare:
        raise UserError("--pruned lists competitors of --compare: add --compare")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {args.batch_size}")
    if args.keep is not None and args.keep < 0:
        raise UserError(f"--keep is a number of blocks, at least 0, not {args.keep}")
    if args.num_workers is not None and args.num_workers < 0:
        raise UserError(f"--num-workers is a number of loader processes, at least 0, not {args.num_workers}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1 image, not {args.limit}")
    if args.report_dir and os.path.exists(args.report_dir) and not os.path.isdir(args.report_dir):
        raise UserError(f"--report-dir {args.report_dir} is a file; name a folder (it is created if missing)")
