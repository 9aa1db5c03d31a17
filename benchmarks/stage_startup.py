"""A training stage's start-up: the seconds from a stage's announcement to its first epoch, where Ray
Train starts its controller and workers and each worker imports the code and loads its data.

    scripts/with-venv python benchmarks/stage_startup.py [--runs 3] [--against REF]
        [--output benchmarks/results/stage_startup_cpu.md]

Each run is `train_job.py --stage pretrain,nest --epochs 1,1 --num-workers 2` on the offline digits
(one epoch each, so that start-up is most of the time) in a fresh temporary folder (a local Ray, a
sqlite MLflow store there), without the analysis. Every line of its output is stamped on arrival;
the figures: the seconds until the first stage is announced (imports, checks, ray.init, MLflow),
each stage's announcement to its first epoch line (Ray Train's start-up plus the workers' imports,
data and set-up; the nest stage's also the greedy block order of the pretrained ResNet, a Ray task),
and the whole run. `--against REF` runs the code of a git commit too
(`git archive`, first on PYTHONPATH, as benchmarks/startup.py), round after round with this tree's.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_table import emit
from startup import environment, unpack, version

REPO = Path(__file__).resolve().parent.parent
STAGES = ("pretrain", "nest")


def run_once(root: Path) -> dict[str, float]:
    """One job's stamps: seconds to the first announcement, each stage's announcement to first epoch, total."""
    with tempfile.TemporaryDirectory(prefix="stage-startup-") as folder:
        cmd = [sys.executable, str(root / "train_job.py"), "--stage", ",".join(STAGES), "--epochs", "1,1",
               "--num-workers", "2", "--no-analysis", "--name", "startup", "--storage-path", str(Path(folder) / "ray")]
        began = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=folder, env=environment(root), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        announced: dict[str, float] = {}
        first_epoch: dict[str, float] = {}
        tail: list[str] = []
        for line in proc.stdout:
            now = time.perf_counter() - began
            tail = (tail + [line])[-20:]
            if match := re.match(r"== (\w+):", line):
                announced.setdefault(match.group(1), now)
            elif match := re.search(r"\[(\w+)\] epoch 1/", line):
                first_epoch.setdefault(match.group(1), now)
        if proc.wait() != 0 or set(first_epoch) != set(STAGES):
            raise SystemExit(f"train_job.py failed under {root}:\n{''.join(tail)}")
        total = time.perf_counter() - began
    return {"to first stage": announced[STAGES[0]], **{f"{s} start-up": first_epoch[s] - announced[s] for s in STAGES},
            "whole job": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="jobs per tree (default 3)")
    parser.add_argument("--against", metavar="REF", help="also run the code of this git commit (before/after)")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "stage_startup_cpu.md"),
                        help="markdown file to write (default benchmarks/results/stage_startup_cpu.md); '' for none")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    with tempfile.TemporaryDirectory(prefix="stage-startup-ref-") as folder:
        trees = {"this tree": REPO}
        if args.against:
            trees = {args.against: unpack(args.against, Path(folder))} | trees
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        for round_ in range(args.runs):
            for name, root in trees.items():
                runs[name].append(run_once(root))
                print(f"round {round_ + 1}/{args.runs}, {name}: {runs[name][-1]['whole job']:.1f} s", file=sys.stderr)

    def cell(name: str, key: str) -> str:
        values = [r[key] for r in runs[name]]
        return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"

    keys = list(runs["this tree"][0])
    shown = " ".join(["python", "benchmarks/stage_startup.py", *sys.argv[1:]])
    lines = [f"### Stage start-up, R26_DIGITS, 2 workers: seconds, median (min-max) of {args.runs} jobs",
             "",
             f"{datetime.date.today().isoformat()}, {platform.node() or 'unknown host'} ({os.cpu_count()} CPU cores), "
             f"Python {platform.python_version()}, torch {version('torch')}, ray {version('ray')}, "
             f"mlflow {version('mlflow')}. Command: `{shown}`",
             "",
             "| | " + " | ".join(trees) + " |",
             "|---|" + "---|" * len(trees)]
    lines += [f"| {key} | " + " | ".join(cell(name, key) for name in trees) + " |" for key in keys]
    lines += ["", "A stage's start-up: from its `== stage` line to its first epoch line (that epoch itself is "
                  "about a second here). Ray Train's own part, measured by hand with a trivial loop on 2 workers "
                  "(fit() to the loop's first line), was 9-11 s of it on this machine."]
    emit(lines, args.output or None)


if __name__ == "__main__":
    main()
