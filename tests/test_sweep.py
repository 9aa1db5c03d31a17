"""tune_penalty.py end to end: real Ray Tune trials launching Ray Train runs, real MLflow."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from blockdrop.checkpoints import save_checkpoint
from blockdrop.data import load_dataset
from blockdrop.presets import get_preset
from blockdrop.stages import Models, make_optimizer, train_epoch

from conftest import REPO, clean_env, pretrain_digits

PRESET = get_preset("R26_DIGITS")
K = PRESET.num_blocks


@pytest.fixture(scope="module")
def curriculum_checkpoint(tmp_path_factory) -> Path:
    """A small pretrain + curriculum run in-process (the library needs no Ray)."""
    backbone, policy = pretrain_digits(), PRESET.build_policy()
    loader = DataLoader(load_dataset(PRESET, "train"), batch_size=64, shuffle=True)
    device = torch.device("cpu")
    backbone.requires_grad_(False)
    curriculum = make_optimizer("curriculum", policy.parameters(), 1e-3, 0.0)
    for epoch in range(PRESET.num_blocks):
        train_epoch("curriculum", Models(backbone, policy, policy_train=policy), loader, curriculum, epoch, -5.0, device)
    folder = tmp_path_factory.mktemp("init")
    user = folder / "user.pt"  # the user's ResNet, where prune-and-finetune starts
    save_checkpoint(user, PRESET, backbone, None, {"stage": "pretrain"})
    path = folder / "curriculum.pt"
    save_checkpoint(path, PRESET, backbone, policy, {"stage": "curriculum", "reference": {
        "accuracy": 0.5, "source": "the test's ResNet", "file": str(user)}})
    return path


def sweep_cmd(tmp_path: Path, init: Path, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "tune_penalty.py"), "--init", str(init), "--storage-path", str(tmp_path / "ray"),
            "--epochs", "2", *args]


def sweep_runs(tmp_path: Path, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("blockdrop-sweeps")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("blockdrop.job") == name)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                and "blockdrop.trial" in r.data.tags]  # the trials (prune-and-finetune's runs are children too)
    return client, parent, children


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory, curriculum_checkpoint):
    """One sweep exercises both: the driver is killed after its first trial, `--resume` finishes it
    without rerunning that trial. Returns its folder (mlflow.db), the finished trial and the resumed run."""
    tmp_path = tmp_path_factory.mktemp("grid")
    cmd = sweep_cmd(tmp_path, curriculum_checkpoint, "--penalties", "-0.5,-20", "--name", "grid")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 600
    for line in proc.stdout:
        if "[sweep] trials finished 1" in line:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
            break
        assert time.time() < deadline
    proc.wait(timeout=60)
    time.sleep(2)
    _, _, before = sweep_runs(tmp_path, "grid")
    finished = [c for c in before if c.info.status == "FINISHED"]
    assert len(finished) == 1

    # resuming it with another grid is refused (the old grid is not restored silently), the sweep kept
    other = subprocess.run([*cmd[:cmd.index("--penalties") + 1], "-0.5,-7", *cmd[cmd.index("--penalties") + 2:],
                            "--resume"], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "penalties '-0.5,-20.0' there, '-0.5,-7.0' here" in other.stderr, \
        other.stderr[-2000:]
    again = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    return tmp_path, finished[0], again


@pytest.mark.slow
def test_grid_sweep_interrupted_resumes_then_publishes_front_tags_and_models(grid_sweep):
    """The resumed sweep did not rerun its finished trial; the published front is checked against the
    trials' metrics; the models carry their figures and take raw images."""
    tmp_path, finished, again = grid_sweep
    assert "continuing sweep grid" in again.stderr and "Pareto front" in again.stdout
    client, parent, children = sweep_runs(tmp_path, "grid")
    assert sorted(float(c.data.params["gamma"]) for c in children) == [-20.0, -0.5]
    assert all(c.info.status == "FINISHED" for c in children) and parent.info.status == "FINISHED"
    done = next(c for c in children if c.info.run_id == finished.info.run_id)
    steps = [m.step for m in client.get_metric_history(done.info.run_id, "test_accuracy")]
    assert sorted(steps) == [0, 1]  # the finished trial was not run again

    # the competitors, trained after the trials, are models of the sweep too: block-pruned at the counts that
    # bracket the trials' front, channel-pruned at each of its FLOPs
    competitors = [r for r in client.search_runs([parent.info.experiment_id])
                   if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id and "competitor" in r.data.params]
    kinds = sorted({r.data.params["competitor"] for r in competitors})
    assert kinds == ["channel_prune", "prune_finetune"] and all(r.info.status == "FINISHED" for r in competitors)
    every = children + competitors
    points = {c.info.run_id: (c.data.metrics["final_test_accuracy"], c.data.metrics["final_flops_per_image"])
              for c in every}
    # the front of whatever wins is chosen on the validation split's figures; the test images only measure
    chosen = {c.info.run_id: (c.data.metrics["final_val_accuracy"], c.data.metrics["final_val_flops_per_image"])
              for c in every}

    def dominated(rid):
        a, f = chosen[rid]
        return any(a2 >= a and f2 <= f and (a2 > a or f2 < f) for other, (a2, f2) in chosen.items() if other != rid)

    for c in every:
        assert c.data.tags["pareto_optimal"] == str(not dominated(c.info.run_id)).lower()

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "pareto")}
    assert artifacts == {"pareto/pareto_front.png", "pareto/pareto_front.json", "pareto/front_table.json"}
    on_front = [rid for rid in points if not dominated(rid)]
    summary = parent.data.metrics  # the parent reads as the sweep's result
    assert summary["trials_finished"] == 2 and summary["pareto_points"] == len(on_front)
    assert summary["competitors"] == len(competitors)
    assert summary["best_accuracy"] == max(a for a, _ in points.values())
    assert summary["lowest_flops_per_image"] == min(f for _, f in points.values())
    front_table = json.loads(Path(client.download_artifacts(parent.info.run_id, "pareto/front_table.json",
                                                            str(tmp_path))).read_text())
    assert sorted(row[front_table["columns"].index("run_id")] for row in front_table["data"]) == sorted(on_front)
    local = client.download_artifacts(parent.info.run_id, "pareto/pareto_front.json", str(tmp_path))
    table = json.loads(Path(local).read_text())
    assert {row["run_id"] for row in table["front"]} == {rid for rid in points if not dominated(rid)}
    assert table["reference"]["flops"] == 6_802_688
    # image-blind baselines: curves on the curriculum checkpoint's ResNet, each trial against them on its own
    assert set(table["baselines_on_init"]) == {"firstk", "randomk", "distributek", "greedy"}
    for curve in table["baselines_on_init"].values():
        assert [p["keep"] for p in curve][0] == 0 and curve[-1]["keep"] == K
    full_greedy = table["baselines_on_init"]["greedy"][-1]
    assert full_greedy["accuracy"] == pytest.approx(table["reference"]["init_resnet_accuracy"])  # K blocks: the full model
    # the user's ResNet is the reference, as the checkpoint recorded it
    assert table["reference"]["accuracy"] == 0.5 and table["reference"]["source"] == "the test's ResNet"
    assert summary["reference_accuracy"] == 0.5
    # block and channel pruning from the user's ResNet: a curve each, every learned front point against both
    pruned, narrowed = table["prune_finetune"], table["channel_prune"]
    assert pruned and all(0 <= p["keep"] <= K for p in pruned) and narrowed and all(p["keep"] == K for p in narrowed)
    for row in table["front"]:
        if "method" in row:  # a competitor that won its place on the front
            continue
        for key in ("gain_over_pruning", "gain_over_channel_pruning"):
            assert row[f"{key}_low"] <= row[key] <= row[f"{key}_high"]
            trial = client.get_run(row["run_id"]).data.metrics
            assert trial[key] == pytest.approx(row[key])
    assert "vs prune and finetune" in again.stdout and "vs channel pruning" in again.stdout
    assert "verdict:" in again.stdout
    assert summary["prune_baseline_seconds"] > 0
    for c in children:
        m = c.data.metrics
        best_static = max(m[f"baseline_{b}_accuracy"] for b in ("firstk", "randomk", "distributek", "greedy"))
        assert m["gain_over_static"] == pytest.approx(m["final_test_accuracy"] - best_static)
        pictures = {a.path for a in client.list_artifacts(c.info.run_id, "policy")}
        assert {"policy/top_policies.png", "policy/blocks_per_class.png", "policy/baselines.json"} <= pictures
    gains = [c.data.metrics["gain_over_static"] for c in children if not dominated(c.info.run_id)]
    if gains:  # the front may be all pruned ResNets
        assert parent.data.metrics["front_gain_over_static"] == pytest.approx(sum(gains) / len(gains))

    import mlflow.pyfunc
    import numpy as np

    from blockdrop.pyfunc import raw_images

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    test = load_dataset(PRESET, "test")
    images = raw_images(PRESET, np.stack([test[i][0].numpy() for i in range(8)]))  # what a client has
    front_ids = {row["run_id"] for row in table["front"]}
    for alias in ("most_accurate", "fastest"):
        version = client.get_model_version_by_alias("blockdrop-R26_DIGITS", alias)
        assert client.get_run(version.run_id).data.tags["pareto_optimal"] == "true"
        model = mlflow.pyfunc.load_model(f"models:/blockdrop-R26_DIGITS@{alias}")
        out = model.predict(images)
        assert len(out) == 8 and model.metadata.get_input_schema().inputs[0].type == np.dtype(np.uint8)
        with pytest.raises(Exception, match="uint8"):  # normalised tensors, the old input, are refused
            model.predict(np.stack([test[i][0].numpy() for i in range(8)]))
    # every registered version and its logged model carry the run's final figures, not epoch 0's
    versions = client.search_model_versions("name = 'blockdrop-R26_DIGITS'")
    assert {v.run_id for v in versions} == front_ids
    for v in versions:
        final = client.get_run(v.run_id).data.metrics
        assert float(v.tags["accuracy"]) == pytest.approx(final["final_test_accuracy"])
        assert float(v.tags["flops_per_image"]) == pytest.approx(final["final_flops_per_image"])
        assert float(v.tags["speedup"]) == pytest.approx(final["final_speedup"])
        assert float(v.tags["blocks_used"]) == pytest.approx(final["final_blocks_used"])
        assert f"accuracy {final['final_test_accuracy']:.4f}" in v.description and "Pareto point" in v.description
        params = client.get_run(v.run_id).data.params
        if "competitor" in params:  # a pruned ResNet that won its place: a static model, registered like a trial
            assert v.tags["method"] == params["competitor"] and "static model" in v.description
            continue
        assert v.tags["preset"] == PRESET.name and float(v.tags["gamma"]) == float(params["gamma"])
        model_id = v.model_id or client.get_run(v.run_id).outputs.model_outputs[0].model_id
        logged = {m.key: m.value for m in client.get_logged_model(model_id).metrics}
        for key in ("final_test_accuracy", "final_flops_per_image", "final_speedup", "final_blocks_used"):
            assert logged[key] == pytest.approx(final[key]), key
        assert logged["test_accuracy"] == pytest.approx(final["test_accuracy"])  # the last epoch's, not the first
        assert client.get_logged_model(model_id).params["gamma"] == params["gamma"]
    # runs read well: trial names say what differs; MLflow's source tags; lr as a parameter only
    assert sorted(c.info.run_name for c in children) == ["gamma=-0.5 lr=0.001", "gamma=-20 lr=0.001"]
    for run in [parent, *children]:
        assert run.data.tags["mlflow.source.name"] == "tune_penalty.py" and run.data.tags.get("mlflow.user")
        assert "lr" not in run.data.metrics
    assert "learning_rate" in children[0].data.metrics


@pytest.mark.parametrize("args, message", [
    (["--penalties", "-1,2"], "--penalties must all be negative"),
    ([], "give a grid of gammas"),
    (["--penalties", "-1", "--lrs", "0"], "--lrs must be positive"),
    (["--penalties", "-1", "--resume"], "--resume needs --name"),
    (["--penalties=-inf"], "--penalties must all be negative numbers"),
    (["--num-samples", "1", "--penalties", "-1"], "exclude each other"),
    (["--penalties", "-1", "--epochs", "0"], "--epochs must be at least 1"),
    (["--penalties", "-1", "--batch-size=-4"], "--batch-size must be at least 1"),
    (["--num-samples", "2", "--gamma-range=-inf,-1"], "--gamma-range takes low,high"),
    (["--penalties", "-1,-5,-1.0"], "--penalties lists -1 more than once"),
    (["--penalties", "-1", "--lrs", "1e-3,0.0010000001"], "--lrs lists 0.001 more than once"),
])
def test_invalid_sweeps_fail_fast(tmp_path, curriculum_checkpoint, monkeypatch, args, message):
    from blockdrop.errors import UserError
    from blockdrop.parsers.sweep import parse_args
    from blockdrop.plans import plan_sweep as validate

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=message):
        validate(parse_args(["--init", str(curriculum_checkpoint), *args]))


@pytest.mark.slow
def test_checkpoint_without_policy_or_for_another_preset_is_refused(tmp_path):
    from blockdrop.errors import UserError
    from blockdrop.parsers.sweep import parse_args
    from blockdrop.plans import plan_sweep as validate

    resnet_only = tmp_path / "resnet.pt"
    save_checkpoint(resnet_only, PRESET, PRESET.build_backbone())
    with pytest.raises(UserError, match="holds no policy"):
        validate(parse_args(["--init", str(resnet_only), "--penalties", "-1"]))
    other = tmp_path / "r32.pt"
    save_checkpoint(other, get_preset("R32_C10"), get_preset("R32_C10").build_backbone())
    with pytest.raises(UserError, match="saved for preset R32_C10"):
        validate(parse_args(["--init", str(other), "--penalties", "-1"]))
    proc = subprocess.run([sys.executable, str(REPO / "tune_penalty.py"), "--init", str(other), "--penalties", "-1"],
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "saved for preset R32_C10" in proc.stderr and "Traceback" not in proc.stderr


def test_init_from_an_mlflow_run_artifact(tmp_path, monkeypatch):
    from blockdrop.errors import UserError
    from blockdrop.plans import resolve_init
    from blockdrop.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "init-test")
    run_id, _ = tracker.job_run("job", "job", {})
    ckpt = tmp_path / "job-curriculum.pt"
    save_checkpoint(ckpt, PRESET, PRESET.build_backbone(), PRESET.build_policy())
    tracker.client.log_artifact(run_id, str(ckpt), "checkpoint")
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'other.db'}")  # --mlflow-uri, not the process default, counts
    for uri in (f"runs:/{run_id}/checkpoint", f"runs:/{run_id}/checkpoint/job-curriculum.pt"):
        assert Path(resolve_init(uri, tracker.uri)).read_bytes() == ckpt.read_bytes()
    with pytest.raises(UserError, match="cannot download it from MLflow"):
        resolve_init(f"runs:/{run_id}/nothing-here", tracker.uri)


@pytest.mark.slow
def test_the_sweep_opens_on_its_front_in_mlflow_ui(grid_sweep, tmp_path):
    """The URL the sweep printed, opened in a real browser (headless Chromium) on a real `mlflow server`
    holding the sweep: the chart view, one scatter of final_test_accuracy against final_flops_per_image,
    one point per trial. Needs Debian's chromium (apt-get install chromium)."""
    import re
    import shutil

    from conftest import _free_port, start_mlflow_server, stop_process_group

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no Chromium: `apt-get install chromium` (Debian) to run the browser test")
    folder, _, again = grid_sweep
    printed = re.search(r"then open http://127\.0\.0\.1:5000(/#/experiments/\S+)", again.stdout)
    assert printed, again.stdout[-2000:]
    shutil.copyfile(folder / "mlflow.db", tmp_path / "tracking.db")  # the server's store: the sweep's
    port = _free_port()
    server = start_mlflow_server(tmp_path, port)
    try:
        url = f"http://127.0.0.1:{port}{printed.group(1)}"
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000",
                   "--virtual-time-budget=60000"]
        dom = ""
        for _ in range(3):  # the first load of a cold server can outlast the page's own data fetches
            dom = subprocess.run([*command, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
            if "plotly-customdata" in dom:
                break
        assert dom.count("js-plotly-plot") == 1, "one chart: the front's scatter"
        scatter = dom[dom.index("scatterlayer"):]
        assert scatter.count('<path class="point') == 3, "one point per trial"
        assert "final_flops_per_image" in dom and "final_test_accuracy" in dom
        subprocess.run([*command, f"--screenshot={tmp_path / 'view.png'}", url], capture_output=True, timeout=180)
        assert (tmp_path / "view.png").stat().st_size > 10_000
    finally:
        stop_process_group(server)


@pytest.mark.slow
def test_resume_of_a_sweep_that_never_existed_is_refused(tmp_path, curriculum_checkpoint):
    proc = subprocess.run(sweep_cmd(tmp_path, curriculum_checkpoint, "--penalties", "-1", "--name", "never-existed",
                                    "--resume"), cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2 and "--resume --name never-existed: no such sweep" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_ctrl_c_during_a_sweep_leaves_no_run_running(tmp_path, curriculum_checkpoint):
    """SIGINT to the sweep's process group (Ctrl-C in a terminal) while a trial trains: the sweep stops
    with a line saying how to resume, the parent run is FAILED and no trial run stays RUNNING."""
    cmd = sweep_cmd(tmp_path, curriculum_checkpoint, "--penalties", "-1,-5", "--name", "stopped", "--no-analysis")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines, deadline = [], time.time() + 300
    for line in proc.stdout:
        lines.append(line)
        if "[finetune] epoch 1/" in line:
            os.killpg(proc.pid, signal.SIGINT)
            break
        assert time.time() < deadline, "".join(lines[-40:])
    try:
        rest, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = "".join(lines) + rest
    assert proc.returncode != 0, output[-3000:]
    client, parent, children = sweep_runs(tmp_path, "stopped")
    assert parent.info.status == "FAILED" and children, output[-3000:]
    assert all(c.info.status in ("FINISHED", "FAILED", "KILLED") for c in children), [c.info.status for c in children]


def test_a_front_is_chosen_on_validation_so_shuffled_test_labels_pick_the_same_front(tmp_path):
    """Trials as a sweep leaves them in a real MLflow store, twice: with the test set's labels intact, and
    with them shuffled (every test figure changes, the validation figures do not). The front, its tags and
    its registered models are the same; only the test figures it shows differ."""
    from blockdrop.pareto import Point
    from blockdrop.sweep import collect_front, publish_front
    from blockdrop.tracking import Tracker

    full = 6e6
    # (gamma, val accuracy, val FLOPs) and two sets of test accuracies: the intact labels' and the shuffled
    # ones' (near chance, in another order: on test figures the front would be another one)
    trials = [(-0.5, 0.97, 5.0e6), (-2.0, 0.96, 3.0e6), (-5.0, 0.90, 3.5e6), (-20.0, 0.80, 1.0e6)]
    intact, shuffled = [0.96, 0.97, 0.91, 0.79], [0.08, 0.12, 0.15, 0.11]
    fronts = {}
    for label, tests in (("intact", intact), ("shuffled", shuffled)):
        tracker = Tracker(f"sqlite:///{tmp_path / label}.db", "val-front")
        parent, _ = tracker.job_run("s", "s", {"preset": PRESET.name})
        for (gamma, val, val_flops), test in zip(trials, tests):
            run_id, _ = tracker.job_run(f"s/g{gamma}", f"gamma={gamma}", {"gamma": gamma, "lr": 0.01}, parent_id=parent)
            flops = val_flops * 1.01  # the test set's FLOPs differ a little from the validation split's
            tracker.log_metrics(run_id, {"final_test_accuracy": test, "final_flops_per_image": flops,
                                         "final_speedup": full / flops, "final_blocks_used": 5.0,
                                         "final_unique_policies": 3.0, "final_val_accuracy": val,
                                         "final_val_flops_per_image": val_flops}, step=1)
            tracker.finish(run_id, ok=True)
        reference = Point(0.97, full, "your ResNet", {"init_resnet_accuracy": 0.97, "flops": full, "speedup": 1.0})
        points, front = collect_front(tracker, parent, reference)
        rows = publish_front(tracker, parent, points, front, reference, "val-front", PRESET.name)
        registered = {v.tags["gamma"] for v in tracker.client.search_model_versions("name = 'val-front'")}
        fronts[label] = ([r["gamma"] for r in rows], registered, [r["accuracy"] for r in rows])
    assert fronts["intact"][:2] == fronts["shuffled"][:2] == ([-20.0, -2.0, -0.5], {"-20.0", "-2.0", "-0.5"})
    assert fronts["shuffled"][2] == [0.11, 0.12, 0.08]  # what is shown: the test figures of the chosen models


def test_the_verdict_names_the_simpler_model_when_pruning_wins_or_ties():
    """The sweep's verdict from its front: pruned ResNets on the front, or intervals against either kind of
    pruning that hold 0 or lie below it, send the user to the pruned ResNet."""
    from blockdrop.pareto import Point
    from blockdrop.sweep import method, recommend

    def learned(low, high, channel=(0.01, 0.02)):
        return Point(0.9, 1e6, "g", {"gain_over_pruning": (low + high) / 2, "gain_over_pruning_low": low,
                                     "gain_over_pruning_high": high, "gain_over_channel_pruning": sum(channel) / 2,
                                     "gain_over_channel_pruning_low": channel[0],
                                     "gain_over_channel_pruning_high": channel[1]})

    pruned = Point(0.91, 1e6, "K=4", {"method": "prune_finetune", "keep": 4})
    assert "beats both kinds of pruning" in recommend([learned(0.01, 0.03)], "s")
    assert "worth the same" in recommend([learned(-0.01, 0.03)], "s")  # a tie with block pruning
    assert "a pruned ResNet is more accurate" in recommend([learned(0.01, 0.03, (-0.05, -0.01))], "s")
    assert "a pruned ResNet is more accurate" in recommend([learned(0.01, 0.03), pruned], "s")  # one won its place
    assert "pruning wins on this data" in recommend([pruned], "s") and "prune and finetune" in recommend([pruned], "s")
    assert [method(p.info) for p in (pruned, learned(0, 0))] == ["prune and finetune", "learned policy"]
