"""A run is its name AND what defines it: resumes check both, in MLflow and in Ray's run storage; an epoch
reaches MLflow once; names, experiments and folders a command will touch are checked before the work."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from blockdrop.errors import UserError

from conftest import REPO, clean_env


def tracker(tmp_path: Path, experiment: str = "identity"):
    from blockdrop.tracking import Tracker

    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", experiment)


def test_a_run_of_the_same_name_with_other_settings_is_refused_not_continued(tmp_path):
    t = tracker(tmp_path)
    first, resumed = t.job_run("x", "x", {"preset": "R26_DIGITS", "data_dir": "/data/a", "epochs": 5, "num_workers": 2})
    assert not resumed
    again, resumed = t.job_run("x", "x", {"preset": "R26_DIGITS", "data_dir": "/data/a", "epochs": 7, "num_workers": 4})
    assert resumed and again == first  # more workers, more epochs: the same run, continued
    with pytest.raises(UserError, match=r"other settings: data_dir '/data/a' there, '/data/b' here.*another --name"):
        t.job_run("x", "x", {"preset": "R26_DIGITS", "data_dir": "/data/b", "epochs": 5})
    child, _ = t.job_run("x/gamma=-1", "c", {"gamma": -1.0}, parent_id=first)
    with pytest.raises(UserError, match="gamma '-1.0' there, '-2.0' here"):
        t.job_run("x/gamma=-1", "c", {"gamma": -2.0}, parent_id=first)


def test_names_with_an_apostrophe_are_found_and_unusable_names_refused_at_once(tmp_path):
    t = tracker(tmp_path)
    run_id, _ = t.job_run("it's", "it's", {"preset": "R26_DIGITS"})
    t.finish(run_id, ok=True)
    assert t.finished_job("it's") == run_id and t.job_exists("it's")
    for bad in ("a/b", "x'y\"z", "..", " "):
        for command in ("train_job.py", "tune_penalty.py"):
            extra = ["--init", "x.pt", "--penalties", "-1"] if command == "tune_penalty.py" else []
            proc = subprocess.run([sys.executable, str(REPO / command), "--name", bad, *extra], cwd=tmp_path,
                                  env=clean_env(), capture_output=True, text=True, timeout=60)
            assert proc.returncode == 2 and "a name is one folder name" in proc.stderr, (bad, proc.stderr[-1500:])


def test_a_deleted_experiment_is_named_with_how_to_restore_it(tmp_path):
    t = tracker(tmp_path, "gone")
    t.client.delete_experiment(t.experiment_id)
    with pytest.raises(UserError, match=r"'gone' .* was deleted: restore it \(mlflow experiments restore"):
        tracker(tmp_path, "gone")


def test_ray_state_of_another_run_is_never_resumed(tmp_path):
    from blockdrop.distributed import RUN_RECORD, claim_storage

    identity = {"preset": "R26_DIGITS", "data_dir": "/data/a", "lr": 0.1, "mlflow": "sqlite:///a.db run 1"}
    claim_storage(str(tmp_path), "x-finetune", identity)
    record = tmp_path / "x-finetune" / RUN_RECORD
    assert json.loads(record.read_text()) == identity
    (tmp_path / "x-finetune" / "checkpoint_000001").mkdir()  # Ray's state of that run
    claim_storage(str(tmp_path), "x-finetune", dict(identity))  # the same run: resumed
    other = identity | {"data_dir": "/data/b", "mlflow": "sqlite:///b.db run 7"}
    with pytest.raises(UserError, match=r'data_dir "/data/a" there, "/data/b" here.*another --name.*delete'):
        claim_storage(str(tmp_path), "x-finetune", other)
    foreign = tmp_path / "y-finetune"
    (foreign / "checkpoint_000003").mkdir(parents=True)  # Ray state nobody recorded (another tool, an old run)
    with pytest.raises(UserError, match="no run of this project recorded"):
        claim_storage(str(tmp_path), "y-finetune", identity)
    claim_storage("s3://bucket/runs", "x-finetune", other)  # object storage: Ray's own resume, nothing kept here


def test_an_epoch_reaches_mlflow_once_whatever_was_killed_when(tmp_path):
    """A run killed after its epoch's metrics were logged but before Ray kept the checkpoint redoes that
    epoch: the callback of the new controller (a new instance) skips the steps the run already has."""
    import pickle

    from blockdrop.epoch_logger import EpochLogger

    t = tracker(tmp_path)
    run_id, _ = t.job_run("x", "x", {})
    logger = EpochLogger(t.uri, run_id)
    for epoch in (0, 1):
        logger.after_report(None, [{"epoch": epoch, "test_accuracy": 0.5 + epoch / 10}], None)
    restarted = pickle.loads(pickle.dumps(logger))  # what a new controller unpickles
    for epoch in (1, 2):  # epoch 1 again, with other figures
        restarted.after_report(None, [{"epoch": epoch, "test_accuracy": 0.9 + epoch / 100}], None)
    history = [(m.step, m.value) for m in t.client.get_metric_history(run_id, "test_accuracy")]
    assert sorted(history) == [(0, 0.5), (1, 0.6), (2, 0.92)]


def test_an_output_or_storage_path_that_is_a_file_is_refused_before_ray(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    for flags in (["--output", str(taken)], ["--storage-path", str(taken)]):
        proc = subprocess.run([sys.executable, str(REPO / "train_job.py"), "--epochs", "1", *flags], cwd=tmp_path,
                              env=clean_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "is a file, not a folder" in proc.stderr, proc.stderr[-1500:]
        assert "Started a local Ray" not in proc.stderr
    assert taken.read_text() == "a file"


@pytest.mark.slow
def test_metrics_wait_while_the_mlflow_server_is_down_and_are_written_when_it_answers(tmp_path, capsys, monkeypatch):
    """A real `mlflow server` stopped mid-stage and started again on the same store: training does not wait
    on it (MLflow's retries bounded: here to 1+2 s, by default 15 s a call), one line says so, and every epoch
    reaches the run once."""
    import time

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")

    from blockdrop.epoch_logger import EpochLogger
    from blockdrop.tracking import Tracker
    from conftest import _free_port, start_mlflow_server, stop_process_group

    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    run_id, _ = Tracker(uri, "down").job_run("x", "x", {})
    logger = EpochLogger(uri, run_id, spool=str(tmp_path / "waiting.jsonl"))
    logger.after_report(None, [{"epoch": 0, "test_accuracy": 0.5}], None)
    stop_process_group(server)
    began = time.time()
    logger.after_report(None, [{"epoch": 1, "test_accuracy": 0.6}], None)  # down: kept, not raised
    logger.after_report(None, [{"epoch": 2, "test_accuracy": 0.7}], None)
    assert time.time() - began < 30  # bounded: MLflow's default retries would take about 8 minutes here
    err = capsys.readouterr().err
    assert err.count("does not answer") == 1 and "training goes on" in err
    with pytest.raises(RuntimeError, match="does not answer"):
        EpochLogger(uri, run_id, spool=logger.spool).flush()  # the stage's end, MLflow still down
    server = start_mlflow_server(tmp_path, port)
    try:
        logger.after_report(None, [{"epoch": 3, "test_accuracy": 0.8}], None)
        assert "answers again: 3 epochs' metrics written" in capsys.readouterr().err
        from mlflow.tracking import MlflowClient

        history = [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, "test_accuracy")]
        assert sorted(history) == [(0, 0.5), (1, 0.6), (2, 0.7), (3, 0.8)]
        assert not Path(logger.spool).exists()
    finally:
        stop_process_group(server)


@pytest.mark.slow
def test_without_an_address_a_command_starts_its_own_ray_beside_one_that_ray_start_left_running(tmp_path):
    """A workstation where `ray start --head` runs: a job or sweep with no --address and no RAY_ADDRESS starts a
    Ray of its own, as documented, instead of joining that one (ray.init's own default: another job's CPUs,
    its PlacementGroupCleaner's notices on this console); `--address auto` joins it on purpose. A Ray of its own
    has no spot nodes: its stages start no preemption watcher."""
    import os
    import shutil
    import signal
    import tempfile

    from conftest import _free_port

    temp = Path(tempfile.mkdtemp(prefix="bd-", dir="/tmp"))  # short: Ray's socket paths
    env = clean_env(RAY_TMPDIR=str(temp), RAY_USAGE_STATS_ENABLED="0")  # where ray.init looks for a running Ray
    ray = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    # In a process group of its own: the teardown stops this head's processes only. (`ray stop` stops every Ray
    # of the machine's user: the other test worker's jobs and sweeps with it.)
    head = subprocess.Popen([ray, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    out, _ = head.communicate(timeout=120)
    code = ("import os, sys, ray\nfrom blockdrop.ray_session import start_ray\n"
            "start_ray(sys.argv[1] or None, False, 1)\n"
            "print(ray.get_runtime_context().gcs_address, os.environ.get('RAY_TRAIN_ENABLE_PREEMPTION_WATCHER'))\n")

    def joined(address: str) -> list[str]:  # the GCS it joined; whether its stages watch for preemption
        proc = subprocess.run([sys.executable, "-c", code, address], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout.split()[-2:]

    try:
        assert head.returncode == 0, out[-3000:]
        assert (temp / "ray" / "ray_current_cluster").exists()  # what ray.init(address=None) would join
        (own, watcher), (chosen, kept) = joined(""), joined("auto")
        assert not own.endswith(f":{port}") and chosen.endswith(f":{port}"), (own, chosen)
        assert watcher == "0" and kept == "None"  # no spot node to lose on a Ray of its own; a cluster keeps it
    finally:
        try:
            os.killpg(head.pid, signal.SIGKILL)  # its GCS, raylet, agents and workers share the group
        except ProcessLookupError:
            pass
        shutil.rmtree(temp, ignore_errors=True)
