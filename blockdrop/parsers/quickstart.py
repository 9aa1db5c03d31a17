"""The Quickstart's flags (`python -m blockdrop.quickstart`)."""
from __future__ import annotations

import argparse
import time

DESCRIPTION = """\
The Quickstart's main job: train the offline preset end to end, then sweep gamma from the
checkpoint before its finetuning, on one embedded Ray and the local MLflow store.

Equivalent to `python train_job.py --name NAME` followed by
`python tune_penalty.py --init checkpoints/NAME-depth.pt --penalties ... --name NAME-sweep` (the depth
policy's stages: pretrain, nest, depth, finetune; with BlockDrop's own policy the sweep starts from
NAME-curriculum.pt).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m blockdrop.quickstart", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default=f"quickstart-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--penalties", default="-5,-20,-100",
                        help="gammas of the sweep (default -5,-20,-100: the depth policy gives an image more blocks when "
                             "its chance of being right rises by more than about 1/(1 - gamma) times the share of "
                             "the ResNet's FLOPs they add)")
    parser.add_argument("--sweep-epochs", default="10", help="finetune epochs per sweep trial (default 10)")
    return parser
