"""MLflow: where runs, metrics, checkpoints and models of this project are kept.

Tracking URI: `--mlflow-uri`, else MLFLOW_TRACKING_URI, else a sqlite file `mlflow.db` in the
working directory (MLflow 3's local default; `mlflow ui --backend-store-uri sqlite:///mlflow.db`).
A job's run carries the tag `blockdrop.job=<job name>`; starting the same job again continues that
run instead of opening a second one. Jobs and sweeps reach MLflow only through `Tracker`.
"""
from __future__ import annotations

import getpass
import json
import logging
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

# First: it sets MLflow's quiet defaults before mlflow is imported.
from blockdrop.epoch_logger import EpochLogger, metric_batch  # isort: skip

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

from blockdrop.checkpoints import Checkpoint
from blockdrop.console import DropMessages
from blockdrop.errors import UserError
from blockdrop.flops import cost_model
from blockdrop.metrics import Report, final_report
from blockdrop.mlflow_views import save_sweep_view, view_location
from blockdrop.preflight import resolve_uri  # noqa: F401 (where a tracking URI comes from)
from blockdrop.pyfunc import BUDGET_PARAMS, BlockDropModel

JOB_TAG = "blockdrop.job"
# params that say how a run runs, not what it computes: a resume may change them (more workers, a GPU, more
# epochs: the same name with more epochs continues training from the stored checkpoint)
OPERATIONAL_PARAMS = frozenset({"num_workers", "gpu", "workers", "workers_per_trial", "max_concurrent", "epochs",
                                "eval_every"})


def quoted(value: str) -> str:
    """A string as a value in an MLflow filter (a name with an apostrophe is double-quoted)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise UserError(f"the name {value!r} holds both kinds of quote, which MLflow's search cannot match: drop one")


def differences(stored: dict, current: dict, ignore=OPERATIONAL_PARAMS) -> list[str]:
    """`key: stored -> current` for each key both name with other values (as strings; `ignore` left out)."""
    return [f"{k} {stored[k]!r} there, {str(v)!r} here" for k, v in current.items()
            if k in stored and k not in ignore and stored[k] != str(v)]
PACKAGE_DIR = Path(__file__).resolve().parent

# The model class is ours and travels as code: MLflow's generic cloudpickle caution is noise here.
logging.getLogger("mlflow.pyfunc").addFilter(DropMessages("Passing a Python object as `python_model`"))


def source_tags(entry: str) -> dict[str, str]:
    """MLflow's own source tags (shown as Source, User and Version in the UI): the CLI, the user, and
    the git commit of this code when it runs from a checkout."""
    tags = {"mlflow.source.name": entry, "mlflow.source.type": "LOCAL"}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):
        pass
    try:
        commit = subprocess.run(["git", "-C", str(PACKAGE_DIR), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5)
        if commit.returncode == 0 and commit.stdout.strip():
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def download(artifact_uri: str, tracking_uri: str) -> Path:
    """An MLflow artifact (runs:/<id>/checkpoint, models:/..., s3://...) as a local file or folder."""
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, tracking_uri=tracking_uri))


def budget_points(metrics: dict) -> list[dict]:
    """A budget model's front from its `budget_B_*` metrics: one dict per budget B, cheapest first."""
    found: dict[float, dict] = {}
    for key, value in metrics.items():
        parts = key.split("_", 2)
        if len(parts) == 3 and parts[0] == "budget":
            try:
                budget = float(parts[1])
            except ValueError:
                continue
            found.setdefault(budget, {"budget": budget})[parts[2]] = value
    return [found[b] for b in sorted(found)]


class Tracker:
    """One experiment on one tracking server. Runs are addressed by id, so that a Ray Train callback or a
    Tune trial in another process can log to a run this one made."""

    def __init__(self, uri: str, experiment: str, source: str | None = None):
        self.uri = uri
        self.source = source or Path(sys.argv[0]).name  # the CLI that started the work
        mlflow.set_tracking_uri(uri)  # also exported to child processes through the environment
        self.client = MlflowClient(uri)
        try:
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        except mlflow.exceptions.MlflowException as err:
            raise UserError(f"MLflow at {uri} refused the experiment {experiment!r}: {err.message}") from None
        except Exception as err:  # unreachable server, bad URI scheme, ...
            raise UserError(f"cannot reach MLflow at {uri} ({type(err).__name__}: {err}); "
                            "check --mlflow-uri / MLFLOW_TRACKING_URI") from None
        if found is not None and found.lifecycle_stage == "deleted":
            raise UserError(f"MLflow experiment {experiment!r} ({uri}) was deleted: restore it (mlflow experiments "
                            f"restore --experiment-id {found.experiment_id}) or give another --experiment")
        self.experiment = experiment
        self._before: dict[str, tuple[str, int | None]] = {}  # runs reopened here: their earlier status, end time

    def finished_job(self, job: str) -> str | None:
        """The id of `job`'s top-level run if it finished, else None."""
        runs = self.client.search_runs([self.experiment_id], f"tags.`{JOB_TAG}` = {quoted(job)}", max_results=10,
                                       order_by=["attributes.start_time DESC"])
        top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        return top[0].info.run_id if top and top[0].info.status == "FINISHED" else None

    def job_exists(self, job: str) -> bool:
        return bool(self.client.search_runs([self.experiment_id], f"tags.`{JOB_TAG}` = {quoted(job)}", max_results=1))

    def job_run(self, job: str, run_name: str, params: dict, parent_id: str | None = None) -> tuple[str, bool]:
        """The run of `job` (under `parent_id`), created or continued; True if it already existed."""
        query = f"tags.`{JOB_TAG}` = {quoted(job)}"
        if parent_id:
            query += f" and tags.`mlflow.parentRunId` = '{parent_id}'"
        existing = self.client.search_runs([self.experiment_id], query, max_results=1,
                                           order_by=["attributes.start_time DESC"])
        if existing:
            run_id = existing[0].info.run_id
            changed = differences(existing[0].data.params, params)
            if changed:  # another experiment under the same name: never reported as this one
                raise UserError(f"{job!r} is an MLflow run already (run {run_id}, experiment {self.experiment!r}, "
                                f"{self.uri}) made with other settings: {'; '.join(changed)}. Give another --name "
                                "for a new run, or the same settings to continue that one")
            self._before[run_id] = (existing[0].info.status, existing[0].info.end_time)
            self.client.update_run(run_id, status="RUNNING")
            return run_id, True
        tags = {JOB_TAG: job} | source_tags(self.source) | ({"mlflow.parentRunId": parent_id} if parent_id else {})
        run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        self.client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()])
        return run_id, False

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        self.client.log_batch(run_id, metrics=metric_batch(metrics, step))

    def finish(self, run_id: str, ok: bool, restore: bool = False) -> None:
        """End the run. `restore`: after a failed attempt on a run that had finished before, put its
        earlier status and end time back rather than marking it FAILED."""
        status, end_time = self._before.get(run_id, (None, None))
        if not ok and restore and status == "FINISHED":
            self.client.set_terminated(run_id, status, end_time=end_time)
            return
        self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")

    def checkpoint(self, run_id: str) -> Path:
        """The run's checkpoint artifact (checkpoint/*.pt), downloaded."""
        names = [f.path for f in self.client.list_artifacts(run_id, "checkpoint") if f.path.endswith((".pt", ".t7"))]
        if not names:
            raise UserError(f"run {run_id} has no checkpoint artifact (checkpoint/*.pt)")
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=names[0], tracking_uri=self.uri))

    def run_url(self, run_id: str) -> str:
        if self.uri.startswith("http"):
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"
        return f"run {run_id} in experiment {self.experiment!r} ({self.uri})"

    def log_model(self, run_id: str, checkpoint: Path, report_text: str, example: np.ndarray,
                  name: str = "model", step: int = 0, params: dict | None = None) -> str:
        """Log the checkpoint, the report, and a pyfunc model that loads from that checkpoint.

        `example`: raw images (uint8, N x H x W x C), the model's input example and signature. The
        run's metrics at `step` (log the final figures there first) become the logged model's own
        metrics; `params` (gamma, lr, preset, ...) its parameters."""
        self.client.log_artifact(run_id, str(checkpoint), "checkpoint")
        self.client.log_text(run_id, report_text, "evaluation.txt")
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            # our outputs are never missing, so MLflow's hint about integer columns does not apply
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
            signature = infer_signature(example, BlockDropModel.output_example(len(example)))
            # any height and width (the preset's evaluation transform resizes), the preset's channels
            signature.inputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, example.shape[-1]))])
            # the budgets predict takes (MLflow passes on only the params its signature names), none by default
            signature.params = ParamSchema([ParamSpec(name, "double", None) for name in BUDGET_PARAMS])
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=BlockDropModel(),
                artifacts={"checkpoint": str(checkpoint)},
                code_paths=[str(PACKAGE_DIR)],
                input_example=example,
                signature=signature,
                step=step,
                params={k: str(v) for k, v in (params or {}).items()} or None,
                pip_requirements=[f"torch=={_version('torch')}", f"torchvision=={_version('torchvision')}",
                                  f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}",
                                  f"pillow=={_version('pillow')}"],
            )
        return info.model_uri

    def publish(self, run_id: str, checkpoint: Path, trained: Checkpoint, preset, example: np.ndarray,
                params: dict, final: Callable[[Report], dict[str, float]] | None = None) -> tuple[Report, str]:
        """A trained model on its run, as a job and a sweep trial both leave it: the final figures of its
        checkpoint (`trained`, as read from `checkpoint`) as metrics at its last epoch's step (`final` of
        its report; default report_metrics), then the checkpoint, the report and the pyfunc model (which
        takes that step's metrics). Returns the report and the model's URI."""
        report = final_report(trained.meta, cost_model(preset).full)
        step = int(trained.meta.get("epoch", 0))
        self.log_metrics(run_id, (final or report_metrics)(report), step=step)
        self.log_curve(run_id, trained.meta.get("metrics", {}))
        return report, self.log_model(run_id, checkpoint, report.text(), example, step=step, params=params)

    def log_curve(self, run_id: str, metrics: dict) -> list[dict]:
        """A budget model's front (its last epoch's `budget_B_*` metrics, blockdrop.distributed.Worker.curve)
        on its run: `curve_*` metrics whose step is the budget in percent (MLflow's chart of one against its
        steps is the curve) and budget_curve.json. Nothing for other models; the points."""
        points = budget_points(metrics)
        if not points:
            return []
        for p in points:
            step = int(round(100 * p["budget"]))
            self.log_metrics(run_id, {f"curve_{k}": p[k] for k in ("test_accuracy", "flops_per_image", "blocks_used",
                                                                      "spent", "val_accuracy", "val_flops_per_image")
                                      if k in p}, step=step)
        with tempfile.TemporaryDirectory() as local:
            path = Path(local) / "budget_curve.json"
            path.write_text(json.dumps({"points": points, "mean_gap": metrics.get("budget_gap"),
                                        "ceiling": metrics.get("budget_ceiling")}, indent=2))
            self.client.log_artifact(run_id, str(path))
        self.log_metrics(run_id, {k: metrics[k] for k in ("budget_gap", "budget_ceiling") if k in metrics}, step=0)
        return points

    # -- what jobs and sweeps read and write besides metrics
    def logged_steps(self, run_id: str, metric: str) -> list[int]:
        return [m.step for m in self.client.get_metric_history(run_id, metric)]

    def log_artifact(self, run_id: str, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), folder)

    def log_files(self, run_id: str, files: dict[str, bytes], folder: str) -> None:
        """Files made elsewhere (a Ray task's pictures: {name: bytes}) as the run's artifacts in `folder`."""
        with tempfile.TemporaryDirectory() as local:
            for name, data in files.items():
                (Path(local) / name).write_bytes(data)
            self.client.log_artifacts(run_id, local, folder)

    def log_table(self, run_id: str, table: pd.DataFrame, path: str) -> None:
        self.client.log_table(run_id, table, path)

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)

    def children(self, parent_id: str) -> list:
        """The runs under `parent_id` (a sweep's trials and prune-and-finetune runs)."""
        return self.client.search_runs([self.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")

    def close_running_children(self, parent_id: str) -> None:
        """Child runs left RUNNING by a stopped sweep (their process was ended before it could say so): KILLED."""
        for run in self.children(parent_id):
            if run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, "KILLED")

    def register(self, model_name: str, run_id: str, tags: dict, description: str) -> str:
        """A new version of registered model `model_name` (created when missing) from the run's logged
        model; its version number."""
        try:
            self.client.get_registered_model(model_name)
        except MlflowException:
            self.client.create_registered_model(model_name, description="BlockDrop models on the accuracy-vs-FLOPs front")
        run = self.client.get_run(run_id)
        model = next((m for m in (run.outputs.model_outputs or [])), None)
        source = f"models:/{model.model_id}" if model is not None else f"runs:/{run_id}/model"
        # model_id: a tracking server refuses a models:/ source without it (a local store does not)
        mv = self.client.create_model_version(model_name, source=source, run_id=run_id,
                                              model_id=model.model_id if model is not None else None,
                                              tags={k: str(v) for k, v in tags.items()}, description=description)
        return mv.version

    def set_alias(self, model_name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(model_name, alias, version)

    def save_view(self, parent_id: str, name: str) -> str:
        """The experiment's saved view of a sweep (a scatter of its trials); where to open it."""
        metrics = sorted({key for run in self.children(parent_id) for key in run.data.metrics})
        key = save_sweep_view(self.client, self.experiment_id, parent_id, name, metrics)
        return view_location(self.uri, self.experiment_id, key)

    def epoch_logger(self, run_id: str) -> EpochLogger:
        """The Ray Train callback that logs a stage's epochs to `run_id`."""
        return EpochLogger(self.uri, run_id)


def report_metrics(report: Report) -> dict[str, float]:
    """A final report as MLflow metrics (final_*): its numbers, the reference's where there is one, and the names
    every model of a sweep's chart shares (a trial's, a competitor's: point_metrics)."""
    return {f"final_{k}": v for k, v in asdict(report).items() if isinstance(v, (int, float))} | point_metrics(report)


def point_metrics(report: Report) -> dict[str, float]:
    """A model's place on an accuracy-vs-FLOPs chart, named alike for every kind of model (final_*): test accuracy,
    FLOPs, speedup and blocks, and the validation split's accuracy and FLOPs (what a front is chosen on)."""
    out = {"final_test_accuracy": report.accuracy, "final_flops_per_image": report.flops_mean,
           "final_speedup": report.speedup, "final_blocks_used": report.blocks_mean,
           "final_unique_policies": report.unique_policies}
    if report.val_accuracy is not None:
        out |= {"final_val_accuracy": report.val_accuracy, "final_val_flops_per_image": report.val_flops}
    return out


def _version(package: str) -> str:
    return version(package).split("+")[0]
