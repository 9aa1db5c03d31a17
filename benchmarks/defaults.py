"""The pretrain stage's defaults on an image folder, chosen on the validation split over seeds and folders.

    scripts/with-venv python benchmarks/defaults.py [--data mixed,shapes] [--lrs 0.02,0.05,0.1]
        [--steps 300,900] [--seeds 0,1,2] [--workdir DIR] [--output FILE]

A user who brings no ResNet gets one from `train_job.py --stage pretrain` (or the first stage of `--stage all`).
On a small folder its learning rate decides a lot: a ResNet-32 at lr 0.1 for 30 epochs on ~1,300 images ended
anywhere between 38% and 86% depending on the seed. Here every (lr, steps) of the grid pretrains a ResNet-32
(preset R32_C10, batch 128, SGD with Nesterov momentum, cosine schedule, weight decay 5e-4 unless --weight-decay,
no stochastic depth: the stage's own code, in-process) on each folder at each seed; the default is the setting
with the best mean validation accuracy over folders and seeds, where no other setting's mean is within one
standard error and cheaper (ties go to fewer steps). Test accuracies are printed for the record, never used.
Each finished run is kept in DIR/method-NAME/defaults-runs.jsonl, so a grid can grow over several sittings.
The stage's default today, the CIFAR schedule (164 epochs at lr 0.1, weight decay 1e-4), is `--lrs 0.1
--steps 1640 --weight-decay 1e-4` on these ~1,300-image folders (10 steps an epoch).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from method import CPU, PRESET, modules, train  # noqa: E402
from results_table import emit  # noqa: E402

from blockdrop.data import load_dataset  # noqa: E402
from blockdrop.flops import cost_model  # noqa: E402
from blockdrop.metrics import tally  # noqa: E402
from blockdrop.sample_data import write_folder  # noqa: E402


def accuracy(state: dict, dataset) -> float:
    backbone, _ = modules(state)
    result = tally(backbone, None, DataLoader(dataset, batch_size=256), cost_model(PRESET), CPU)
    return result.report(cost_model(PRESET).full).accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="mixed,shapes", help="sample folders (default mixed,shapes)")
    parser.add_argument("--lrs", default="0.02,0.05,0.1")
    parser.add_argument("--steps", default="300,900", help="optimisation steps of the stage (default 300,900)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="of every setting this call trains (default "
                        "5e-4; the CIFAR schedule's own is 1e-4); settings kept from other calls stay in the table")
    parser.add_argument("--workdir", default=".", help="where the folders method-NAME/ are written and each "
                        "finished run is kept (default: here)")
    parser.add_argument("--output", help="results file (default benchmarks/results/defaults_pretrain.md)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    folders = args.data.split(",")
    try:
        lrs, steps, seeds = ([float(x) for x in args.lrs.split(",")], [int(x) for x in args.steps.split(",")],
                             [int(x) for x in args.seeds.split(",")])
    except ValueError as err:
        parser.error(f"--lrs, --steps and --seeds take comma-separated numbers ({err})")
    found: dict[tuple[float, int, float], dict[str, list[tuple[float, float]]]] = {}
    for name in folders:
        data = Path(args.workdir, f"method-{name}").resolve() / "data"
        if not data.exists():
            write_folder(name, data, 32)
        train_set, val, test = (load_dataset(PRESET, split, "imagefolder", data) for split in ("train", "val", "test"))
        per_epoch = len(train_set) // 128
        # every finished run is kept beside the folder: a rerun (or a larger grid) trains only what is missing, and
        # the table holds every kept setting that has run on every folder at these seeds
        kept_runs = data.parent / "defaults-runs.jsonl"
        # (runs kept before the weight decay was recorded ran at 5e-4)
        kept = [{"weight_decay": 5e-4} | json.loads(line) for line in kept_runs.read_text().splitlines()] \
            if kept_runs.exists() else []
        done = {(r["lr"], r["steps"], r["weight_decay"], r["seed"]) for r in kept}
        for lr, length, seed in itertools.product(lrs, steps, seeds):
            if (lr, length, args.weight_decay, seed) in done:
                continue
            settings = {"epochs": max(1, round(length / per_epoch)), "batch_size": 128, "lr": lr,
                        "weight_decay": args.weight_decay, "drop_rate": 0.0}
            state, seconds, _ = train("pretrain", settings, data, None, None, seed)
            run = {"lr": lr, "steps": length, "weight_decay": args.weight_decay, "seed": seed,
                   "val": accuracy(state, val), "test": accuracy(state, test), "seconds": seconds}
            print(f"{name} lr {lr:g} {length} steps weight decay {args.weight_decay:g} seed {seed}: val "
                  f"{run['val']:.3f} test {run['test']:.3f} ({seconds:.0f} CPU s)", flush=True)
            with kept_runs.open("a") as out:
                out.write(json.dumps(run) + "\n")
            kept.append(run)
        for r in kept:
            if r["seed"] in seeds:
                setting = (r["lr"], r["steps"], r["weight_decay"])
                found.setdefault(setting, {}).setdefault(name, []).append((r["val"], r["test"]))
    found = {k: v for k, v in found.items() if all(name in v for name in folders)}
    write(args, folders, seeds, found)


def write(args, folders: list[str], seeds: list[int], found: dict) -> None:
    def mean_val(setting) -> float:
        return float(np.mean([v for name in folders for v, _ in found[setting][name]]))

    def stderr(setting) -> float:
        values = [v for name in folders for v, _ in found[setting][name]]
        return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0

    best = max(found, key=mean_val)
    # the cheapest setting whose mean is within one standard error of the best
    chosen = min((s for s in found if mean_val(s) >= mean_val(best) - stderr(best)), key=lambda s: (s[1], -mean_val(s)))
    lines = ["### The pretrain stage's defaults on an image folder, chosen on validation", "",
             f"{time.strftime('%Y-%m-%d')}, {platform.node()}: {os.cpu_count()} CPU cores, torch {torch.__version__}, "
             f"in-process (benchmarks/defaults.py), R32_C10 on the {', '.join(folders)} folders (32x32), seeds "
             f"{args.seeds}. Validation: 10% of each class of the training images; the test images are shown for the "
             "record only.", "",
             "| lr | steps | weight decay | "
             + " | ".join(f"{name}: val (sd over seeds) | {name}: test" for name in folders)
             + " | mean val |", "|---|---|---|" + "---|---|" * len(folders) + "---|"]
    for setting in sorted(found):
        cells = []
        for name in folders:
            vals = np.array([v for v, _ in found[setting][name]]) * 100
            tests = np.array([t for _, t in found[setting][name]]) * 100
            cells.append(f"{vals.mean():.2f} ({vals.std():.2f}) | {tests.mean():.2f}")
        mark = " **chosen**" if setting == chosen else ""
        lines.append(f"| {setting[0]:g} | {setting[1]} | {setting[2]:g} | {' | '.join(cells)} | "
                     f"{100 * mean_val(setting):.2f}{mark} |")
    lines += ["", f"Chosen: lr {chosen[0]:g}, {chosen[1]} steps (best mean validation accuracy "
              f"{100 * mean_val(best):.2f}% at lr {best[0]:g}, {best[1]} steps; the cheapest setting within one "
              f"standard error of it, {100 * stderr(best):.2f} points)."]
    emit(lines, args.output or str(Path(__file__).parent / "results" / "defaults_pretrain.md"))


if __name__ == "__main__":
    main()
