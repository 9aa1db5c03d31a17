"""The Quickstart's main job: train the offline preset end to end, then sweep gamma from the
checkpoint before its finetuning, on one embedded Ray and the local MLflow store.

    python -m blockdrop.quickstart [--name NAME] [--penalties -5,-20,-100] [--sweep-epochs 10]

Equivalent to `python train_job.py --name NAME` followed by
`python tune_penalty.py --init checkpoints/NAME-depth.pt --penalties ... --name NAME-sweep` (the depth
policy's stages: pretrain, nest, depth, finetune; with BlockDrop's own policy the sweep starts from
NAME-curriculum.pt).
"""
from __future__ import annotations

import argparse
import time

from blockdrop.cli import run_sweep, run_train
from blockdrop.errors import run_cli
from blockdrop.parsers.train import DEFAULT_POLICY


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m blockdrop.quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default=f"quickstart-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--penalties", default="-5,-20,-100",
                        help="gammas of the sweep (default -5,-20,-100: the depth policy gives an image more blocks when "
                             "its chance of being right rises by more than about 1/(1 - gamma) times the share of "
                             "the ResNet's FLOPs they add)")
    parser.add_argument("--sweep-epochs", default="10", help="finetune epochs per sweep trial (default 10)")
    args = parser.parse_args(argv)
    run_train(["--name", args.name])
    before = "depth" if DEFAULT_POLICY == "depth" else "curriculum"  # the stage before finetuning
    print(f"\n== sweep of gamma over {args.penalties}, starting from the {before} checkpoint", flush=True)
    run_sweep(["--init", f"checkpoints/{args.name}-{before}.pt", "--penalties", args.penalties,
               "--epochs", args.sweep_epochs, "--name", f"{args.name}-sweep"])


if __name__ == "__main__":
    run_cli(main)
