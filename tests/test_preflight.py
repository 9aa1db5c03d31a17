"""Checks before Ray starts: a bad tracking URI, run storage or Ray address is one line and exit 2,
within a stated timeout, before Ray or MLflow is touched (real sockets, a real MLflow server)."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from blockdrop.errors import UserError
from blockdrop.preflight import check_ray_address, check_storage, check_tracking_uri

from conftest import REPO


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_tracking_uris(tmp_path, mlflow_server):
    check_tracking_uri(mlflow_server)  # a real server answers /health
    check_tracking_uri(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")  # its folder can be created
    with pytest.raises(UserError, match="not a tracking URI MLflow knows"):
        check_tracking_uri("foo://bar")
    with pytest.raises(UserError, match="no MLflow server answered within 5 s"):
        check_tracking_uri(f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(UserError, match="the folder of the database cannot be created"):
        check_tracking_uri("sqlite:////proc/x/mlflow.db")


def test_a_server_that_never_answers_fails_within_the_timeout():
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        began = time.time()
        with pytest.raises(UserError, match="within 1 s"):
            check_tracking_uri(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=1.0)
        assert time.time() - began < 5


def test_storage_and_ray_address(tmp_path):
    check_storage(str(tmp_path / "ray_results" / "deep"))
    assert not (tmp_path / "ray_results").exists()  # the check leaves nothing behind
    check_storage("s3://bucket/runs")  # Ray's business
    with pytest.raises(UserError, match="--storage-path /proc/x cannot be created"):
        check_storage("/proc/x")
    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen(1)
        check_ray_address(f"127.0.0.1:{head.getsockname()[1]}")
        check_ray_address(f"ray://127.0.0.1:{head.getsockname()[1]}")
    for address in (None, "auto", "local"):
        check_ray_address(address)
    with pytest.raises(UserError, match="nothing answered within 5 s"):
        check_ray_address(f"127.0.0.1:{closed_port()}")
    with pytest.raises(UserError, match="expected HOST:PORT"):
        check_ray_address("not-an-address")


@pytest.mark.parametrize("script", ["train_job.py", "tune_penalty.py"])
@pytest.mark.parametrize("flags, message", [
    (["--mlflow-uri", "foo://bar"], "--mlflow-uri foo://bar: not a tracking URI MLflow knows"),
    (["--storage-path", "/proc/x"], "--storage-path /proc/x cannot be created"),
    (["--address", "127.0.0.1:9"], "--address 127.0.0.1:9: nothing answered"),
])
@pytest.mark.slow
def test_the_clis_refuse_before_ray_starts(tmp_path, script, flags, message):
    from blockdrop.checkpoints import save_checkpoint
    from blockdrop.presets import get_preset

    preset = get_preset("R26_DIGITS")
    save_checkpoint(tmp_path / "cl.pt", preset, preset.build_backbone(), preset.build_policy(), {"stage": "curriculum"})
    extra = ["--init", str(tmp_path / "cl.pt"), "--penalties", "-1"] if script == "tune_penalty.py" else []
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path)}
    began = time.time()
    proc = subprocess.run([sys.executable, str(REPO / script), *extra, *flags], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()  # one line, nothing from Ray (it never started)
    assert len(lines) == 1 and lines[0].startswith("error: ") and time.time() - began < 60, proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing was created
