"""Shared fixtures: small files in the real on-disk formats, and helpers to perturb models."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

# The machine's cores shared by the test processes (pytest-xdist's workers), one thread at least.
torch.set_num_threads(max((os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), 1))
REPO = Path(__file__).resolve().parents[1]


# The test files that take longest, handed out first: pytest-xdist (pytest.ini: -n 2 --dist loadfile
# --no-loadscope-reorder) gives each worker whole files in this order, so that the two longest never
# wait for the end of the run. Most of their time is Ray starting and stopping processes, not CPU.
LONGEST_FIRST = ("test_train_job.py", "test_sweep.py", "test_cluster.py", "test_budget.py", "test_serving.py",
                 "test_identity.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a command a test runs as a user would: no Ray address or MLflow tracking URI
    inherited from the test run's own, this checkout on PYTHONPATH, output unbuffered; plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return {**env, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **extra}


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m module args` as a user runs it, from the current directory."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env)


def randomize_batchnorm(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics, so that eval-mode comparisons cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return module.eval()


def write_cifar(root: Path, name: str = "cifar10", per_batch: int = 20, test: int = 30, seed: int = 0) -> np.ndarray:
    """CIFAR-10/100 in torchvision's extracted layout (python pickles); returns the test labels."""
    rng = np.random.default_rng(seed)
    classes = 10 if name == "cifar10" else 100
    label_key = "labels" if name == "cifar10" else "fine_labels"
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if name == "cifar10" else ["train"]

    def dump(fname: str, n: int) -> np.ndarray:
        labels = rng.integers(0, classes, n)
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(folder / fname, "wb") as f:
            pickle.dump({"data": data, label_key: labels.tolist()}, f)
        return labels

    for fname in train_files:
        dump(fname, per_batch)
    test_labels = dump("test_batch" if name == "cifar10" else "test", test)
    meta_file, meta_key = ("batches.meta", "label_names") if name == "cifar10" else ("meta", "fine_label_names")
    with open(folder / meta_file, "wb") as f:
        pickle.dump({meta_key: [f"class{i}" for i in range(classes)]}, f)
    return test_labels


def pretrain_digits(epochs: int = 6, seed: int = 0) -> nn.Module:
    """An R26_DIGITS ResNet trained in-process as the pretrain stage trains it (stochastic depth, SGD): a
    user's ResNet made in seconds, without Ray."""
    from torch.utils.data import DataLoader

    from blockdrop.data import load_dataset
    from blockdrop.execution import Executor
    from blockdrop.presets import get_preset
    from blockdrop.stages import Models, make_optimizer, train_epoch

    preset = get_preset("R26_DIGITS")
    torch.manual_seed(seed)
    backbone = preset.build_backbone()
    loader = DataLoader(load_dataset(preset, "train"), batch_size=64, shuffle=True)
    optimizer = make_optimizer("pretrain", backbone.parameters(), 0.05, 5e-4)
    for epoch in range(epochs):
        train_epoch("pretrain", Models(backbone, None, executor_train=Executor(backbone)), loader, optimizer, epoch,
                    -5.0, torch.device("cpu"), drop_rate=0.5)
    return backbone.eval()


@pytest.fixture(scope="session")
def user_resnet(tmp_path_factory) -> Path:
    """A user's pretrained R26_DIGITS ResNet as a file (blockdrop's checkpoint format, no policy): where jobs
    that test what comes after the pretrain stage start (--init), as users with their own ResNet do."""
    from blockdrop.checkpoints import save_checkpoint
    from blockdrop.presets import get_preset

    path = tmp_path_factory.mktemp("user-resnet") / "user.pt"
    save_checkpoint(path, get_preset("R26_DIGITS"), pretrain_digits(), None,
                    {"stage": "pretrain", "config": {"stage": "pretrain", "drop_rate": 0.5}})  # as the stage writes it
    return path


@pytest.fixture
def cifar10_dir(tmp_path: Path) -> Path:
    write_cifar(tmp_path)
    return tmp_path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(root: Path, port: int, allowed_hosts: str = "127.0.0.1:*,localhost:*") -> subprocess.Popen:
    """`cluster/mlflow/serve.sh`, the team server's documented command, on localhost: sqlite instead
    of PostgreSQL, a folder instead of S3. Returns once /health answers."""
    import time
    import urllib.request

    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{root / 'tracking.db'}",  # not MLflow's default name
           "MLFLOW_ARTIFACTS_DESTINATION": str(root / "artifacts"), "MLFLOW_SERVER_ALLOWED_HOSTS": allowed_hosts,
           "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1",
           "MLFLOW": str(Path(sys.executable).parent / "mlflow")}
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(["bash", str(REPO / "cluster" / "mlflow" / "serve.sh")], cwd=root, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            stop_process_group(proc)
            raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)


def stop_process_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM to the process group a test started (start_new_session), SIGKILL if it lingers."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def mlflow_server_root(tmp_path_factory) -> Path:
    """The folder of the session's MLflow server: tracking.db, artifacts/, server.log."""
    return tmp_path_factory.mktemp("mlflow-server")


@pytest.fixture(scope="session")
def mlflow_server(mlflow_server_root) -> str:
    """A real `mlflow server` process on localhost (sqlite backend, local artifacts)."""
    port = _free_port()
    proc = start_mlflow_server(mlflow_server_root, port)
    yield f"http://127.0.0.1:{port}"
    stop_process_group(proc)
