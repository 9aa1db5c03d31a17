"""The console scripts `pip install` puts on PATH (pyproject.toml, [project.scripts]).

Each runs the same code as the command it names, with the same errors and exit statuses
(blockdrop.errors.run_cli: a UserError is `error: ...` and exit 2):

    blockdrop-train        python train_job.py
    blockdrop-sweep        python tune_penalty.py
    blockdrop-serve        python serve_policy.py
    blockdrop-evaluate     python -m blockdrop.evaluate
    blockdrop-flops        python -m blockdrop.flops
    blockdrop-sample-data  python -m blockdrop.sample_data
    blockdrop-quickstart   python -m blockdrop.quickstart

The CLI modules are imported inside each function: a script loads only what it runs.
"""
from __future__ import annotations

from blockdrop.errors import run_cli


def train() -> None:
    from blockdrop.job import build_parser, run

    run_cli(lambda: run(build_parser().parse_args()))


def sweep() -> None:
    from blockdrop.sweep import parse_args, run

    run_cli(lambda: run(parse_args()))


def serve() -> None:
    from blockdrop.serve_cli import build_parser, run

    run_cli(lambda: run(build_parser().parse_args()))


def evaluate() -> None:
    from blockdrop.evaluate import main

    run_cli(main)


def flops() -> None:
    from blockdrop.flops import main

    run_cli(main)


def sample_data() -> None:
    from blockdrop.sample_data import main

    run_cli(main)


def quickstart() -> None:
    from blockdrop.quickstart import main

    run_cli(main)
