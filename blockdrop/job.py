"""train_job.py's work: a job's stages in a row on Ray Train, prune-and-finetune beside the learned
policy, the analysis against its competitors, and the trained model published in MLflow.

The job was planned before (blockdrop.plans.validate: flags, --init, data); here the cluster comes in.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray

from blockdrop.analysis import Comparison
from blockdrop.baselines import from_order
from blockdrop.checkpoints import Checkpoint, read_checkpoint
from blockdrop.choices import PRUNE
from blockdrop.competitors import PruneRuns, train_competitors
from blockdrop.data import load_dataset
from blockdrop.distributed import Payloads, analyse_remotely, run_stage
from blockdrop.errors import UserError
from blockdrop.plans import Plan, describe, finetune_gamma
from blockdrop.pyfunc import input_example
from blockdrop.ray_session import output_folder, start_ray, storage_location
from blockdrop.stages import StageConfig
from blockdrop.preflight import resolve_uri
from blockdrop.tracking import Tracker


def stage_reference(meta: dict, path: Path) -> dict | None:
    """The reference a stage's checkpoint carries; a pretrain stage's own ResNet is the reference of the
    stages after it."""
    if meta.get("reference") is not None:
        return meta["reference"]
    if meta.get("stage") == "pretrain":
        return {"accuracy": meta["metrics"]["full_accuracy"], "source": f"pretrain stage, {path.name}",
                "file": str(path.resolve())}
    return None


@dataclass
class Job:
    """One training job: its plan, where its runs and checkpoints go, and what its stages have made."""

    args: argparse.Namespace
    plan: Plan
    name: str
    tracker: Tracker
    run_id: str = ""
    storage: str | None = None
    data_dir: str | None = None
    payloads: Payloads = None
    # the user's ResNet: what --init's checkpoint records, else --init's ResNet (measured by the first stage),
    # else the pretrain stage's
    reference: dict | None = None
    seconds: float = 0.0  # the policy's own training time, against which prune-and-finetune's is set
    common: dict = field(default_factory=dict)  # the parameters every run of the job records

    @property
    def output(self) -> Path:
        return output_folder(self.args.output, self.args.storage_path and self.storage, self.name)

    def open_run(self) -> bool:
        """The job's MLflow run, created or continued; whether it existed."""
        args, plan = self.args, self.plan
        label = "all" if args.stage is None else ",".join(args.stage)
        self.common = {"preset": plan.preset.name, "num_workers": args.num_workers, "gpu": args.gpu,
                       "dataset": args.dataset or plan.preset.dataset, "data_dir": self.data_dir or "",
                       "init": args.init or "",
                       "train_execution": args.train_execution, "policy": args.policy}
        params = self.common | {"stage": label, "stages": ",".join(plan.names)}
        if len(plan.stages) == 1:
            params |= plan.stages[0][1]
        elif "finetune" in plan.names:
            params["gamma"] = finetune_gamma(plan.preset, args)
        self.run_id, resumed = self.tracker.job_run(self.name, self.name, params)
        print(f"{'continuing' if resumed else 'started'} MLflow {self.tracker.run_url(self.run_id)}", file=sys.stderr)
        print(f"plan: {' -> '.join(plan.names)}", file=sys.stderr)
        return resumed

    def stage_config(self, stage: str, settings: dict, start: str | None, start_ref) -> tuple[StageConfig, object]:
        """A stage's worker config (from `start`, the file it starts from) and its teacher's payload."""
        args, preset = self.args, self.plan.preset
        order = static = None
        if stage in (PRUNE, "nest"):  # the greedy static order of the starting ResNet
            order = self.payloads.order(start_ref, args.dataset, self.data_dir, args.gpu)
        if stage == PRUNE:
            static = from_order(settings["keep"], order).int().tolist()
        taught = None
        if stage in ("nest", PRUNE):
            taught = start_ref
        elif stage == "finetune" and "policy_lr" not in settings:  # the depth policy's finetune
            taught = self.payloads.user_resnet(self.reference, "finetuning on the labels alone")
        cfg = StageConfig(preset=preset.name, stage=stage, dataset=args.dataset, data_dir=self.data_dir,
                          seed=args.seed, max_bad_images=args.max_bad_images, execution=args.train_execution,
                          eval_every=args.eval_every, reference=self.reference,
                          reference_source=f"--init {Path(start).name}" if start else "",
                          reference_file=str(Path(start).resolve()) if start else "",
                          static_policy=static, order=order if stage == "nest" else None,
                          **({"gamma": 0.0} | {k: v for k, v in settings.items() if k != "keep"}))
        return cfg, taught

    def train_stage(self, stage: str, settings: dict, start: str | None) -> tuple[Path, Checkpoint]:
        """One stage on Ray Train (a child run when the job has several), its checkpoint copied next to the
        job's: where it is, and what it holds."""
        stage_run = self.run_id
        if len(self.plan.stages) > 1:
            stage_run, _ = self.tracker.job_run(f"{self.name}/{stage}", f"{self.name}-{stage}",
                                                self.common | {"stage": stage} | settings, parent_id=self.run_id)
        print(describe(stage, settings, self.args.num_workers), file=sys.stderr)
        start_ref = self.payloads.of_file(start) if start else None
        cfg, taught = self.stage_config(stage, settings, start, start_ref)
        began = time.time()
        out = run_stage(cfg, start_ref, self.args.num_workers, self.args.gpu, f"{self.name}-{stage}", self.storage,
                        self.args.max_failures, self.output / f"{self.name}-{stage}.pt",
                        callbacks=[self.tracker.epoch_logger(stage_run)], teacher_ref=taught)
        self.seconds += time.time() - began
        if stage_run != self.run_id:
            self.tracker.log_artifact(stage_run, out, "checkpoint")
            self.tracker.finish(stage_run, ok=True)
        trained = read_checkpoint(out)
        self.payloads.put(out, trained.backbone, trained.policy)  # the next stage starts from it
        self.reference = stage_reference(trained.meta, out)
        return out, trained

    def train(self) -> tuple[Path, Checkpoint]:
        """Every stage of the plan in a row, each from the one before (the first from --init)."""
        args, plan = self.args, self.plan
        self.reference = plan.init.meta.get("reference") if plan.init is not None else None
        if plan.init is not None:
            self.payloads.put(args.init, *plan.init_models)
        start, trained = args.init, None
        for stage, settings in plan.stages:
            out, trained = self.train_stage(stage, settings, start)
            start = str(out)
        return Path(start), trained

    def analyse(self, trained: Checkpoint) -> Comparison | None:
        """The finetuned policy against prune-and-finetune and the image-blind policies at its FLOPs, and its
        pictures, onto the job's run; a failed analysis is reported, not fatal (the model is saved)."""
        args, preset = self.args, self.plan.preset
        pruned = []
        if not args.no_prune_baseline:
            test = load_dataset(preset, "test", args.dataset, args.data_dir)
            runs = PruneRuns(self.name, args.dataset, self.data_dir, args.num_workers, args.gpu, self.storage,
                             self.output, self.tracker, self.run_id, self.common, self.plan.train_size,
                             input_example(preset, test), args.seed, args.max_bad_images, args.train_execution,
                             args.max_failures)
            pruned = [c.model for c in train_competitors(preset, runs, self.payloads, self.reference,
                                                         [trained.meta["metrics"]["flops_per_image"]],
                                                         self.plan.stages, self.seconds)]
        print("== analysis: the policy against its competitors at equal FLOPs, policy pictures", file=sys.stderr)
        payload = ray.put({"backbone": trained.backbone, "policy": trained.policy})
        try:
            comparison, files = analyse_remotely(self.plan.preset.name, payload, args.dataset, self.data_dir, args.gpu,
                                                 pruned)
        except ray.exceptions.RayError as err:
            print(f"warning: the analysis failed ({type(err).__name__}: {str(err).splitlines()[0]}); "
                  f"run it again with python -m blockdrop.evaluate --compare --report-dir", file=sys.stderr)
            return None
        self.tracker.log_files(self.run_id, files, "policy")
        self.tracker.log_metrics(self.run_id, comparison.metrics(), step=0)
        return comparison


def refuse_finished(tracker: Tracker, name: str, plan: Plan) -> None:
    """A finished job is reopened only by a real resume: a single stage asked for more epochs than it ran."""
    done = tracker.finished_job(name)
    if done is None:
        return
    ran = tracker.logged_steps(done, "test_accuracy")
    if len(plan.stages) > 1 or not ran or plan.stages[0][1]["epochs"] <= max(ran) + 1:
        raise UserError(f"job {name} has finished already (MLflow run {done}); more --epochs of a single stage "
                        "continue it, another --name starts a new job")


def run(args: argparse.Namespace, plan: Plan) -> None:
    """The job `plan` (blockdrop.plans.validate(args)) on Ray, tracked in MLflow; MLflow, run storage and
    Ray were checked before (blockdrop.preflight.check_cluster_flags; blockdrop.cli.run_train does both)."""
    label = "all" if args.stage is None else "-".join(args.stage)
    name = args.name or f"{plan.preset.name}-{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    uri = resolve_uri(args.mlflow_uri)
    start_ray(args.address, args.gpu, args.num_workers, args.storage_path)  # a refused job leaves no run
    tracker = Tracker(uri, args.experiment)
    refuse_finished(tracker, name, plan)
    job = Job(args, plan, name, tracker, storage=storage_location(args.storage_path),
              data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else None, payloads=Payloads(plan.preset))
    resumed, ok = job.open_run(), False
    try:
        path, trained = job.train()
        comparison = None
        if plan.names[-1] == "finetune" and not args.no_analysis:
            comparison = job.analyse(trained)
        test = load_dataset(plan.preset, "test", args.dataset, args.data_dir)
        params = {"preset": plan.preset.name, "stages": ",".join(plan.names)}
        if plan.names[-1] == "finetune":
            params |= {k: plan.stages[-1][1][k] for k in ("gamma", "lr", "policy_lr") if k in plan.stages[-1][1]}
        report, model_uri = tracker.publish(job.run_id, path, trained, plan.preset, input_example(plan.preset, test),
                                            params)
        ok = True
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM: what is trained is kept, and how to go on is said
        print(f"stopped: job {name}'s finished stages and last epoch checkpoints are kept; continue it with the "
              f"same command{'' if args.name else f' and --name {name}'}", file=sys.stderr)
        raise
    finally:
        if not ok:  # a rerun of a finished job that fails leaves the earlier record as it was
            tracker.close_running_children(job.run_id)
            tracker.finish(job.run_id, ok=False, restore=resumed)
    tracker.finish(job.run_id, ok=True)
    print(f"\n{plan.preset.name} {' -> '.join(plan.names)} ({name})")
    print(report.text())
    if comparison is not None:
        print(f"\n{comparison.text()}")
    print(f"\ncheckpoint: {path}")
    print(f"MLflow: {tracker.run_url(job.run_id)}; model {model_uri}")
    if uri.startswith("sqlite:"):
        print(f"browse: mlflow ui --backend-store-uri {uri}")
