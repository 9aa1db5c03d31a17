"""Checks made before Ray starts: is MLflow there, can the run storage be written, does Ray answer?

Each failure is a UserError of one line naming the flag and what to do (exit 2), within a stated
timeout, instead of a traceback after Ray started or a connection retried forever.
"""
from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

from blockdrop.errors import UserError
from blockdrop.choices import DEFAULT_STORAGE

TIMEOUT_S = 5.0  # how long a server gets to answer a check
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks")


def resolve_uri(flag: str | None) -> str:
    """The MLflow tracking URI: the flag, else $MLFLOW_TRACKING_URI, else ./mlflow.db (MLflow 3's local default)."""
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def check_tracking_uri(uri: str, flag: str = "--mlflow-uri", timeout: float = TIMEOUT_S) -> None:
    """An MLflow tracking URI that MLflow can use: a server that answers /health, or a sqlite file that
    can be created; other database URIs are left to MLflow."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else ""
    if scheme not in TRACKING_SCHEMES:
        raise UserError(f"{flag} {uri}: not a tracking URI MLflow knows; use http(s)://HOST:PORT (a tracking "
                        "server), sqlite:///PATH.db, or a database URI (postgresql://...)")
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
                if response.status == 200:
                    return
                reason = f"HTTP {response.status}"
        except urllib.error.HTTPError as err:
            reason = f"HTTP {err.code}"
        except (OSError, ValueError) as err:
            reason = str(getattr(err, "reason", err))
        raise UserError(f"{flag} {uri}: no MLflow server answered within {timeout:g} s ({reason}); start it "
                        "(cluster/mlflow/serve.sh) or fix the URI")
    if scheme == "sqlite":
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if not path or path == ":memory:":
            return
        _writable(Path(path).parent, f"{flag} {uri}: the folder of the database")
        if Path(path).exists() and not os.access(path, os.W_OK):
            raise UserError(f"{flag} {uri}: {path} exists but cannot be written")


def check_storage(path: str | None, flag: str = "--storage-path") -> None:
    """A local run storage folder exists or can be created, and can be written (URIs: left to Ray)."""
    if path and "://" not in path:
        _writable(Path(path), f"{flag} {path}")


def _writable(folder: Path, what: str) -> None:
    """The folder exists and can be written, or can be created; what the check creates, it removes (a
    refused command leaves nothing behind)."""
    folder = folder.absolute()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what} is a file, not a folder; give a folder (it is made if missing)")
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{what} cannot be created ({err.strerror or err}); give a folder you can write") from None
    finally:
        for created in missing:  # deepest first
            try:
                created.rmdir()
            except OSError:
                pass
    if not missing and not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{what} cannot be written; give a folder you can write")


def check_ray_address(address: str | None, flag: str = "--address", timeout: float = TIMEOUT_S) -> None:
    """A Ray address (HOST:PORT of a head's GCS, or ray://HOST:PORT of a Ray Client server) that accepts
    a TCP connection; `auto`, `local` and no address are Ray's own business."""
    if not address or address in ("auto", "local"):
        return
    target = address.split("://", 1)[1] if "://" in address else address
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"{flag} {address}: expected HOST:PORT (the head's GCS, e.g. 10.0.0.1:6379) or ray://HOST:PORT")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return
    except OSError as err:
        raise UserError(f"{flag} {address}: nothing answered within {timeout:g} s ({err.strerror or err}); is the "
                        "Ray head running (ray start --head) and the port right?") from None


def check_cluster_flags(args, tracking_uri: str) -> None:
    """What train_job.py and tune_penalty.py check before starting Ray."""
    source = ("--mlflow-uri" if args.mlflow_uri else
              "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the default tracking URI")
    check_tracking_uri(tracking_uri, source)
    check_storage(args.storage_path or DEFAULT_STORAGE, "--storage-path" if args.storage_path else
                  f"the run storage ./{DEFAULT_STORAGE} (--storage-path)")
    if getattr(args, "output", None):  # train_job.py: where its checkpoints go
        _writable(Path(args.output), f"--output {args.output}")
    check_ray_address(args.address or os.environ.get("RAY_ADDRESS"),
                      "--address" if args.address else "RAY_ADDRESS")
