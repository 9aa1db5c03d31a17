"""Ray Train: a training stage's throughput at 1 and 2 workers, Ray's overhead over the same epoch
loop run without Ray, and where an epoch's time goes.

    scripts/with-venv python benchmarks/ray_train.py [--quick] [--preset R32_C10] [--stage pretrain]
        [--train-images 5000] [--epochs 3] [--output benchmarks/results/ray_train_cpu.md]

Data: a CIFAR-10 of random pixels in torchvision's on-disk layout (python pickles), written to a
temporary folder (`--train-images`, a test set a fifth of that, as CIFAR's 50k/10k). Each Ray run
is `train_job.py` itself (a local Ray, a sqlite MLflow store in the temporary folder); its
per-epoch metrics `train_seconds` and `eval_seconds` (rank 0's clock) and the MLflow timestamps
of consecutive epochs (the whole epoch cycle: steps, evaluation, checkpoint, MLflow, report) give
the breakdown. The first epoch (start-up, warm-up) is left out of every figure. The no-Ray run is
the workers' epoch loop (blockdrop.stages.train_epoch, blockdrop.evaluate.tally, a checkpoint
save) in this process, at the thread count the 1-worker run's worker had (`torch_threads`).
Target: Ray Train at 1 worker within 10% of the no-Ray loop.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from results_table import emit  # noqa: E402


def ray_run(root: Path, args, workers: int) -> dict:
    """One train_job.py run; its per-epoch timings from MLflow."""
    from mlflow.tracking import MlflowClient

    name = f"bench-{workers}w"
    uri = f"sqlite:///{root}/mlflow.db"
    cmd = [sys.executable, str(REPO / "train_job.py"), "--preset", args.preset, "--stage", args.stage,
           "--dataset", "cifar10", "--data-dir", str(root / "data"), "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--num-workers", str(workers), "--name", name,
           "--mlflow-uri", uri, "--storage-path", str(root / "ray"), "--output", str(root / "ckpt"),
           "--no-analysis", "--eval-every", "1"]
    began = time.perf_counter()
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"train_job.py failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("blockdrop").experiment_id],
                             f"tags.mlflow.runName = '{name}'")[0]
    def history(key):
        return sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
    train = [m.value for m in history("train_seconds")][1:]
    evals = [m.value for m in history("eval_seconds")][1:]
    stamps = [m.timestamp / 1e3 for m in history("train_seconds")]
    cycle = [b - a for a, b in zip(stamps, stamps[1:])]  # epoch k's log to epoch k+1's: a whole cycle
    threads = int(history("torch_threads")[0].value)
    return {"train": statistics.median(train), "eval": statistics.median(evals), "cycle": statistics.median(cycle),
            "threads": threads, "wall": wall}


def plain_run(root: Path, args, threads: int) -> dict:
    """The same epochs in this process, without Ray."""
    import torch
    from torch.utils.data import DataLoader

    from blockdrop.checkpoints import save_checkpoint
    from blockdrop.data import load_dataset
    from blockdrop.metrics import tally
    from blockdrop.execution import Executor
    from blockdrop.flops import cost_model
    from blockdrop.presets import get_preset
    from blockdrop.stages import Models, make_optimizer, make_schedule, train_epoch

    torch.set_num_threads(threads)
    preset = get_preset(args.preset)
    backbone = preset.build_backbone()
    executor = Executor(backbone).to(memory_format=torch.channels_last)
    models = Models(backbone, None, executor_train=executor)
    defaults = preset.stages[args.stage]
    optimizer = make_optimizer(args.stage, backbone.parameters(), defaults.lr, defaults.weight_decay)
    schedule = make_schedule(args.stage, optimizer, args.epochs)
    train = DataLoader(load_dataset(preset, "train", "cifar10", root / "data", download=False),
                       batch_size=args.batch_size, shuffle=True)
    test = DataLoader(load_dataset(preset, "test", "cifar10", root / "data", download=False), batch_size=256)
    costs = cost_model(preset)
    times = {"train": [], "eval": [], "cycle": []}
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        train_epoch(args.stage, models, train, optimizer, epoch, 0.0, torch.device("cpu"), defaults.drop_rate)
        schedule.step()
        t1 = time.perf_counter()
        tally(backbone, None, test, costs, torch.device("cpu"))
        t2 = time.perf_counter()
        save_checkpoint(root / "plain.pt", preset, backbone, None, {"epoch": epoch})
        t3 = time.perf_counter()
        if epoch:
            times["train"].append(t1 - t0)
            times["eval"].append(t2 - t1)
            times["cycle"].append(t3 - t0)
    return {k: statistics.median(v) for k, v in times.items()} | {"threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="R32_C10", help="a CIFAR-10 preset (default R32_C10)")
    parser.add_argument("--stage", default="pretrain", choices=("pretrain",),
                        help="the stage timed (pretrain: needs no earlier checkpoint)")
    parser.add_argument("--train-images", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is left out")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch size")
    parser.add_argument("--quick", action="store_true", help="1,000 images, 3 epochs (< 2 minutes... of waiting)")
    parser.add_argument("--output", help="also write the markdown table to this file")
    args = parser.parse_args()
    if args.quick:
        args.train_images, args.epochs = 1000, 3

    from conftest import write_cifar

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_cifar(root / "data", per_batch=args.train_images // 5, test=args.train_images // 5)
        runs = {}
        for workers in (1, 2):
            runs[f"Ray Train, {workers} worker{'s' if workers > 1 else ''}"] = r = ray_run(root, args, workers)
            print(f"{workers} worker(s): train {r['train']:.1f}s eval {r['eval']:.1f}s cycle {r['cycle']:.1f}s "
                  f"({r['threads']} torch threads per worker; whole job {r['wall']:.0f}s)", flush=True)
        one = runs["Ray Train, 1 worker"]
        runs["no Ray, same loop"] = r = plain_run(root, args, one["threads"])
        print(f"no Ray: train {r['train']:.1f}s eval {r['eval']:.1f}s cycle {r['cycle']:.1f}s", flush=True)

    import torch

    n = args.train_images
    plain = runs["no Ray, same loop"]
    lines = [
        f"### {args.preset} {args.stage} epoch, {n} training images (random CIFAR-10 pickles), global batch "
        f"{args.batch_size}, {platform.node()} ({platform.processor() or 'cpu'}), torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}",
        "",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        "| run | torch threads per worker | train steps s | evaluation + merge s | whole epoch s | train img/s | "
        "epoch vs no Ray |",
        "|---|---|---|---|---|---|---|",
    ] + [f"| {name} | {r['threads']} | {r['train']:.1f} | {r['eval']:.1f} | {r['cycle']:.1f} | {n / r['train']:.0f} | "
         f"{r['cycle'] / plain['cycle']:.2f}x |" for name, r in runs.items()]
    emit(lines, args.output)


if __name__ == "__main__":
    main()
