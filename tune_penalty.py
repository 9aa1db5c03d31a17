"""Sweep BlockDrop's penalty gamma on Ray Tune; the Pareto front lands in MLflow (see --help)."""
from blockdrop.errors import run_cli
from blockdrop.sweep import parse_args, run

if __name__ == "__main__":
    run_cli(lambda: run(parse_args()))
