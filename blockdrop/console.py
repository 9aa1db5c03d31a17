"""What Ray, Serve and PyTorch print that users need not see, kept off their console.

Each filter names the messages it drops and why they are harmless here; everything else, errors
included, is printed as before (and every line stays in Ray's log files).
"""
from __future__ import annotations

import logging
import os
import re


class DropMessages(logging.Filter):
    """A logging filter that drops the records whose message holds one of `needles`."""

    def __init__(self, *needles: str):
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.needles)


def quiet_ray() -> None:
    """Ray's console output down to what a user needs: progress and errors. Before ray.init."""
    for key, value in {"RAY_DEDUP_LOGS": "1", "RAY_AIR_NEW_OUTPUT": "0"}.items():
        os.environ.setdefault(key, value)
    # A local Ray started here says that it turned on token authentication: by design, not news.
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        DropMessages("Token authentication is enabled"))


def quiet_serve() -> None:
    """serve.run after serve.start (which set the HTTP host and port) says, at INFO, that it connects to
    the Serve instance just started and applies no new options: there were none to apply."""
    logging.getLogger("ray.serve").addFilter(DropMessages("Connecting to existing Serve app"))


# Lines Ray's workers print that are known to be harmless here, and read like failures on a console:
HARMLESS_WORKER_LINES = (
    # Ray Train V2 starts its PreemptionWatcher (spot-node preemption handling, kept on a cluster) with restarts on;
    # the core worker then logs at ERROR level that restarting would need its constructor arguments.
    "has constructor arguments in the object store and max_restarts > 0",
    # Serve's shutdown kills its controller while a graceful-shutdown call is pending, and says so.
    "Task ServeController.graceful_shutdown failed",
    # DDP with find_unused_parameters (only where a worker's rows can skip a block: blockdrop.stages) on a
    # step whose rows ran every block. PyTorch itself calls it a possible false positive "if your model
    # has flow control causing later iterations to have unused parameters", which a per-image policy is.
    "find_unused_parameters=True was specified in DDP constructor, but did not find any unused parameters",
)


# Messages Ray's workers log with a traceback that are known to be harmless and say so themselves: the
# message and the traceback that follows it go. Ray Train V2's controller, on a machine whose CPUs are
# busy (a 2-core laptop training), logs a page-long GetTimeoutError traceback for each late
# autoscaling request, though "it's safe to ignore this error" if transient.
HARMLESS_WORKER_TRACEBACKS = ("Failed to send resource request for train-",)
_TRACEBACK_LINES = ("Traceback (most recent call last)", "During handling of the above exception",
                    "The above exception was the direct cause")


def harmless_line_filter(needles: tuple[str, ...] = HARMLESS_WORKER_LINES,
                         tracebacks: tuple[str, ...] = HARMLESS_WORKER_TRACEBACKS):
    """keep(pid, lines) -> the lines to print: without the lines holding a needle, and without a harmless
    message's traceback (its lines up to the exception's own line, which is the one not indented). A
    traceback may arrive over several batches of a process's lines: where each process stands is kept."""
    skipping: set = set()

    def keep(pid, lines: list[str]) -> list[str]:
        out = []
        for line in lines:
            if pid in skipping:
                if not line.strip() or line[:1].isspace() or line.startswith(_TRACEBACK_LINES):
                    continue
                skipping.discard(pid)
                if re.match(r"[\w.]*(Error|Exception)\b", line):  # the exception's own line ends it
                    continue
            if any(n in line for n in tracebacks):
                skipping.add(pid)
                continue
            if not any(n in line for n in needles):
                out.append(line)
        return out

    return keep


def drop_harmless_worker_lines(needles: tuple[str, ...] = HARMLESS_WORKER_LINES) -> bool:
    """Filter the worker output Ray forwards to this driver's console, and the raylet's messages about this
    job's tasks (printed even with log_to_driver=False): the lines above go (they stay in Ray's log files),
    everything else, errors included, is printed as before. Call after ray.init. Ray has no public hook for
    this; if its internals change, nothing is filtered (False)."""
    try:
        import ray._private.worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    keep = harmless_line_filter(needles)

    def wrap(handler):
        if getattr(handler, "blockdrop_filtered", False):
            return handler

        def filtered(data, *args, **kwargs):
            lines = keep(data.get("pid"), data.get("lines", []))
            if lines:
                handler({**data, "lines": lines}, *args, **kwargs)
        filtered.blockdrop_filtered = True
        return filtered

    with dispatcher._lock:
        dispatcher.handlers = [(name, wrap(h)) for name, h in dispatcher.handlers]
    if hasattr(ray_worker, "print_to_stdstream"):  # the raylet's messages: listen_error_messages calls it by name
        ray_worker.print_to_stdstream = wrap(ray_worker.print_to_stdstream)
    return True


def stop_on_sigterm() -> None:
    """SIGTERM (what Kubernetes, systemd and Docker send) stops this process as Ctrl-C does, through its
    KeyboardInterrupt paths: runs closed, Ray shut down, a line that says so. Call it after ray.init, whose
    handler dumps a native stack and leaves Ray's dashboard and runtime-env agents behind."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)
