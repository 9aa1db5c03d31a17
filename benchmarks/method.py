"""Does a per-image policy beat pruning? The depth policy, block pruning (prune-and-finetune) and channel pruning,
side by side on one image folder, from one user's ResNet, over several seeds, every choice made on the
validation split and every figure a test figure.

    scripts/with-venv python benchmarks/method.py --data mixed|shapes|digits [--seeds 0,1,2] [--gammas=-1,-4]
        [--combine 0.5] [--workdir DIR] [--output FILE] [--quick]

In-process (no Ray: one process, the stages' own code, blockdrop.stages.setup_stage and train_epoch, with
train_job.py's settings for an image folder), preset R32_C10:

1. writes the folder (blockdrop.sample_data); its training images lose 10% of each class to the validation
   split (blockdrop.data.VAL_SHARE); pretrains the user's ResNet-32 on the rest once, without stochastic depth,
   30 epochs (the user's model is given: it is not re-drawn per seed);
2. per seed (nest, depth, finetune and every competitor re-seeded):
   - depth: the depth policy (nest -> depth -> finetune) at each gamma; nest and depth are shared by the gammas;
   - combined: the depth policy on your ResNet channel-pruned to `--combine` of its FLOPs (the pruning not
     finetuned apart: nest is its finetuning), at each gamma;
   - block pruning (prune and finetune) at the block counts that bracket every learned point's FLOPs, and
     channel pruning (torch-pruning, criterion chosen on validation) at every learned point's FLOPs. Each
     trains the ResNet for exactly the depth policy's ResNet steps (nest + finetune), in the same two cosine
     cycles at the same lrs, with the same distillation from your ResNet (blockdrop.competitors' rule);
3. compares every learned point, image by image on the test set, with block pruning and channel pruning at its
   FLOPs, with the shuffled-policy control (its own choices permuted across images: same FLOPs, same histogram)
   and with your ResNet; intervals pool seeds and images (blockdrop.stats.seeded_difference);
4. the service's front: on each seed, every model (all methods) placed by its validation accuracy and FLOPs;
   the front chosen there; at each learned FLOPs, the best model within those FLOPs (on validation) of the
   front, of block pruning alone and of channel pruning alone, compared on the test images.
"""
from __future__ import annotations

import argparse
import copy
import os
import pickle
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from results_table import emit  # noqa: E402

from blockdrop import channels as C  # noqa: E402
from blockdrop.analysis import competitor_curves, compare, holdout, shuffled_scores  # noqa: E402
from blockdrop.baselines import from_order, greedy_order  # noqa: E402
from blockdrop.checkpoints import build_policy, read_checkpoint, save_checkpoint  # noqa: E402
from blockdrop.choices import CHANNELS, PRUNED, SHUFFLED  # noqa: E402
from blockdrop.data import load_dataset  # noqa: E402
from blockdrop.flops import cost_model  # noqa: E402
from blockdrop.metrics import tally  # noqa: E402
from blockdrop.pareto import Point, pareto_front  # noqa: E402
from blockdrop.parsers.train import build_parser  # noqa: E402
from blockdrop.plans import prune_settings, resnet_cycles, resnet_steps, validate  # noqa: E402
from blockdrop.presets import get_preset  # noqa: E402
from blockdrop.prune import keeps_bracketing, static_chooser  # noqa: E402
from blockdrop.sample_data import write_folder  # noqa: E402
from blockdrop.stages import StageConfig, setup_stage, spend_on, train_epoch  # noqa: E402
from blockdrop.stats import seeded_difference  # noqa: E402

PRESET = get_preset("R32_C10")
CPU = torch.device("cpu")
USER_LR = 0.05  # the user's ResNet-32 on ~1,300 images: at 0.1 it ended at 38-86% test accuracy by seed


def state_of(models) -> dict:
    return {"backbone": copy.deepcopy(models.backbone.state_dict()),
            "policy": None if models.policy is None else copy.deepcopy(models.policy.state_dict())}


def train(stage: str, settings: dict, data: Path, init: dict | None, teacher: dict | None, seed: int,
          scale: float = 1.0, **extra) -> tuple[dict, float, int]:
    """One stage in this process, as a Ray Train worker runs it: (the models' state, seconds, ResNet steps)."""
    torch.manual_seed(seed)
    epochs = max(1, round(settings["epochs"] * scale))
    keys = {k: v for k, v in settings.items() if k in StageConfig.__dataclass_fields__}
    if extra.get("cycles") and scale != 1.0:
        extra["cycles"] = [[max(1, round(n * scale)), peak] for n, peak in extra["cycles"]]
        epochs = sum(int(n) for n, _ in extra["cycles"])
    cfg = StageConfig(**({"gamma": 0.0} | keys | {"epochs": epochs}), preset=PRESET.name, stage=stage,
                      dataset="imagefolder", data_dir=str(data), seed=seed, **extra)
    models, optimizer, schedule = setup_stage(cfg, PRESET, init, teacher, CPU)
    train_set = load_dataset(PRESET, "train", "imagefolder", data)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    row = None if cfg.static_policy is None else torch.tensor(cfg.static_policy, dtype=torch.float32)
    began = time.process_time()
    for epoch in range(cfg.epochs):
        stats = train_epoch(stage, models, loader, optimizer, epoch, cfg.gamma, CPU, cfg.drop_rate, static=row,
                            budget_range=cfg.budget_range, budget_sampling=cfg.budget_sampling)
        schedule.step()
        if stats.spent is not None:  # a budget policy: its price table, on the validation split as the workers do
            val = load_dataset(PRESET, "val", "imagefolder", data)
            models.policy.calibrate(*spend_on(models.policy, DataLoader(val, batch_size=256), CPU))
    trains_resnet = stage in ("pretrain", "nest", "prune", "finetune")
    return state_of(models), time.process_time() - began, cfg.epochs * len(loader) if trains_resnet else 0


def kept(parts: Path, label: str, run) -> tuple[dict, float, int]:
    """`run()` (one stage: state, seconds, ResNet steps), or what it returned before, kept under `parts/label.pt`:
    an interrupted seed resumes after its last finished stage (every stage reseeds itself, so skipping the ones
    before changes nothing)."""
    path = parts / f"{label}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=False)
        return saved["state"], saved["seconds"], saved["steps"]
    state, seconds, steps = run()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": state, "seconds": seconds, "steps": steps}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return state, seconds, steps


def user_resnet(data: Path, workdir: Path, epochs: int) -> Path:
    """The user's ResNet-32: standard training, no stochastic depth (kept in `workdir`)."""
    path = workdir / f"user-resnet32-{epochs}-lr{USER_LR:g}.pt"
    if not path.exists():
        print(f"pretraining the user's ResNet-32 ({epochs} epochs)", flush=True)
        settings = {"epochs": epochs, "batch_size": 128, "lr": USER_LR, "weight_decay": 5e-4, "drop_rate": 0.0}
        state, seconds, _ = train("pretrain", settings, data, None, None, seed=0)
        backbone = PRESET.build_backbone()
        backbone.load_state_dict(state["backbone"])
        save_checkpoint(path, PRESET, backbone, None, {"stage": "pretrain", "seconds": seconds})
    return path


def plan_for(policy: str, user: Path, data: Path, gamma: float, extra: list[str] | None = None) -> dict[str, dict]:
    """train_job.py's stages and settings for `--init USER --policy POLICY --penalty GAMMA` (and `extra` flags) on
    this folder."""
    args = build_parser().parse_args(["--preset", PRESET.name, "--dataset", "imagefolder", "--data-dir", str(data),
                                      "--init", str(user), "--policy", policy, f"--penalty={gamma}"] + (extra or []))
    return dict(validate(args).stages)


def modules(state: dict):
    backbone = PRESET.build_backbone(state["backbone"])
    backbone.load_state_dict(state["backbone"])
    policy = None
    if state.get("policy") is not None:
        policy = build_policy(PRESET, state["policy"])
        policy.load_state_dict(state["policy"])
    return backbone, policy


@dataclass
class Model:
    """One trained model of one seed: its test and validation tallies, its ResNet steps and CPU seconds."""

    name: str  # "depth, gamma -1", "block pruning K=4", ...
    method: str  # "depth", "combined", PRUNED, CHANNELS
    seed: int
    state: dict
    steps: int
    seconds: float
    row: list[int] | None = None  # the pruned ones' static policy
    keep: int = 0
    test: object = None
    val: object = None
    comparison: object = None
    extra: dict = field(default_factory=dict)

    @property
    def flops(self) -> float:
        return self.test.report(cost_model(PRESET).full).flops_mean

    @property
    def val_point(self) -> Point:
        r = self.val.report(cost_model(PRESET).full)
        return Point(r.accuracy, r.flops_mean, self.name, {"model": self})

    def correct(self) -> np.ndarray:
        return self.test.records().correct.astype(np.float64)


def measure(model: Model, test, val) -> None:
    """The model's tallies (with each image's outcome) on the test set and the validation split."""
    backbone, policy = modules(model.state)
    chooser = static_chooser(torch.tensor(model.row, dtype=torch.float32)) if model.row is not None else policy
    costs = cost_model(PRESET, policy, backbone)
    model.test, model.val = (tally(backbone, chooser, DataLoader(ds, batch_size=256), costs, CPU, records=True)
                             for ds in (test, val))


def run_seed(seed: int, args, data: Path, user: Path, user_state: dict, order: list[int], scale: float,
             parts: Path) -> list[Model]:
    """Every model of one seed, trained and measured (each trained stage kept under `parts`)."""
    gammas = [float(g) for g in args.gammas.split(",")]
    plans = {g: plan_for("depth", user, data, g) for g in gammas}
    plan = plans[gammas[0]]
    train_size = len(load_dataset(PRESET, "train", "imagefolder", data))
    stages = [("nest", plan["nest"]), ("finetune", plan["finetune"])]
    models: list[Model] = []

    def depth_models(method: str, start: dict, start_order: list[int]) -> None:
        nested, s_nest, n_nest = kept(parts, f"{method}-nest", lambda: train(
            "nest", plan["nest"], data, start, user_state, seed, scale, order=start_order))
        trained, s_depth, _ = kept(parts, f"{method}-depth", lambda: train(
            "depth", plan["depth"], data, nested, None, seed, scale))
        for gamma in gammas:
            state, s_ft, n_ft = kept(parts, f"{method}-finetune-gamma{gamma:g}", lambda: train(
                "finetune", plans[gamma]["finetune"], data, trained, user_state, seed, scale))
            label = "depth policy" if method == "depth" else f"depth policy on channels {args.combine:g}"
            models.append(Model(f"{label}, gamma {gamma:g}", method, seed, state, n_nest + n_ft, s_nest + s_depth + s_ft))
            print(f"[seed {seed}] {models[-1].name}: {models[-1].seconds:.0f} CPU s", flush=True)

    depth_models("depth", user_state, order)
    if args.combine:  # your ResNet channel-pruned (not finetuned apart), then the depth policy's stages
        backbone, _ = modules(user_state)
        val = load_dataset(PRESET, "val", "imagefolder", data)
        choice = C.choose(backbone, args.combine * cost_model(PRESET).full, 32, 10,
                          DataLoader(holdout(val, 1000), batch_size=256), CPU)
        narrow = C.pruned(backbone, choice.kept, 10)
        train_unaug = load_dataset(PRESET, "train", "imagefolder", data, augment=False)
        narrow_order = greedy_order(narrow, DataLoader(holdout(train_unaug), batch_size=256), CPU)
        depth_models("combined", {"backbone": narrow.state_dict(), "policy": None}, narrow_order)
    learned = list(models)
    for m in learned:
        measure(m, *args.splits)
    # the competitors: as many ResNet steps as the depth policy's, in its cycles, with its soft labels
    settings = prune_settings(PRESET, argparse.Namespace(dataset="imagefolder", batch_size=None, lr=None, epochs=None,
                                                         preset=PRESET.name), train_size, resnet_steps(stages, train_size))
    cycles = resnet_cycles(stages, train_size, settings["batch_size"], settings["lr"])
    settings["epochs"] = sum(int(n) for n, _ in cycles)
    flops = [m.flops for m in learned]
    for keep in sorted({k for f in flops for k in keeps_bracketing(cost_model(PRESET), order, f)}):
        row = from_order(keep, order).int().tolist()
        state, seconds, steps = kept(parts, f"blocks-K{keep}", lambda: train(
            "prune", settings, data, user_state, user_state, seed, scale, static_policy=row, cycles=cycles))
        models.append(Model(f"block pruning K={keep}", PRUNED, seed, state, steps, seconds, row, keep))
    backbone, _ = modules(user_state)
    val = load_dataset(PRESET, "val", "imagefolder", data)
    for target in sorted(set(flops)):
        choice = C.choose(backbone, target, 32, 10, DataLoader(holdout(val, 1000), batch_size=256), CPU)
        row = [1] * PRESET.num_blocks
        state, seconds, steps = kept(parts, f"channels-{target:.6g}", lambda: train(
            "prune", settings, data, user_state, user_state, seed, scale, static_policy=row, cycles=cycles,
            channels=choice.kept))
        models.append(Model(f"channel pruning {target / cost_model(PRESET).full:.2f}", CHANNELS, seed, state, steps,
                            seconds, row, PRESET.num_blocks, extra={"criterion": choice.criterion,
                                                                    "criteria": choice.accuracy}))
    for m in models[len(learned):]:
        measure(m, *args.splits)
        print(f"[seed {seed}] {m.name}: {m.seconds:.0f} CPU s, {m.steps} ResNet steps", flush=True)
    competitors = [(m.keep, modules(m.state)[0], torch.tensor(m.row, dtype=torch.float32))
                   for m in models if m.row is not None]
    curves = competitor_curves(competitors, args.splits[0], PRESET, CPU)
    train_unaug = load_dataset(PRESET, "train", "imagefolder", data, augment=False)
    for m in learned:
        backbone, policy = modules(m.state)
        costs = cost_model(PRESET, policy, backbone)
        m.comparison, found = compare(backbone, policy, args.splits[0], train_unaug, costs, CPU, pruned=curves)
        # each competitor's per-image scores at the learned point's FLOPs, for intervals over seeds and images
        m.extra["scores"] = {kind: curve.at(m.flops)[0] for kind, curve in curves.items()}
        m.extra["scores"][SHUFFLED] = shuffled_scores(backbone, found, DataLoader(args.splits[0], batch_size=256), costs,
                                                      CPU)
    return models


def best_within(models: list[Model], flops: float) -> Model | None:
    """The model a user would pick at `flops`: the most accurate on validation among those that cost at most
    that much on validation."""
    fits = [m for m in models if m.val_point.flops <= flops * 1.001]
    return max(fits, key=lambda m: m.val_point.accuracy) if fits else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("digits", "shapes", "mixed"), default="mixed")
    parser.add_argument("--per-class", type=int, default=180, help="shapes: images per class (default 180)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--gammas", default="-1,-4", help="gammas of the depth policy (default -1,-4)")
    parser.add_argument("--combine", type=float, default=0.5,
                        help="the depth policy on your ResNet channel-pruned to this share of its FLOPs too (0: not)")
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="every stage at a tenth of its length: a smoke test")
    parser.add_argument("--workdir", help="data and the user's ResNet (default ./method-DATA)")
    parser.add_argument("--output", help="results file (default benchmarks/results/method_DATA.md)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    scale = 0.1 if args.quick else 1.0
    tag = args.data + (f"{args.per_class}" if args.data == "shapes" and args.per_class != 180 else "")
    workdir = Path(args.workdir or f"method-{tag}").resolve()
    data = workdir / "data"
    if not data.exists():
        write_folder(args.data, data, 32, args.per_class)
    args.user_epochs = max(1, round(args.pretrain_epochs * scale))
    user = user_resnet(data, workdir, args.user_epochs)
    user_state = {"backbone": read_checkpoint(user).backbone, "policy": None}
    args.splits = (load_dataset(PRESET, "test", "imagefolder", data), load_dataset(PRESET, "val", "imagefolder", data))
    backbone, _ = modules(user_state)
    user_model = Model("your ResNet-32", "user", 0, user_state, 0, read_checkpoint(user).meta.get("seconds", 0.0))
    measure(user_model, *args.splits)
    train_unaug = load_dataset(PRESET, "train", "imagefolder", data, augment=False)
    order = greedy_order(backbone, DataLoader(holdout(train_unaug), batch_size=256), CPU)
    by_seed = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        # each seed's measured models are kept in the work folder: a rerun resumes after the last finished seed
        # (the same settings: delete the file to train that seed again); within a seed, each trained stage is kept
        # under seedN-.../ so an interrupted seed resumes after its last finished stage
        cache = workdir / f"seed{seed}-{args.gammas}-{args.combine:g}{'-quick' if args.quick else ''}.pkl"
        if cache.exists():
            by_seed[seed] = pickle.loads(cache.read_bytes())
            continue
        by_seed[seed] = run_seed(seed, args, data, user, user_state, order, scale, cache.with_suffix(""))
        for m in by_seed[seed]:
            m.state = None  # measured: the weights are not needed again
        cache.write_bytes(pickle.dumps(by_seed[seed]))
        shutil.rmtree(cache.with_suffix(""), ignore_errors=True)  # the seed's stages: kept in the file now
    write(args, tag, data, user_model, by_seed)


def write(args, tag: str, data: Path, user: Model, by_seed: dict[int, list[Model]]) -> None:
    full = cost_model(PRESET).full
    test, val = args.splits
    seeds = sorted(by_seed)
    train_size = len(load_dataset(PRESET, "train", "imagefolder", data))
    u = user.test.report(full)
    lines = [f"### Per-image policies against block and channel pruning: {tag} (32x32 RGB folder, {train_size} train / "
             f"{len(val)} validation / {len(test)} test images), ResNet-32", "",
             f"{time.strftime('%Y-%m-%d')}, {platform.node()}: {os.cpu_count()} CPU cores, torch {torch.__version__}, "
             f"in-process (benchmarks/method.py, the stages' own code), seeds {args.seeds}, gammas {args.gammas}"
             f"{', quick (every stage a tenth as long: not evidence)' if args.quick else ''}. Command: "
             f"`python benchmarks/method.py --data {args.data} --seeds {args.seeds} --gammas={args.gammas} "
             f"--combine {args.combine:g}`", "",
             f"Your ResNet-32 (standard training, {args.user_epochs} epochs, fixed across seeds): "
             f"**{100 * u.accuracy:.2f}%** on the test images ({100 * user.val.report(full).accuracy:.2f}% on "
             f"validation), 15 blocks, {full:.2E} FLOPs. Every competitor trained the ResNet for the depth policy's "
             f"ResNet steps, in the same cosine cycles, with the same distillation from your ResNet; every figure "
             f"below is a test figure; every choice (the channel criterion, the front) was made on validation.", ""]
    names = list(dict.fromkeys(m.name for models in by_seed.values() for m in models))
    lines += ["#### Every model, mean +- spread (sd) over seeds", "",
              "| model | accuracy | val accuracy | blocks (std within) | unique policies | FLOPs (speedup) | easy / hard "
              "blocks | ResNet steps | CPU s |", "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        found = [m for s in seeds for m in by_seed[s] if m.name == name]
        reports = [m.test.report(full) for m in found]
        acc = np.array([r.accuracy for r in reports]) * 100
        vacc = np.array([m.val.report(full).accuracy for m in found]) * 100
        groups = [m.comparison.groups for m in found if m.comparison is not None and m.comparison.groups]
        easy_hard = (f"{np.mean([g['easy'].blocks for g in groups]):.2f} / {np.mean([g['hard'].blocks for g in groups]):.2f}"
                     if groups else "")
        lines.append(f"| {name} | {acc.mean():.2f} +- {acc.std():.2f} ({len(found)} seeds) | {vacc.mean():.2f} | "
                     f"{np.mean([r.blocks_mean for r in reports]):.2f} ({np.mean([r.blocks_std for r in reports]):.2f}) | "
                     f"{np.mean([r.unique_policies for r in reports]):.1f} | "
                     f"{np.mean([r.flops_mean for r in reports]):.2E} ({np.mean([r.speedup for r in reports]):.2f}x) | "
                     f"{easy_hard} | {found[0].steps} | {np.mean([m.seconds for m in found]):.0f} |")
    lines += ["", "#### Each learned point against its competitors at its FLOPs, pooled over seeds and images "
              "(learned minus competitor, 95% interval resampling seeds and images)", "",
              "| learned model | vs block pruning | vs channel pruning | vs shuffled policies (what routing per image "
              "buys) | vs your ResNet | channel criterion chosen |", "|---|---|---|---|---|---|"]
    for name in names:
        found = [m for s in seeds for m in by_seed[s] if m.name == name and m.comparison is not None]
        if not found:
            continue

        cells = []
        for kind in (PRUNED, CHANNELS, SHUFFLED):
            d = seeded_difference([m.correct() for m in found], [m.extra["scores"][kind] for m in found])
            cells.append(f"{d.text()} ({d.verdict}; {found[0].comparison.versus[kind].where})")
        vs_user = seeded_difference([m.correct() for m in found], [user.correct()] * len(found))
        criteria = ", ".join(sorted({c.extra.get("criterion", "") for s in seeds for c in by_seed[s]
                                     if c.method == CHANNELS and c.extra}))
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {cells[2]} | {vs_user.text()} ({vs_user.verdict}) | "
                     f"{criteria} |")
    lines += front_section(by_seed, seeds, full)
    output = args.output or str(Path(__file__).parent / "results" / f"method_{tag}.md")
    emit(lines, output)


def front_section(by_seed: dict[int, list[Model]], seeds: list[int], full: float) -> list[str]:
    """The front the service offers (every model, chosen on validation) against each kind of pruning alone, at
    each learned point's FLOPs, pooled over seeds and images."""
    lines = ["", "#### The front the service offers, against each kind of pruning alone", "",
             "On each seed every model above is placed by its validation accuracy and FLOPs; at each FLOPs budget the "
             "model a user would pick (the most accurate on validation within the budget) is taken from the whole "
             "front, from block pruning alone and from channel pruning alone, and compared on the test images.", "",
             "| FLOPs budget (share) | front picks | its accuracy | vs block pruning alone | vs channel pruning "
             "alone |", "|---|---|---|---|---|"]
    targets = sorted({round(m.flops / full, 2) for s in seeds for m in by_seed[s] if m.comparison is not None})
    for share in targets:
        budget = share * full * 1.02  # the learned points' own FLOPs, with the rounding's slack
        picks = {kind: [] for kind in ("front", PRUNED, CHANNELS)}
        for s in seeds:
            models = by_seed[s]
            front = [p.info["model"] for p in pareto_front([m.val_point for m in models])]
            picks["front"].append(best_within(front, budget))
            picks[PRUNED].append(best_within([m for m in models if m.method == PRUNED], budget))
            picks[CHANNELS].append(best_within([m for m in models if m.method == CHANNELS], budget))
        if any(p is None for p in picks["front"]):
            continue
        chosen = ", ".join(sorted({p.name for p in picks["front"]}))
        acc = np.mean([p.test.report(full).accuracy for p in picks["front"]]) * 100
        cells = []
        for kind in (PRUNED, CHANNELS):
            if any(p is None for p in picks[kind]):
                cells.append("none within")
                continue
            d = seeded_difference([p.correct() for p in picks["front"]], [p.correct() for p in picks[kind]])
            cells.append(f"{d.text()} ({d.verdict}; {', '.join(sorted({p.name for p in picks[kind]}))})")
        lines.append(f"| {share:.2f} | {chosen} | {acc:.2f}% | {cells[0]} | {cells[1]} |")
    return lines


if __name__ == "__main__":
    main()
