"""Each epoch's metrics into MLflow from where Ray Train's controller runs (a Ray Train callback).

A module of its own, light on imports: every stage's controller unpickles the callback, so importing
this module is part of every stage's start-up; blockdrop.tracking would bring torch, pandas and the
model code into the controller too (seconds per stage on a small machine). Importing it also sets
MLflow's quiet defaults, before mlflow is imported (blockdrop.tracking imports it first for that).
"""
from __future__ import annotations

import json
import os
import sys
import time

# Before mlflow is imported: keep its INFO chatter and telemetry out of users' consoles.
for _key, _value in {"MLFLOW_LOGGING_LEVEL": "WARNING", "MLFLOW_DISABLE_TELEMETRY": "true",
                     "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
                     "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                     # an unreachable server: about 15 s of retries (1+2+4+8), not MLflow's 4 minutes per call
                     "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                     "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}.items():
    os.environ.setdefault(_key, _value)

from mlflow.entities import Metric  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from ray.train import UserCallback  # noqa: E402


def metric_batch(metrics: dict[str, float], step: int) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in metrics.items()]


class EpochLogger(UserCallback):
    """Each epoch's metrics into the stage's MLflow run, at the epoch's step, once Ray Train has the
    epoch's checkpoint (a Ray Train callback: it runs where Train's controller runs, not on the workers).

    An epoch reaches MLflow once: steps the run has already (logged by a run killed before its checkpoint
    was kept, whose epoch is then done again) are skipped. When MLflow does not answer (MLflow's own
    retries bounded: MLFLOW_HTTP_REQUEST_* above), training goes on: the epoch's metrics wait in `spool`
    (a file in the stage's Ray folder, set by blockdrop.distributed.run_stage; else in memory) and are
    written when MLflow answers again, at a later epoch or at the stage's end (`flush`)."""

    def __init__(self, uri: str, run_id: str, spool: str | None = None):
        self.uri, self.run_id, self.spool = uri, run_id, spool
        self._client: MlflowClient | None = None
        self._logged: set[int] | None = None
        self._waiting: list[tuple[int, dict]] = []  # without a spool file
        self._down = False

    def __getstate__(self) -> dict:  # shipped to the controller without a client; it makes its own once
        return {"uri": self.uri, "run_id": self.run_id, "spool": self.spool, "_client": None, "_logged": None,
                "_waiting": [], "_down": False}

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        row = metrics[0]  # every worker reports the same figures, merged over all of them
        self._write([(int(row["epoch"]), row)])

    def flush(self) -> None:
        """Write what waits (the driver, after a stage); a RuntimeError when MLflow still does not answer."""
        if not self._write([]):
            raise RuntimeError(f"MLflow at {self.uri} does not answer: the stage's metrics wait in "
                               f"{self.spool or 'memory'} for run {self.run_id}")

    def _write(self, rows: list[tuple[int, dict]]) -> bool:
        waiting = self._spooled()
        try:
            self._client = self._client or MlflowClient(self.uri)
            if self._logged is None:
                self._logged = {m.step for m in self._client.get_metric_history(self.run_id, "epoch")}
            for step, row in waiting + rows:
                if step not in self._logged:
                    self._client.log_batch(self.run_id, metrics=metric_batch(row, step))
                    self._logged.add(step)
        except Exception as err:  # unreachable, timed out, 5xx after MLflow's retries
            self._keep(rows)
            if not self._down:
                print(f"warning: MLflow at {self.uri} does not answer ({type(err).__name__}); training goes on, "
                      f"and the metrics of epoch {rows[0][0] if rows else '?'} on are written when it answers again",
                      file=sys.stderr, flush=True)
            self._down = True
            return False
        self._clear()
        if self._down:
            print(f"MLflow at {self.uri} answers again: {len(waiting) + len(rows)} epochs' metrics written",
                  file=sys.stderr, flush=True)
        self._down = False
        return True

    def _spooled(self) -> list[tuple[int, dict]]:
        if self.spool is None:
            return list(self._waiting)
        try:
            with open(self.spool) as f:
                return [(int(r["step"]), r["metrics"]) for r in map(json.loads, f) if r]
        except FileNotFoundError:
            return []

    def _keep(self, rows: list[tuple[int, dict]]) -> None:
        if self.spool is None:
            self._waiting += rows
            return
        with open(self.spool, "a") as f:
            for step, row in rows:
                f.write(json.dumps({"step": step, "metrics": row}) + "\n")

    def _clear(self) -> None:
        self._waiting = []
        if self.spool is not None:
            try:
                os.remove(self.spool)
            except FileNotFoundError:
                pass
