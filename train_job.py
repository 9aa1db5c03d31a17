"""Train BlockDrop on Ray Train (see `python train_job.py --help`)."""
from blockdrop.errors import run_cli
from blockdrop.job import build_parser, run

if __name__ == "__main__":
    run_cli(lambda: run(build_parser().parse_args()))
