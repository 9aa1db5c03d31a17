"""tune_penalty.py's flags and the checks they allow before anything is loaded."""
from __future__ import annotations

import argparse
import math
import sys

from blockdrop.choices import (BUDGET_SAMPLINGS, DEFAULT_BUDGET_SAMPLING, PRESET_NAMES, check_preset_name,
                               check_unreadable_share)
from blockdrop.errors import UserError
from blockdrop.parsers.common import (add_cluster_args, add_training_args, budget_range, check_budget_range,
                                     check_training_args)


def float_list(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, not {text!r}") from None
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tune_penalty.py",
        description="Sweep the penalty gamma (and the learning rate) of the finetuning stage on Ray Tune, starting\n"
                    "every trial from one checkpoint of the stage before it (depth policy: NAME-depth.pt; BlockDrop's\n"
                    "policy: NAME-curriculum.pt), and put the accuracy-vs-FLOPs Pareto\n"
                    "front into MLflow: a parent run per sweep, a child run per trial, the front's models registered.\n"
                    "From a depth checkpoint, --budget-ranges adds budget models (one model for every budget, its\n"
                    "ResNet finetuned under mean budgets drawn from the range): each such trial is a whole curve,\n"
                    "and the front is taken over every point of every trial.",
        epilog="Examples:\n"
               "  python tune_penalty.py --init checkpoints/JOB-depth.pt --penalties -5,-20,-100 --epochs 10\n"
               "  python tune_penalty.py --init runs:/<run id>/checkpoint --num-samples 12   # Optuna proposes gammas\n"
               "  python tune_penalty.py --init checkpoints/JOB-depth.pt --budget-ranges 0.2,1.0 0.1,0.6 --lrs 0.01,0.03\n"
               "  python tune_penalty.py --init checkpoints/JOB-depth.pt --penalties -5,-20 --budget-ranges 0.2,1.0\n"
               "  python tune_penalty.py ... --name my-sweep --resume                       # after an interruption",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="R26_DIGITS", help=f"one of: {', '.join(PRESET_NAMES)} (default R26_DIGITS)")
    parser.add_argument("--init", required=True, help="the checkpoint before finetuning (JOB-depth.pt or "
                                                      "JOB-curriculum.pt): a file, or an MLflow artifact URI "
                                                      "(runs:/<id>/checkpoint/<file>)")
    parser.add_argument("--penalties", type=float_list, help="grid of gammas, negative (e.g. -5,-20,-100 for the depth "
                                                                 "policy, -1,-2,-5,-10 for BlockDrop's)")
    parser.add_argument("--budget-ranges", type=budget_range, nargs="+", metavar="LOW,HIGH",
                        help="budget models, one trial per range (and lr): the mean budgets, shares of the full "
                             "ResNet's FLOPs, that its finetune draws from; each trial's curve (accuracy at 14 "
                             "budgets) joins the front. Needs a depth policy's checkpoint (JOB-depth.pt of --policy "
                             "depth or budget); its policy network stays as trained, so --policy-lr does not apply")
    parser.add_argument("--budget-sampling", choices=BUDGET_SAMPLINGS,
                        help="--budget-ranges: how the budget models' finetunes draw their budgets, as train_job.py's "
                             f"flag: sandwich, uniform or log (default {DEFAULT_BUDGET_SAMPLING})")
    parser.add_argument("--lrs", type=float_list, help="grid of learning rates (default: the preset's finetune lr)")
    parser.add_argument("--num-samples", type=int, help="instead of a gamma grid: this many trials whose gammas "
                                                        "Optuna's multi-objective sampler proposes in [--gamma-range]")
    parser.add_argument("--gamma-range", type=float_list, default=[-20.0, -0.5],
                        help="low,high bounds for proposed gammas (default -20,-0.5)")
    parser.add_argument("--policy-lr", type=float, help="the policy network's lr in every trial (default: the preset's)")
    parser.add_argument("--epochs", type=int, help="finetune epochs per trial (default: the preset's; on other data "
                                                   "than the preset's own, a fixed number of steps)")
    parser.add_argument("--no-analysis", action="store_true",
                        help="skip the competitors (the image-blind baselines: curves on --init's ResNet and each "
                             "trial's comparison at equal FLOPs; prune-and-finetune) and the policy pictures")
    parser.add_argument("--no-prune-baseline", action="store_true",
                        help="leave out prune-and-finetune: the user's ResNet finetuned under static policies at the "
                             "block counts that bracket the front's points (a training run each; on the plot and "
                             "in the table, each front point against it with a paired interval)")
    parser.add_argument("--batch-size", type=int, help="global batch size of each trial")
    parser.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers per trial (default 1)")
    parser.add_argument("--max-concurrent", type=int, default=1, help="trials running at once (default 1)")
    parser.add_argument("--experiment", default="blockdrop-sweeps", help="MLflow experiment (default blockdrop-sweeps)")
    parser.add_argument("--name", help="sweep name (default PRESET-sweep-TIMESTAMP); with --resume, the sweep to resume")
    parser.add_argument("--model-name", help="registered model name for the front (default blockdrop-PRESET)")
    add_training_args(parser)
    add_cluster_args(parser)
    parser.add_argument("--resume", action="store_true", help="continue the sweep --name: finished trials are kept")
    return parser


def grid_value(value: float) -> str:
    """A gamma or lr as a trial's name shows it: 6 significant digits."""
    return f"{value:g}"


def range_value(low: float, high: float) -> str:
    return f"{grid_value(low)}-{grid_value(high)}"


def trial_key(config: dict) -> str:
    """A sweep trial's name (Ray Tune's trial and the MLflow run's key), from its config: a gamma or a
    budget range, and an lr."""
    budgets = config.get("budget_range")
    what = f"budget={range_value(*budgets)}" if budgets is not None else f"gamma={grid_value(config['gamma'])}"
    return f"{what},lr={grid_value(config['lr'])}"


def check_distinct(flag: str, values: list[float]) -> None:
    """A grid's values, each once as trial names show them: a repeat would be the same trial, resumed
    instead of trained again."""
    shown = [grid_value(v) for v in values]
    repeated = sorted({v for v in shown if shown.count(v) > 1})
    if repeated:
        raise UserError(f"{flag} lists {', '.join(repeated)} more than once (trials are named by their values, to 6 "
                        "significant digits): give each value once")


LIST_FLAGS = ("--penalties", "--lrs", "--gamma-range")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """argparse reads `--penalties -1,-2` as two flags; glue such a list to its flag first."""
    argv = list(sys.argv[1:] if argv is None else argv)
    glued = []
    for token in argv:
        if glued and glued[-1] in LIST_FLAGS and token.startswith("-") and token[1:2].isdigit():
            glued[-1] = f"{glued[-1]}={token}"
        else:
            glued.append(token)
    return build_parser().parse_args(glued)


def check_flags(args: argparse.Namespace) -> None:
    """Every check of the flags alone (no file read, no torch): a bad one answers at once."""
    check_preset_name(args.preset)
    check_training_args(args)
    if args.num_samples is None:
        if not args.penalties and not args.budget_ranges:
            raise UserError("give a grid of gammas (--penalties -1,-2,-5), budget ranges (--budget-ranges 0.2,1.0) "
                            "or --num-samples N for a search of gammas")
        bad = [g for g in args.penalties or [] if not (g < 0 and math.isfinite(g))]
        if bad:
            raise UserError(f"--penalties must all be negative numbers (the reward of a misclassified image): {bad}")
    elif args.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, not {args.num_samples}")
    elif args.budget_ranges:
        raise UserError("--budget-ranges is a grid (a trial per range and lr), --num-samples a search of gammas: "
                        "give one")
    elif args.penalties:
        raise UserError("--num-samples (Optuna proposes gammas in --gamma-range) and --penalties (a grid of gammas) "
                        "exclude each other: give one")
    if (len(args.gamma_range) != 2 or not all(math.isfinite(g) for g in args.gamma_range)
            or not args.gamma_range[0] < args.gamma_range[1] < 0):
        raise UserError(f"--gamma-range takes low,high with low < high < 0, not {args.gamma_range}")
    check_unreadable_share(args.max_bad_images)
    for flag in ("epochs", "batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, not {getattr(args, flag)}")
    if args.lrs is not None and (not args.lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in args.lrs)):
        raise UserError(f"--lrs must be positive numbers, not {args.lrs}")
    for flag in ("workers_per_trial", "max_concurrent"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    for flag, values in (("--penalties", args.penalties), ("--lrs", args.lrs)):
        check_distinct(flag, values or [])
    for low, high in args.budget_ranges or []:
        check_budget_range("--budget-ranges", low, high)
    if args.budget_sampling is not None and not args.budget_ranges:
        raise UserError("--budget-sampling is for the budget models of --budget-ranges; this sweep has none")
    shown = [range_value(*r) for r in args.budget_ranges or []]
    if len(set(shown)) != len(shown):
        raise UserError(f"--budget-ranges lists {', '.join(sorted({v for v in shown if shown.count(v) > 1}))} more "
                        "than once: give each range once")
    if args.resume and not args.name:
        raise UserError("--resume needs --name: the sweep to resume")
    if args.policy_lr is not None and not (args.policy_lr > 0 and math.isfinite(args.policy_lr)):
        raise UserError(f"--policy-lr must be positive, not {args.policy_lr}")
