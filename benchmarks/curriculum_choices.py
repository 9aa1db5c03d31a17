"""Why a curriculum on a standard ResNet keeps every block, and which choices fix it.

    scripts/with-venv python benchmarks/curriculum_choices.py [--data digits|shapes] [--workdir DIR]
        [--steps 390] [--quick] [--output benchmarks/results/curriculum_choices_DATA.md]

In-process (no Ray), on a 32x32 RGB sample folder (blockdrop.sample_data) and preset R32_C10:
pretrain a standard ResNet-32 (no stochastic depth), adapt a copy with stochastic depth (the
`adapt` stage), then run the curriculum stage for the same number of steps under each choice:
backbone (standard / adapted) x curriculum gamma (-1, the original's / -5) x entropy bonus
(original `-s log s` over all blocks / full Bernoulli entropy of decided blocks). Reported: the
greedy policy's test accuracy, blocks used (mean +- std), unique policies, and the ResNet's
robustness (accuracy with one random block in ten dropped).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from results_table import emit  # noqa: E402

from blockdrop.data import load_dataset  # noqa: E402
from blockdrop.metrics import tally  # noqa: E402
from blockdrop.execution import Executor, run_sparse  # noqa: E402
from blockdrop.flops import cost_model  # noqa: E402
from blockdrop.presets import CURRICULUM_PACE, get_preset  # noqa: E402
from blockdrop.sample_data import write_folder  # noqa: E402
from blockdrop.stages import Models, make_optimizer, make_schedule, to_device, train_epoch  # noqa: E402

PRESET = get_preset("R32_C10")
CPU = torch.device("cpu")


def supervised(backbone, train, epochs: int, lr: float, drop_rate: float) -> None:
    backbone.to(memory_format=torch.channels_last)
    optimizer = make_optimizer("pretrain", backbone.parameters(), lr, 5e-4)
    schedule = make_schedule("pretrain", optimizer, epochs)
    for epoch in range(epochs):
        loader = DataLoader(train, batch_size=128, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(epoch))
        train_epoch("adapt", Models(backbone, None, executor_train=Executor(backbone)), loader, optimizer, epoch,
                    0.0, CPU, drop_rate)
        schedule.step()


@torch.inference_mode()
def robustness(backbone, test) -> float:
    """Accuracy with each block dropped with probability 0.1, independently per image."""
    backbone.eval()
    torch.manual_seed(0)
    correct = 0
    for x, y in DataLoader(test, batch_size=256):
        policy = torch.bernoulli(torch.full((len(x), PRESET.num_blocks), 0.9))
        correct += int((run_sparse(backbone, to_device(x, CPU), policy).argmax(1) == y).sum())
    return correct / len(test)


def curriculum(backbone, train, test, steps: int, gamma: float, entropy: str) -> dict:
    torch.manual_seed(0)
    backbone = copy.deepcopy(backbone).requires_grad_(False).eval()
    policy = PRESET.build_policy().to(memory_format=torch.channels_last)
    optimizer = make_optimizer("curriculum", policy.parameters(), 1e-3, 0.0)
    loader_steps = len(train) // 128
    began = time.time()
    for epoch in range(-(-steps // loader_steps)):
        loader = DataLoader(train, batch_size=128, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(epoch))
        train_epoch("curriculum", Models(backbone, policy, policy_train=policy), loader, optimizer, epoch, gamma, CPU,
                    pace=CURRICULUM_PACE, entropy=entropy)
    costs = cost_model(PRESET)
    report = tally(backbone, policy, DataLoader(test, batch_size=256), costs, CPU).report(costs.full)
    return {"accuracy": report.accuracy, "blocks": report.blocks_mean, "std": report.blocks_std,
            "unique": report.unique_policies, "seconds": time.time() - began}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("digits", "shapes"), default="digits")
    parser.add_argument("--workdir", help="default ./curriculum-choices-DATA")
    parser.add_argument("--steps", type=int, default=2 * PRESET.num_blocks * CURRICULUM_PACE,
                        help="curriculum steps per variant (default: the stage's default on other data, 390)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 3 pretrain epochs, 30 steps, 2 variants")
    parser.add_argument("--output", help="default benchmarks/results/curriculum_choices_DATA.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    workdir = Path(args.workdir or f"curriculum-choices-{args.data}").resolve()
    data = workdir / "data"
    if not data.exists():
        write_folder(args.data, data)
    train = load_dataset(PRESET, "train", "imagefolder", data)
    test = load_dataset(PRESET, "test", "imagefolder", data)
    epochs, steps = (3, 30) if args.quick else (30, args.steps)

    torch.manual_seed(0)
    standard = PRESET.build_backbone()
    print(f"pretraining a standard ResNet-32 ({epochs} epochs)", flush=True)
    supervised(standard, train, epochs, 0.1, 0.0)
    adapted = copy.deepcopy(standard)
    print("adapting a copy with stochastic depth (the adapt stage: 120 steps)", flush=True)
    supervised(adapted, train, -(-120 // (len(train) // 128)), 0.02, 0.5)
    backbones = {"standard": standard, "adapted": adapted}
    costs = cost_model(PRESET)
    full = {name: tally(b, None, DataLoader(test, batch_size=256), costs, CPU).report(costs.full).accuracy
            for name, b in backbones.items()}
    robust = {name: robustness(b, test) for name, b in backbones.items()}

    variants = list(itertools.product(backbones, (-1.0, -5.0), ("original", "bernoulli")))
    if args.quick:
        variants = [("adapted", -1.0, "original"), ("standard", -5.0, "bernoulli")]
    rows = []
    for name, gamma, entropy in variants:
        print(f"curriculum: {name} ResNet, gamma {gamma:g}, {entropy} entropy, {steps} steps", flush=True)
        r = curriculum(backbones[name], train, test, steps, gamma, entropy)
        rows.append(f"| {name} | {gamma:g} | {entropy} | {100 * r['accuracy']:.1f}% | {r['blocks']:.2f} +- "
                    f"{r['std']:.2f} | {r['unique']} | {r['seconds']:.0f} s |")
    lines = [
        f"### Curriculum choices on a standard ResNet-32: {args.data} (32x32 RGB folder)",
        "",
        f"{time.strftime('%Y-%m-%d')}, {platform.node()}, 2 CPU threads, in-process. Command: "
        f"`python benchmarks/curriculum_choices.py --data {args.data}{' --quick' if args.quick else ''}`",
        "",
        "| ResNet | full model accuracy | accuracy with 1 block in 10 dropped at random |",
        "|---|---|---|",
        *(f"| {name} | {100 * full[name]:.1f}% | {100 * robust[name]:.1f}% |" for name in backbones),
        "",
        f"Curriculum, {steps} steps at batch 128, a block decided every {CURRICULUM_PACE} steps:",
        "",
        "| ResNet | curriculum gamma | entropy bonus | accuracy | blocks used (of 15) | unique policies | time |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    emit(lines, args.output or str(Path(__file__).parent / "results" / f"curriculum_choices_{args.data}.md"))


if __name__ == "__main__":
    main()
