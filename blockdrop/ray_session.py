"""Starting or joining Ray for a job or a sweep, the environment its workers get, and where runs are kept."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import ray

from blockdrop.console import drop_harmless_worker_lines, quiet_ray, stop_on_sigterm
from blockdrop.choices import DEFAULT_STORAGE
from blockdrop.errors import UserError

# Ray Train's controller polls workers every 2 s by default and each report waits for it:
# 2 s lost per epoch. Set where the controller runs, through the job's runtime environment.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
# A Ray of this process's own (no address) runs on this machine alone: no spot node to lose, so none of Ray
# Train's preemption watchers (an actor, a process, per stage) that a cluster's stages keep.
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def job_env_vars() -> dict[str, str]:
    """TRAIN_ENV minus what the submitted job's own runtime env sets: Ray refuses to merge the same
    variable from the job and from ray.init, and the user's value is the one to keep."""
    taken = _submitted_runtime_env().get("env_vars") or {}
    return {key: value for key, value in TRAIN_ENV.items() if key not in taken}


def _submitted_runtime_env() -> dict:
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return job_config.get("runtime_env") or {}


def join_own_cluster() -> None:
    """Every worker process of the job (a worker_process_setup_hook): Ray's State API, which Ray Train's
    PlacementGroupCleaner calls without an address, finds this worker's own cluster through RAY_ADDRESS
    rather than by scanning the machine, which fails with a traceback where two Rays run side by side."""
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def runtime_env() -> dict:
    """The runtime environment of a job's or sweep's workers, minus what a submitted job sets itself."""
    env: dict = {"env_vars": job_env_vars()}
    if "worker_process_setup_hook" not in _submitted_runtime_env():
        env["worker_process_setup_hook"] = join_own_cluster
    return env


def start_ray(address: str | None, use_gpu: bool, num_workers: int, storage_path: str | None = None) -> None:
    """Join the cluster at `address` (else $RAY_ADDRESS, else a local Ray started here) and say what it
    lacks for `num_workers` workers; a UserError for --gpu on a cluster without GPUs."""
    quiet_ray()
    # no address: a Ray of its own ("local"); ray.init(address=None) would join whichever Ray a `ray start`
    # left running on this machine, unasked (another user's cluster, another job's CPUs)
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    local = LOCAL_TRAIN_ENV if address == "local" else {}
    for key, value in (TRAIN_ENV | local).items():  # a local Ray started here passes them on to its controller
        os.environ.setdefault(key, value)
    if not ray.is_initialized():
        ray.init(address=address, logging_level=logging.WARNING, runtime_env=runtime_env())
    drop_harmless_worker_lines()
    stop_on_sigterm()
    resources = ray.cluster_resources()
    if use_gpu and resources.get("GPU", 0) < 1:
        raise UserError("--gpu was given but the Ray cluster has no GPU")
    need = "GPU" if use_gpu else "CPU"
    if resources.get(need, 0) < num_workers:
        print(f"note: {num_workers} workers need {num_workers} {need}s; the cluster has "
              f"{resources.get(need, 0):g} now (an autoscaling cluster adds them)", file=sys.stderr)
    nodes = sum(node["Alive"] for node in ray.nodes())
    if nodes > 1 and not storage_path:
        print(f"note: {nodes} nodes and no --storage-path: checkpoints go to ./{DEFAULT_STORAGE} on each worker's node; "
              "give shared storage (NFS path or s3://...) so every node and this driver see them", file=sys.stderr)


def storage_location(path: str | None) -> str:
    """Ray run storage as Ray wants it: an absolute local path (workers chdir elsewhere) or a URI. Default:
    ./ray_results, so a job's Ray state belongs to the folder it ran in, not to a folder shared by unrelated
    work (~/ray_results, Ray's own default)."""
    if path and "://" in path:
        return path
    return str(Path(path or DEFAULT_STORAGE).resolve())


def output_folder(flag: str | None, storage: str | None, name: str) -> Path:
    """Where a job's checkpoints go: --output; else next to Ray's run storage when that is a path (shared
    storage on a cluster outlives a submitted job's temporary working directory); else ./checkpoints.
    With a storage URI (s3://...) the checkpoints are MLflow artifacts and Ray checkpoints there."""
    if flag:
        return Path(flag)
    if storage and "://" not in storage:
        return Path(storage) / name / "checkpoints"
    return Path("checkpoints")
