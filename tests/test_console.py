"""What the project keeps off users' consoles, and only that: the notices Ray, Serve and PyTorch print
that are harmless here, each dropped by its own words."""
from __future__ import annotations

import json
import logging

from blockdrop.console import DropMessages, harmless_line_filter, quiet_serve


def test_ddps_false_alarm_about_unused_parameters_is_dropped_and_its_neighbours_kept():
    keep = harmless_line_filter()
    ddp = ("[rank0]:[W1202 19:00:54.122343688 reducer.cpp:1529] Warning: find_unused_parameters=True was specified in "
           "DDP constructor, but did not find any unused parameters in the forward pass. This flag results in an extra "
           "traversal of the autograd graph every iteration")
    other = "[rank0]:[W1202 19:00:54.1 reducer.cpp:1400] Warning: grad strides do not match bucket view strides"
    assert keep(7, [ddp, "[finetune] epoch 1/15  loss 0.3", other]) == ["[finetune] epoch 1/15  loss 0.3", other]


def test_serves_notice_that_it_applies_no_new_options_is_dropped_and_nothing_else(caplog):
    quiet_serve()
    logger = logging.getLogger("ray.serve")
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        logger.info('Connecting to existing Serve app in namespace "serve". New http_options/controller_options '
                    "will not be applied.")
        logger.info("Application 'blockdrop' is ready at http://127.0.0.1:8000/.")
    assert [r.getMessage() for r in caplog.records] == ["Application 'blockdrop' is ready at http://127.0.0.1:8000/."]
    assert any(isinstance(f, DropMessages) for f in logger.filters)


def test_every_worker_of_a_job_finds_its_own_cluster_unless_the_submitted_job_sets_its_own_hook(monkeypatch):
    """Ray Train's PlacementGroupCleaner asks Ray's State API without an address; with two Rays on one
    machine the scan for one fails with a traceback. The job's workers get RAY_ADDRESS from a setup hook."""
    from blockdrop.ray_session import TRAIN_ENV, join_own_cluster, runtime_env

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    env = runtime_env()
    assert env["worker_process_setup_hook"] is join_own_cluster and env["env_vars"] == TRAIN_ENV
    submitted = {"runtime_env": {"worker_process_setup_hook": "theirs.setup", "env_vars": dict(TRAIN_ENV)}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(submitted))
    assert runtime_env() == {"env_vars": {}}  # theirs are kept: Ray refuses to merge the same keys


def test_the_raylets_notice_that_serves_shutdown_killed_its_own_controller_is_dropped(monkeypatch, capsys):
    """serve.shutdown() ends with its controller killed while its graceful-shutdown call is pending; the
    raylet tells the driver (even with log_to_driver=False) as if a task had failed. Its other messages,
    real failures among them, are printed."""
    import ray._private.worker as ray_worker

    from blockdrop.console import drop_harmless_worker_lines

    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)  # restored afterwards
    assert drop_harmless_worker_lines()
    for message in ("Task ServeController.graceful_shutdown failed. There are infinite retries remaining, so the task "
                    "will be retried. Error: The actor is dead because it was killed by `ray.kill`.",
                    "A worker died or was killed while executing a task by an unexpected system error."):
        ray_worker.print_to_stdstream({"lines": [message], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    out = capsys.readouterr().out
    assert "graceful_shutdown" not in out and "A worker died or was killed" in out
