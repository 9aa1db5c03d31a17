"""One budget model against a front of per-gamma models: accuracy at equal FLOPs and training compute.

    scripts/with-venv python benchmarks/budget.py --data digits|shapes|mixed [--gammas=-0.3,-1,-3,-10]
        [--samplings uniform,log,sandwich] [--seed 0] [--no-prune] [--quick] [--workdir DIR] [--output FILE]

In-process, with benchmarks/method.py's stages (the stages' own code, train_job.py's settings for an
image folder, preset R32_C10), from one user's ResNet-32, same seed and data for everything:

1. nest and depth once (shared: a sweep's trials share their --init the same way);
2. the per-gamma front: the depth policy's finetune at each gamma (what `tune_penalty.py --penalties`
   runs, one trial per gamma);
3. the budget model: ONE finetune of the same network as a budget policy (train_job.py --policy budget:
   mean budgets drawn per image from --budget-range), then evaluated at every per-gamma point's FLOPs
   (its mean budget set to that point's share) and along blockdrop.budget.CURVE; one such model per
   --samplings (--budget-sampling: uniform, log-uniform or sandwich draws), each compared with the first
   image by image;
4. at each per-gamma point: budget model minus that model, image by image (95% paired bootstrap), and
   both against prune-and-finetune at those FLOPs (the user's ResNet finetuned under a static greedy
   policy at the bracketing block counts: the strongest image-blind competitor) and against the greedy
   static policy on the budget model's own ResNet;
5. the training compute of each: the N finetunes against the one.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from method import PRESET, modules, plan_for, train, user_resnet  # noqa: E402
from results_table import emit  # noqa: E402

from blockdrop.analysis import holdout, pruned_curve  # noqa: E402
from blockdrop.models.resnet import depth_state  # noqa: E402
from blockdrop.baselines import from_order, greedy_order  # noqa: E402
from blockdrop.budget import CURVE, curve_budgets  # noqa: E402
from blockdrop.checkpoints import read_checkpoint  # noqa: E402
from blockdrop.data import load_dataset  # noqa: E402
from blockdrop.flops import cost_model  # noqa: E402
from blockdrop.metrics import budget_curve, tally  # noqa: E402
from blockdrop.plans import prune_settings, resnet_cycles, resnet_steps  # noqa: E402
from blockdrop.prune import keeps_bracketing, static_chooser  # noqa: E402
from blockdrop.sample_data import write_folder  # noqa: E402
from blockdrop.stats import paired_difference  # noqa: E402

CPU = torch.device("cpu")


def cpu_timed(fn, *args, **kwargs):
    """fn's first result and the CPU seconds this process spent in it (all threads): compute, whatever else
    runs on the machine (a wall clock counts the other work too)."""
    began = time.process_time()
    result = fn(*args, **kwargs)[0]
    return result, time.process_time() - began


def as_depth_policy(state: dict) -> dict:
    """A budget policy's payload as the plain depth policy's (the same network, no spending table)."""
    return {"backbone": state["backbone"], "policy": depth_state(state["policy"])}


def outcome(backbone, policy, test, budget: float | None = None, chooser=None):
    """(each image's correctness, mean FLOPs, blocks mean, blocks std, unique policies) of one evaluation."""
    costs = cost_model(PRESET, policy)
    result = tally(backbone, chooser or policy, DataLoader(test, batch_size=256), costs, CPU, records=True,
                   budget=budget)
    report = result.report(costs.full)
    return result.records().correct.astype(float), report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("digits", "shapes", "mixed"), default="digits")
    parser.add_argument("--per-class", type=int, default=180)
    parser.add_argument("--gammas", default="-0.3,-1,-3,-10", help="the per-gamma front (default -0.3,-1,-3,-10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-range", default="0.2,1.0")
    parser.add_argument("--samplings", default="uniform,log,sandwich",
                        help="a budget model per way of drawing its budgets (--budget-sampling), each compared with "
                             "the first (default uniform,log,sandwich)")
    parser.add_argument("--no-prune", action="store_true", help="leave out prune-and-finetune (saves its runs)")
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="every stage at a tenth of its length: a smoke test")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="torch threads (default: 2 or the machine's cores); compute is counted in CPU seconds, "
                             "so two runs can share a machine")
    parser.add_argument("--workdir")
    parser.add_argument("--output")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gammas = [float(g) for g in args.gammas.split(",")]
    scale = 0.1 if args.quick else 1.0
    tag = args.data
    workdir = Path(args.workdir or f"method-{tag}").resolve()
    data = workdir / "data"
    if not data.exists():
        write_folder(args.data, data, 32, args.per_class)
    user_path = user_resnet(data, workdir, max(1, round(args.pretrain_epochs * scale)))
    user = {"backbone": read_checkpoint(user_path).backbone, "policy": None}
    test = load_dataset(PRESET, "test", "imagefolder", data)
    train_size = len(load_dataset(PRESET, "train", "imagefolder", data))
    user_backbone = PRESET.build_backbone()
    user_backbone.load_state_dict(user["backbone"])
    user_correct, user_report = outcome(user_backbone, None, test)
    order = greedy_order(user_backbone, DataLoader(holdout(load_dataset(PRESET, "train", "imagefolder", data,
                                                                        augment=False)), batch_size=256), CPU)
    seed = args.seed

    # 1. nest and depth, once, as the budget policy (its table is measured, the network is the depth policy's)
    extra = ["--budget-range", args.budget_range]
    plan = plan_for("budget", user_path, data, gammas[0], extra)
    nested, s_nest, _ = train("nest", plan["nest"], data, user, user, seed, scale, order=order)
    shared, s_depth, _ = train("depth", plan["depth"], data, nested, None, seed, scale)
    print(f"nest {s_nest:.0f} s, depth {s_depth:.0f} s", flush=True)

    # 2. the per-gamma front: one finetune per gamma
    front = []
    for gamma in gammas:
        settings = plan_for("depth", user_path, data, gamma)["finetune"]
        state, seconds = cpu_timed(train, "finetune", settings, data, as_depth_policy(shared), user, seed, scale)
        backbone, policy = modules(state)
        correct, report = outcome(backbone, policy, test)
        front.append({"gamma": gamma, "seconds": seconds, "correct": correct, "report": report})
        print(f"gamma {gamma:g}: {100 * report.accuracy:.2f}% at {report.flops_mean:.2E} ({seconds:.0f} CPU s)",
              flush=True)

    # 3. the budget models: one finetune each (one per way of drawing the budgets)
    full = cost_model(PRESET).full
    models = {}
    for sampling in args.samplings.split(","):
        settings = plan_for("budget", user_path, data, gammas[0], extra + ["--budget-sampling", sampling])
        state, seconds = cpu_timed(train, "finetune", settings["finetune"], data, shared, user, seed, scale)
        backbone, policy = modules(state)
        curve = budget_curve(backbone, policy, DataLoader(test, batch_size=256), cost_model(PRESET, policy), CPU,
                             curve_budgets(float(policy.base), CURVE))
        models[sampling] = {"backbone": backbone, "policy": policy, "seconds": seconds, "curve": curve}
        print(f"budget model ({sampling}): {seconds:.0f} CPU s; mean |spent - asked| "
              f"{np.mean([p.gap for p in curve]):.4f}", flush=True)

    # 4. prune-and-finetune at the block counts that bracket the front
    pruned = None
    if not args.no_prune:
        # as many ResNet steps as a per-gamma model's (nest and finetune), in the same two cosine cycles
        depth = plan_for("depth", user_path, data, gammas[0])
        stages = [("nest", depth["nest"]), ("finetune", depth["finetune"])]
        settings = prune_settings(PRESET, argparse.Namespace(dataset="imagefolder", batch_size=None, lr=None,
                                                               epochs=None, preset=PRESET.name), train_size,
                                  resnet_steps(stages, train_size))
        cycles = resnet_cycles(stages, train_size, settings["batch_size"], settings["lr"])
        settings["epochs"] = sum(int(n) for n, _ in cycles)
        keeps = sorted({k for f in front for k in keeps_bracketing(cost_model(PRESET), order, f["report"].flops_mean)})
        runs = []
        for keep in keeps:
            static = from_order(keep, order).int().tolist()
            state, _, _ = train("prune", settings, data, user, user, seed, scale, static_policy=static, cycles=cycles)
            runs.append((keep, modules(state)[0], torch.tensor(static, dtype=torch.float32)))
        pruned = pruned_curve(runs, test, PRESET, CPU)

    variants = {}
    for sampling, m in models.items():
        backbone, policy = m["backbone"], m["policy"]
        own_order = greedy_order(backbone, DataLoader(holdout(load_dataset(PRESET, "train", "imagefolder", data,
                                                                           augment=False)), batch_size=256), CPU)
        rows = []
        for f in front:
            share = f["report"].flops_mean / full
            correct, report = outcome(backbone, policy, test, budget=share)
            row = {"gamma": f["gamma"], "share": share, "front": f["report"], "budget": report, "correct": correct,
                   "vs_gamma": paired_difference(correct, f["correct"])}
            keep = keeps_bracketing(cost_model(PRESET), own_order, report.flops_mean)[0]
            static_correct, _ = outcome(backbone, None, test, chooser=static_chooser(from_order(keep, own_order)))
            row["vs_static"] = (keep, paired_difference(correct, static_correct))
            if pruned is not None:
                scores, where = pruned.at(report.flops_mean)
                row["vs_prune"] = (paired_difference(correct, scores), where)
                front_scores, _ = pruned.at(f["report"].flops_mean)
                row["front_vs_prune"] = paired_difference(f["correct"], front_scores)
            rows.append(row)
        variants[sampling] = rows
    write(args, tag, user_report, variants, models, sum(f["seconds"] for f in front), s_nest + s_depth, len(test),
          train_size, full)


def write(args, tag, user_report, variants, models, front_seconds, shared_seconds, test_size, train_size,
          full) -> None:
    first = next(iter(variants.values()))
    n = len(first)
    seconds = ", ".join(f"{s} {m['seconds']:.0f} s ({m['seconds'] / front_seconds:.2f}x)" for s, m in models.items())
    threads = f"{args.threads} torch thread{'s' if args.threads > 1 else ''}"
    lines = [f"### One budget model against {n} per-gamma models: {tag} (32x32 RGB folder, {train_size} train / "
             f"{test_size} test images), ResNet-32", "",
             f"{time.strftime('%Y-%m-%d')}, {platform.node()}: {os.cpu_count()} CPU cores, torch {torch.__version__}, "
             f"in-process (benchmarks/budget.py, the stages' own code), seed {args.seed}, gammas {args.gammas}, budget "
             f"range {args.budget_range}, samplings {args.samplings}{', quick' if args.quick else ''}. Command: "
             f"`python benchmarks/budget.py --data {args.data} --gammas={args.gammas} --samplings {args.samplings} "
             f"--threads {args.threads}"
             f"{' --no-prune' if args.no_prune else ''}{' --quick' if args.quick else ''}`", "",
             f"The user's ResNet-32: {100 * user_report.accuracy:.2f}%, {full:.2E} FLOPs. Nest + depth, shared by all: "
             f"{shared_seconds:.0f} s (wall). Training compute (the process's CPU seconds, {threads}; against the {n} "
             f"per-gamma finetunes' {front_seconds:.0f} s; by optimisation steps each budget finetune is 1/{n} of "
             f"them, a sandwich step trains twice the rows, the added ones at the range's low end): {seconds}.", ""]

    def point(r) -> str:
        return (f"{100 * r.accuracy:.2f}%, {r.blocks_mean:.2f} +- {r.blocks_std:.2f} blocks, {r.unique_policies} "
                f"policies, {r.flops_mean:.2E}")

    for sampling, rows in variants.items():
        lines += [f"**Budgets drawn {sampling}**: at each per-gamma model's FLOPs (the budget model's mean budget set "
                  "to that model's share):", "",
                  "| gamma | share | per-gamma model | budget model | budget minus per-gamma | budget minus greedy "
                  "static on its ResNet | budget minus prune-and-finetune | per-gamma minus prune-and-finetune |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in rows:
            keep, static = row["vs_static"]
            prune = f"{row['vs_prune'][0].text()} ({row['vs_prune'][1]})" if "vs_prune" in row else "not run"
            front_prune = row["front_vs_prune"].text() if "front_vs_prune" in row else ""
            lines.append(f"| {row['gamma']:g} | {row['share']:.3f} | {point(row['front'])} | {point(row['budget'])} | "
                         f"{row['vs_gamma'].text()} ({row['vs_gamma'].verdict}) | {static.text()} (K={keep}) | "
                         f"{prune} | {front_prune} |")
        lines.append("")
    first, *others = list(variants)
    for other in others:
        lines += [f"**{other} minus {first}**, image by image at each point:", "", "| gamma | share | difference |",
                  "|---|---|---|"]
        for ra, rb in zip(variants[other], variants[first]):
            d = paired_difference(ra["correct"], rb["correct"])
            lines.append(f"| {ra['gamma']:g} | {ra['share']:.3f} | {d.text()} ({d.verdict}) |")
        lines.append("")
    for sampling, m in models.items():
        curve = m["curve"]
        lines += [f"The budget model's curve, budgets drawn {sampling} (mean budgets; spent: the mean share of the "
                  "full ResNet's FLOPs on the test images, the table measured on the validation split):", "",
                  "| asked | spent | max image | accuracy | blocks | unique policies | speedup |",
                  "|---|---|---|---|---|---|---|"]
        for p in curve:
            r = p.report
            lines.append(f"| {p.budget:.2f} | {p.spent:.3f} | {p.flops_max / full:.3f} | {100 * r.accuracy:.2f}% | "
                         f"{r.blocks_mean:.2f} +- {r.blocks_std:.2f} | {r.unique_policies} | {r.speedup:.2f}x |")
        lines.append(f"\nMean |spent - asked| over the curve: {np.mean([p.gap for p in curve]):.4f}.\n")
    output = args.output or str(Path(__file__).parent / "results" / f"budget_{tag}.md")
    emit(lines, output)


if __name__ == "__main__":
    main()
