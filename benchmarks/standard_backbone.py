"""BlockDrop on a standard pretrained ResNet, as a user with their own small dataset runs it.

    scripts/with-venv python benchmarks/standard_backbone.py [--data digits|shapes] [--workdir DIR]
        [--penalty -1] [--output benchmarks/results/standard_backbone_digits.md]

1. writes a small 32x32 RGB image folder (`python -m blockdrop.sample_data`): scikit-learn's digits
   upsampled, or the synthetic shapes of graded difficulty;
2. pretrains a standard ResNet-32 on it, without stochastic depth (the user's own ResNet; timed
   apart, it is not part of BlockDrop's cost);
3. runs BlockDrop from it with train_job.py's defaults for other data (adapt -> curriculum ->
   finetune, 2 Ray Train workers) and the analysis against image-blind baselines;
4. reads the figures back from MLflow and writes a results table.

Target (issue 9): all BlockDrop stages in under 20 minutes on a 2-core CPU machine, at least 40%
of the blocks dropped at no more than 1 point below the standard ResNet's accuracy.
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
    parser.add_argument("--data", choices=("digits", "shapes"), default="digits")
    parser.add_argument("--workdir", help="where data, checkpoints and mlflow.db go (default ./standard-backbone-DATA)")
    parser.add_argument("--pretrain-epochs", type=int, default=30, help="the standard ResNet's epochs (default 30)")
    parser.add_argument("--penalty", default="-1", help="finetuning gamma (default -1)")
    parser.add_argument("--output", help="results file (default benchmarks/results/standard_backbone_DATA.md)")
    args = parser.parse_args()
    workdir = Path(args.workdir or f"standard-backbone-{args.data}").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    python = sys.executable
    common = ["--preset", "R32_C10", "--dataset", "imagefolder", "--data-dir", str(data)]
    if not data.exists():
        run([python, "-m", "blockdrop.sample_data", args.data, str(data)], workdir, workdir / "data.log")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    resnet, blockdrop = f"{args.data}-resnet32-{stamp}", f"{args.data}-blockdrop-{stamp}"
    pretrain_s = run([python, str(REPO / "train_job.py"), *common, "--stage", "pretrain", "--drop-rate", "0",
                      "--epochs", str(args.pretrain_epochs), "--name", resnet, "--no-analysis"],
                     workdir, workdir / f"{resnet}.log")
    job = [python, str(REPO / "train_job.py"), *common, "--init", f"checkpoints/{resnet}-pretrain.pt",
           "--penalty", args.penalty, "--name", blockdrop]
    blockdrop_s = run(job, workdir, workdir / f"{blockdrop}.log")

    full = final_metrics(workdir, resnet)
    m = final_metrics(workdir, blockdrop)
    dropped = 1 - m["final_blocks_mean"] / 15
    loss = full["final_accuracy"] - m["final_accuracy"]
    met = blockdrop_s < 20 * 60 and dropped >= 0.4 and loss <= 0.01
    baselines = sorted(((k.removeprefix("baseline_").removesuffix("_accuracy"), v) for k, v in m.items()
                        if k.startswith("baseline_")), key=lambda kv: -kv[1])
    report = (workdir / f"{blockdrop}.log").read_text()
    verdict = next((line for line in report.splitlines() if "static policy" in line or "Per-image" in line), "")
    lines = [
        f"### BlockDrop on a standard ResNet-32: {args.data} (32x32 RGB image folder)",
        "",
        f"{time.strftime('%Y-%m-%d')}, {platform.node()}: {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"2 Ray Train workers. Command: `python benchmarks/standard_backbone.py --data {args.data} "
        f"--penalty {args.penalty}`, which runs",
        "",
        f"    train_job.py {' '.join(common[:4])} --data-dir DATA --stage pretrain --drop-rate 0 --epochs "
        f"{args.pretrain_epochs}",
        f"    train_job.py {' '.join(common[:4])} --data-dir DATA --init RESNET --penalty {args.penalty}",
        "",
        "| model | test accuracy | blocks used (of 15) | unique policies | FLOPs / image | FLOPs speedup | wall time |",
        "|---|---|---|---|---|---|---|",
        f"| standard ResNet-32 (the user's, no stochastic depth) | {100 * full['final_accuracy']:.1f}% | 15 | 1 | "
        f"{full['final_flops_mean']:.2E} | 1.00x | {pretrain_s / 60:.1f} min (pretrain, not counted) |",
        f"| BlockDrop: adapt -> curriculum -> finetune | {100 * m['final_accuracy']:.1f}% | "
        f"{m['final_blocks_mean']:.2f} +- {m['final_blocks_std']:.2f} | {m['final_unique_policies']:.0f} | "
        f"{m['final_flops_mean']:.2E} | {m['final_speedup']:.2f}x | {blockdrop_s / 60:.1f} min |",
        "",
        f"Blocks dropped: {100 * dropped:.0f}%; accuracy {100 * -loss:+.1f} points against the standard ResNet. "
        f"Target (>= 40% dropped, <= 1 point lost, < 20 min): {'met' if met else 'NOT met'}.",
        "",
        "Image-blind policies on the same finetuned ResNet at the learned policy's FLOPs: "
        + ", ".join(f"{name} {100 * value:.1f}%" for name, value in baselines) + f". {verdict}",
    ]
    output = args.output or str(REPO / "benchmarks" / "results" / f"standard_backbone_{args.data}.md")
    sys.path.insert(0, str(Path(__file__).parent))
    from results_table import emit

    emit(lines, output)


if __name__ == "__main__":
    main()
