"""A saved view of an MLflow experiment page: a sweep opens on its accuracy-vs-FLOPs scatter.

MLflow's UI keeps a shared view as the experiment tag `mlflow.sharedViewState.<key>` and opens it
from `#/experiments/<id>/runs?viewStateShareKey=<key>&compareRunsMode=CHART`. The format is the UI's
own and undocumented; what is written here was read from, and checked in a browser against, the UI
of MLflow `VERIFIED_WITH` (requirements.txt's pin; tests/test_mlflow_views.py fails on another
version so that the format is checked again before the pin moves):

- the tag value is an envelope `{"name", "createdAt", "updatedAt", "state"}` whose `state` is
  `"deflate;"` + base64 of a zlib stream of the state's compact JSON;
- chart or table view is the URL's `compareRunsMode`, not part of the state;
- the state cannot expand a parent's rows (the UI drops `runsExpanded` from shared views), so the
  view filters on the sweep's parent run and sorts by a metric: children are nested under their
  parent only in the default sort by start time, and only visible rows are plotted;
- `compareRunSections` must come with `compareRunCharts`, else the UI puts its default charts back;
  `runsHiddenMode: SHOW_ALL` plots every trial rather than the first ten.
"""
from __future__ import annotations

import base64
import json
import time
import uuid
import zlib

VERIFIED_WITH = "3.17.2"
TAG_PREFIX = "mlflow.sharedViewState."
MAX_TAG_VALUE = 20_000  # MLflow's limit on an experiment tag's value (the UI refuses larger views too)


def _compact(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)  # as the UI's JSON.stringify


def encode(state: dict, name: str, now_ms: int | None = None) -> str:
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    blob = "deflate;" + base64.b64encode(zlib.compress(_compact(state).encode(), 6)).decode("ascii")
    value = _compact({"name": name, "createdAt": now_ms, "updatedAt": now_ms, "state": blob})
    if len(value) > MAX_TAG_VALUE:
        raise ValueError(f"a shared view of {len(value)} characters; MLflow keeps at most {MAX_TAG_VALUE}")
    return value


def decode(value: str) -> dict:
    """The state of a tag value: an envelope, a bare `deflate;...` string, or plain JSON (all three
    are what the UI reads)."""
    try:
        envelope = json.loads(value)
        if isinstance(envelope, dict) and isinstance(envelope.get("state"), str):
            value = envelope["state"]
        elif isinstance(envelope, dict):
            return envelope
    except ValueError:
        pass
    if value.startswith("deflate;"):
        value = zlib.decompress(base64.b64decode(value[len("deflate;"):])).decode()
    return json.loads(value)


def column(kind: str, name: str) -> str:
    """A runs-table column or sort key: kind is attributes, params, metrics or tags."""
    return f"{kind}.`{name}`"


def scatter_state(x_metric: str, y_metric: str, columns: list[str], parent_run_id: str,
                  other_metrics: list[str] = ()) -> dict:
    """One scatter chart of two metrics, a point per child run of `parent_run_id`, with `columns`.
    The UI adds a bar chart for every metric the runs have unless the view holds a removed chart for
    it: `other_metrics` get one each, so the scatter is the page's only chart."""
    section = uuid.uuid4().hex
    removed = [{"uuid": uuid.uuid4().hex, "type": "BAR", "runsCountToCompare": 10, "metricSectionId": section,
                "deleted": True, "isGenerated": True, "metricKey": m, "displayName": m} for m in sorted(set(other_metrics))]
    return {
        "searchFilter": f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        "orderByKey": column("metrics", y_metric),
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        "selectedColumns": columns,
        "columnOrder": [],
        "columnWidths": {},
        "runsHiddenMode": "SHOW_ALL",
        "compareRunCharts": [{
            "uuid": uuid.uuid4().hex, "type": "SCATTER", "runsCountToCompare": 100, "metricSectionId": section,
            "deleted": False, "isGenerated": False, "displayName": f"{y_metric} vs {x_metric}",
            "xaxis": {"key": x_metric, "type": "METRIC"}, "yaxis": {"key": y_metric, "type": "METRIC"},
        }, *removed],
        "compareRunSections": [{"uuid": section, "name": "Model metrics", "display": True, "isReordered": False,
                                "deleted": False, "isGenerated": True}],
        "viewMaximized": False,
        "runListHidden": False,
        "isAccordionReordered": False,
        "groupBy": None,
        "groupsExpanded": {},
        "useGroupedValuesInCharts": True,
        "hideEmptyCharts": True,
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
    }


# a sweep's rows: its trials and its pruned competitors (params.competitor, keep), each with the validation
# accuracy its place on the front was chosen by and the test figures the chart plots
SWEEP_COLUMNS = [column("params", "gamma"), column("params", "budget_range"), column("params", "competitor"),
                 column("params", "keep"), column("params", "lr"), column("metrics", "final_val_accuracy"),
                 column("metrics", "final_test_accuracy"), column("metrics", "final_flops_per_image"),
                 column("metrics", "final_speedup"), column("metrics", "final_blocks_used"),
                 column("tags", "pareto_optimal")]


def save_sweep_view(client, experiment_id: str, parent_run_id: str, sweep_name: str, metrics: list[str] = ()) -> str:
    """The sweep's view (FLOPs per image on x, test accuracy on y, one point per trial and per pruned competitor)
    saved on the experiment; returns its key (the parent run's id: one view per sweep, replaced when it resumes).
    `metrics`: every metric the trials logged (no bar chart for them)."""
    state = scatter_state("final_flops_per_image", "final_test_accuracy", SWEEP_COLUMNS, parent_run_id, metrics)
    client.set_experiment_tag(experiment_id, TAG_PREFIX + parent_run_id, encode(state, f"{sweep_name}: Pareto front"))
    return parent_run_id


def view_path(experiment_id: str, key: str, mode: str = "CHART") -> str:
    """The part of the UI's URL after the server's address."""
    return f"/#/experiments/{experiment_id}/runs?viewStateShareKey={key}&compareRunsMode={mode}"


def view_location(tracking_uri: str, experiment_id: str, key: str) -> str:
    """Where a user opens the view: the tracking server's URL, or how to start `mlflow ui` for a local store."""
    path = view_path(experiment_id, key)
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/") + path
    return f"mlflow ui --backend-store-uri {tracking_uri}   then open http://127.0.0.1:5000{path}"
