"""BlockDrop on a standard pretrained ResNet, as a user with their own small dataset runs it.

    scripts/with-venv python benchmarks/standard_backbone.py [--data digits|shapes|mixed] [--per-class N]
        [--policy depth|blocks] [--workdir DIR] [--penalty -1] [--output benchmarks/results/standard_backbone_DATA.md]

1. writes a small 32x32 RGB image folder (`python -m blockdrop.sample_data`): scikit-learn's digits
   upsampled, the synthetic shapes of graded difficulty, or the digits with half of them degraded;
2. pretrains a standard ResNet-32 on it, without stochastic depth (the user's own ResNet; timed
   apart, it is not part of BlockDrop's cost);
3. runs the README's command from it, train_job.py with its defaults for other data (the depth
   policy's nest -> depth -> finetune, or BlockDrop's adapt -> curriculum -> finetune; 2 Ray Train
   workers), then prune-and-finetune and the comparison the job itself makes;
4. reads the figures back from MLflow and writes a results table.

Targets (issues 9 and 18): all stages in under 20 minutes on a 2-core CPU machine, at least 40% of the
blocks dropped at no more than 1 point below the user's ResNet, at or above prune-and-finetune and the
image-blind policies at equal FLOPs (within the 95% interval).
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], cwd: Path, log: Path) -> float:
    """Run a job, its output into `log` (and its last lines on failure); returns the wall time."""
    print(f"$ {' '.join(cmd)}", flush=True)
    began = time.time()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}); the end of {log}:\n" + "".join(log.read_text().splitlines(True)[-30:]))
    return time.time() - began


def final_metrics(workdir: Path, name: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("blockdrop")
    run = client.search_runs([experiment.experiment_id], f"tags.`blockdrop.job` = '{name}'")[0]
    return run.data.metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("digits", "shapes", "mixed"), default="digits")
    parser.add_argument("--per-class", type=int, default=180, help="shapes: images per class (default 180)")
    parser.add_argument("--policy", choices=("depth", "blocks"), default="depth")
    parser.add_argument("--workdir", help="where data, checkpoints and mlflow.db go (default ./standard-backbone-DATA)")
    parser.add_argument("--pretrain-epochs", type=int, default=30, help="the standard ResNet's epochs (default 30)")
    parser.add_argument("--penalty", default="-1", help="finetuning gamma (default -1)")
    parser.add_argument("--output", help="results file (default benchmarks/results/standard_backbone_DATA.md)")
    args = parser.parse_args()
    tag = args.data + (f"{args.per_class}" if args.data == "shapes" and args.per_class != 180 else "")
    workdir = Path(args.workdir or f"standard-backbone-{tag}").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    python = sys.executable
    common = ["--preset", "R32_C10", "--dataset", "imagefolder", "--data-dir", str(data)]
    if not data.exists():
        run([python, "-m", "blockdrop.sample_data", args.data, str(data), "--per-class", str(args.per_class)], workdir,
            workdir / "data.log")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    resnet, blockdrop = f"{args.data}-resnet32-{stamp}", f"{args.data}-{args.policy}-{stamp}"
    pretrain_s = run([python, str(REPO / "train_job.py"), *common, "--stage", "pretrain", "--drop-rate", "0",
                      "--epochs", str(args.pretrain_epochs), "--name", resnet, "--no-analysis"],
                     workdir, workdir / f"{resnet}.log")
    job = [python, str(REPO / "train_job.py"), *common, "--init", f"checkpoints/{resnet}-pretrain.pt",
           "--policy", args.policy, "--penalty", args.penalty, "--name", blockdrop]
    job_s = run(job, workdir, workdir / f"{blockdrop}.log")

    full = final_metrics(workdir, resnet)
    m = final_metrics(workdir, blockdrop)
    stages_s = m.get("blockdrop_seconds", job_s)
    dropped = 1 - m["final_blocks_mean"] / 15
    loss = full["final_accuracy"] - m["final_accuracy"]
    competitors = m.get("gain_over_pruning_high", 1) >= 0 and m.get("gain_over_static_high", 1) >= 0
    met = stages_s < 20 * 60 and dropped >= 0.4 and loss <= 0.01 and competitors
    report = (workdir / f"{blockdrop}.log").read_text().splitlines()
    comparison = report[next(i for i, line in enumerate(report) if line.startswith("At the learned policy's FLOPs")):]
    comparison = comparison[:next(i for i, line in enumerate(comparison) if line.startswith("checkpoint:"))]
    stages = "nest -> depth -> finetune" if args.policy == "depth" else "adapt -> curriculum -> finetune"
    groups = (f"; easy images {m['blocks_easy']:.2f} blocks, hard images {m['blocks_hard']:.2f}"
              if "blocks_easy" in m else "")
    lines = [
        f"### {args.policy} policy on a standard ResNet-32: {tag} (32x32 RGB image folder)",
        "",
        f"{time.strftime('%Y-%m-%d')}, {platform.node()}: {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"2 Ray Train workers. Command: `python benchmarks/standard_backbone.py --data {args.data}"
        f"{f' --per-class {args.per_class}' if args.data == 'shapes' else ''} --policy {args.policy} "
        f"--penalty {args.penalty}`, which runs",
        "",
        f"    train_job.py {' '.join(common[:4])} --data-dir DATA --stage pretrain --drop-rate 0 --epochs "
        f"{args.pretrain_epochs}",
        f"    train_job.py {' '.join(common[:4])} --data-dir DATA --init RESNET --policy {args.policy} "
        f"--penalty {args.penalty}",
        "",
        "| model | test accuracy | blocks used (of 15) | unique policies | FLOPs / image | FLOPs speedup | wall time |",
        "|---|---|---|---|---|---|---|",
        f"| your ResNet-32 (standard training, no stochastic depth) | {100 * full['final_accuracy']:.2f}% | 15 | 1 | "
        f"{full['final_flops_mean']:.2E} | 1.00x | {pretrain_s / 60:.1f} min (pretrain, not counted) |",
        f"| {stages} | {100 * m['final_accuracy']:.2f}% | "
        f"{m['final_blocks_mean']:.2f} +- {m['final_blocks_std']:.2f} | {m['final_unique_policies']:.0f} | "
        f"{m['final_flops_mean']:.2E} | {m['final_speedup']:.2f}x | {stages_s / 60:.1f} min (stages) |",
        f"| prune and finetune, at the block counts around it | in the comparison below | | 1 | | | "
        f"{m.get('prune_baseline_seconds', 0) / 60:.1f} min |",
        "",
        f"Blocks dropped: {100 * dropped:.0f}%{groups}; accuracy {100 * -loss:+.2f} points against your ResNet "
        f"(its finetuned ResNet run in full: {100 * m['final_full_accuracy']:.2f}%). Target (>= 40% dropped, <= 1 point "
        f"lost, < 20 min, at or above every competitor within the interval): {'met' if met else 'NOT met'}.",
        "",
        "The job's own comparison:",
        "",
        *[f"    {line}" for line in comparison],
    ]
    output = args.output or str(REPO / "benchmarks" / "results" / f"standard_backbone_{tag}.md")
    sys.path.insert(0, str(Path(__file__).parent))
    from results_table import emit

    emit(lines, output)


if __name__ == "__main__":
    main()
