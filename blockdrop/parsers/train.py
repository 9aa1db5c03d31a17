"""train_job.py's flags and the checks they allow before anything is loaded."""
from __future__ import annotations

import argparse
import math

from blockdrop.choices import (BUDGET_SAMPLINGS, CURRICULUM_PACE, DEFAULT_BUDGET_RANGE, DEFAULT_BUDGET_SAMPLING,
                               default_budget, DEPTH_STAGES, ENTROPIES, POLICIES, PRESET_NAMES, PRUNE, STAGES,
                               check_preset_name, check_unreadable_share)
from blockdrop.errors import UserError
from blockdrop.parsers.common import (add_cluster_args, add_training_args, budget_range, check_budget_range, check_share,
                                     check_training_args)

DEFAULT_PRESET = "R26_DIGITS"
DEFAULT_POLICY = "depth"  # benchmarks/results/method_*.md: it reaches the FLOPs BlockDrop's policy cannot


def add_method_args(parser: argparse.ArgumentParser) -> None:
    """What the stages learn with: penalties, learning rates, the curriculum's bonus and pace, batch, drop rate."""
    parser.add_argument("--penalty", type=float, help="gamma of finetuning, the reward of a misclassified image; "
                                                      "negative (default: the preset's, -10 CIFAR, -5 ImageNet/digits)")
    parser.add_argument("--curriculum-penalty", type=float,
                        help="gamma of the curriculum (default -1, the original's: a stricter one keeps every block)")
    parser.add_argument("--lr", type=float, help="learning rate (default: the preset's per stage; finetune: the ResNet's)")
    parser.add_argument("--policy-lr", type=float, help="finetune: the policy network's lr (default: the preset's; "
                                                        "lower than the ResNet's keeps per-image policies apart)")
    parser.add_argument("--entropy", choices=ENTROPIES, default="original",
                        help="curriculum entropy bonus: original (-s log s over all blocks: undecided blocks drift "
                             "towards drop, the original code) or bernoulli (full entropy of decided blocks)")
    parser.add_argument("--curriculum-pace", type=int, help="curriculum: optimisation steps per newly decided block "
                                                            f"(default: one epoch on the preset's data, {CURRICULUM_PACE} "
                                                            "on other data)")
    parser.add_argument("--batch-size", type=int, help="global batch size, split over the workers")
    parser.add_argument("--drop-rate", type=float, help="pretrain: stochastic-depth drop rate of the last block")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_job.py",
        description="Train BlockDrop on Ray Train: pretrain the ResNet, adapt it to dropped blocks (stochastic\n"
                    "depth), train the policy with a curriculum, finetune both jointly; one stage or all in a row.\n"
                    "Without --address it starts a local Ray; without --mlflow-uri it logs to MLflow's sqlite store\n"
                    "./mlflow.db.",
        epilog="Examples:\n"
               "  python train_job.py                                   # all stages, offline digits, 2 workers\n"
               "  python train_job.py --preset R32_C10 --dataset imagefolder --data-dir D --init resnet32.pt\n"
               "                      # your own pretrained ResNet: adapt -> curriculum -> finetune\n"
               "  python train_job.py --preset R110_C10 --stage curriculum --init adapted.pt --gpu\n"
               "  ray job submit --working-dir . -- python train_job.py --preset R32_C10 --num-workers 4 --gpu\n"
               "Per-stage defaults (epochs, batch size, lr) come from the preset on its own dataset; on other data\n"
               "(an image folder) the policy stages last a fixed number of optimisation steps whatever its size.\n"
               "Flags override every stage run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default=DEFAULT_PRESET, help=f"one of: {', '.join(PRESET_NAMES)} (default {DEFAULT_PRESET})")
    parser.add_argument("--stage", default="all", type=stage_list,
                        help="a stage (pretrain, adapt, curriculum, finetune), several (adapt,curriculum), or all "
                             "(default): every stage after what --init holds; adapt is left out after a pretrain "
                             "with stochastic depth. prune (alone, with --keep K): prune-and-finetune, the "
                             "competitor, from --init's ResNet")
    parser.add_argument("--epochs", type=epoch_list, help="epochs of each stage run, or one number per stage run "
                                                         "(e.g. 30,30,15; default: the preset's)")
    add_method_args(parser)
    parser.add_argument("--num-workers", type=int, default=2, help="Ray Train workers (default 2)")
    parser.add_argument("--init", help="checkpoint the (first) stage starts from: a previous stage's output, an "
                                       "original BlockDrop file, or a pretrained ResNet (torchvision layout)")
    parser.add_argument("--experiment", default="blockdrop", help="MLflow experiment (default blockdrop)")
    parser.add_argument("--name", help="job name (default PRESET-STAGE-TIMESTAMP); the same name again resumes")
    add_cluster_args(parser)
    parser.add_argument("--output", help="folder for each stage's checkpoint (default: STORAGE/NAME/checkpoints "
                                         "with a local or shared --storage-path, where a cluster keeps it; else "
                                         "./checkpoints); MLflow keeps a copy with the run either way")
    parser.add_argument("--max-failures", type=int, default=3, help="worker-group restarts allowed per stage (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data order and policy sampling (default 0)")
    add_training_args(parser)
    parser.add_argument("--no-analysis", action="store_true",
                        help="after finetuning, skip comparing the policy with its competitors at equal FLOPs "
                             "(image-blind policies, prune-and-finetune) and drawing its policy pictures")
    parser.add_argument("--no-prune-baseline", action="store_true",
                        help="in that comparison, leave out prune-and-finetune: the user's ResNet finetuned under a "
                             "static policy (the greedy K blocks) for as many steps as the policy's stages train the "
                             "ResNet, at the two block counts that bracket the learned policy's FLOPs (two more "
                             "training runs; their time is reported)")
    parser.add_argument("--policy", choices=POLICIES,
                        help=f"blocks: BlockDrop's policy, each block of each image decided by its own probability, "
                             f"trained by REINFORCE (adapt -> curriculum -> finetune); depth: per image, how many "
                             f"blocks of the greedy order of your ResNet to run, the policy network trained on the "
                             f"outcome of every depth (nest -> depth -> finetune; blockdrop/depth.py); budget: the "
                             f"depth policy for any compute budget, one model for the whole front, its ResNet "
                             f"finetuned under budgets drawn from --budget-range (blockdrop/budget.py). Default: "
                             f"what --init holds, else {DEFAULT_POLICY}")
    parser.add_argument("--budget-range", type=budget_range, metavar="LOW,HIGH",
                        help="--policy budget: the mean budgets its finetuning draws from, as shares of the full "
                             "ResNet's FLOPs (default 0.2,1.0: from 5x faster to the whole ResNet)")
    parser.add_argument("--budget", type=float, metavar="SHARE",
                        help="--policy budget: the mean budget the model runs at when a request names none "
                             "(default: the middle of --budget-range)")
    parser.add_argument("--budget-sampling", choices=BUDGET_SAMPLINGS,
                        help="--policy budget: how its finetuning draws the budgets from --budget-range (default "
                             f"{DEFAULT_BUDGET_SAMPLING}): uniform, log (log-uniform: as much training per factor "
                             "of speedup, so more at the low end), or sandwich (uniform, and every image also at "
                             "the range's low end in the same batch: about a quarter more compute)")
    parser.add_argument("--keep", type=int, metavar="K",
                        help="--stage prune: the blocks the pruned ResNet keeps, chosen by the greedy static order "
                             "on --init's ResNet")
    return parser


def stage_list(text: str) -> list[str] | None:
    """`all` (None: decided once --init is known) or stages (their order is checked with the policy)."""
    if text == "all":
        return None
    if text == PRUNE:
        return [PRUNE]
    names = [part.strip() for part in text.split(",")]
    known = STAGES + tuple(s for s in DEPTH_STAGES if s not in STAGES)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown stage {', '.join(unknown) or text!r}; use {', '.join(known)}, all, "
                                         f"or {PRUNE} (alone)")
    return names


def epoch_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or N,N,N, not {text!r}") from None


def check_flags(args: argparse.Namespace) -> None:
    """Every check of the flags alone (no file read, no torch): a bad one answers at once."""
    check_preset_name(args.preset)  # the flags first: the preset itself brings its models in (torch)
    check_training_args(args)
    for flag in ("penalty", "curriculum_penalty"):
        value = getattr(args, flag)
        if value is not None and not (value < 0 and math.isfinite(value)):
            raise UserError(f"--{flag.replace('_', '-')} must be a negative number (the reward of a misclassified "
                            f"image), not {value}")
    for flag in ("lr", "policy_lr"):
        value = getattr(args, flag)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise UserError(f"--{flag.replace('_', '-')} must be positive, not {value}")
    if args.curriculum_pace is not None and args.curriculum_pace < 1:
        raise UserError(f"--curriculum-pace must be at least 1 step, not {args.curriculum_pace}")
    if args.num_workers < 1:
        raise UserError(f"--num-workers must be at least 1, not {args.num_workers}")
    if args.batch_size is not None and args.batch_size < args.num_workers:
        raise UserError(f"--batch-size {args.batch_size} is smaller than --num-workers {args.num_workers}")
    if args.drop_rate is not None and not 0 <= args.drop_rate < 1:
        raise UserError(f"--drop-rate must be in [0, 1), not {args.drop_rate}")
    check_unreadable_share(args.max_bad_images)
    check_budget_flags(args)
    if args.max_failures < 0:
        raise UserError(f"--max-failures must be >= 0, not {args.max_failures}")


def check_budget_flags(args: argparse.Namespace) -> None:
    """--budget-range and --budget: shares in (0, 1], for --policy budget only."""
    if args.policy not in (None, "budget") and (args.budget_range is not None or args.budget is not None
                                                or args.budget_sampling is not None):
        raise UserError(f"--budget-range, --budget and --budget-sampling are for --policy budget, not --policy "
                        f"{args.policy}")
    low, high = args.budget_range or DEFAULT_BUDGET_RANGE
    check_budget_range("--budget-range", low, high)
    check_share("--budget", args.budget if args.budget is not None else default_budget(low, high))
