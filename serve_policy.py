"""Serve BlockDrop models over HTTP on Ray Serve (see `python serve_policy.py --help`)."""
from blockdrop.errors import run_cli
from blockdrop.serve_cli import build_parser, run

if __name__ == "__main__":
    run_cli(lambda: run(build_parser().parse_args()))
