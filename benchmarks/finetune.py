"""Joint finetuning: sparse execution of the ResNet in train mode vs the original's masked pass.

    scripts/with-venv python benchmarks/finetune.py speed [--preset R110_C10] [--batch 128] [--keep 0.3,0.5,0.7]
    scripts/with-venv python benchmarks/finetune.py accuracy --init CURRICULUM.pt [--penalties -0.5,-5,-20]
    scripts/with-venv python benchmarks/finetune.py all --init CURRICULUM.pt        # both, one results file

`speed`: one finetuning step (`blockdrop.stages.finetune_step`: policy forward, the greedy
baseline pass, the ResNet forward and backward under the sampled policy, the optimiser) with the
ResNet executed `masked` (every block on every image, as the original code) and `sparse` (each
block on the images that keep it; BatchNorm normalises those). The policy network runs for real
but its output is replaced by per-image probabilities drawn so that each image gets its own
policy (the hard case for sparse execution) and the sampled policy keeps the asked fraction of
blocks. Medians of interleaved rounds. Target: sparse >= 1.6x masked at 50% kept.

`accuracy`: finetunes the same curriculum checkpoint both ways, same seeds, at several gammas on
the preset's own data (default R26_DIGITS: offline), in-process (no Ray: the epoch loop the Ray
workers run), and evaluates each result: accuracy, blocks used (mean and std), unique policies,
FLOPs speedup. Get a curriculum checkpoint with
`python train_job.py --stage pretrain,curriculum --name NAME` (checkpoints/NAME-curriculum.pt).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch

from blockdrop import reinforce as R
from blockdrop.checkpoints import load_models
from blockdrop.data import load_dataset
from blockdrop.metrics import tally
from blockdrop.execution import TRAIN_EXECUTIONS, Executor
from blockdrop.flops import cost_model
from blockdrop.presets import get_preset
from blockdrop.stages import Models, finetune_step, make_optimizer, make_schedule, train_epoch
from policies import PerImagePolicy, per_image_probs
from results_table import emit


def speed(args) -> list[str]:
    preset = get_preset(args.preset)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, preset.in_channels, preset.image_size, preset.image_size, generator=g)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(preset.num_classes, (args.batch,), generator=g)
    rows = []
    for keep in [float(k) for k in args.keep.split(",")]:
        probs = per_image_probs(args.batch, preset.num_blocks, keep, R.ALPHA)
        setups = {}
        for execution in TRAIN_EXECUTIONS:
            backbone = preset.build_backbone().to(memory_format=torch.channels_last)
            policy = PerImagePolicy(preset.build_policy().to(memory_format=torch.channels_last), probs)
            executor = Executor(backbone, execution)
            optimizer = make_optimizer("finetune", [{"params": list(policy.parameters())},
                                                    {"params": list(backbone.parameters())}], 1e-4, 0.0)
            setups[execution] = (policy, executor, backbone, optimizer)
        blocks_run = []

        def step(execution: str) -> None:
            policy, executor, backbone, optimizer = setups[execution]
            backbone.train()
            optimizer.zero_grad(set_to_none=True)
            out = finetune_step(policy, executor, backbone, images, labels, -5.0)
            optimizer.step()
            blocks_run.append(out.blocks.float().mean().item())

        times: dict[str, list[float]] = {name: [] for name in TRAIN_EXECUTIONS}
        for name in TRAIN_EXECUTIONS:  # warm-up
            step(name)
        for _ in range(args.rounds):
            for name in TRAIN_EXECUTIONS:
                t0 = time.perf_counter()
                step(name)
                times[name].append(time.perf_counter() - t0)
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        kept = statistics.mean(blocks_run) / preset.num_blocks
        x = ms["masked"] / ms["sparse"]
        rows.append((keep, kept, ms["masked"], ms["sparse"], x))
        print(f"sampled policy keeps {kept:.0%}: masked {ms['masked']:.0f} ms, sparse {ms['sparse']:.0f} ms, "
              f"x{x:.2f}", flush=True)
    return [
        f"### {preset.name} finetune step, batch {args.batch}, {platform.processor() or 'cpu'}, "
        f"{torch.get_num_threads()} threads, channels_last, torch {torch.__version__}",
        "",
        "| sampled policy keeps | masked step ms (original) | sparse step ms (default) | sparse speedup | masked img/s | sparse img/s |",
        "|---|---|---|---|---|---|",
    ] + [f"| {kept:.0%} | {m:.0f} | {s:.0f} | {x:.2f}x | {args.batch / m * 1e3:.0f} | {args.batch / s * 1e3:.0f} |"
         for _, kept, m, s, x in rows]


def finetune(preset, init: str, execution: str, gamma: float, epochs: int, batch: int, seed: int, train_set, loader_test):
    backbone, policy, _ = load_models(preset, init)
    if policy is None:
        raise SystemExit(f"{init} holds no policy network: pass a curriculum checkpoint")
    backbone.to(memory_format=torch.channels_last)
    policy.to(memory_format=torch.channels_last)
    defaults = preset.stages["finetune"]
    optimizer = make_optimizer("finetune", [{"params": list(policy.parameters()), "lr": defaults.policy_lr or defaults.lr},
                                            {"params": list(backbone.parameters())}], defaults.lr, defaults.weight_decay)
    schedule = make_schedule("finetune", optimizer, epochs)
    models = Models(backbone, policy, executor_train=Executor(backbone, execution), policy_train=policy)
    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    began = time.perf_counter()
    for epoch in range(epochs):
        train_epoch("finetune", models, loader, optimizer, epoch, gamma, torch.device("cpu"))
        schedule.step()
    seconds = time.perf_counter() - began
    costs = cost_model(preset)
    report = tally(backbone, policy, loader_test, costs, torch.device("cpu")).report(costs.full)
    return report, seconds


def accuracy(args) -> list[str]:
    if not args.init:
        raise SystemExit("accuracy needs --init CURRICULUM.pt (see --help)")
    preset = get_preset(args.accuracy_preset)
    train_set = load_dataset(preset, "train")
    test = torch.utils.data.DataLoader(load_dataset(preset, "test"), batch_size=256)
    epochs = args.epochs or preset.stages["finetune"].epochs
    batch = args.finetune_batch or preset.stages["finetune"].batch_size
    rows = []
    for gamma in [float(p) for p in args.penalties.split(",")]:
        for seed in range(args.seeds):
            for execution in TRAIN_EXECUTIONS:
                r, seconds = finetune(preset, args.init, execution, gamma, epochs, batch, seed, train_set, test)
                rows.append((gamma, seed, execution, r, seconds))
                print(f"gamma {gamma:g} seed {seed} {execution:6s}: acc {r.accuracy:.3f}  blocks {r.blocks_mean:.2f} "
                      f"+- {r.blocks_std:.2f}  unique {r.unique_policies}  speedup {r.speedup:.2f}x  ({seconds:.0f}s)",
                      flush=True)
    lines = [
        f"### {preset.name} finetuning from `{args.init}`, {epochs} epochs, batch {batch}, masked vs sparse, "
        f"same seeds",
        "",
        "| gamma | seed | execution | test accuracy | blocks used | blocks std | unique policies | FLOPs speedup | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ] + [f"| {g:g} | {s} | {e} | {r.accuracy:.3f} | {r.blocks_mean:.2f} | {r.blocks_std:.2f} | {r.unique_policies} | "
         f"{r.speedup:.2f}x | {t:.0f} |" for g, s, e, r, t in rows]
    lines += ["", "Means over seeds:", "",
              "| gamma | execution | test accuracy | blocks used | train s |", "|---|---|---|---|---|"]
    for gamma in dict.fromkeys(g for g, *_ in rows):
        for execution in TRAIN_EXECUTIONS:
            sel = [(r, t) for g, _, e, r, t in rows if g == gamma and e == execution]
            lines.append(f"| {gamma:g} | {execution} | {statistics.mean(r.accuracy for r, _ in sel):.3f} | "
                         f"{statistics.mean(r.blocks_mean for r, _ in sel):.2f} | "
                         f"{statistics.mean(t for _, t in sel):.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("speed", "accuracy", "all"))
    parser.add_argument("--preset", default="R110_C10", help="speed: the preset timed (default R110_C10)")
    parser.add_argument("--batch", type=int, default=128,
                        help="speed: batch per worker (default 128: R110_C10's 256 over two workers)")
    parser.add_argument("--keep", default="0.3,0.5,0.7", help="speed: fractions of blocks the sampled policy keeps")
    parser.add_argument("--rounds", type=int, default=5, help="speed: timed steps of each execution (interleaved)")
    parser.add_argument("--init", help="accuracy: a curriculum checkpoint of --accuracy-preset")
    parser.add_argument("--accuracy-preset", default="R26_DIGITS")
    parser.add_argument("--penalties", default="-0.5,-5,-20", help="accuracy: gammas")
    parser.add_argument("--epochs", type=int, help="accuracy: finetune epochs (default: the preset's)")
    parser.add_argument("--finetune-batch", type=int, help="accuracy: batch size (default: the preset's)")
    parser.add_argument("--seeds", type=int, default=2, help="accuracy: seeds per gamma and execution")
    parser.add_argument("--quick", action="store_true", help="a short run (< 2 minutes): batch 32, 2 rounds, "
                                                              "one seed, 3 epochs")
    parser.add_argument("--output", help="also write the markdown tables to this file")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.rounds, args.seeds, args.epochs = 32, 2, 1, args.epochs or 3
    lines = [f"Command: `python {' '.join(sys.argv)}` ({time.strftime('%Y-%m-%d')}, {platform.node()})", ""]
    if args.part in ("speed", "all"):
        lines += speed(args) + [""]
    if args.part in ("accuracy", "all"):
        lines += accuracy(args)
    emit(lines, args.output)


if __name__ == "__main__":
    main()
