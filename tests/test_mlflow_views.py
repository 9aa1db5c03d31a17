"""The saved MLflow view of a sweep: its format, pinned to the MLflow version it was checked against.
(The view opened in a browser on a real sweep: tests/test_sweep.py.)"""
from __future__ import annotations

import json
import re

import mlflow

from blockdrop.mlflow_views import (SWEEP_COLUMNS, TAG_PREFIX, VERIFIED_WITH, decode, encode, save_sweep_view,
                                    scatter_state, view_location)

from conftest import REPO


def test_the_format_was_checked_against_the_mlflow_the_project_pins():
    """The UI's shared-view format is undocumented: moving the MLflow pin means checking it again
    (the browser test in test_sweep.py) and then VERIFIED_WITH."""
    pinned = re.search(r"^mlflow==(\S+)$", (REPO / "requirements.txt").read_text(), re.M).group(1)
    assert pinned == VERIFIED_WITH == mlflow.__version__


def test_a_view_round_trips_and_holds_one_scatter_of_the_trials(tmp_path):
    state = scatter_state("final_flops_per_image", "final_test_accuracy", SWEEP_COLUMNS, "abc123",
                          ["test_accuracy", "final_flops_per_image", "learning_rate"])
    value = encode(state, "sweep: Pareto front", now_ms=1)
    envelope = json.loads(value)
    assert envelope["name"] == "sweep: Pareto front" and envelope["state"].startswith("deflate;")
    assert decode(value) == state and decode(envelope["state"]) == state and decode(json.dumps(state)) == state
    charts = [c for c in state["compareRunCharts"] if not c["deleted"]]
    assert [(c["type"], c["xaxis"]["key"], c["yaxis"]["key"]) for c in charts] == [
        ("SCATTER", "final_flops_per_image", "final_test_accuracy")]
    assert {c["metricKey"] for c in state["compareRunCharts"] if c["deleted"]} == {
        "test_accuracy", "final_flops_per_image", "learning_rate"}
    assert state["searchFilter"] == "tags.`mlflow.parentRunId` = 'abc123'" and state["runsHiddenMode"] == "SHOW_ALL"
    assert state["orderByKey"] == "metrics.`final_test_accuracy`"  # not start time: trials are rows of their own
    assert {c["metricSectionId"] for c in state["compareRunCharts"]} == {state["compareRunSections"][0]["uuid"]}


def test_the_view_is_an_experiment_tag_and_its_location_is_printable(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("views")
    parent = client.create_run(experiment).info.run_id
    key = save_sweep_view(client, experiment, parent, "s1", ["final_test_accuracy"])
    tag = client.get_experiment(experiment).tags[TAG_PREFIX + key]
    assert decode(tag)["searchFilter"].endswith(f"'{parent}'")
    path = f"/#/experiments/{experiment}/runs?viewStateShareKey={key}&compareRunsMode=CHART"
    assert view_location("http://mlflow.team:5000/", experiment, key) == "http://mlflow.team:5000" + path
    assert view_location(uri, experiment, key) == f"mlflow ui --backend-store-uri {uri}   then open http://127.0.0.1:5000{path}"
