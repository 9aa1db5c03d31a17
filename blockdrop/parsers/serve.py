"""serve_policy.py's flags and the checks they allow before anything is loaded."""
from __future__ import annotations

import argparse

from blockdrop.choices import check_preset_name
from blockdrop.errors import UserError

EPILOG = """\
URIs (repeat --model-uri to serve several; a request then picks one):
  models:/NAME@ALIAS       a registered version by alias (e.g. models:/blockdrop-R26_DIGITS@fastest)
  models:/NAME/VERSION     a registered version
  models:/NAME             every version of a registered model: a sweep's whole front
  runs:/RUN_ID             the checkpoint a train_job.py / tune_penalty.py run logged
  PATH                     a checkpoint file (this project's or an original BlockDrop one; --preset if
                           the file does not say)
Without --model-uri: the Quickstart's front, models:/blockdrop-R26_DIGITS, from the MLflow store.

Requests:
  curl -s -X POST --data-binary @digit.png -H 'Content-Type: image/png' http://127.0.0.1:8000/predict
  curl -s -X POST 'http://127.0.0.1:8000/predict?max_flops=3e6' --data-binary @digit.png -H 'Content-Type: image/png'
  curl -s -X POST http://127.0.0.1:8000/predict -H 'Content-Type: application/json' \\
       -d '{"images": ["<base64 PNG>", "..."], "model": "most_accurate"}'
  curl -s http://127.0.0.1:8000/metadata
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Serve BlockDrop on Ray Serve: each image gets its own policy and only its blocks run, "
                    "inside dynamic batches; several models (a Pareto front) behind one endpoint.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", action="append", dest="model_uris", metavar="URI",
                        help="model to serve (repeatable; see below)")
    parser.add_argument("--preset", help="preset of a checkpoint file that does not record one")
    parser.add_argument("--backbone", metavar="FILE",
                        help="the pretrained ResNet for a checkpoint file that holds only a policy (an original "
                             "BlockDrop curriculum checkpoint); overrides the ResNet of a file that has one")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=1, help="fixed number of replicas (default 1)")
    scale.add_argument("--autoscale", metavar="MIN,MAX", help="autoscale between MIN and MAX replicas")
    parser.add_argument("--max-batch-size", type=int, default=32, help="images per dynamic batch (default 32)")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="how long a batch waits to fill (default 5 ms)")
    parser.add_argument("--max-images", type=int, default=64, help="images per request, at most (default 64)")
    parser.add_argument("--max-body-mb", type=float, default=8.0, help="request body size limit in MB (default 8)")
    parser.add_argument("--cpus-per-replica", type=int, default=1,
                        help="CPUs Ray reserves for each replica; PyTorch uses as many threads (default 1)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per replica")
    parser.add_argument("--address", help="deploy onto this Ray cluster and return (default: a local Ray, in the "
                                          "foreground until Ctrl-C)")
    parser.add_argument("--mlflow-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--name", default="blockdrop", help="Serve application name (default blockdrop)")
    return parser


def autoscale(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        low, high = (int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--autoscale wants MIN,MAX (e.g. 1,4), not {text!r}") from None
    if not 0 <= low <= high or high < 1:
        raise UserError(f"--autoscale wants 0 <= MIN <= MAX and MAX >= 1, not {text!r}")
    return low, high


def check_flags(args: argparse.Namespace) -> tuple[int, int] | None:
    """Every check of the flags alone (no file read, no torch); the autoscaling range, if asked for."""
    for flag in ("max_batch_size", "max_images", "replicas", "cpus_per_replica"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, not {getattr(args, flag)}")
    if not 0 <= args.batch_wait_ms <= 10_000:
        raise UserError(f"--batch-wait-ms must be 0..10000, not {args.batch_wait_ms:g}")
    if not 0 < args.max_body_mb <= 4096:  # NaN and inf fail here too
        raise UserError(f"--max-body-mb must be a size in MB in (0, 4096], not {args.max_body_mb:g}")
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port must be 1..65535, not {args.port}")
    scale = autoscale(args.autoscale)
    if args.backbone and (not args.model_uris or any(u.startswith(("models:", "runs:")) for u in args.model_uris)):
        raise UserError("--backbone applies to checkpoint files; models:/ and runs:/ URIs already hold their ResNet")
    if args.preset:
        check_preset_name(args.preset)
    return scale
