"""Ray Train wiring: one stage of training as a data-parallel TorchTrainer run, and the evaluation
tasks a job or sweep runs on Ray workers.

Each worker trains on its shard (DistributedSampler) with DDP-wrapped modules, evaluates the
greedy policy on its shard of the test set, and the epoch's figures are merged over *all* workers
before rank 0 reports them, with a checkpoint, to Ray Train (the caller's Train callbacks take them
from there: MLflow, Tune). A worker that dies is replaced (FailureConfig) and the group resumes from
the last reported checkpoint; running the same job name again against the same storage resumes it too.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2.api.config import LoggingConfig
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from blockdrop.analysis import Comparison, analyse, competitor_curves, curves, greedy_order_on, holdout, versus
from blockdrop.channels import choose
from blockdrop.checkpoints import build_policy, load_models, save_checkpoint
from blockdrop.data import allowed_unreadable, default_loader_workers, load_dataset, loader_options, skipped_images
from blockdrop.errors import UserError
from blockdrop.flops import cost_model
from blockdrop.budget import ceiling, curve_budgets, gap
from blockdrop.metrics import Tally, tally, tallies
from blockdrop.models.resnet import PolicyNet
from blockdrop.presets import Preset, get_preset
from blockdrop.prune import static_chooser
from blockdrop.reinforce import curriculum_index, curriculum_mask
from blockdrop.stages import EpochStats, Models, StageConfig, blocks_can_go_unused, setup_stage, spend_on, train_epoch

STATE_FILE = "train_state.pt"
MODEL_FILE = "model.pt"


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


def epoch_metrics(stats: EpochStats, test: Tally | None, full_flops: int, lr: float,
                  val: Tally | None = None) -> dict[str, float]:
    """An epoch's metrics; without `test` (an epoch --eval-every skips) the training ones only. `val`: the
    validation split's figures (val_*), what choices are made on."""
    if test is None:
        return stats.metrics() | {"learning_rate": lr}
    report = test.report(full_flops)
    return stats.metrics() | ({} if val is None else val_metrics(val.report(full_flops))) | {
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


def val_metrics(report) -> dict[str, float]:
    """The validation split's figures as metrics (val_*): what a sweep's front and search are chosen on."""
    return {"val_images": report.images, "val_accuracy": report.accuracy, "val_blocks_used": report.blocks_mean,
            "val_flops_per_image": report.flops_mean, "val_unique_policies": report.unique_policies}


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


@dataclass
class WorkerData:
    """A worker's shard of the training set (its sampler and loader), of the validation split and of the
    test set."""

    train: Dataset
    sampler: DistributedSampler
    loader: DataLoader
    test: DataLoader
    val: DataLoader
    smallest_batch: int  # the fewest images a training step of this worker sees

    def skipped(self) -> int | None:
        """Unreadable files this worker met so far: in its training images and in its shard of the validation
        split (often carved from the same folder), None for datasets that cannot have any."""
        counts = [k for k in (skipped_images(self.train), skipped_images(self.val.dataset)) if k is not None]
        return sum(counts) if counts else None

    @classmethod
    def load(cls, cfg: StageConfig, preset: Preset, device: torch.device) -> WorkerData:
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        train_set = load_dataset(preset, "train", cfg.dataset, cfg.data_dir, download=False)
        test_set = load_dataset(preset, "test", cfg.dataset, cfg.data_dir, download=False)
        val_set = load_dataset(preset, "val", cfg.dataset, cfg.data_dir, download=False)
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
        per_worker = max(cfg.batch_size // world, 1)
        workers = cfg.loader_workers
        if workers is None:  # the node's cores shared by its training processes (benchmarks/input_pipeline.py)
            cpus = max((os.cpu_count() or 1) // max(ctx.get_local_world_size(), 1), 1)
            workers = default_loader_workers(cfg.dataset or preset.dataset, device.type, cpus)
        options = loader_options(device.type, workers)
        drop_last = len(train_set) >= per_worker * world * 2
        loader = DataLoader(train_set, batch_size=per_worker, sampler=sampler, drop_last=drop_last, **options)
        test, val = (DataLoader(Subset(part, range(rank, len(part), world)), batch_size=256, **options)
                     for part in (test_set, val_set))
        smallest = per_worker if drop_last else (len(sampler) % per_worker or per_worker)
        return cls(train_set, sampler, loader, test, val, min(smallest, len(sampler)))


def resume(cfg: StageConfig, models: Models, optimizer, schedule, device: torch.device) -> int:
    """Ray Train's last checkpoint of this run restored into the models, optimiser and schedule; the
    first epoch still to train (0 without a checkpoint)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, map_location=device, weights_only=True)
    models.backbone.load_state_dict(state["backbone"])
    if models.policy is not None:
        models.policy.load_state_dict(state["policy"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    # a resumed stage keeps the reference measured on its starting ResNet, not on the trained one
    cfg.reference, cfg.reference_source = state.get("reference", cfg.reference), ""
    if ray.train.get_context().get_world_rank() == 0:
        progress(f"[{cfg.stage}] resuming after epoch {state['epoch']} (from the last checkpoint)")
    return state["epoch"] + 1


class Worker:
    """One Ray Train worker's stage: its models, optimiser and data, an epoch at a time."""

    def __init__(self, cfg: StageConfig, init: dict | None, teacher: dict | None):
        ctx = ray.train.get_context()
        self.cfg, self.preset = cfg, get_preset(cfg.preset)
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        torch.manual_seed(cfg.seed * 1000 + self.rank)
        self.data = WorkerData.load(cfg, self.preset, self.device)
        unused = blocks_can_go_unused(cfg, self.preset.num_blocks, self.data.smallest_batch,
                                      cfg.epochs * len(self.data.loader))
        self.models, self.optimizer, self.schedule = setup_stage(cfg, self.preset, init, teacher, self.device,
                                                                 ray.train.torch.prepare_model, unused)
        self.start = resume(cfg, self.models, self.optimizer, self.schedule, self.device)
        self.costs = cost_model(self.preset, self.models.policy, self.models.backbone)
        self.static = None if cfg.static_policy is None else torch.tensor(cfg.static_policy, dtype=torch.float32)
        # what the test set is run under: the policy network, the static policy of a pruned ResNet, or every
        # block (nest: the depth policy is not trained yet)
        self.evaluated = (static_chooser(self.static) if self.static is not None else
                          None if cfg.stage == "nest" else self.models.policy)
        self.reference = reference_of(cfg, self.models.backbone, self.data.test, self.costs, self.device, self.world)

    def epoch(self, epoch: int) -> dict[str, float]:
        """Train one epoch, evaluate (every --eval-every), and return the figures merged over all workers."""
        cfg, began = self.cfg, time.time()
        self.data.sampler.set_epoch(epoch)
        on_step = StepProgress(cfg.stage, epoch, cfg.epochs, self.world, cfg.progress_every_s) if self.rank == 0 else None
        stats = train_epoch(cfg.stage, self.models, self.data.loader, self.optimizer, epoch, cfg.gamma, self.device,
                            cfg.drop_rate, cfg.pace, cfg.entropy, on_step=on_step, static=self.static,
                            budget_range=cfg.budget_range, budget_sampling=cfg.budget_sampling)
        trained = time.time()
        lr = self.optimizer.param_groups[-1]["lr"]  # finetune: the ResNet's
        self.schedule.step()
        if stats.spent is not None:  # a budget policy: its spending table, from every worker's training images
            self.calibrate(stats)
        evaluate = (epoch + 1) % cfg.eval_every == 0 or epoch == cfg.epochs - 1
        test, val = (self.test(epoch, loader) for loader in (self.data.test, self.data.val)) if evaluate else (None, None)
        merged_stats, skipped = EpochStats(), None
        merged_test, merged_val = (Tally(), Tally()) if evaluate else (None, None)
        for s, t, v, k in _gather((stats, test, val, self.data.skipped()), self.world):
            merged_stats.merge(s)
            if evaluate:
                merged_test.merge(t)
                merged_val.merge(v)
            skipped = None if k is None else (skipped or 0) + k
        if merged_val is not None and not merged_val.blocks.n:  # data too small to hold images out
            merged_val = None
        metrics = epoch_metrics(merged_stats, merged_test, self.costs.full, lr, merged_val) | {"epoch": epoch}
        if epoch == cfg.epochs - 1 and stats.spent is not None:
            metrics |= self.curve()
        if self.reference is not None:
            metrics["reference_accuracy"] = self.reference["accuracy"]
        # where the epoch's time goes (rank 0's clock): training steps, then evaluation and merging
        metrics |= {"train_seconds": trained - began, "eval_seconds": time.time() - trained,
                    "torch_threads": torch.get_num_threads()}
        if skipped is not None:  # an image folder: unreadable files met so far (each stood in for by the next)
            metrics["skipped_images"] = skipped
            self.check_unreadable(skipped)
        return metrics

    def test(self, epoch: int, loader: DataLoader) -> Tally:
        """This worker's shard of the test set or the validation split (`loader`) under the stage's policy
        (the curriculum: with the blocks it has not decided yet forced on)."""
        decided = None
        if self.cfg.stage == "curriculum":
            steps = len(self.data.loader)
            index = curriculum_index((epoch + 1) * steps - 1, self.cfg.pace or steps)
            decided = curriculum_mask(self.preset.num_blocks, index)
        return tally(self.models.backbone, self.evaluated, loader, self.costs, self.device, decided=decided)

    def calibrate(self, stats: EpochStats) -> None:
        """The budget policy's table: what it spends at each price on the validation split, images it does not
        train on (all workers' shards); data too small to hold images out: on the epoch's training images."""
        found = (stats.spent, stats.images)
        if len(self.data.val.dataset.dataset):  # every worker alike
            found = spend_on(self.models.policy, self.data.val, self.device)
        spent, images = None, 0
        for s, n in _gather(found, self.world):
            spent, images = (s if spent is None else spent + s), images + n
        self.models.policy.calibrate(spent, images)

    def curve(self) -> dict[str, float]:
        """The budget policy's front on the test set and on the validation split (all workers' shards), as
        metrics: at each budget of blockdrop.budget.curve_budgets, `budget_B_*` (`budget_B_val_*`: what a
        sweep chooses on); `budget_gap`: the mean miss on the test set (blockdrop.budget.gap);
        `budget_ceiling`: what it spends when blocks are free."""
        policy = self.models.policy
        budgets = curve_budgets(float(policy.base))
        most = ceiling(float(policy.base), policy.spend)
        out, gaps = {}, []
        for split, loader in (("test", self.data.test), ("val", self.data.val)):
            if split == "val" and not len(loader.dataset.dataset):  # every worker skips it alike
                continue
            found = tallies(self.models.backbone, policy, loader, self.costs, self.device, [(b, None) for b in budgets])
            merged = [Tally() for _ in budgets]
            for shard in _gather(found, self.world):
                for m, t in zip(merged, shard):
                    m.merge(t)
            prefix = "" if split == "test" else "val_"
            for b, t in zip(budgets, merged):
                report = t.report(self.costs.full)
                spent = report.flops_mean / self.costs.full
                if split == "test":
                    gaps.append(gap(b, spent, most))
                out |= {f"budget_{b:.2f}_{split}_accuracy": report.accuracy,
                        f"budget_{b:.2f}_{prefix}flops_per_image": report.flops_mean,
                        f"budget_{b:.2f}_{prefix}blocks_used": report.blocks_mean, f"budget_{b:.2f}_{prefix}spent": spent}
        return out | {"budget_gap": sum(gaps) / len(gaps), "budget_ceiling": most}

    def check_unreadable(self, skipped: int) -> None:
        # the share of the images the count covers: the training images and the whole validation split
        images = len(self.data.train) + len(self.data.val.dataset.dataset)
        allowed = allowed_unreadable(self.cfg.max_bad_images, images)
        if skipped > allowed:
            raise UserError(f"{skipped} unreadable training and validation images, more than --max-bad-images "
                            f"{self.cfg.max_bad_images:g} allows ({allowed}); the warnings name them")

    def report(self, epoch: int, metrics: dict[str, float], began: float) -> None:
        """The epoch's figures to Ray Train; rank 0's with the checkpoint: the state to resume from and the
        model file (this project's format) the stage returns."""
        if self.rank != 0:
            ray.train.report(metrics)
            return
        backbone, policy = self.models.backbone, self.models.policy
        with tempfile.TemporaryDirectory() as folder:
            torch.save({
                "backbone": backbone.state_dict(), "policy": None if policy is None else policy.state_dict(),
                "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(), "epoch": epoch,
                "reference": self.reference,
            }, Path(folder) / STATE_FILE)
            save_checkpoint(Path(folder) / MODEL_FILE, self.preset, backbone, policy,
                            {"stage": self.cfg.stage, "epoch": epoch, "metrics": metrics, "config": asdict(self.cfg),
                             "reference": self.reference})
            progress(self.epoch_line(epoch, metrics, began))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    def epoch_line(self, epoch: int, metrics: dict[str, float], began: float) -> str:
        cfg = self.cfg
        validated = f"val acc {metrics['val_accuracy']:.3f}  " if "val_accuracy" in metrics else ""
        tested = (f"{validated}test acc {metrics['test_accuracy']:.3f}  blocks {metrics['blocks_used']:.2f}/"
                  f"{self.preset.num_blocks}  speedup {metrics['speedup']:.2f}x" if "test_accuracy" in metrics else
                  f"train acc {metrics['train_accuracy']:.3f}  (not evaluated: --eval-every {cfg.eval_every})")
        return (f"[{cfg.stage}] epoch {epoch + 1}/{cfg.epochs}  loss {metrics['train_loss']:.3f}  {tested}  "
                f"({time.time() - began:.1f}s)")


def train_loop_per_worker(config: dict) -> None:
    """The per-worker function of TorchTrainer: ordinary PyTorch around Ray's prepare_model and report."""
    # Train's per-report INFO lines drown the progress; some come from loggers named after files.
    for name in ("ray.train", ""):
        logging.getLogger(name).setLevel(logging.WARNING)
    init, teacher = (ray.get(config[key]) if config.get(key) is not None else None for key in ("init", "teacher"))
    worker = Worker(StageConfig(**config["stage"]), init, teacher)
    for epoch in range(worker.start, worker.cfg.epochs):
        began = time.time()
        worker.report(epoch, worker.epoch(epoch), began)


RUN_RECORD = "blockdrop-run.json"  # in a stage's Ray folder: what the run is (claim_storage)
# StageConfig fields measured on the way (the same on a resume, but not what defines the run), and those a
# resume may change (more epochs continue from the stored checkpoint)
NOT_IDENTITY = ("reference", "order", "static_policy", "channels", "progress_every_s", "epochs", "eval_every")


def run_identity(cfg: StageConfig, callbacks: list | None, extra: dict | None = None) -> dict:
    """What defines a stage's Ray run: its settings (data, hyperparameters, the file it starts from), the
    MLflow run it logs to, and `extra` (a sweep trial's --init)."""
    identity = {k: v for k, v in asdict(cfg).items() if k not in NOT_IDENTITY}
    runs = [f"{c.uri} run {c.run_id}" for c in callbacks or [] if hasattr(c, "run_id")]
    return identity | ({"mlflow": runs[0]} if runs else {}) | (extra or {})


def claim_storage(storage_path: str | None, name: str, identity: dict) -> None:
    """Ray Train resumes any run it finds under `name`: only when that run is this one (its record, written
    when it started, says the same), else a UserError that says what differs and how to start fresh."""
    if not storage_path or "://" in storage_path:  # object storage: no record kept (Ray's own resume)
        return
    folder = Path(storage_path) / name
    record = folder / RUN_RECORD
    fresh = (f"give another --name for a new run, or delete {folder} to start this one over (its Ray state: "
             "checkpoints to resume from)")
    if record.is_file():
        stored = json.loads(record.read_text())
        changed = [f"{k} {json.dumps(stored.get(k))} there, {json.dumps(v)} here" for k, v in identity.items()
                   if json.dumps(stored.get(k), sort_keys=True) != json.dumps(v, sort_keys=True)]
        if changed:
            raise UserError(f"Ray's state for {name} at {folder} is another run's: {'; '.join(changed)}. A resume "
                            f"continues the same run only; {fresh}")
        return
    if folder.is_dir() and any(folder.iterdir()):
        raise UserError(f"{folder} holds Ray state that no run of this project recorded as its own: {fresh}")
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{RUN_RECORD}.tmp"
    partial.write_text(json.dumps(identity, indent=1, sort_keys=True, default=str))
    partial.replace(record)


def run_stage(cfg: StageConfig, init_ref, num_workers: int, use_gpu: bool, name: str,
              storage_path: str | None, max_failures: int, out: Path, callbacks: list | None = None,
              teacher_ref=None, identity: dict | None = None) -> Path:
    """Fit one stage; its final model checkpoint is copied to `out` (returned).

    `callbacks` are Ray Train callbacks, run where Train's controller runs, after each report (the MLflow
    run's epoch metrics, blockdrop.tracking; a Tune trial's forwarding to Tune); `teacher_ref` the user's
    ResNet's state dict (the depth policy's stages learn from its soft labels). Ray's state under `name`
    is resumed only when it is this run's (claim_storage; `identity`: what else defines it).
    """
    claim_storage(storage_path, name, run_identity(cfg, callbacks, identity))
    loggers = [c for c in callbacks or [] if hasattr(c, "flush") and hasattr(c, "spool")]  # EpochLoggers
    if storage_path and "://" not in storage_path:  # metrics MLflow could not take wait next to Ray's state
        for c in loggers:
            c.spool = str(Path(storage_path) / name / "mlflow-waiting.jsonl")
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
    for c in loggers:  # what waited for MLflow (also from an earlier, killed run of this stage)
        try:
            c.flush()
        except RuntimeError as err:
            raise UserError(f"{err}; the stage's model is kept in Ray's run folder: rerun the same command "
                            "once MLflow answers (the stage is not trained again, its metrics are written)") from None
    if result.checkpoint is None:
        raise RuntimeError(f"stage {cfg.stage} finished without a checkpoint")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as folder:
        shutil.copyfile(Path(folder) / MODEL_FILE, out)
    return out


class Payloads:
    """Models in Ray's object store for the workers ({"backbone", "policy"} state dicts; the policy None
    unless it is a network), each file read and put once per process."""

    def __init__(self, preset: Preset):
        self.preset = preset
        self._refs: dict[str, ray.ObjectRef] = {}
        self._orders: dict[str, list[int]] = {}

    def put(self, path: str | Path, backbone: dict | torch.nn.Module, policy: dict | torch.nn.Module | None):
        """The models of file `path`, already in memory (modules or state dicts), put in the store."""
        def state(m):
            return m.state_dict() if isinstance(m, torch.nn.Module) else m

        learned = policy if isinstance(policy, dict) else policy if isinstance(policy, PolicyNet) else None
        ref = ray.put({"backbone": state(backbone), "policy": state(learned)})
        self._refs[str(Path(path).resolve())] = ref
        return ref

    def of_file(self, path: str | Path):
        """The models of the checkpoint at `path`, read and put on first use."""
        key = str(Path(path).resolve())
        if key not in self._refs:
            backbone, policy, _ = load_models(self.preset, path)
            self.put(path, backbone, policy)
        return self._refs[key]

    def order(self, ref, dataset: str | None, data_dir: str | None, use_gpu: bool) -> list[int]:
        """The greedy static order of the ResNet in `ref` (one of these payloads), measured once: a job's nest
        and its prune-and-finetune runs start from the same ResNet."""
        key = ref.hex()
        if key not in self._orders:
            self._orders[key] = order_remotely(self.preset.name, ref, dataset, data_dir, use_gpu)
        return self._orders[key]

    def user_resnet(self, reference: dict | None, missing: str):
        """The ResNet the user started from (the file a reference names), or None with a note that says
        what goes without it (`missing`) when the file is not at hand here."""
        source = (reference or {}).get("file")
        if not source or not Path(source).is_file():
            print(f"note: the user's ResNet ({source or 'unknown'}) is not here: {missing}", file=sys.stderr)
            return None
        return self.of_file(source)


# ---------------------------------------------------------------- evaluation on a Ray worker
# Not on the driver: on a cluster that is the head node. "DEFAULT": outside the caller's placement group
# (a Tune trial's holds only the trial's small bundle).
_TASK_OPTIONS = {"num_cpus": 1, "max_retries": 1, "scheduling_strategy": "DEFAULT"}


def _on_worker(task, use_gpu: bool, *args) -> ray.ObjectRef:
    """`task(*args)` as a Ray task on one worker (a GPU one with `use_gpu`)."""
    return ray.remote(task).options(**_TASK_OPTIONS, num_gpus=1 if use_gpu else 0).remote(*args)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _backbone(preset: Preset, state: dict):
    backbone = preset.build_backbone(state)
    backbone.load_state_dict(state)
    return backbone


def _policy(preset: Preset, state: dict):
    policy = build_policy(preset, state)
    policy.load_state_dict(state)
    return policy


def _pruned(preset: Preset, pruned: list | None) -> list:
    """Prune-and-finetune models as (K, ResNet, 0/1 row), from (K, state dict, 0/1 row) each."""
    return [(keep, _backbone(preset, state), torch.tensor(row, dtype=torch.float32)) for keep, state, row in pruned or []]


def _analyse_task(preset_name: str, payload: dict, dataset: str | None, data_dir: str | None,
                  pruned: list | None = None) -> tuple[dict, dict[str, bytes]]:
    """The comparison with the baselines (and the pruned ResNets) and the policy pictures: (the
    comparison as JSON, {file name: bytes} of the pictures and baselines.json)."""
    preset = get_preset(preset_name)
    with tempfile.TemporaryDirectory() as folder:
        comparison = analyse(preset, _backbone(preset, payload["backbone"]), _policy(preset, payload["policy"]),
                             dataset, data_dir, _device(), folder, pruned=_pruned(preset, pruned))
        files = {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir())}
    return comparison.to_json(), files


def analyse_remotely(preset_name: str, payload_ref, dataset: str | None, data_dir: str | None, use_gpu: bool,
                     pruned: list | None = None) -> tuple[Comparison, dict[str, bytes]]:
    """blockdrop.analysis.analyse on one Ray worker: the Comparison, and its files to keep with the run."""
    result, files = ray.get(_on_worker(_analyse_task, use_gpu, preset_name, payload_ref, dataset, data_dir, pruned))
    return Comparison.from_json(result), files


def _versus_pruned_task(preset_name: str, learned: list, pruned: list, dataset: str | None,
                        data_dir: str | None) -> dict:
    """Each learned model ((key, payload, mean budget or None) each; a budget model at that budget) against the
    pruned competitors ((K, state dict, 0/1 row) each: prune-and-finetune, channel pruning) at its FLOPs, image by
    image on the test set: {"versus": {key: {kind: Versus as a dict}}, "curves": {kind: [CurvePoint as dict]}}."""
    preset = get_preset(preset_name)
    device, layout = _device(), {"memory_format": torch.channels_last}
    test = load_dataset(preset, "test", dataset, data_dir, download=False)
    curves = competitor_curves(_pruned(preset, pruned), test, preset, device)
    out = {}
    for key, payload, budget in learned:
        payload = ray.get(payload) if isinstance(payload, ray.ObjectRef) else payload
        policy = _policy(preset, payload["policy"])
        backbone = _backbone(preset, payload["backbone"])
        costs = cost_model(preset, policy, backbone)
        result = tally(backbone.to(device, **layout), policy.to(device, **layout),
                       DataLoader(test, batch_size=256), costs, device, records=True, budget=budget)
        flops = result.report(costs.full).flops_mean
        correct = result.records().correct.astype("float64")
        out[key] = {kind: asdict(versus(correct, curve, flops)) for kind, curve in curves.items()}
    return {"versus": out, "curves": {kind: [asdict(p) for p in curve.points] for kind, curve in curves.items()}}


def versus_pruned_remotely(preset_name: str, learned: list, pruned: list, dataset: str | None, data_dir: str | None,
                           use_gpu: bool) -> dict:
    """_versus_pruned_task on a Ray worker."""
    return ray.get(_on_worker(_versus_pruned_task, use_gpu, preset_name, learned, pruned, dataset, data_dir))


CHOICE_IMAGES = 1000  # validation images a channel pruning's criterion is chosen on (at most)


def _channels_task(preset_name: str, payload: dict, flops: float, dataset: str | None, data_dir: str | None) -> dict:
    preset = get_preset(preset_name)
    images = load_dataset(preset, "val", dataset, data_dir, download=False)
    if not len(images):  # data too small to hold images out: a slice of the training images
        images = load_dataset(preset, "train", dataset, data_dir, download=False, augment=False)
    loader = DataLoader(holdout(images, CHOICE_IMAGES), batch_size=256)
    choice = choose(_backbone(preset, payload["backbone"]), flops, preset.image_size, preset.num_classes, loader,
                    _device())
    return asdict(choice)


def channels_remotely(preset_name: str, payload_ref, flops: float, dataset: str | None, data_dir: str | None,
                      use_gpu: bool) -> dict:
    """blockdrop.channels.choose on a Ray worker, on the validation split: the ResNet in `payload_ref` pruned to
    at most `flops` per image (criterion, kept channels, each criterion's accuracy, FLOPs; as a dict)."""
    return ray.get(_on_worker(_channels_task, use_gpu, preset_name, payload_ref, flops, dataset, data_dir))


def _order_task(preset_name: str, payload: dict, dataset: str | None, data_dir: str | None) -> list[int]:
    preset = get_preset(preset_name)
    return greedy_order_on(preset, _backbone(preset, payload["backbone"]), dataset, data_dir, _device())


def order_remotely(preset_name: str, payload_ref, dataset: str | None, data_dir: str | None, use_gpu: bool) -> list[int]:
    """The greedy static order (every block, least useful first) of a ResNet, on a Ray worker."""
    return ray.get(_on_worker(_order_task, use_gpu, preset_name, payload_ref, dataset, data_dir))


def _curves_task(preset_name: str, payload: dict, dataset: str | None, data_dir: str | None) -> dict:
    preset = get_preset(preset_name)
    backbone = _backbone(preset, payload["backbone"])
    return {name: [asdict(p) for p in curve] for name, curve in curves(preset, backbone, dataset, data_dir, _device()).items()}


def curves_remotely(preset_name: str, payload_ref, dataset: str | None, data_dir: str | None,
                    use_gpu: bool) -> ray.ObjectRef:
    """blockdrop.analysis.curves on a Ray worker; the ObjectRef of {name: [CurvePoint as dict]}."""
    return _on_worker(_curves_task, use_gpu, preset_name, payload_ref, dataset, data_dir)
