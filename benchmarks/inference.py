"""Inference wall-clock: full vs masked vs sparse execution under per-image policies.

    scripts/with-venv python benchmarks/inference.py [--preset R110_C10] [--device cpu]
        [--batches 1,16,128] [--keep 0.3,0.6] [--output benchmarks/results/inference_cpu.md]

Two policy families, both seeded: `random` draws every image's policy independently
(Bernoulli(keep) per block), the hardest case for sparse execution since every block then runs
on a different subset of the batch; `patterned` gives each image one of 8 random policies, closer
to trained BlockDrop policies (469 unique policies over CIFAR-10's 10,000 test images; 10 on
ImageNet). The backbone's FLOPs
speedup (policy network excluded, since all three modes are timed without it) is the target the
wall-clock speedup is measured against: target ratio >= 0.9 at batch >= 16.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from blockdrop.execution import run
from blockdrop.flops import cost_model
from blockdrop.presets import get_preset
from policies import make_policies
from results_table import emit


def timed(fns: dict, device: torch.device, min_time: float, min_reps: int = 7) -> dict[str, float]:
    """Median seconds per call of each fn, interleaved round by round so that drift hits all alike."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    for fn in fns.values():  # warm-up
        fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    while min(map(len, times.values())) < min_reps or time.perf_counter() - start < min_time * len(fns):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="R110_C10")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", default="1,16,128")
    parser.add_argument("--keep", default="0.3,0.6", help="fractions of blocks each image keeps")
    parser.add_argument("--policies", default="random,patterned", help="policy families: random, patterned")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds of timing per cell")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--memory-format", choices=("channels_last", "contiguous"), default="channels_last",
                        help="layout of weights and activations for all three modes (default channels_last: "
                             "oneDNN's fast path on CPU)")
    parser.add_argument("--output", help="also write the markdown table to this file")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    preset = get_preset(args.preset)
    costs = cost_model(preset)
    memory_format = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    net = preset.build_backbone().to(device, memory_format=memory_format).eval()
    backbone_fixed = costs.fixed - costs.policy

    rows = []
    cells = [(family, float(k), int(b)) for family in args.policies.split(",")
             for k in args.keep.split(",") for b in args.batches.split(",")]
    for family, keep, batch in cells:
        policy = make_policies(family, batch, preset.num_blocks, keep).to(device)
        x = torch.randn(batch, preset.in_channels, preset.image_size, preset.image_size, device=device)
        x = x.contiguous(memory_format=memory_format)
        flops = backbone_fixed + (policy.cpu().double() @ torch.tensor(costs.backbone.blocks).double()).mean().item()
        flops_speedup = costs.full / flops
        fns = {mode: (lambda mode=mode: run(net, x, policy, mode)) for mode in ("full", "masked", "sparse")}
        with torch.inference_mode():
            ms = {mode: 1e3 * t for mode, t in timed(fns, device, args.min_time).items()}
        wall = ms["full"] / ms["sparse"]
        rows.append((family, keep, batch, ms["full"], ms["masked"], ms["sparse"], wall, flops_speedup,
                     wall / flops_speedup, batch / ms["sparse"] * 1e3))
        print(f"{family} keep={keep:.1f} batch={batch:4d}  full {ms['full']:8.2f} ms  masked {ms['masked']:8.2f} ms  "
              f"sparse {ms['sparse']:8.2f} ms  wall x{wall:.2f} / FLOPs x{flops_speedup:.2f} = "
              f"{wall / flops_speedup:.2f}", flush=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}"
    header = [
        f"### {preset.name} inference, {device.type} ({name}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads, {args.memory_format}",
        "",
        "| policies | keep | batch | full ms | masked ms | sparse ms | sparse img/s | wall speedup | FLOPs speedup | wall/FLOPs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    table = header + [
        f"| {p} | {k:.0%} | {b} | {f:.2f} | {m:.2f} | {s:.2f} | {ips:.0f} | {w:.2f}x | {fs:.2f}x | {r:.2f} |"
        for p, k, b, f, m, s, w, fs, r, ips in rows
    ]
    emit(table, args.output)


if __name__ == "__main__":
    main()
