"""Does a per-image policy beat pruning? BlockDrop's policy, the depth policy and prune-and-finetune,
side by side on one image folder, from one user's ResNet, same seeds and data, paired intervals.

    scripts/with-venv python benchmarks/method.py --data mixed|digits|shapes [--per-class 500]
        [--seeds 0] [--gammas=-1,-4] [--ablations] [--workdir DIR] [--output FILE] [--quick]

In-process (no Ray: one process, the stages' own code, blockdrop.stages.setup_stage and
blockdrop.stages.train_epoch, with train_job.py's settings for an image folder), preset R32_C10:

1. writes the folder (blockdrop.sample_data) and pretrains the user's ResNet-32 on it, without
   stochastic depth, 30 epochs (kept in the work folder: the user's model is given, not re-drawn);
2. per seed:
   - blocks: BlockDrop's policy as train_job.py runs it from the user's ResNet (adapt -> curriculum ->
     finetune), at each gamma;
   - depth: the depth policy (nest -> depth -> finetune), at each gamma (nest and depth are shared:
     gamma only enters the finetune);
   - prune and finetune, with the user's ResNet's soft labels, at the block counts that bracket every
     learned point's FLOPs, each as long as BlockDrop's stages train the ResNet;
   - with --ablations: the depth policy without its finetune (on the nested ResNet), without
     distillation (labels only, nest and finetune), and prune-and-finetune without distillation;
3. compares every learned point with the image-blind policies on its own ResNet and with
   prune-and-finetune at its FLOPs (blockdrop.analysis.compare: 95% paired bootstrap intervals over
   images), reports blocks for easy and hard images where the folder says which, and the time each
   training took; seeds are pooled image by image for the verdict.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from results_table import emit  # noqa: E402

from blockdrop import depth as D  # noqa: E402
from blockdrop.analysis import PRUNED, compare, pruned_curve  # noqa: E402
from blockdrop.baselines import from_order, greedy_order  # noqa: E402
from blockdrop.checkpoints import build_policy, read_checkpoint, save_checkpoint  # noqa: E402
from blockdrop.data import load_dataset  # noqa: E402
from blockdrop.metrics import tally  # noqa: E402
from blockdrop.flops import cost_model  # noqa: E402
from blockdrop.parsers.train import build_parser  # noqa: E402
from blockdrop.plans import prune_settings, resnet_steps, validate  # noqa: E402
from blockdrop.presets import get_preset  # noqa: E402
from blockdrop.prune import keeps_bracketing  # noqa: E402
from blockdrop.sample_data import write_folder  # noqa: E402
from blockdrop.stats import paired_difference  # noqa: E402
from blockdrop.stages import StageConfig, setup_stage, train_epoch  # noqa: E402

PRESET = get_preset("R32_C10")
CPU = torch.device("cpu")


def payload(models) -> dict:
    policy = models.policy
    return {"backbone": copy.deepcopy(models.backbone.state_dict()),
            "policy": None if policy is None else copy.deepcopy(policy.state_dict())}


def train(stage: str, settings: dict, data: Path, init: dict | None, teacher: dict | None, seed: int,
          order: list[int] | None = None, static: list[int] | None = None, scale: float = 1.0):
    """One stage in this process, as a Ray Train worker runs it; returns the models and the seconds."""
    torch.manual_seed(seed)
    epochs = max(1, round(settings["epochs"] * scale))
    keys = {k: v for k, v in settings.items() if k in StageConfig.__dataclass_fields__}
    cfg = StageConfig(**({"gamma": 0.0} | keys | {"epochs": epochs}), preset=PRESET.name, stage=stage,
                      dataset="imagefolder", data_dir=str(data), seed=seed,
                      order=order, static_policy=static)
    models, optimizer, schedule = setup_stage(cfg, PRESET, init, teacher, CPU)
    train_set = load_dataset(PRESET, "train", "imagefolder", data)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    row = None if static is None else torch.tensor(static, dtype=torch.float32)
    began = time.time()
    for epoch in range(cfg.epochs):
        stats = train_epoch(stage, models, loader, optimizer, epoch, cfg.gamma, CPU, cfg.drop_rate, cfg.pace,
                            cfg.entropy, static=row, budget_range=cfg.budget_range,
                            budget_sampling=cfg.budget_sampling)
        if stats.spent is not None:  # a budget policy: its spending table, as the workers measure it
            models.policy.calibrate(stats.spent, stats.images)
        schedule.step()
    return models, time.time() - began


def user_resnet(data: Path, workdir: Path, epochs: int) -> tuple[Path, float]:
    """The user's ResNet-32: standard training, no stochastic depth (kept in `workdir`)."""
    path = workdir / f"user-resnet32-{epochs}-lr0.05.pt"
    if not path.exists():
        print(f"pretraining the user's ResNet-32 ({epochs} epochs)", flush=True)
        # lr 0.05: at 0.1 a ResNet-32 on 1,437 images ended at 38-86% test accuracy depending on the seed
        settings = {"epochs": epochs, "batch_size": 128, "lr": 0.05, "weight_decay": 5e-4, "drop_rate": 0.0}
        models, seconds = train("pretrain", settings, data, None, None, seed=0)
        save_checkpoint(path, PRESET, models.backbone, None, {"stage": "pretrain", "seconds": seconds})
    return path, read_checkpoint(path).meta.get("seconds", 0.0)


def plan_for(policy: str, user: Path, data: Path, gamma: float, extra: list[str] | None = None
             ) -> list[tuple[str, dict]]:
    """train_job.py's stages and settings for `--init USER --policy POLICY --penalty GAMMA` (and `extra`
    flags) on this folder."""
    args = build_parser().parse_args(["--preset", PRESET.name, "--dataset", "imagefolder", "--data-dir", str(data),
                                      "--init", str(user), "--policy", policy, f"--penalty={gamma}"] + (extra or []))
    return validate(args).stages


def models_of(state: dict):
    backbone = PRESET.build_backbone()
    backbone.load_state_dict(state["backbone"])
    policy = build_policy(PRESET, state["policy"])
    policy.load_state_dict(state["policy"])
    layout = {"memory_format": torch.channels_last}  # as the workers evaluate
    return backbone.to(**layout), policy.to(**layout)


def evaluate(name: str, state: dict, data: Path, seconds: float, curve) -> dict:
    """The comparison of one learned point (image-blind policies on its own ResNet, prune-and-finetune),
    with each image's outcome and prune-and-finetune's score at its FLOPs (for pooling seeds)."""
    backbone, policy = models_of(state)
    test = load_dataset(PRESET, "test", "imagefolder", data)
    train_set = load_dataset(PRESET, "train", "imagefolder", data, augment=False)
    comparison, learned = compare(backbone, policy, test, train_set, cost_model(PRESET, policy), CPU, pruned=curve)
    return {"name": name, "comparison": comparison, "correct": learned.records().correct.astype(float),
            "prune_scores": curve.at(comparison.learned.flops_mean)[0], "seconds": seconds}


def full_correct(payload_: dict, data: Path) -> np.ndarray:
    backbone = PRESET.build_backbone()
    backbone.load_state_dict(payload_["backbone"])
    test = load_dataset(PRESET, "test", "imagefolder", data)
    result = tally(backbone, None, DataLoader(test, batch_size=256), cost_model(PRESET), CPU, records=True)
    return result.records().correct.astype(float)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("digits", "shapes", "mixed"), default="mixed")
    parser.add_argument("--per-class", type=int, default=180, help="shapes: images per class (default 180)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--gammas", default="-1,-4", help="gammas of both policies (default -1,-4)")
    parser.add_argument("--ablations", action="store_true", help="also the depth policy's ablations (see above)")
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="every stage at a tenth of its length: a smoke test")
    parser.add_argument("--workdir", help="data and the user's ResNet (default ./method-DATA)")
    parser.add_argument("--output", help="results file (default benchmarks/results/method_DATA.md)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    seeds = [int(s) for s in args.seeds.split(",")]
    gammas = [float(g) for g in args.gammas.split(",")]
    scale = 0.1 if args.quick else 1.0
    tag = args.data + (f"{args.per_class}" if args.data == "shapes" and args.per_class != 180 else "")
    workdir = Path(args.workdir or f"method-{tag}").resolve()
    data = workdir / "data"
    if not data.exists():
        write_folder(args.data, data, 32, args.per_class)
    user_path, user_seconds = user_resnet(data, workdir, max(1, round(args.pretrain_epochs * scale)) if args.quick
                                          else args.pretrain_epochs)
    user = {"backbone": read_checkpoint(user_path).backbone, "policy": None}
    user_correct = full_correct(user, data)
    test = load_dataset(PRESET, "test", "imagefolder", data)
    train_size = len(load_dataset(PRESET, "train", "imagefolder", data))
    user_backbone = PRESET.build_backbone()
    user_backbone.load_state_dict(user["backbone"])
    train_unaug = load_dataset(PRESET, "train", "imagefolder", data, augment=False)
    from blockdrop.analysis import holdout

    order = greedy_order(user_backbone, DataLoader(holdout(train_unaug), batch_size=256), CPU)
    rows, pooled = [], {}
    for seed in seeds:
        learned = []  # (name, payload, seconds)
        for gamma in gammas:  # BlockDrop's policy, as train_job.py --init USER --penalty GAMMA runs it
            plan = plan_for("blocks", user_path, data, gamma)
            state, seconds = user, 0.0
            for stage, settings in plan:
                models, s = train(stage, settings, data, state, None, seed, scale=scale)
                state, seconds = payload(models), seconds + s
            learned.append((f"blocks, gamma {gamma:g}", state, seconds))
            print(f"[seed {seed}] blocks gamma {gamma:g}: {seconds:.0f} s", flush=True)
        plan = dict(plan_for("depth", user_path, data, gammas[0]))
        variants = [("depth", D.DISTILL)] + ([("depth, no distillation", 0.0)] if args.ablations else [])
        for label, weight in variants:
            D.DISTILL = weight  # the stages read it at each step
            teacher = user if weight else None
            nested, s_nest = train("nest", plan["nest"], data, user, teacher, seed, order=order, scale=scale)
            nested = payload(nested)
            trained, s_depth = train("depth", plan["depth"], data, nested, None, seed, scale=scale)
            trained = payload(trained)
            if args.ablations and weight:
                learned.append(("depth, no finetune", trained, s_nest + s_depth))
            for gamma in gammas:
                settings = dict(plan_for("depth", user_path, data, gamma))["finetune"]
                models, s_ft = train("finetune", settings, data, trained, teacher, seed, scale=scale)
                learned.append((f"{label}, gamma {gamma:g}", payload(models), s_nest + s_depth + s_ft))
                print(f"[seed {seed}] {label} gamma {gamma:g}: {s_nest + s_depth + s_ft:.0f} s", flush=True)
        D.DISTILL = 0.5
        # prune and finetune at every block count that brackets a learned point
        steps = resnet_steps(plan_for("blocks", user_path, data, gammas[0]), train_size)
        settings = prune_settings(PRESET, argparse.Namespace(dataset="imagefolder", batch_size=None, lr=None,
                                                               epochs=None, preset=PRESET.name), train_size, steps)
        flops = {}
        for name, state, _ in learned:
            backbone, policy = models_of(state)
            report = tally(backbone, policy, DataLoader(test, batch_size=256), cost_model(PRESET, policy), CPU)
            flops[name] = report.report(cost_model(PRESET).full).flops_mean
        keeps = sorted({k for f in flops.values() for k in keeps_bracketing(cost_model(PRESET), order, f)})
        pruned, prune_seconds = {True: [], False: []}, {True: 0.0, False: 0.0}
        for distill in ([True, False] if args.ablations else [True]):
            for keep in keeps:
                static = from_order(keep, order).int().tolist()
                models, s = train("prune", settings, data, user, user if distill else None, seed, static=static,
                                  scale=scale)
                pruned[distill].append((keep, models.backbone, torch.tensor(static, dtype=torch.float32)))
                prune_seconds[distill] += s
            print(f"[seed {seed}] prune and finetune ({'distilled' if distill else 'labels only'}) at K = "
                  f"{', '.join(map(str, keeps))}: {prune_seconds[distill]:.0f} s", flush=True)
        curve = pruned_curve(pruned[True], test, cost_model(PRESET), CPU)
        for name, state, seconds in learned:
            result = evaluate(name, state, data, seconds, curve)
            result["seed"] = seed
            rows.append(result)
            pooled.setdefault(name, []).append(result)
        if args.ablations:
            plain_curve = pruned_curve(pruned[False], test, cost_model(PRESET), CPU)
            for point, score in zip(plain_curve.points, plain_curve.scores):
                distilled = curve.scores[curve.points.index(next(p for p in curve.points if p.keep == point.keep))]
                rows.append({"name": f"prune and finetune K={point.keep}: distilled minus labels only",
                             "seed": seed, "interval": paired_difference(distilled, score)})
        rows.append({"name": f"prune and finetune ({len(keeps)} block counts)", "seed": seed,
                     "seconds": prune_seconds[True], "curve": curve})
    write(args, rows, pooled, user_correct, user_seconds, tag, len(test), train_size)


def write(args, rows, pooled, user_correct, user_seconds, tag, test_size, train_size) -> None:
    full = cost_model(PRESET).full
    lines = [f"### Per-image policies against pruning: {tag} (32x32 RGB folder, {train_size} train / {test_size} test"
             f" images), ResNet-32", "",
             f"{time.strftime('%Y-%m-%d')}, {platform.node()}: {os.cpu_count()} CPU cores, torch {torch.__version__}, "
             f"in-process (benchmarks/method.py, the stages' own code), seeds {args.seeds}, gammas {args.gammas}"
             f"{', quick' if args.quick else ''}. Command: `python benchmarks/method.py --data {args.data}"
             f"{f' --per-class {args.per_class}' if args.data == 'shapes' else ''} --seeds {args.seeds} "
             f"--gammas={args.gammas}{' --ablations' if args.ablations else ''}`", "",
             f"The user's ResNet-32 (standard training, no stochastic depth, {args.pretrain_epochs} epochs, "
             f"{user_seconds / 60:.1f} min): **{100 * user_correct.mean():.2f}%**, 15 blocks, {full:.2E} FLOPs.", "",
             "| model | seed | accuracy | vs your ResNet | blocks | unique policies | FLOPs (speedup) | easy / hard "
             "blocks | vs best image-blind on its ResNet | vs prune and finetune | training |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "comparison" in r:
            c = r["comparison"]
            rep = c.learned
            groups = (f"{c.groups['easy'].blocks:.2f} / {c.groups['hard'].blocks:.2f}" if c.groups else "")
            best = c.versus[c.best_static]
            prune = c.versus.get(PRUNED)
            lines.append(
                f"| {r['name']} | {r['seed']} | {100 * rep.accuracy:.2f}% | {100 * (rep.accuracy - user_correct.mean()):+.2f} "
                f"| {rep.blocks_mean:.2f} +- {rep.blocks_std:.2f} | {rep.unique_policies} | {rep.flops_mean:.2E} "
                f"({rep.speedup:.2f}x) | {groups} | {best.interval.text()} ({LABEL(c.best_static)}) | "
                f"{prune.interval.text() + ' (' + prune.where + ')' if prune else ''} | {r['seconds']:.0f} s |")
        elif "curve" in r:
            points = ", ".join(f"K={p.keep}: {100 * p.accuracy:.2f}% at {p.flops:.2E}" for p in r["curve"].points)
            lines.append(f"| {r['name']} | {r['seed']} | {points} | | | 1 | | | | | {r['seconds']:.0f} s in all |")
        else:
            lines.append(f"| {r['name']} | {r['seed']} | {r['interval'].text()} | | | | | | | | |")
    lines += ["", "Pooled over seeds, image by image (learned minus prune-and-finetune at its FLOPs; learned minus "
              "your ResNet):", ""]
    for name, results in pooled.items():
        learned = np.concatenate([r["correct"] for r in results])
        vs_prune = paired_difference(learned, np.concatenate([r["prune_scores"] for r in results]))
        vs_user = paired_difference(learned, np.tile(user_correct, len(results)))
        lines.append(f"- {name}: vs prune and finetune {vs_prune.text()} ({vs_prune.verdict}); vs your ResNet "
                     f"{vs_user.text()} ({vs_user.verdict})")
    output = args.output or str(Path(__file__).parent / "results" / f"method_{tag}.md")
    emit(lines, output)


def LABEL(name: str) -> str:
    from blockdrop.analysis import LABELS

    return LABELS[name]


if __name__ == "__main__":
    main()
