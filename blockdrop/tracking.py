"""MLflow: where runs, metrics, checkpoints and models of this project are kept.

Tracking URI: `--mlflow-uri`, else MLFLOW_TRACKING_URI, else a sqlite file `mlflow.db` in the
working directory (MLflow 3's local default; `mlflow ui --backend-store-uri sqlite:///mlflow.db`).
A job's run carries the tag `blockdrop.job=<job name>`; starting the same job again continues that
run instead of opening a second one.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

# Before mlflow is imported: keep its INFO chatter and telemetry out of users' consoles.
for _key, _value in {"MLFLOW_LOGGING_LEVEL": "WARNING", "MLFLOW_DISABLE_TELEMETRY": "true",
                     "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
                     "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}.items():
    os.environ.setdefault(_key, _value)

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from blockdrop.errors import UserError  # noqa: E402

JOB_TAG = "blockdrop.job"
PACKAGE_DIR = Path(__file__).resolve().parent


class _DropMessages(logging.Filter):
    def __init__(self, *needles: str):
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.needles)


# The model class is ours and travels as code: MLflow's generic cloudpickle caution is noise here.
logging.getLogger("mlflow.pyfunc").addFilter(_DropMessages("Passing a Python object as `python_model`"))


def metric_batch(metrics: dict[str, float], step: int) -> list[mlflow.entities.Metric]:
    now = int(time.time() * 1000)
    return [mlflow.entities.Metric(k, float(v), now, step) for k, v in metrics.items()]


def resolve_uri(flag: str | None) -> str:
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"
    return uri


class Tracker:
    """One experiment on one tracking server; runs are addressed by id so workers can log too."""

    def __init__(self, uri: str, experiment: str):
        self.uri = uri
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
        self.experiment = experiment

    def job_run(self, job: str, run_name: str, params: dict, parent_id: str | None = None) -> tuple[str, bool]:
        """The run of `job` (under `parent_id`), created or continued; True if it already existed."""
        query = f"tags.`{JOB_TAG}` = '{job}'"
        if parent_id:
            query += f" and tags.`mlflow.parentRunId` = '{parent_id}'"
        existing = self.client.search_runs([self.experiment_id], query, max_results=1,
                                           order_by=["attributes.start_time DESC"])
        if existing:
            run_id = existing[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id, True
        tags = {JOB_TAG: job} | ({"mlflow.parentRunId": parent_id} if parent_id else {})
        run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        self.client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()])
        return run_id, False

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        self.client.log_batch(run_id, metrics=metric_batch(metrics, step))

    def finish(self, run_id: str, ok: bool) -> None:
        self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")

    def run_url(self, run_id: str) -> str:
        if self.uri.startswith("http"):
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"
        return f"run {run_id} in experiment {self.experiment!r} ({self.uri})"

    def log_model(self, run_id: str, checkpoint: Path, report_text: str, example: np.ndarray,
                  name: str = "model") -> str:
        """Log the checkpoint, the report, and a pyfunc model that loads from that checkpoint."""
        self.client.log_artifact(run_id, str(checkpoint), "checkpoint")
        self.client.log_text(run_id, report_text, "evaluation.txt")
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            # our outputs are never missing, so MLflow's hint about integer columns does not apply
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=BlockDropModel(),
                artifacts={"checkpoint": str(checkpoint)},
                code_paths=[str(PACKAGE_DIR)],
                input_example=example,
                pip_requirements=[f"torch=={_version('torch')}", f"torchvision=={_version('torchvision')}",
                                  f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}"],
            )
        return info.model_uri


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package).split("+")[0]


class BlockDropModel(mlflow.pyfunc.PythonModel):
    """An MLflow model: normalised images (N, C, H, W) in; class, blocks used and FLOPs per image out."""

    def load_context(self, context) -> None:
        from blockdrop.checkpoints import load_models, read_checkpoint
        from blockdrop.flops import cost_model
        from blockdrop.presets import get_preset

        path = context.artifacts["checkpoint"]
        self.preset = get_preset(read_checkpoint(path).preset)
        self.backbone, self.policy, _ = load_models(self.preset, path)
        self.backbone.eval()
        if self.policy is not None:
            self.policy.eval()
        self.costs = cost_model(self.preset)

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> pd.DataFrame:
        import torch

        from blockdrop.execution import run_sparse
        from blockdrop.reinforce import greedy

        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            if self.policy is None:
                actions = torch.ones(len(images), self.preset.num_blocks)
                logits, flops = self.backbone(images), torch.full((len(images),), float(self.costs.full))
            else:
                actions = greedy(self.policy(images))
                logits, flops = run_sparse(self.backbone, images, actions), self.costs.per_image(actions)
        return pd.DataFrame({
            "prediction": logits.argmax(1).numpy(),
            "blocks_used": actions.sum(1).int().numpy(),
            "flops": flops.numpy(),
            "policy": ["".join(str(int(v)) for v in row) for row in actions.tolist()],
        })
