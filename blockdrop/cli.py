"""The commands: what train_job.py, tune_penalty.py, serve_policy.py and the console scripts `pip install`
puts on PATH (pyproject.toml, [project.scripts]) run.

    blockdrop-train        python train_job.py
    blockdrop-sweep        python tune_penalty.py
    blockdrop-serve        python serve_policy.py
    blockdrop-evaluate     python -m blockdrop.evaluate
    blockdrop-flops        python -m blockdrop.flops
    blockdrop-sample-data  python -m blockdrop.sample_data
    blockdrop-quickstart   python -m blockdrop.quickstart

Each parses and checks its flags first (blockdrop.parsers: no torch, Ray or MLflow, so `--help` and a bad
flag answer at once), then plans what needs files (torch), and only then imports the module that does the
work: the imports inside these functions are the point of this module. Errors and exit statuses are
blockdrop.errors.run_cli's: a UserError is `error: ...` and exit 2.
"""
from __future__ import annotations

from blockdrop import preflight
from blockdrop.errors import run_cli
from blockdrop.parsers import evaluate as evaluate_flags
from blockdrop.parsers import flops as flops_flags
from blockdrop.parsers import quickstart as quickstart_flags
from blockdrop.parsers import serve as serve_flags
from blockdrop.parsers import sweep as sweep_flags
from blockdrop.parsers import train as train_flags


def run_train(argv: list[str] | None = None) -> None:
    """train_job.py ARGV: a training job."""
    args = train_flags.build_parser().parse_args(argv)
    train_flags.check_flags(args)
    from blockdrop import plans

    plan = plans.validate(args)  # reads --init and the data: torch
    preflight.check_cluster_flags(args, preflight.resolve_uri(args.mlflow_uri))  # MLflow, storage, Ray answer
    from blockdrop import job

    job.run(args, plan)  # Ray, MLflow


def run_sweep(argv: list[str] | None = None) -> None:
    """tune_penalty.py ARGV: a gamma sweep."""
    args = sweep_flags.parse_args(argv)
    sweep_flags.check_flags(args)
    from blockdrop import plans

    plan = plans.plan_sweep(args)  # reads --init and the data: torch
    preflight.check_cluster_flags(args, preflight.resolve_uri(args.mlflow_uri))  # MLflow, storage, Ray answer
    from blockdrop import sweep as work

    work.run(args, plan)  # Ray, MLflow


def run_serve(argv: list[str] | None = None) -> None:
    """serve_policy.py ARGV: models behind HTTP on Ray Serve."""
    args = serve_flags.build_parser().parse_args(argv)
    serve_flags.check_flags(args)
    from blockdrop import serve_cli

    serve_cli.run(args)


def run_evaluate(argv: list[str] | None = None) -> None:
    """python -m blockdrop.evaluate ARGV: the evaluation report."""
    args = evaluate_flags.build_parser().parse_args(argv)
    evaluate_flags.check_flags(args)
    from blockdrop import evaluate as work

    work.run(args)


def run_flops(argv: list[str] | None = None) -> None:
    """python -m blockdrop.flops ARGV: a preset's analytic FLOPs."""
    args = flops_flags.build_parser().parse_args(argv)
    flops_flags.check_flags(args)
    from blockdrop import flops as work

    work.report(args)


def run_quickstart(argv: list[str] | None = None) -> None:
    """python -m blockdrop.quickstart ARGV: the main job, then a sweep from its checkpoint before finetuning."""
    args = quickstart_flags.build_parser().parse_args(argv)
    run_train(["--name", args.name])
    before = "depth" if train_flags.DEFAULT_POLICY == "depth" else "curriculum"  # the stage before finetuning
    print(f"\n== sweep of gamma over {args.penalties}, starting from the {before} checkpoint", flush=True)
    run_sweep(["--init", f"checkpoints/{args.name}-{before}.pt", "--penalties", args.penalties,
               "--epochs", args.sweep_epochs, "--name", f"{args.name}-sweep"])


def train() -> None:
    run_cli(run_train)


def sweep() -> None:
    run_cli(run_sweep)


def serve() -> None:
    run_cli(run_serve)


def evaluate() -> None:
    run_cli(run_evaluate)


def flops() -> None:
    run_cli(run_flops)


def sample_data() -> None:
    from blockdrop.sample_data import main

    run_cli(main)


def quickstart() -> None:
    run_cli(run_quickstart)
