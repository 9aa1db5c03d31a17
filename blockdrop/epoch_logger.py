"""Each epoch's metrics into MLflow from where Ray Train's controller runs (a Ray Train callback).

A module of its own, light on imports: every stage's controller unpickles the callback, so importing
this module is part of every stage's start-up; blockdrop.tracking would bring torch, pandas and the
model code into the controller too (seconds per stage on a small machine). Importing it also sets
MLflow's quiet defaults, before mlflow is imported (blockdrop.tracking imports it first for that).
"""
from __future__ import annotations

import os
import time

# Before mlflow is imported: keep its INFO chatter and telemetry out of users' consoles.
for _key, _value in {"MLFLOW_LOGGING_LEVEL": "WARNING", "MLFLOW_DISABLE_TELEMETRY": "true",
                     "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
                     "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}.items():
    os.environ.setdefault(_key, _value)

from mlflow.entities import Metric  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from ray.train import UserCallback  # noqa: E402


def metric_batch(metrics: dict[str, float], step: int) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in metrics.items()]


class EpochLogger(UserCallback):
    """Each epoch's metrics into the stage's MLflow run, at the epoch's step, once Ray Train has the
    epoch's checkpoint (a Ray Train callback: it runs where Train's controller runs, not on the workers)."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self._client: MlflowClient | None = None
        self._logged: set[int] | None = None

    def __getstate__(self) -> dict:  # shipped to the controller without a client; it makes its own once
        return {"uri": self.uri, "run_id": self.run_id, "_client": None, "_logged": None}

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        self._client = self._client or MlflowClient(self.uri)
        if self._logged is None:  # epochs a killed run logged before its checkpoint was kept: not twice
            self._logged = {m.step for m in self._client.get_metric_history(self.run_id, "epoch")}
        row = metrics[0]  # every worker reports the same figures, merged over all of them
        step = int(row["epoch"])
        if step in self._logged:
            return
        self._client.log_batch(self.run_id, metrics=metric_batch(row, step))
        self._logged.add(step)
