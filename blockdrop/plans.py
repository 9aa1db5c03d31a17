"""What a training job or a sweep runs, and with what: stages, epochs, batch size, learning rates, penalties.

The rules: a flag wins; else the preset's defaults on its own dataset; else, on other data (an image
folder), a fixed number of optimisation steps whatever its size (presets.OTHER_DATA_STAGES). `--stage
all` means every stage after what --init holds. Planning reads --init once and checks everything that
needs no cluster; torch, but neither Ray nor MLflow (but to download an --init artifact).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

from blockdrop.checkpoints import Checkpoint, load_models, read_checkpoint
from blockdrop.choices import (DEFAULT_BUDGET_RANGE, DEFAULT_BUDGET_SAMPLING, DEPTH_POLICIES, DEPTH_STAGES, PRUNE, STAGES,
                               default_budget)
from blockdrop.data import load_dataset
from blockdrop.errors import UserError
from blockdrop.models.resnet import FlatResNet, PolicyNet
from blockdrop.parsers.sweep import check_flags as check_sweep_flags
from blockdrop.preflight import resolve_uri
from blockdrop.parsers.train import DEFAULT_POLICY, build_parser, check_budget_flags, check_flags
from blockdrop.presets import CURRICULUM_PACE, OTHER_DATA_STAGES, Preset, get_preset


def policy_kind(args: argparse.Namespace, init: Checkpoint | None) -> str:
    """--policy, else what the stages named belong to, else what --init (`init`, as read) holds (a depth
    policy's checkpoint continues as one, a BlockDrop curriculum checkpoint as BlockDrop), else the default."""
    if args.policy is not None:
        return args.policy
    named = set(args.stage or [])
    if named & {"adapt", "curriculum"}:
        return "blocks"
    if named & {"nest", "depth"}:
        return "depth"
    if init is not None and init.policy is not None:
        return ("budget" if "spend" in init.policy else "depth") if "rank" in init.policy else "blocks"
    return DEFAULT_POLICY


def plan_stages(preset: Preset, args: argparse.Namespace, policy: str, init: Checkpoint | None) -> list[str]:
    """The stages `--stage all` means: every stage after what --init (`init`) holds. BlockDrop's policy:
    adapt only for a ResNet pretrained without stochastic depth; the depth policy: nest, depth, finetune."""
    if args.stage is not None:
        return args.stage
    if policy in DEPTH_POLICIES:
        if init is None:
            return list(DEPTH_STAGES)
        stage = init.meta.get("stage")
        done = DEPTH_STAGES.index(stage) + 1 if stage in DEPTH_STAGES[1:] else 1
        return list(DEPTH_STAGES[done:]) or ["finetune"]
    if init is None:
        pretrain_drop = args.drop_rate if args.drop_rate is not None else preset.stages["pretrain"].drop_rate
        return ["pretrain", "curriculum", "finetune"] if pretrain_drop > 0 else list(STAGES)
    if init.policy is not None:
        return ["finetune"]
    config = init.meta.get("config", {})
    robust = init.meta.get("stage") == "adapt" or config.get("drop_rate", 0) > 0
    return ["curriculum", "finetune"] if robust else ["adapt", "curriculum", "finetune"]


def own_data(preset: Preset, args: argparse.Namespace) -> bool:
    return (args.dataset or preset.dataset) == preset.dataset


def resnet_steps(plan: list[tuple[str, dict]], train_size: int) -> int:
    """The optimisation steps the stages of `plan` train the ResNet for (adapt or nest, and finetune; the
    curriculum and depth stages freeze it): the length of prune-and-finetune, their competitor."""
    return sum(settings["epochs"] * max(train_size // settings["batch_size"], 1)
               for stage, settings in plan if stage in ("adapt", "nest", "finetune"))


def resnet_cycles(plan: list[tuple[str, dict]], train_size: int, batch_size: int, lr: float) -> list[list[float]]:
    """The schedule a competitor gets to train as the stages of `plan` train the ResNet: one cosine cycle per
    such stage (adapt or nest, then finetune), as many steps at `batch_size` as that stage took, peaking at that
    stage's lr relative to the competitor's `lr` where the stage trains the ResNet with SGD (an Adam stage's
    lr is not an SGD one: its cycle peaks at `lr`). [epochs, peak factor] each (blockdrop.stages.cycles_factor)."""
    per_epoch = max(train_size // batch_size, 1)
    depth = any(stage in ("nest", "depth") for stage, _ in plan)
    cycles = []
    for stage, settings in plan:
        if stage in ("adapt", "nest", "finetune"):
            steps = settings["epochs"] * max(train_size // settings["batch_size"], 1)
            peak = settings["lr"] / lr if stage != "finetune" or depth else 1.0
            cycles.append([max(1, round(steps / per_epoch)), peak])
    return cycles


def default_plan(preset: Preset, dataset: str | None, train_size: int, policy: str = DEFAULT_POLICY
                 ) -> list[tuple[str, dict]]:
    """The stages after a user's ResNet (adapt, curriculum, finetune; or nest, depth, finetune) with their
    default settings on `dataset`."""
    plain = build_parser().parse_args(["--preset", preset.name] + (["--dataset", dataset] if dataset else []))
    stages = list((DEPTH_STAGES if policy in DEPTH_POLICIES else STAGES)[1:])
    return [(stage, stage_settings(preset, stage, plain, stages, train_size, policy in DEPTH_POLICIES))
            for stage in stages]


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
    elif stage in ("depth", "finetune") and "budget_range" in settings:
        low, high = settings["budget_range"]
        how = {"log": " log-uniformly", "sandwich": " uniformly and at the low end (sandwich)"}.get(
            settings.get("budget_sampling"), "")
        parts.append(f"budget policy, mean budgets drawn{how} from {low:g}-{high:g} of the FLOPs"
                     if stage == "finetune" else "budget policy (the depth policy's network)")
    elif stage in ("depth", "finetune"):
        parts.append(f"depth policy, gamma {settings['gamma']:g}")
    if stage == "nest":
        parts.append("every image a random prefix of the greedy order, soft labels of the user's ResNet")
    if stage == PRUNE:
        parts.append(f"{settings['keep']} blocks kept (greedy order of the starting ResNet)")
    return f"== {stage}: {', '.join(parts)}, {workers} workers"


@dataclass
class Plan:
    """What a training job runs: its stages with their settings, and the --init it starts from, read once."""

    preset: Preset
    policy: str  # "depth", "budget", "blocks", or "static" (prune)
    stages: list[tuple[str, dict]]
    init: Checkpoint | None
    init_models: tuple[FlatResNet, torch.nn.Module | None] | None  # --init's ResNet and policy, fitted to the preset
    train_size: int

    @property
    def names(self) -> list[str]:
        return [stage for stage, _ in self.stages]


def check_stages(preset: Preset, args: argparse.Namespace, policy: str, stages: list[str]) -> None:
    """The stages in their policy's order, each once, with the flags they need."""
    order = DEPTH_STAGES if policy in DEPTH_POLICIES else STAGES
    if stages != [PRUNE] and (any(s not in order for s in stages) or sorted(stages, key=order.index) != stages
                              or len(set(stages)) != len(stages)):
        other = "blocks" if policy in DEPTH_POLICIES else "depth"
        raise UserError(f"the {policy} policy's stages run in the order {' -> '.join(order)}, each once: not "
                        f"{','.join(stages)}" + (f" (those of --policy {other}?)" if all(
                            s in (STAGES if other == "blocks" else DEPTH_STAGES) for s in stages) else ""))
    if args.epochs is not None and (min(args.epochs) < 1 or len(args.epochs) not in (1, len(stages))):
        raise UserError(f"--epochs takes one number (>= 1) or one per stage run ({len(stages)}: "
                        f"{', '.join(stages)}), not {','.join(map(str, args.epochs))}")
    if (stages == [PRUNE]) != (args.keep is not None):
        raise UserError("--stage prune and --keep K go together: --stage prune --keep 8 --init RESNET")
    if stages == [PRUNE] and not 0 <= args.keep <= preset.num_blocks:
        raise UserError(f"--keep must be between 0 and {preset.num_blocks} (the blocks of {preset.name}), not {args.keep}")
    if stages[0] != "pretrain" and not args.init:
        raise UserError(f"--stage {stages[0]} starts from a trained ResNet: pass --init with a pretrain checkpoint "
                        f"(checkpoints/*-pretrain.pt), an original BlockDrop file or a torchvision ResNet file")


def validate(args: argparse.Namespace) -> Plan:
    """Every check that needs no cluster, before any work starts (the flags' own first:
    blockdrop.parsers.train.check_flags); the stages to run and their settings."""
    check_flags(args)
    preset = get_preset(args.preset)
    init = read_checkpoint(args.init) if args.init else None
    policy = args.policy = policy_kind(args, init)  # resolved: the run records it
    check_budget_flags(args)  # again, now that the policy is known (no --policy: --init's, or the default)
    stages = plan_stages(preset, args, policy, init)
    check_stages(preset, args, policy, stages)
    if stages == [PRUNE]:
        args.policy = "static"  # what the run records: a pruned ResNet runs one set of blocks for every image
    if stages[0] in ("finetune", "depth") and init is not None and init.policy is None:
        needs = "a curriculum checkpoint" if policy == "blocks" else "a checkpoint of the nest or depth stage"
        raise UserError(f"--stage {stages[0]} needs a policy: {args.init} has none; pass {needs}")
    # --init fits the preset, or a clear error now rather than on a worker
    init_models = load_models(preset, init)[:2] if init is not None else None
    # the data must be there before workers look for it
    train_size = len(load_dataset(preset, "train", args.dataset, args.data_dir))
    depth = policy in DEPTH_POLICIES
    settings = [(stage, stage_settings(preset, stage, args, stages, train_size, depth)
                 | (budget_settings(args) if policy == "budget" and stage != "pretrain" else {})) for stage in stages]
    return Plan(preset, args.policy, settings, init, init_models, train_size)


def budget_settings(args: argparse.Namespace) -> dict:
    """A budget policy's stages: the range of mean budgets its finetuning draws from, and the budget it
    answers at when a request names none."""
    low, high = args.budget_range or DEFAULT_BUDGET_RANGE
    return {"budget_range": [low, high], "budget": args.budget if args.budget is not None else default_budget(low, high),
            "budget_sampling": args.budget_sampling or DEFAULT_BUDGET_SAMPLING}


@dataclass
class SweepPlan:
    """What every trial of a sweep runs: the finetuning of --init (read once) with these settings."""

    preset: Preset
    init: str  # a local file (an MLflow artifact URI downloaded)
    checkpoint: Checkpoint
    backbone: FlatResNet
    policy: PolicyNet
    depth: bool  # a depth policy's checkpoint: its own finetune (the ResNet alone, soft labels)
    epochs: int
    batch_size: int
    lrs: list[float]
    policy_lr: float | None
    weight_decay: float
    train_size: int
    budget_ranges: list[list[float]]  # budget models: one trial per range (and lr)
    budget_sampling: str  # ... and how their finetunes draw the budgets

    def trials(self, penalties: list[float] | None) -> list[dict]:
        """The grid's trials but for the lr: a gamma each, then a budget range each."""
        return ([{"gamma": g, "budget_range": None} for g in penalties or []]
                + [{"gamma": None, "budget_range": r} for r in self.budget_ranges])


def plan_sweep(args: argparse.Namespace) -> SweepPlan:
    """Every check of a sweep that needs no cluster (the flags' own first), and its trials' settings: the
    preset's finetune defaults (on other data: a fixed number of steps), or the flags."""
    check_sweep_flags(args)
    init = resolve_init(args.init, args.mlflow_uri)
    preset = get_preset(args.preset)
    checkpoint = read_checkpoint(init)
    backbone, policy, _ = load_models(preset, checkpoint)
    if not isinstance(policy, PolicyNet):
        raise UserError(f"--init {args.init} holds no policy: a sweep finetunes a curriculum checkpoint")
    train_size = len(load_dataset(preset, "train", args.dataset, args.data_dir))
    own = (args.dataset or preset.dataset) == preset.dataset
    depth = "rank" in checkpoint.policy  # a depth or budget policy's: either kind of trial starts from it
    if args.budget_ranges and not depth:
        raise UserError(f"--budget-ranges trains budget models, which start from a depth policy's checkpoint "
                        f"(JOB-depth.pt of train_job.py --policy depth or --policy budget); --init {args.init} holds "
                        "BlockDrop's per-block policy")
    key = "finetune_depth" if depth else "finetune"
    defaults = preset.stages[key] if own else OTHER_DATA_STAGES[key]
    batch = args.batch_size or defaults.batch_size
    epochs = args.epochs or (defaults.epochs if own else math.ceil(defaults.steps / max(train_size // batch, 1)))
    return SweepPlan(preset, init, checkpoint, backbone, policy, depth, epochs, batch, args.lrs or [defaults.lr],
                     args.policy_lr or defaults.policy_lr, defaults.weight_decay, train_size,
                     [list(r) for r in args.budget_ranges or []],
                     args.budget_sampling or DEFAULT_BUDGET_SAMPLING)


def is_artifact_uri(init: str) -> bool:
    return "://" in init or init.startswith(("runs:/", "models:/"))


def resolve_init(init: str, mlflow_flag: str | None) -> str:
    """A local path for --init; MLflow artifact URIs are downloaded from the sweep's tracking server."""
    if not is_artifact_uri(init):
        return init
    from blockdrop.tracking import download  # MLflow only for an artifact URI: not at start-up

    try:
        local = download(init, resolve_uri(mlflow_flag))
    except Exception as err:
        raise UserError(f"--init {init}: cannot download it from MLflow ({type(err).__name__}: {err})") from None
    files = sorted(local.glob("*.pt")) if local.is_dir() else [local]
    if len(files) != 1:
        raise UserError(f"--init {init} holds {len(files)} .pt files; name one (runs:/<id>/checkpoint/<file>)")
    return str(files[0])
