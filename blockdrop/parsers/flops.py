"""`python -m blockdrop.flops`'s flags and the checks they allow before torch is imported."""
from __future__ import annotations

import argparse

from blockdrop.choices import PRESET_NAMES, check_preset_name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m blockdrop.flops",
        description="Print a preset's analytic FLOPs: each residual block, the full model and the "
                    "policy network, in the paper's convention.",
    )
    parser.add_argument("--preset", required=True, help=f"one of: {', '.join(PRESET_NAMES)}")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def check_flags(args: argparse.Namespace) -> None:
    check_preset_name(args.preset)
