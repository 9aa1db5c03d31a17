"""Curriculum-stage training throughput: this project's step vs the original's.

    scripts/with-venv python benchmarks/curriculum.py [--preset R110_C10] [--batch 256] [--keep 0.5,0.3]
        [--output benchmarks/results/curriculum_cpu.md]

Both steps do the same work on the same model, batch and policies: policy forward and backward,
and the frozen ResNet run under the sampled and the greedy policy for the self-critical reward.
The original computes those two ResNet passes with masked execution (every block on every image);
`blockdrop.stages.curriculum_step` runs them sparse, so dropped blocks cost nothing. The policy's
decisions come in two families (`--policies`): `biased`, every image's greedy policy keeps the
first `keep` fraction of blocks (the logits are biased so), which lets the original skip the blocks
no image keeps too; `per-image`, every image gets a policy of its own (as a trained policy network
gives: 469 unique policies over CIFAR-10's test set for R110), so that every block is kept by
some image and the original computes them all. Targets: >= 1.5x (biased) and >= 1.8x (per-image)
at 30 and 50% kept.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from blockdrop import reinforce as R
from blockdrop.execution import run_masked
from blockdrop.presets import get_preset
from blockdrop.stages import curriculum_step
from policies import PerImagePolicy, per_image_probs
from results_table import emit


def original_step(policy_net, backbone, images, labels, epoch, gamma):
    """The original cl_training.py step, ported: both ResNet passes masked."""
    probs = policy_net(images)
    bounded = R.bound(probs)
    mask = R.curriculum_mask(probs.shape[1], epoch)
    sampled = R.force_undecided(R.sample(bounded), mask)
    baseline = R.force_undecided(R.greedy(probs), mask)
    with torch.no_grad():
        correct_s = run_masked(backbone, images, sampled).argmax(1) == labels
        correct_g = run_masked(backbone, images, baseline).argmax(1) == labels
    reward = R.reward(correct_s, sampled, gamma)
    advantage = reward - R.reward(correct_g, baseline, gamma)
    loss = R.reinforce_loss(bounded, sampled, advantage, mask) - R.BETA * R.entropy(bounded, mask)
    loss.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="R110_C10")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--keep", default="0.5,0.3", help="fractions of blocks the greedy policy keeps")
    parser.add_argument("--policies", default="biased,per-image", help="policy families: biased, per-image")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps of each implementation (interleaved)")
    parser.add_argument("--quick", action="store_true", help="batch 64, 2 rounds (< 2 minutes)")
    parser.add_argument("--memory-format", choices=("channels_last", "contiguous"), default="channels_last",
                        help="layout of the ResNet and the images for both implementations")
    parser.add_argument("--output")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.rounds = 64, 2

    preset = get_preset(args.preset)
    memory_format = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    backbone = preset.build_backbone().eval().requires_grad_(False).to(memory_format=memory_format)
    policy = preset.build_policy().train()
    optimizer = torch.optim.Adam(policy.parameters(), lr=0)  # lr 0: the policy stays where we put it
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, preset.in_channels, preset.image_size, preset.image_size, generator=g)
    images = images.contiguous(memory_format=memory_format)
    labels = torch.randint(preset.num_classes, (args.batch,), generator=g)
    epoch = preset.num_blocks  # every block decided by the policy

    rows = []
    for family in args.policies.split(","):
        if family not in ("biased", "per-image"):
            raise SystemExit(f"unknown policy family {family!r}; use biased or per-image")
        for keep in [float(k) for k in args.keep.split(",")]:
            kept = round(keep * preset.num_blocks)
            with torch.no_grad():
                policy.logit.weight.zero_()
                policy.logit.bias.copy_(torch.where(torch.arange(preset.num_blocks) < kept, 8.0, -8.0))
            chooser = policy if family == "biased" else PerImagePolicy(
                policy, per_image_probs(args.batch, preset.num_blocks, keep, 1.0, seed=1))
            with torch.no_grad():
                probs = chooser(images)
                greedy_keep = R.greedy(probs).mean().item()
                unique = len({tuple(row) for row in R.greedy(probs).int().tolist()})
            steps = {
                "original (masked)": lambda: original_step(chooser, backbone, images, labels, epoch, -10.0),
                "blockdrop (sparse)": lambda: curriculum_step(chooser, backbone, images, labels, epoch, -10.0),
            }
            times: dict[str, list[float]] = {name: [] for name in steps}
            for step in steps.values():  # warm-up
                optimizer.zero_grad()
                step()
            for _ in range(args.rounds):
                for name, step in steps.items():
                    optimizer.zero_grad()
                    t0 = time.perf_counter()
                    step()
                    optimizer.step()
                    times[name].append(time.perf_counter() - t0)
            ips = {name: args.batch / statistics.median(t) for name, t in times.items()}
            speedup = ips["blockdrop (sparse)"] / ips["original (masked)"]
            sampled_keep = 0.8 * greedy_keep + 0.2 * (1 - greedy_keep)
            rows.append((family, unique, greedy_keep, sampled_keep, ips["original (masked)"], ips["blockdrop (sparse)"],
                         speedup))
            print(f"{family}: greedy keeps {greedy_keep:.0%} ({unique} unique policies): original "
                  f"{ips['original (masked)']:.1f} img/s, blockdrop {ips['blockdrop (sparse)']:.1f} img/s, "
                  f"x{speedup:.2f}", flush=True)

    table = [
        f"### {preset.name} curriculum step, batch {args.batch}, CPU, {torch.get_num_threads()} threads, "
        f"{args.memory_format}, torch {torch.__version__}",
        "",
        "| policies | unique greedy policies in the batch | greedy policy keeps | sampled policy keeps (alpha 0.8) "
        "| original step img/s | this project img/s | speedup |",
        "|---|---|---|---|---|---|---|",
    ] + [f"| {f} | {u} | {k:.0%} | {s:.0%} | {o:.1f} | {b:.1f} | {x:.2f}x |" for f, u, k, s, o, b, x in rows]
    emit(table, args.output)


if __name__ == "__main__":
    main()
