"""Prune-and-finetune trained beside a learned policy, on Ray Train: the competitor a job and a sweep
both train (blockdrop.prune holds its math) at the block counts that bracket the learned FLOPs."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from blockdrop.baselines import from_order
from blockdrop.checkpoints import read_checkpoint
from blockdrop.choices import PRUNE
from blockdrop.distributed import Payloads, run_stage
from blockdrop.flops import cost_model
from blockdrop.plans import prune_settings
from blockdrop.presets import Preset
from blockdrop.prune import keeps_bracketing
from blockdrop.stages import StageConfig
from blockdrop.tracking import Tracker


@dataclass
class PruneRuns:
    """Where and how prune-and-finetune trains (a job's or a sweep's settings), and what its MLflow runs
    are children of."""

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
    seed: int = 0
    max_bad_images: float = 0.001
    execution: str = "sparse"
    max_failures: int = 3


def prune_baseline(preset: Preset, runs: PruneRuns, payloads: Payloads, reference: dict | None, flops: list[float],
                   steps: int, policy_seconds: float) -> list[tuple[int, dict, list[int]]]:
    """Prune-and-finetune from the user's ResNet at the block counts that bracket each of `flops` (a learned
    policy's FLOPs per image), for `steps` optimisation steps (as many as the learned policy's stages
    trained the ResNet): (K, ResNet state dict, 0/1 row) each. Its runs are children of `runs.parent_id`;
    its time is logged there beside the policy's (`policy_seconds`)."""
    start = payloads.user_resnet(reference, "prune-and-finetune left out")
    if start is None:
        return []
    order = payloads.order(start, runs.dataset, runs.data_dir, runs.gpu)
    plain = argparse.Namespace(dataset=runs.dataset, preset=preset.name, epochs=None, lr=None, batch_size=None)
    settings = prune_settings(preset, plain, runs.train_size, steps)
    keeps = sorted({keep for f in flops for keep in keeps_bracketing(cost_model(preset), order, f)})
    print(f"== prune and finetune (the competitor): {reference['source']} finetuned with the greedy "
          f"{', '.join(map(str, keeps))} blocks, {settings['epochs']} epochs each (as many steps as this "
          f"job's stages trained the ResNet)", file=sys.stderr)
    began = time.time()
    runs.output.mkdir(parents=True, exist_ok=True)
    pruned = [_prune(preset, runs, start, reference, settings, keep, from_order(keep, order).int().tolist())
              for keep in keeps]
    seconds = time.time() - began
    runs.tracker.log_metrics(runs.parent_id, {"prune_baseline_seconds": seconds, "blockdrop_seconds": policy_seconds},
                             step=0)
    print(f"   prune and finetune: {len(keeps)} runs in {seconds:.0f} s (the policy's stages: {policy_seconds:.0f} s)",
          file=sys.stderr)
    return pruned


def _prune(preset: Preset, runs: PruneRuns, start, reference: dict, settings: dict, keep: int,
           row: list[int]) -> tuple[int, dict, list[int]]:
    """One prune-and-finetune run (a child run of its own), its checkpoint next to the job's."""
    run_name = f"{runs.name}-prune-K{keep}"
    child, _ = runs.tracker.job_run(f"{runs.name}/prune-K{keep}", run_name,
                                    runs.params | {"stage": PRUNE, "keep": keep} | settings, parent_id=runs.parent_id)
    cfg = StageConfig(preset=preset.name, stage=PRUNE, dataset=runs.dataset, data_dir=runs.data_dir, seed=runs.seed,
                      max_bad_images=runs.max_bad_images, execution=runs.execution, eval_every=settings["epochs"],
                      reference=reference, static_policy=row, **({"gamma": 0.0} | settings))
    out = run_stage(cfg, start, runs.workers, runs.gpu, run_name, runs.storage, runs.max_failures,
                    runs.output / f"{run_name}.pt", callbacks=[runs.tracker.epoch_logger(child)], teacher_ref=start)
    runs.tracker.log_artifact(child, out, "checkpoint")
    runs.tracker.finish(child, ok=True)
    return keep, read_checkpoint(out).backbone, row
