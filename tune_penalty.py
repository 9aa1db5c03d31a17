"""Sweep BlockDrop's penalty gamma on Ray Tune into an MLflow Pareto front (see `python tune_penalty.py --help`)."""
from blockdrop.cli import sweep

if __name__ == "__main__":
    sweep()
