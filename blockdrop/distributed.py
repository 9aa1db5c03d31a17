"""Ray Train wiring: one stage of training as a data-parallel TorchTrainer run.

Each worker trains on its shard (DistributedSampler) with DDP-wrapped modules, evaluates the
greedy policy on its shard of the test set, and the epoch's figures are merged over *all* workers
before rank 0 reports them, with a checkpoint, to Ray Train and to MLflow. A worker that dies is
replaced (FailureConfig) and the group resumes from the last reported checkpoint; running the same
job name again against the same storage resumes it too.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Subset

from blockdrop.checkpoints import build_policy, read_checkpoint, save_checkpoint
from blockdrop.errors import UserError
from blockdrop.data import (MAX_UNREADABLE, allowed_unreadable, default_loader_workers, load_dataset, loader_options,
                            skipped_images)
from blockdrop.evaluate import Report, Tally, tally
from blockdrop.execution import Executor
from blockdrop.flops import cost_model
from blockdrop.presets import get_preset
from blockdrop.prune import static_chooser
from blockdrop.reinforce import curriculum_index, curriculum_mask
from blockdrop.stages import SUPERVISED, EpochStats, Models, make_optimizer, make_schedule, train_epoch

STATE_FILE = "train_state.pt"
MODEL_FILE = "model.pt"


@dataclass
class StageConfig:
    """Everything a worker needs; plain data so Ray can ship it."""

    preset: str
    stage: str
    epochs: int
    batch_size: int  # global: split over the workers
    lr: float
    weight_decay: float
    gamma: float
    drop_rate: float
    dataset: str | None
    data_dir: str | None
    mlflow_uri: str | None
    mlflow_run_id: str | None
    seed: int = 0
    loader_workers: int | None = None  # DataLoader worker processes (None: blockdrop.data.default_loader_workers)
    policy_lr: float | None = None  # finetune: the policy's own lr (default: lr)
    entropy: str = "original"  # curriculum: one of reinforce.ENTROPIES
    pace: int = 0  # curriculum: optimisation steps per newly decided block (0: one epoch)
    max_bad_images: float = MAX_UNREADABLE  # share of an image folder that may be unreadable
    execution: str = "sparse"  # finetune, stochastic depth: blockdrop.execution.TRAIN_EXECUTIONS
    eval_every: int = 1  # evaluate on the test set every this many epochs, and after the last
    # The user's ResNet, what every figure is measured against: {"accuracy", "source"}. None: the stage's
    # --init ResNet is that reference, evaluated in full before the first epoch (`reference_source` names it).
    reference: dict | None = None
    reference_source: str = ""
    reference_file: str = ""  # its checkpoint, where prune-and-finetune starts from
    static_policy: list[int] | None = None  # prune: the 0/1 policy every image runs
    order: list[int] | None = None  # nest: the greedy static order of the user's ResNet (the depth policy's)
    # a progress line within an epoch every this many seconds (ImageNet: an epoch is an hour)
    progress_every_s: float = field(default_factory=lambda: float(os.environ.get("BLOCKDROP_PROGRESS_EVERY_S", "30")))


def progress(line: str) -> None:
    """A progress line from a worker, straight to its stdout (Ray forwards it to the driver once;
    Train's patched print would log it twice)."""
    sys.__stdout__.write(line + "\n")
    sys.__stdout__.flush()


class StepProgress:
    """Rank 0's line within a long epoch, every `every` seconds: step, images/s of all workers, ETA.
    Workers' output is not a terminal (Ray forwards it), so lines rather than a progress bar; an epoch
    shorter than `every` prints none."""

    def __init__(self, stage: str, epoch: int, epochs: int, world: int, every: float):
        self.stage, self.epoch, self.epochs, self.world, self.every = stage, epoch, epochs, world, every
        self.began = self.last = time.time()
        self.images = 0

    def __call__(self, step: int, steps: int, images: int) -> None:
        self.images += images
        now = time.time()
        if now - self.last < self.every or step >= steps:
            return
        self.last = now
        elapsed = now - self.began
        eta = (steps - step) * elapsed / step
        progress(f"[{self.stage}] epoch {self.epoch + 1}/{self.epochs}  step {step}/{steps}  "
                 f"{self.images * self.world / elapsed:.0f} img/s  epoch ends in {_duration(eta)}")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def _gather(obj: object, world: int) -> list:
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def epoch_metrics(stats: EpochStats, test: Tally | None, full_flops: int, lr: float) -> dict[str, float]:
    """An epoch's metrics; without `test` (an epoch --eval-every skips) the training ones only."""
    if test is None:
        return stats.metrics() | {"learning_rate": lr}
    report = test.report(full_flops)
    return stats.metrics() | {
        "test_images": report.images,
        "test_accuracy": report.accuracy,
        "full_accuracy": report.full_accuracy,
        "blocks_used": report.blocks_mean,
        "blocks_used_std": report.blocks_std,
        "flops_per_image": report.flops_mean,
        "flops_per_image_std": report.flops_std,
        "speedup": report.speedup,
        "unique_policies": report.unique_policies,
        "learning_rate": lr,  # this epoch's, from the schedule; the parameter `lr` is where it starts
    }


def final_report(meta: dict, full_flops: int) -> Report:
    """The report of a stage's last epoch from its checkpoint's metadata, as its workers computed it over
    the whole test set: no second evaluation pass on the driver."""
    m, reference = meta["metrics"], meta.get("reference") or {}
    return Report(images=int(m["test_images"]), accuracy=m["test_accuracy"], blocks_mean=m["blocks_used"],
                  blocks_std=m["blocks_used_std"], flops_mean=m["flops_per_image"],
                  flops_std=m["flops_per_image_std"], unique_policies=int(m["unique_policies"]),
                  full_accuracy=m["full_accuracy"], full_flops=full_flops, speedup=m["speedup"],
                  reference_accuracy=reference.get("accuracy"), reference=reference.get("source", ""))


def reference_of(cfg: StageConfig, backbone, test_loader, costs, device, world: int) -> dict | None:
    """The stage's reference ResNet: the one given, else its starting ResNet run in full on the whole
    test set (each worker its shard, merged)."""
    if cfg.reference is not None or not cfg.reference_source:
        return cfg.reference
    merged = Tally()
    for shard in _gather(tally(backbone, None, test_loader, costs, device), world):
        merged.merge(shard)
    return {"accuracy": merged.full_correct / max(merged.blocks.n, 1), "source": cfg.reference_source,
            "file": cfg.reference_file}


def setup_stage(cfg: StageConfig, preset, init: dict | None, teacher: dict | None, device: torch.device,
                prepare=lambda module, **_: module) -> tuple[Models, torch.optim.Optimizer, object]:
    """The models a stage trains (from `init`'s state dicts), wrapped by `prepare` (Ray Train's
    prepare_model: DDP), with their optimiser and schedule. `teacher`: the user's ResNet (a payload like
    `init`'s), whose soft labels the depth policy's stages learn from."""
    backbone = preset.build_backbone()
    init_policy = (init or {}).get("policy")
    depth = cfg.stage in ("nest", "depth") or (init_policy is not None and "rank" in init_policy)
    policy = preset.build_depth_policy() if depth else None if cfg.stage in SUPERVISED else preset.build_policy()
    if init is not None:
        backbone.load_state_dict(init["backbone"], strict=False)
        if policy is not None and init_policy is not None:
            policy.load_state_dict(init_policy)
    if cfg.order is not None:  # nest: the keep order of the depth policy, from the user's ResNet
        costs = cost_model(preset)
        policy.set_order(cfg.order, costs.backbone.blocks, costs.full)
    if depth:
        policy.gamma.fill_(cfg.gamma)

    executor = Executor(backbone, cfg.execution).to(device, memory_format=torch.channels_last)
    # Sparse execution leaves the blocks no row of this worker keeps out of the step's graph.
    per_image = cfg.stage in ("finetune", "nest") or cfg.drop_rate > 0 or cfg.static_policy is not None
    ddp = {"find_unused_parameters": per_image and executor.needs_unused_parameters}
    if policy is not None:
        policy.to(device, memory_format=torch.channels_last)
    frozen = None
    if teacher is not None and (cfg.stage in ("nest", "prune") or (depth and cfg.stage == "finetune")):
        frozen = preset.build_backbone()
        frozen.load_state_dict(teacher["backbone"])
        frozen.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
    if cfg.stage in ("curriculum", "depth"):
        backbone.requires_grad_(False)
        models = Models(backbone, policy, policy_train=prepare(policy))
        params = list(policy.parameters())
    elif cfg.stage in SUPERVISED or depth:  # the ResNet alone (the depth policy's finetune: its choices fixed)
        if policy is not None:
            policy.requires_grad_(False)
        models = Models(backbone, policy, executor_train=prepare(executor, parallel_strategy_kwargs=ddp),
                        teacher=frozen, rank=policy.rank if depth else None)
        params = list(backbone.parameters())
    else:
        models = Models(backbone, policy, executor_train=prepare(executor, parallel_strategy_kwargs=ddp),
                        policy_train=prepare(policy))
        params = [{"params": list(policy.parameters()), "lr": cfg.policy_lr or cfg.lr},
                  {"params": list(backbone.parameters())}]
    optimizer = make_optimizer(cfg.stage, params, cfg.lr, cfg.weight_decay, depth)
    return models, optimizer, make_schedule(cfg.stage, optimizer, cfg.epochs, depth)


def train_loop_per_worker(config: dict) -> None:
    """The per-worker function of TorchTrainer: ordinary PyTorch plus Ray's report/checkpoint."""
    import ray.train
    import ray.train.torch

    # Train's per-report INFO lines drown the progress; some come from loggers named after files.
    for name in ("ray.train", ""):
        logging.getLogger(name).setLevel(logging.WARNING)
    cfg = StageConfig(**config["stage"])
    preset = get_preset(cfg.preset)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed * 1000 + rank)

    init = ray.get(config["init"]) if config.get("init") is not None else None
    teacher = ray.get(config["teacher"]) if config.get("teacher") is not None else None
    models, optimizer, schedule = setup_stage(cfg, preset, init, teacher, device, ray.train.torch.prepare_model)
    backbone, policy = models.backbone, models.policy

    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location=device, weights_only=True)
        backbone.load_state_dict(state["backbone"])
        if policy is not None:
            policy.load_state_dict(state["policy"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start = state["epoch"] + 1
        # a resumed stage keeps the reference measured on its starting ResNet, not on the trained one
        cfg.reference, cfg.reference_source = state.get("reference", cfg.reference), ""
        if rank == 0:
            progress(f"[{cfg.stage}] resuming after epoch {state['epoch']} (from the last checkpoint)")

    train_set = load_dataset(preset, "train", cfg.dataset, cfg.data_dir, download=False)
    test_set = load_dataset(preset, "test", cfg.dataset, cfg.data_dir, download=False)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    per_worker = max(cfg.batch_size // world, 1)
    workers = cfg.loader_workers
    if workers is None:  # the node's cores shared by its training processes (benchmarks/input_pipeline.py)
        cpus = max((os.cpu_count() or 1) // max(ctx.get_local_world_size(), 1), 1)
        workers = default_loader_workers(cfg.dataset or preset.dataset, device.type, cpus)
    options = loader_options(device.type, workers)
    loader = DataLoader(train_set, batch_size=per_worker, sampler=sampler,
                        drop_last=len(train_set) >= per_worker * world * 2, **options)
    test_loader = DataLoader(Subset(test_set, range(rank, len(test_set), world)), batch_size=256, **options)
    costs = cost_model(preset, policy)
    static = None if cfg.static_policy is None else torch.tensor(cfg.static_policy, dtype=torch.float32)
    # what the test set is run under: the policy network, the static policy of a pruned ResNet, or every block
    # (nest: the depth policy is not trained yet)
    evaluated = static_chooser(static) if static is not None else None if cfg.stage == "nest" else policy
    tracker = None
    if rank == 0 and cfg.mlflow_run_id:
        from mlflow.tracking import MlflowClient

        tracker = MlflowClient(cfg.mlflow_uri)

    reference = reference_of(cfg, backbone, test_loader, costs, device, world)
    for epoch in range(start, cfg.epochs):
        began = time.time()
        sampler.set_epoch(epoch)
        on_step = StepProgress(cfg.stage, epoch, cfg.epochs, world, cfg.progress_every_s) if rank == 0 else None
        stats = train_epoch(cfg.stage, models, loader, optimizer, epoch, cfg.gamma, device, cfg.drop_rate,
                            cfg.pace, cfg.entropy, on_step=on_step, static=static)
        trained = time.time()
        lr = optimizer.param_groups[-1]["lr"]  # finetune: the ResNet's
        schedule.step()
        decided = None
        if cfg.stage == "curriculum":
            decided = curriculum_mask(preset.num_blocks, curriculum_index((epoch + 1) * len(loader) - 1, cfg.pace or len(loader)))
        evaluate = (epoch + 1) % cfg.eval_every == 0 or epoch == cfg.epochs - 1
        test = tally(backbone, evaluated, test_loader, costs, device, decided=decided) if evaluate else None
        merged_stats, merged_test, skipped = EpochStats(), Tally() if evaluate else None, None
        for s, t, k in _gather((stats, test, skipped_images(train_set)), world):
            merged_stats.merge(s)
            if evaluate:
                merged_test.merge(t)
            skipped = None if k is None else (skipped or 0) + k
        metrics = epoch_metrics(merged_stats, merged_test, costs.full, lr) | {"epoch": epoch}
        if reference is not None:
            metrics["reference_accuracy"] = reference["accuracy"]
        # where the epoch's time goes (rank 0's clock): training steps, then evaluation and merging
        metrics |= {"train_seconds": trained - began, "eval_seconds": time.time() - trained,
                    "torch_threads": torch.get_num_threads()}
        if skipped is not None:  # an image folder: unreadable files met so far (each stood in for by the next)
            metrics["skipped_images"] = skipped
            allowed = allowed_unreadable(cfg.max_bad_images, len(train_set))
            if skipped > allowed:
                raise UserError(f"{skipped} unreadable training images, more than --max-bad-images "
                                f"{cfg.max_bad_images:g} allows ({allowed}); the warnings name them")
        if rank != 0:
            ray.train.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as folder:
            torch.save({
                "backbone": backbone.state_dict(), "policy": None if policy is None else policy.state_dict(),
                "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "epoch": epoch,
                "reference": reference,
            }, Path(folder) / STATE_FILE)
            save_checkpoint(Path(folder) / MODEL_FILE, preset, backbone, policy,
                            {"stage": cfg.stage, "epoch": epoch, "metrics": metrics, "config": asdict(cfg),
                             "reference": reference})
            if tracker is not None:
                from blockdrop.tracking import metric_batch

                tracker.log_batch(cfg.mlflow_run_id, metrics=metric_batch(metrics, epoch))
            tested = (f"test acc {metrics['test_accuracy']:.3f}  blocks {metrics['blocks_used']:.2f}/"
                      f"{preset.num_blocks}  speedup {metrics['speedup']:.2f}x" if evaluate else
                      f"train acc {metrics['train_accuracy']:.3f}  (not evaluated: --eval-every {cfg.eval_every})")
            progress(f"[{cfg.stage}] epoch {epoch + 1}/{cfg.epochs}  loss {metrics['train_loss']:.3f}  {tested}  "
                     f"({time.time() - began:.1f}s)")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def run_stage(cfg: StageConfig, init_ref, num_workers: int, use_gpu: bool, name: str,
              storage_path: str | None, max_failures: int, callbacks: list | None = None, teacher_ref=None) -> Path:
    """Fit one stage; returns a local copy of its final model checkpoint.

    `callbacks` are Ray Train callbacks (a Tune trial passes the one that forwards reports to Tune);
    `teacher_ref` the user's ResNet's state dict (the depth policy's stages learn from its soft labels).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.config import LoggingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"stage": asdict(cfg), "init": init_ref, "teacher": teacher_ref},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            # controller_failure_limit: a worker dying while the group starts must fail, not hang
            failure_config=FailureConfig(max_failures=max_failures, controller_failure_limit=max(max_failures, 1)),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),  # progress is ours; Ray's INFO is noise
            callbacks=callbacks,
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"stage {cfg.stage} finished without a checkpoint")
    local = Path(tempfile.mkdtemp(prefix=f"blockdrop-{cfg.stage}-"))
    with result.checkpoint.as_directory() as folder:
        target = local / MODEL_FILE
        target.write_bytes((Path(folder) / MODEL_FILE).read_bytes())
    return target


# "DEFAULT": outside the caller's placement group (a Tune trial's holds only the trial's small bundle).
_TASK_OPTIONS = {"num_cpus": 1, "max_retries": 1, "scheduling_strategy": "DEFAULT"}


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _backbone(preset, state: dict):
    backbone = preset.build_backbone()
    backbone.load_state_dict(state)
    return backbone


def _analyse_task(preset_name: str, payload: dict, dataset: str | None, data_dir: str | None,
                  mlflow_uri: str | None, run_id: str | None, pruned: list | None = None) -> dict:
    """Runs on a Ray worker: compare with the baselines (and the pruned ResNets: (K, state dict, 0/1
    row) each), draw the pictures, log both to the run."""
    from blockdrop.analysis import analyse

    preset = get_preset(preset_name)
    policy = build_policy(preset, payload["policy"])
    policy.load_state_dict(payload["policy"])
    models = [(keep, _backbone(preset, state), torch.tensor(row, dtype=torch.float32)) for keep, state, row in pruned or []]
    with tempfile.TemporaryDirectory() as folder:
        comparison = analyse(preset, _backbone(preset, payload["backbone"]), policy, dataset, data_dir, _device(), folder,
                             pruned=models)
        if mlflow_uri and run_id:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(mlflow_uri)
            client.log_artifacts(run_id, folder, "policy")
            from blockdrop.tracking import metric_batch

            client.log_batch(run_id, metrics=metric_batch(comparison.metrics(), 0))
    return comparison.to_json()


def analyse_remotely(preset_name: str, payload_ref, dataset: str | None, data_dir: str | None,
                     mlflow_uri: str | None, run_id: str | None, use_gpu: bool, pruned: list | None = None):
    """blockdrop.analysis on one Ray worker (a GPU one with `use_gpu`), logged to the MLflow run;
    returns the Comparison. Not on the driver: on a cluster that is the head node."""
    import ray

    from blockdrop.analysis import Comparison

    task = ray.remote(_analyse_task).options(**_TASK_OPTIONS, num_gpus=1 if use_gpu else 0)
    result = ray.get(task.remote(preset_name, payload_ref, dataset, data_dir, mlflow_uri, run_id, pruned))
    return Comparison.from_json(result)


def _versus_pruned_task(preset_name: str, learned: list, pruned: list, dataset: str | None,
                        data_dir: str | None) -> dict:
    """Each learned model ((key, payload) each) against prune-and-finetune ((K, state dict, 0/1 row) each)
    at its FLOPs, image by image on the test set: {key: Versus as a dict}."""
    from blockdrop.analysis import versus
    from blockdrop.prune import pruned_curve

    preset = get_preset(preset_name)
    device, layout = _device(), {"memory_format": torch.channels_last}
    test = load_dataset(preset, "test", dataset, data_dir, download=False)
    models = [(keep, _backbone(preset, state), torch.tensor(row, dtype=torch.float32)) for keep, state, row in pruned]
    curve = pruned_curve(models, test, cost_model(preset), device)
    out = {}
    for key, payload in learned:
        policy = build_policy(preset, payload["policy"])
        policy.load_state_dict(payload["policy"])
        costs = cost_model(preset, policy)
        result = tally(_backbone(preset, payload["backbone"]).to(device, **layout), policy.to(device, **layout),
                       DataLoader(test, batch_size=256), costs, device, records=True)
        flops = result.report(costs.full).flops_mean
        out[key] = asdict(versus(result.records().correct.astype("float64"), curve, flops))
    return {"versus": out, "curve": [asdict(p) for p in curve.points]}


def versus_pruned_remotely(preset_name: str, learned: list, pruned: list, dataset: str | None, data_dir: str | None,
                           use_gpu: bool) -> dict:
    """_versus_pruned_task on a Ray worker."""
    import ray

    task = ray.remote(_versus_pruned_task).options(**_TASK_OPTIONS, num_gpus=1 if use_gpu else 0)
    return ray.get(task.remote(preset_name, learned, pruned, dataset, data_dir))


def _order_task(preset_name: str, payload: dict, dataset: str | None, data_dir: str | None) -> list[int]:
    from blockdrop.analysis import greedy_order_on

    preset = get_preset(preset_name)
    return greedy_order_on(preset, _backbone(preset, payload["backbone"]), dataset, data_dir, _device())


def order_remotely(preset_name: str, payload_ref, dataset: str | None, data_dir: str | None, use_gpu: bool) -> list[int]:
    """The greedy static order (every block, least useful first) of a ResNet, on a Ray worker."""
    import ray

    task = ray.remote(_order_task).options(**_TASK_OPTIONS, num_gpus=1 if use_gpu else 0)
    return ray.get(task.remote(preset_name, payload_ref, dataset, data_dir))


def _curves_task(preset_name: str, payload: dict, dataset: str | None, data_dir: str | None) -> dict:
    from blockdrop.analysis import curves

    preset = get_preset(preset_name)
    backbone = _backbone(preset, payload["backbone"])
    return {name: [asdict(p) for p in curve] for name, curve in curves(preset, backbone, dataset, data_dir, _device()).items()}


def curves_remotely(preset_name: str, payload_ref, dataset: str | None, data_dir: str | None, use_gpu: bool):
    """blockdrop.analysis.curves on a Ray worker; returns the ObjectRef of {name: [CurvePoint as dict]}."""
    import ray

    task = ray.remote(_curves_task).options(**_TASK_OPTIONS, num_gpus=1 if use_gpu else 0)
    return task.remote(preset_name, payload_ref, dataset, data_dir)


# Ray Train's controller polls workers every 2 s by default and each report waits for it:
# 2 s lost per epoch. Set where the controller runs, through the job's runtime environment.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def quiet_ray_env() -> None:
    """Ray's console output down to what a user needs: progress and errors."""
    for key, value in {"RAY_DEDUP_LOGS": "1", "RAY_AIR_NEW_OUTPUT": "0", **TRAIN_ENV}.items():
        os.environ.setdefault(key, value)
    # A local Ray started here says that it turned on token authentication: by design, not news.
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        lambda record: "Token authentication is enabled" not in record.getMessage())


# Lines Ray's workers print that are known to be harmless here, and read like failures on a console:
HARMLESS_WORKER_LINES = (
    # Ray Train V2 starts its PreemptionWatcher (spot-node preemption handling, kept) with restarts on;
    # the core worker then logs at ERROR level that restarting would need its constructor arguments.
    "has constructor arguments in the object store and max_restarts > 0",
    # Serve's shutdown kills its controller while a graceful-shutdown call is pending, and says so.
    "Task ServeController.graceful_shutdown failed",
)


# Messages Ray's workers log with a traceback that are known to be harmless and say so themselves: the
# message and the traceback that follows it go. Ray Train V2's controller, on a machine whose CPUs are
# busy (a 2-core laptop training), logs a page-long GetTimeoutError traceback for each late
# autoscaling request, though "it's safe to ignore this error" if transient.
HARMLESS_WORKER_TRACEBACKS = ("Failed to send resource request for train-",)
_TRACEBACK_LINES = ("Traceback (most recent call last)", "During handling of the above exception",
                    "The above exception was the direct cause")


def harmless_line_filter(needles: tuple[str, ...] = HARMLESS_WORKER_LINES,
                         tracebacks: tuple[str, ...] = HARMLESS_WORKER_TRACEBACKS):
    """keep(pid, lines) -> the lines to print: without the lines holding a needle, and without a harmless
    message's traceback (its lines up to the exception's own line, which is the one not indented). A
    traceback may arrive over several batches of a process's lines: where each process stands is kept."""
    skipping: set = set()

    def keep(pid, lines: list[str]) -> list[str]:
        out = []
        for line in lines:
            if pid in skipping:
                if not line.strip() or line[:1].isspace() or line.startswith(_TRACEBACK_LINES):
                    continue
                skipping.discard(pid)
                if re.match(r"[\w.]*(Error|Exception)\b", line):  # the exception's own line ends it
                    continue
            if any(n in line for n in tracebacks):
                skipping.add(pid)
                continue
            if not any(n in line for n in needles):
                out.append(line)
        return out

    return keep


def drop_harmless_worker_lines(needles: tuple[str, ...] = HARMLESS_WORKER_LINES) -> bool:
    """Filter the worker output Ray forwards to this driver's console: the lines above go (they stay in
    Ray's log files), everything else, errors included, is printed as before. Call after ray.init.
    Ray has no public hook for this; if its internals change, nothing is filtered (False)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    keep = harmless_line_filter(needles)

    def wrap(handler):
        def filtered(data):
            lines = keep(data.get("pid"), data.get("lines", []))
            if lines:
                handler({**data, "lines": lines})
        filtered.blockdrop_filtered = True
        return filtered

    with dispatcher._lock:
        dispatcher.handlers = [(name, h if getattr(h, "blockdrop_filtered", False) else wrap(h))
                               for name, h in dispatcher.handlers]
    return True
