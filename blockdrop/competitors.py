"""The static competitors trained beside a learned policy on Ray Train, which a job and a sweep both train:
prune-and-finetune (whole blocks dropped: blockdrop.prune) at the block counts that bracket the learned
FLOPs, and channel pruning (each block narrower: blockdrop.channels) at the learned FLOPs. Each starts from
the user's ResNet and trains as long as the learned policy's stages trained the ResNet, with the same
schedule (a cosine cycle per such stage) and the same distillation from the user's ResNet. Each is a model of
its own: a child run with its checkpoint and its MLflow model, servable like any other."""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from blockdrop.baselines import from_order
from blockdrop.checkpoints import read_checkpoint
from blockdrop.choices import CHANNELS, PRUNE, PRUNED
from blockdrop.distributed import Payloads, channels_remotely, run_stage
from blockdrop.flops import cost_model
from blockdrop.plans import prune_settings, resnet_cycles, resnet_steps
from blockdrop.presets import Preset
from blockdrop.prune import keeps_bracketing
from blockdrop.stages import StageConfig
from blockdrop.tracking import Tracker


@dataclass
class PruneRuns:
    """Where and how the competitors train (a job's or a sweep's settings), and what their MLflow runs are
    children of. `example`: the logged models' input example (blockdrop.pyfunc.input_example)."""

    name: str
    dataset: str | None
    data_dir: str | None
    workers: int
    gpu: bool
    storage: str | None
    output: Path
    tracker: Tracker
    parent_id: str
    params: dict
    train_size: int
    example: np.ndarray
    seed: int = 0
    max_bad_images: float = 0.001
    execution: str = "sparse"
    max_failures: int = 3


@dataclass
class Trained:
    """One trained competitor: its kind (PRUNED or CHANNELS), blocks kept, ResNet state dict, 0/1 row, run, file."""

    kind: str
    keep: int
    backbone: dict
    row: list[int]
    run_id: str
    path: Path
    info: dict = field(default_factory=dict)  # channel pruning: its criterion and each criterion's validation accuracy

    @property
    def model(self) -> tuple[int, dict, list[int]]:
        """(K, ResNet state dict, 0/1 row): what the comparisons take (blockdrop.analysis.competitor_curves)."""
        return self.keep, self.backbone, self.row


def train_competitors(preset: Preset, runs: PruneRuns, payloads: Payloads, reference: dict | None, flops: list[float],
                      stages: list[tuple[str, dict]], policy_seconds: float) -> list[Trained]:
    """Prune-and-finetune at the block counts that bracket each of `flops` (a learned policy's FLOPs per image),
    and channel pruning at each of them, from the user's ResNet, for as many optimisation steps as the learned
    policy's `stages` (stage, settings) trained the ResNet, a cosine cycle per such stage
    (blockdrop.plans.resnet_cycles). Their runs are children of `runs.parent_id`; their time is logged there
    beside the policy's (`policy_seconds`)."""
    start = payloads.user_resnet(reference, "prune-and-finetune and channel pruning left out")
    if start is None:
        return []
    order = payloads.order(start, runs.dataset, runs.data_dir, runs.gpu)
    plain = argparse.Namespace(dataset=runs.dataset, preset=preset.name, epochs=None, lr=None, batch_size=None)
    settings = prune_settings(preset, plain, runs.train_size, resnet_steps(stages, runs.train_size))
    cycles = resnet_cycles(stages, runs.train_size, settings["batch_size"], settings["lr"])
    settings |= {"epochs": sum(int(c[0]) for c in cycles), "cycles": cycles}
    keeps = sorted({keep for f in flops for keep in keeps_bracketing(cost_model(preset), order, f)})
    full = cost_model(preset).full
    # one channel-pruned model per 0.5% of the full FLOPs the points fall in, at most their FLOPs
    targets = sorted({math.floor(200 * f / full) * full / 200 for f in flops})
    steps = settings["epochs"] * max(runs.train_size // settings["batch_size"], 1)
    print(f"== the competitors, from {reference['source']}, {steps} ResNet steps each ({settings['epochs']} epochs in "
          f"{len(cycles)} cosine cycle(s); the policy's stages: {resnet_steps(stages, runs.train_size)} ResNet steps, "
          f"{' + '.join(stage for stage, _ in stages if stage in ('adapt', 'nest', 'finetune'))}), the same soft labels: "
          f"prune and finetune with the greedy {', '.join(map(str, keeps))} blocks; channel pruning to "
          f"{', '.join(f'{f / full:.2f}' for f in targets)} of the FLOPs", file=sys.stderr)
    began = time.time()
    runs.output.mkdir(parents=True, exist_ok=True)
    trained = [_train(preset, runs, start, reference, settings, PRUNED, keep, from_order(keep, order).int().tolist())
               for keep in keeps]
    for target in targets:
        choice = channels_remotely(preset.name, start, target, runs.dataset, runs.data_dir, runs.gpu)
        print(f"   channel pruning to {target:.2E} FLOPs: criterion {choice['criterion']} (validation accuracy before "
              "finetuning: " + ", ".join(f"{c} {a:.3f}" for c, a in choice["accuracy"].items()) + ")", file=sys.stderr)
        trained.append(_train(preset, runs, start, reference, settings, CHANNELS, preset.num_blocks,
                              [1] * preset.num_blocks, choice))
    seconds = time.time() - began
    runs.tracker.log_metrics(runs.parent_id, {"prune_baseline_seconds": seconds, "blockdrop_seconds": policy_seconds},
                             step=0)
    print(f"   the competitors: {len(trained)} runs in {seconds:.0f} s (the policy's stages: {policy_seconds:.0f} s)",
          file=sys.stderr)
    return trained


def _train(preset: Preset, runs: PruneRuns, start, reference: dict, settings: dict, kind: str, keep: int,
           row: list[int], choice: dict | None = None) -> Trained:
    """One competitor's run (a child run of its own), its checkpoint next to the job's, its MLflow model."""
    if kind == CHANNELS:
        share = choice["flops"] / cost_model(preset).full
        label, params = f"channels-{100 * share:.0f}", {"criterion": choice["criterion"], "flops_share": f"{share:.3f}"}
    else:
        label, params = f"prune-K{keep}", {}
    run_name = f"{runs.name}-{label}"
    child, _ = runs.tracker.job_run(f"{runs.name}/{label}", run_name, runs.params | {"stage": PRUNE, "keep": keep,
                                    "competitor": kind} | params | settings, parent_id=runs.parent_id)
    cfg = StageConfig(preset=preset.name, stage=PRUNE, dataset=runs.dataset, data_dir=runs.data_dir, seed=runs.seed,
                      max_bad_images=runs.max_bad_images, execution=runs.execution, eval_every=settings["epochs"],
                      reference=reference, static_policy=row, channels=choice["kept"] if choice else None,
                      **({"gamma": 0.0} | settings))
    out = run_stage(cfg, start, runs.workers, runs.gpu, run_name, runs.storage, runs.max_failures,
                    runs.output / f"{run_name}.pt", callbacks=[runs.tracker.epoch_logger(child)], teacher_ref=start)
    checkpoint = read_checkpoint(out)
    runs.tracker.publish(child, out, checkpoint, preset, runs.example,
                         {"preset": preset.name, "competitor": kind, "keep": keep} | params)
    runs.tracker.finish(child, ok=True)
    info = {} if choice is None else {"criterion": choice["criterion"], "criteria": choice["accuracy"]}
    return Trained(kind, keep, checkpoint.backbone, row, child, out, info)
