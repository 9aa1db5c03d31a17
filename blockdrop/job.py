"""A training job: one stage or all three, on Ray Train, tracked in MLflow (`train_job.py`).

The parser and the checks that need no model or data import neither torch, Ray nor MLflow: --help and a
bad flag answer in a fraction of a second (benchmarks/startup.py); those come in where they are used.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from blockdrop.choices import (DATASETS, DEPTH_STAGES, ENTROPIES, POLICIES, PRUNE, STAGES,  # noqa: F401
                               TRAIN_EXECUTIONS, add_unreadable_flag, check_unreadable_share)
from blockdrop.errors import UserError
from blockdrop.presets import CURRICULUM_PACE, OTHER_DATA_STAGES, PRESET_NAMES, Preset, check_preset_name, get_preset

DEFAULT_PRESET = "R26_DIGITS"
DEFAULT_POLICY = "depth"  # benchmarks/results/method_*.md: it reaches the FLOPs BlockDrop's policy cannot

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


def check_training_args(args: argparse.Namespace) -> None:
    if args.eval_every < 1:
        raise UserError(f"--eval-every is a number of epochs >= 1, not {args.eval_every}")


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    """Where data, Ray and MLflow are: the flags train_job.py and tune_penalty.py share."""
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--dataset", choices=DATASETS, help="default: the preset's dataset")
    parser.add_argument("--data-dir", help="dataset folder; on a cluster, shared storage every node sees")
    add_unreadable_flag(parser)
    parser.add_argument("--mlflow-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--storage-path", help="Ray run storage (default ~/ray_results; shared storage on a cluster)")


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
                             f"outcome of every depth (nest -> depth -> finetune; blockdrop/depth.py). Default: what "
                             f"--init holds, else {DEFAULT_POLICY}")
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


def policy_kind(args: argparse.Namespace) -> str:
    """--policy, else what the stages named belong to, else what --init holds (a depth policy's checkpoint
    continues as one, a BlockDrop curriculum checkpoint as BlockDrop), else the default."""
    if args.policy is not None:
        return args.policy
    named = set(args.stage or [])
    if named & {"adapt", "curriculum"}:
        return "blocks"
    if named & {"nest", "depth"}:
        return "depth"
    if args.init:
        from blockdrop.checkpoints import read_checkpoint

        policy = read_checkpoint(args.init).policy
        if policy is not None:
            return "depth" if "rank" in policy else "blocks"
    return DEFAULT_POLICY


def plan_stages(preset: Preset, args: argparse.Namespace, policy: str) -> list[str]:
    """The stages `--stage all` means: every stage after what --init holds. BlockDrop's policy: adapt only
    for a ResNet pretrained without stochastic depth; the depth policy: nest, depth, finetune."""
    if args.stage is not None:
        return args.stage
    if policy == "depth":
        if not args.init:
            return list(DEPTH_STAGES)
        from blockdrop.checkpoints import read_checkpoint

        stage = read_checkpoint(args.init).meta.get("stage")
        done = DEPTH_STAGES.index(stage) + 1 if stage in DEPTH_STAGES[1:] else 1
        return list(DEPTH_STAGES[done:]) or ["finetune"]
    if not args.init:
        pretrain_drop = args.drop_rate if args.drop_rate is not None else preset.stages["pretrain"].drop_rate
        return ["pretrain", "curriculum", "finetune"] if pretrain_drop > 0 else list(STAGES)
    from blockdrop.checkpoints import read_checkpoint

    ckpt = read_checkpoint(args.init)
    if ckpt.policy is not None:
        return ["finetune"]
    config = ckpt.meta.get("config", {})
    robust = ckpt.meta.get("stage") == "adapt" or config.get("drop_rate", 0) > 0
    return ["curriculum", "finetune"] if robust else ["adapt", "curriculum", "finetune"]


def epoch_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or N,N,N, not {text!r}") from None


def own_data(preset: Preset, args: argparse.Namespace) -> bool:
    return (args.dataset or preset.dataset) == preset.dataset


def resnet_steps(plan: list[tuple[str, dict]], train_size: int) -> int:
    """The optimisation steps the stages of `plan` train the ResNet for (adapt or nest, and finetune; the
    curriculum and depth stages freeze it): the length of prune-and-finetune, their competitor."""
    return sum(settings["epochs"] * max(train_size // settings["batch_size"], 1)
               for stage, settings in plan if stage in ("adapt", "nest", "finetune"))


def default_plan(preset: Preset, dataset: str | None, train_size: int, policy: str = DEFAULT_POLICY
                 ) -> list[tuple[str, dict]]:
    """The stages after a user's ResNet (adapt, curriculum, finetune; or nest, depth, finetune) with their
    default settings on `dataset`."""
    plain = build_parser().parse_args(["--preset", preset.name] + (["--dataset", dataset] if dataset else []))
    stages = list((DEPTH_STAGES if policy == "depth" else STAGES)[1:])
    return [(stage, stage_settings(preset, stage, plain, stages, train_size, policy == "depth")) for stage in stages]


def prune_settings(preset: Preset, args: argparse.Namespace, train_size: int, steps: int | None = None) -> dict:
    """Prune-and-finetune: the adapt stage's optimiser and batch, for `steps` optimisation steps (default:
    as many as BlockDrop's default stages train the ResNet), or --epochs."""
    d = preset.stages["adapt"] if own_data(preset, args) else OTHER_DATA_STAGES["adapt"]
    batch = args.batch_size if args.batch_size is not None else d.batch_size
    if steps is None and args.epochs is not None:
        epochs = args.epochs[0]
    else:
        steps = steps or resnet_steps(default_plan(preset, args.dataset, train_size), train_size)
        epochs = math.ceil(steps / max(train_size // batch, 1))
    return {"epochs": epochs, "batch_size": batch, "lr": args.lr if args.lr is not None else d.lr,
            "weight_decay": d.weight_decay, "drop_rate": 0.0}


def stage_settings(preset: Preset, stage: str, args: argparse.Namespace, stages: list[str], train_size: int,
                   depth: bool = False) -> dict:
    """Epochs, batch size, lrs, pace of one stage: flags, else the preset's defaults on its own data,
    else a fixed number of optimisation steps (OTHER_DATA_STAGES) on other data. `depth`: the stages of
    the depth policy (its finetune trains the ResNet alone)."""
    if stage == PRUNE:
        return prune_settings(preset, args, train_size) | {"keep": args.keep}
    own = own_data(preset, args) or stage == "pretrain"
    key = "finetune_depth" if stage == "finetune" and depth else stage
    d = preset.stages[key] if own else OTHER_DATA_STAGES[key]
    batch = args.batch_size if args.batch_size is not None else d.batch_size
    steps_per_epoch = max(train_size // batch, 1)
    pace = args.curriculum_pace or (0 if own else CURRICULUM_PACE)
    if args.epochs is not None:
        epochs = args.epochs[stages.index(stage)] if len(args.epochs) > 1 else args.epochs[0]
    elif own:
        epochs = d.epochs
    else:
        steps = 2 * preset.num_blocks * pace if stage == "curriculum" else d.steps
        epochs = math.ceil(steps / steps_per_epoch)
    settings = {
        "epochs": epochs,
        "batch_size": batch,
        "lr": args.lr if args.lr is not None else d.lr,
        "weight_decay": d.weight_decay,
        "drop_rate": args.drop_rate if args.drop_rate is not None else d.drop_rate,
    }
    if stage == "curriculum":
        settings |= {"gamma": curriculum_gamma(preset, args), "pace": pace, "entropy": args.entropy}
    elif stage == "finetune" and not depth:
        settings |= {"gamma": finetune_gamma(preset, args),
                     "policy_lr": args.policy_lr if args.policy_lr is not None else (d.policy_lr or d.lr)}
    elif stage in ("depth", "finetune"):  # the gamma the depth policy chooses depths at
        settings["gamma"] = finetune_gamma(preset, args)
    return settings


def finetune_gamma(preset: Preset, args: argparse.Namespace) -> float:
    return preset.penalty if args.penalty is None else args.penalty


def curriculum_gamma(preset: Preset, args: argparse.Namespace) -> float:
    return preset.curriculum_penalty if args.curriculum_penalty is None else args.curriculum_penalty


def describe(stage: str, settings: dict, workers: int) -> str:
    parts = [f"{settings['epochs']} epochs", f"batch {settings['batch_size']}", f"lr {settings['lr']:g}"]
    if stage in ("pretrain", "adapt") and settings["drop_rate"] > 0:
        parts.append(f"stochastic depth {settings['drop_rate']:g}")
    if stage == "curriculum":
        pace = f"every {settings['pace']} steps" if settings["pace"] else "every epoch"
        parts.append(f"gamma {settings['gamma']:g}, a block decided {pace}, {settings['entropy']} entropy")
    if stage == "finetune" and "policy_lr" in settings:
        parts.append(f"policy lr {settings['policy_lr']:g}, gamma {settings['gamma']:g}")
    elif stage in ("depth", "finetune"):
        parts.append(f"depth policy, gamma {settings['gamma']:g}")
    if stage == "nest":
        parts.append("every image a random prefix of the greedy order, soft labels of the user's ResNet")
    if stage == PRUNE:
        parts.append(f"{settings['keep']} blocks kept (greedy order of the starting ResNet)")
    return f"== {stage}: {', '.join(parts)}, {workers} workers"


def validate(args: argparse.Namespace) -> tuple[Preset, list[tuple[str, dict]]]:
    """Every check that needs no cluster, before any work starts; the stages to run and their settings."""
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
    if args.max_failures < 0:
        raise UserError(f"--max-failures must be >= 0, not {args.max_failures}")
    preset = get_preset(args.preset)
    policy = args.policy = policy_kind(args)  # resolved: the run records it
    stages = plan_stages(preset, args, policy)
    order = DEPTH_STAGES if policy == "depth" else STAGES
    if stages != [PRUNE] and (any(s not in order for s in stages) or sorted(stages, key=order.index) != stages
                              or len(set(stages)) != len(stages)):
        other = "blocks" if policy == "depth" else "depth"
        raise UserError(f"the {policy} policy's stages run in the order {' -> '.join(order)}, each once: not "
                        f"{','.join(stages)}" + (f" (those of --policy {other}?)" if all(
                            s in (STAGES if other == "blocks" else DEPTH_STAGES) for s in stages) else ""))
    if args.epochs is not None and (min(args.epochs) < 1 or len(args.epochs) not in (1, len(stages))):
        raise UserError(f"--epochs takes one number (>= 1) or one per stage run ({len(stages)}: "
                        f"{', '.join(stages)}), not {','.join(map(str, args.epochs))}")
    if stages == [PRUNE]:
        args.policy = "static"  # what the run records: a pruned ResNet runs one set of blocks for every image
    if (stages == [PRUNE]) != (args.keep is not None):
        raise UserError("--stage prune and --keep K go together: --stage prune --keep 8 --init RESNET")
    if stages == [PRUNE] and not 0 <= args.keep <= preset.num_blocks:
        raise UserError(f"--keep must be between 0 and {preset.num_blocks} (the blocks of {preset.name}), not {args.keep}")
    if stages[0] != "pretrain" and not args.init:
        raise UserError(f"--stage {stages[0]} starts from a trained ResNet: pass --init with a pretrain checkpoint "
                        f"(checkpoints/*-pretrain.pt), an original BlockDrop file or a torchvision ResNet file")
    from blockdrop.checkpoints import load_models, read_checkpoint  # the checks that read files: torch
    from blockdrop.data import load_dataset

    if stages[0] in ("finetune", "depth") and args.init and read_checkpoint(args.init).policy is None:
        needs = "a curriculum checkpoint" if policy == "blocks" else "a checkpoint of the nest or depth stage"
        raise UserError(f"--stage {stages[0]} needs a policy: {args.init} has none; pass {needs}")
    if args.init:
        load_models(preset, args.init)  # fits the preset, or a clear error now rather than on a worker
    # the data must be there before workers look for it
    train = load_dataset(preset, "train", args.dataset, args.data_dir)
    return preset, [(stage, stage_settings(preset, stage, args, stages, len(train), policy == "depth"))
                    for stage in stages]


def init_payload(preset: Preset, path: str | None) -> dict | None:
    if path is None:
        return None
    from blockdrop.checkpoints import load_models

    from blockdrop.models.resnet import PolicyNet

    backbone, policy, _ = load_models(preset, path)
    return {"backbone": backbone.state_dict(), "policy": policy.state_dict() if isinstance(policy, PolicyNet) else None}


def storage_location(path: str | None) -> str | None:
    """Ray run storage as Ray wants it: an absolute local path (workers chdir elsewhere) or a URI."""
    if not path or "://" in path:
        return path
    return str(Path(path).resolve())


def output_folder(flag: str | None, storage: str | None, name: str) -> Path:
    """Where a job's checkpoints go: --output; else next to Ray's run storage when that is a path (shared
    storage on a cluster outlives a submitted job's temporary working directory); else ./checkpoints.
    With a storage URI (s3://...) the checkpoints are MLflow artifacts and Ray checkpoints there."""
    if flag:
        return Path(flag)
    if storage and "://" not in storage:
        return Path(storage) / name / "checkpoints"
    return Path("checkpoints")


def job_env_vars() -> dict[str, str]:
    """TRAIN_ENV minus what the submitted job's own runtime env sets: Ray refuses to merge the same
    variable from the job and from ray.init, and the user's value is the one to keep."""
    from blockdrop.distributed import TRAIN_ENV

    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    taken = (job_config.get("runtime_env") or {}).get("env_vars") or {}
    return {key: value for key, value in TRAIN_ENV.items() if key not in taken}


def start_ray(address: str | None, use_gpu: bool, num_workers: int, storage_path: str | None = None) -> None:
    import ray

    from blockdrop.distributed import drop_harmless_worker_lines, quiet_ray_env

    quiet_ray_env()
    address = address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        ray.init(address=address, logging_level=logging.WARNING, runtime_env={"env_vars": job_env_vars()})
    drop_harmless_worker_lines()
    resources = ray.cluster_resources()
    if use_gpu and resources.get("GPU", 0) < 1:
        raise UserError("--gpu was given but the Ray cluster has no GPU")
    need = "GPU" if use_gpu else "CPU"
    if resources.get(need, 0) < num_workers:
        print(f"note: {num_workers} workers need {num_workers} {need}s; the cluster has "
              f"{resources.get(need, 0):g} now (an autoscaling cluster adds them)", file=sys.stderr)
    nodes = sum(node["Alive"] for node in ray.nodes())
    if nodes > 1 and not storage_path:
        print(f"note: {nodes} nodes and no --storage-path: checkpoints go to ~/ray_results on each worker's node; "
              "give shared storage (NFS path or s3://...) so every node and this driver see them", file=sys.stderr)


def stage_reference(meta: dict, path: Path) -> dict | None:
    """The reference a stage's checkpoint carries; a pretrain stage's own ResNet is the reference of the
    stages after it."""
    if meta.get("reference") is not None:
        return meta["reference"]
    if meta.get("stage") == "pretrain":
        return {"accuracy": meta["metrics"]["full_accuracy"], "source": f"pretrain stage, {path.name}",
                "file": str(path.resolve())}
    return None


def teacher_payload(preset: Preset, reference: dict | None):
    """The user's ResNet in Ray's object store, whose soft labels the depth policy's finetune learns from;
    None (labels only) when its file is not at hand."""
    import ray

    source = Path((reference or {}).get("file", ""))
    if not source.is_file():
        print(f"note: the user's ResNet ({source or 'unknown'}) is not here: finetuning on the labels alone",
              file=sys.stderr)
        return None
    return ray.put(init_payload(preset, str(source)))


@dataclass
class PruneRuns:
    """Where and how prune-and-finetune trains (a job's or a sweep's settings), and what its MLflow runs
    are children of."""

    name: str
    dataset: str | None
    data_dir: str | None
    workers: int
    gpu: bool
    storage: str | None
    output: Path
    tracker: object
    parent_id: str
    params: dict
    seed: int = 0
    max_bad_images: float = 0.001
    execution: str = "sparse"
    max_failures: int = 3


def prune_baseline(preset: Preset, runs: PruneRuns, reference: dict | None, flops: list[float], steps: int,
                   blockdrop_seconds: float) -> list[tuple[int, dict, list[int]]]:
    """Prune-and-finetune from the user's ResNet at the block counts that bracket each of `flops` (a learned
    policy's FLOPs per image), for `steps` optimisation steps (as many as the learned policy's stages
    trained the ResNet): (K, ResNet state dict, 0/1 row) each. Its runs are children of `runs.parent_id`;
    its time is logged there beside the policy's."""
    import ray

    from blockdrop.baselines import from_order
    from blockdrop.checkpoints import read_checkpoint
    from blockdrop.data import load_dataset
    from blockdrop.distributed import StageConfig, order_remotely, run_stage
    from blockdrop.flops import cost_model
    from blockdrop.prune import keeps_bracketing

    source = Path((reference or {}).get("file", ""))
    if not source.is_file():
        print(f"note: prune-and-finetune left out: the user's ResNet file ({source or 'unknown'}) is not here",
              file=sys.stderr)
        return []
    train_size = len(load_dataset(preset, "train", runs.dataset, runs.data_dir))
    start = ray.put(init_payload(preset, str(source)))
    order = order_remotely(preset.name, start, runs.dataset, runs.data_dir, runs.gpu)
    plain = argparse.Namespace(dataset=runs.dataset, preset=preset.name, epochs=None, lr=None, batch_size=None)
    settings = prune_settings(preset, plain, train_size, steps)
    keeps = sorted({keep for f in flops for keep in keeps_bracketing(cost_model(preset), order, f)})
    print(f"== prune and finetune (the competitor): {reference['source']} finetuned with the greedy "
          f"{', '.join(map(str, keeps))} blocks, {settings['epochs']} epochs each (as many steps as this "
          f"job's stages trained the ResNet)", file=sys.stderr)
    began, pruned = time.time(), []
    runs.output.mkdir(parents=True, exist_ok=True)
    for keep in keeps:
        row = from_order(keep, order).int().tolist()
        run_name = f"{runs.name}-prune-K{keep}"
        child, _ = runs.tracker.job_run(f"{runs.name}/prune-K{keep}", run_name,
                                        runs.params | {"stage": PRUNE, "keep": keep} | settings, parent_id=runs.parent_id)
        cfg = StageConfig(preset=preset.name, stage=PRUNE, dataset=runs.dataset, data_dir=runs.data_dir,
                          mlflow_uri=runs.tracker.uri, mlflow_run_id=child, seed=runs.seed,
                          max_bad_images=runs.max_bad_images, execution=runs.execution,
                          eval_every=settings["epochs"], reference=reference, static_policy=row,
                          **({"gamma": 0.0} | settings))
        checkpoint = run_stage(cfg, start, runs.workers, runs.gpu, run_name, runs.storage, runs.max_failures,
                               teacher_ref=start)
        out = runs.output / f"{run_name}.pt"
        shutil.copyfile(checkpoint, out)
        runs.tracker.client.log_artifact(child, str(out), "checkpoint")
        runs.tracker.finish(child, ok=True)
        pruned.append((keep, read_checkpoint(out).backbone, row))
    seconds = time.time() - began
    runs.tracker.log_metrics(runs.parent_id, {"prune_baseline_seconds": seconds, "blockdrop_seconds": blockdrop_seconds},
                             step=0)
    print(f"   prune and finetune: {len(keeps)} runs in {seconds:.0f} s (the policy's stages: {blockdrop_seconds:.0f} s)",
          file=sys.stderr)
    return pruned


def report_metrics(report) -> dict[str, float]:
    """A final report as MLflow metrics (final_*): its numbers, the reference's where there is one."""
    return {f"final_{k}": v for k, v in asdict(report).items() if isinstance(v, (int, float))}


def run(args: argparse.Namespace) -> None:
    from blockdrop.preflight import check_cluster_flags

    preset, plan = validate(args)  # before the imports of Ray and MLflow: a bad flag answers at once
    from blockdrop.tracking import Tracker, raw_images, resolve_uri

    stage_label = "all" if args.stage is None else ",".join(args.stage)
    name = args.name or f"{preset.name}-{stage_label.replace(',', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    uri = resolve_uri(args.mlflow_uri)
    check_cluster_flags(args, uri)  # MLflow, run storage and Ray answer, before anything starts
    import torch

    from blockdrop.baselines import from_order
    from blockdrop.checkpoints import read_checkpoint
    from blockdrop.data import load_dataset
    from blockdrop.distributed import StageConfig, analyse_remotely, final_report, order_remotely, run_stage
    from blockdrop.flops import cost_model

    start_ray(args.address, args.gpu, args.num_workers, args.storage_path)  # cluster checks first: a refused job leaves no run
    import ray

    tracker = Tracker(uri, args.experiment)
    done = tracker.finished_job(name)
    if done is not None:  # reopened only by a real resume: a single stage asked for more epochs than it ran
        ran = [m.step for m in tracker.client.get_metric_history(done, "test_accuracy")]
        if len(plan) > 1 or not ran or plan[0][1]["epochs"] <= max(ran) + 1:
            raise UserError(f"job {name} has finished already (MLflow run {done}); more --epochs of a single stage "
                            "continue it, another --name starts a new job")

    common = {"preset": preset.name, "num_workers": args.num_workers, "gpu": args.gpu,
              "dataset": args.dataset or preset.dataset, "init": args.init or "",
              "train_execution": args.train_execution, "policy": args.policy}
    job_params = common | {"stage": stage_label, "stages": ",".join(stage for stage, _ in plan)}
    if len(plan) == 1:
        job_params |= plan[0][1]
    elif any(stage == "finetune" for stage, _ in plan):
        job_params["gamma"] = finetune_gamma(preset, args)
    run_id, resumed = tracker.job_run(name, name, job_params)
    print(f"{'continuing' if resumed else 'started'} MLflow {tracker.run_url(run_id)}", file=sys.stderr)
    print(f"plan: {' -> '.join(stage for stage, _ in plan)}", file=sys.stderr)

    init_path, ok = args.init, False
    # the user's ResNet: what --init's checkpoint records, else --init's ResNet (measured by the first stage),
    # else the pretrain stage's
    reference = read_checkpoint(args.init).meta.get("reference") if args.init else None
    storage = storage_location(args.storage_path)
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None
    seconds = 0.0  # BlockDrop's own training time, against which prune-and-finetune's is set
    try:
        for stage, settings in plan:
            stage_run = run_id
            if len(plan) > 1:
                stage_run, _ = tracker.job_run(f"{name}/{stage}", f"{name}-{stage}",
                                               common | {"stage": stage} | settings, parent_id=run_id)
            print(describe(stage, settings, args.num_workers), file=sys.stderr)
            ref = ray.put(init_payload(preset, init_path)) if init_path else None
            static = order = teacher = None
            if stage in (PRUNE, "nest"):  # the greedy static order of the starting ResNet
                order = order_remotely(preset.name, ref, args.dataset, data_dir, args.gpu)
            if stage == PRUNE:
                static = from_order(settings["keep"], order).int().tolist()
            if stage in ("nest", PRUNE) or (stage == "finetune" and "policy_lr" not in settings):
                teacher = ref if stage in ("nest", PRUNE) else teacher_payload(preset, reference)
            cfg = StageConfig(preset=preset.name, stage=stage, dataset=args.dataset, data_dir=data_dir,
                              mlflow_uri=uri, mlflow_run_id=stage_run, seed=args.seed, max_bad_images=args.max_bad_images,
                              execution=args.train_execution, eval_every=args.eval_every, reference=reference,
                              reference_source=f"--init {Path(init_path).name}" if init_path else "",
                              reference_file=str(Path(init_path).resolve()) if init_path else "",
                              static_policy=static, order=order if stage == "nest" else None,
                              **({"gamma": 0.0} | {k: v for k, v in settings.items() if k != "keep"}))
            began = time.time()
            checkpoint = run_stage(cfg, ref, args.num_workers, args.gpu, f"{name}-{stage}",
                                   storage, args.max_failures, teacher_ref=teacher)
            seconds += time.time() - began
            out = output_folder(args.output, storage, name) / f"{name}-{stage}.pt"
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(checkpoint, out)
            if stage_run != run_id:
                tracker.client.log_artifact(stage_run, str(out), "checkpoint")
                tracker.finish(stage_run, ok=True)
            init_path = str(out)
            reference = stage_reference(read_checkpoint(out).meta, out)
        comparison = None
        if plan[-1][0] == "finetune" and not args.no_analysis:
            pruned = []
            if not args.no_prune_baseline:
                runs = PruneRuns(name, args.dataset, data_dir, args.num_workers, args.gpu, storage,
                                 output_folder(args.output, storage, name), tracker, run_id, common, args.seed,
                                 args.max_bad_images, args.train_execution, args.max_failures)
                train_size = len(load_dataset(preset, "train", args.dataset, args.data_dir))
                flops = read_checkpoint(init_path).meta["metrics"]["flops_per_image"]
                pruned = prune_baseline(preset, runs, reference, [flops], resnet_steps(plan, train_size), seconds)
            print("== analysis: the policy against its competitors at equal FLOPs, policy pictures", file=sys.stderr)
            try:
                comparison = analyse_remotely(preset.name, ray.put(init_payload(preset, init_path)), args.dataset,
                                              data_dir, uri, run_id, args.gpu, pruned)
            except ray.exceptions.RayError as err:  # the model is trained and saved: report, go on
                print(f"warning: the analysis failed ({type(err).__name__}: {str(err).splitlines()[0]}); "
                      f"run it again with python -m blockdrop.evaluate --compare --report-dir", file=sys.stderr)
        ok = True
    finally:
        if not ok:  # a rerun of a finished job that fails leaves the earlier record as it was
            tracker.finish(run_id, ok=False, restore=resumed)

    meta = read_checkpoint(init_path).meta
    report = final_report(meta, cost_model(preset).full)
    test = load_dataset(preset, "test", args.dataset, args.data_dir)
    # at the last epoch's step: the logged model takes the run's metrics of the step it is logged at
    final_step = int(meta.get("epoch", 0))
    tracker.log_metrics(run_id, report_metrics(report), step=final_step)
    example = raw_images(preset, torch.stack([test[i][0] for i in range(2)]).numpy())
    model_params = {"preset": preset.name, "stages": ",".join(stage for stage, _ in plan)}
    if plan[-1][0] == "finetune":
        model_params |= {k: plan[-1][1][k] for k in ("gamma", "lr", "policy_lr") if k in plan[-1][1]}
    model_uri = tracker.log_model(run_id, Path(init_path), report.text(), example, step=final_step, params=model_params)
    tracker.finish(run_id, ok=True)
    print(f"\n{preset.name} {' -> '.join(stage for stage, _ in plan)} ({name})")
    print(report.text())
    if comparison is not None:
        print(f"\n{comparison.text()}")
    print(f"\ncheckpoint: {init_path}")
    print(f"MLflow: {tracker.run_url(run_id)}; model {model_uri}")
    if uri.startswith("sqlite:"):
        print(f"browse: mlflow ui --backend-store-uri {uri}")
