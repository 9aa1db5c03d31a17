"""serve_policy.py: BlockDrop models behind HTTP on Ray Serve, dropped blocks skipped per image."""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time

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


def _autoscale(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        low, high = (int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--autoscale wants MIN,MAX (e.g. 1,4), not {text!r}") from None
    if not 0 <= low <= high or high < 1:
        raise UserError(f"--autoscale wants 0 <= MIN <= MAX and MAX >= 1, not {text!r}")
    return low, high


def _port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port") from None


def _with_backbone(sources, backbone: str, preset_name: str | None):
    """Each file source joined with the ResNet of `backbone` into one checkpoint of this project's format
    (in a temporary folder): what a replica loads is then one complete file, like any other model."""
    import tempfile
    from pathlib import Path

    from blockdrop.checkpoints import load_models, read_checkpoint, save_checkpoint
    from blockdrop.presets import get_preset

    folder = Path(tempfile.mkdtemp(prefix="blockdrop-serve-"))
    for s in sources:
        ckpt = read_checkpoint(s.checkpoint)
        name = ckpt.preset or preset_name
        if name is None:
            raise UserError(f"{s.checkpoint} does not say its preset: pass --preset")
        preset = get_preset(name)
        resnet, policy, ckpt = load_models(preset, s.checkpoint, backbone_file=backbone)
        if policy is None:
            raise UserError(f"{s.checkpoint} holds no policy network: not a BlockDrop model")
        s.checkpoint = str(folder / f"{s.label}.pt")
        save_checkpoint(s.checkpoint, preset, resnet, policy, ckpt.meta if isinstance(ckpt.meta, dict) else {})
    return sources


def validate(args: argparse.Namespace, check_port: bool = True):
    """Everything checked before anything is deployed: flags, URIs, the models themselves, the port.
    The flags first, before torch and MLflow are imported: a bad one answers at once."""
    for flag in ("max_batch_size", "max_images", "replicas", "cpus_per_replica"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, not {getattr(args, flag)}")
    if not 0 <= args.batch_wait_ms <= 10_000 or not args.max_body_mb > 0:
        raise UserError("--batch-wait-ms must be 0..10000 and --max-body-mb positive")
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port must be 1..65535, not {args.port}")
    autoscale = _autoscale(args.autoscale)
    if args.backbone and (not args.model_uris or any(u.startswith(("models:", "runs:")) for u in args.model_uris)):
        raise UserError("--backbone applies to checkpoint files; models:/ and runs:/ URIs already hold their ResNet")
    if args.preset:
        from blockdrop.presets import get_preset

        get_preset(args.preset)
    from blockdrop.serving import DEFAULT_MODEL, Engine, resolve
    from blockdrop.tracking import resolve_uri

    uri = resolve_uri(args.mlflow_uri)
    if args.model_uris:
        sources = resolve(args.model_uris, uri)
    else:
        try:
            sources = resolve([f"models:/{DEFAULT_MODEL}"], uri)
        except UserError:
            raise UserError(f"no --model-uri and no Quickstart front ({DEFAULT_MODEL}) in {uri}: run "
                            "`scripts/with-venv python -m blockdrop.quickstart` first, or pass --model-uri") from None
    if args.backbone:
        sources = _with_backbone(sources, args.backbone, args.preset)
    engine = Engine(sources, args.preset)  # loads every model once: a wrong file fails here, not in a replica
    if check_port and args.address is None and not os.environ.get("RAY_ADDRESS"):
        _port_free(args.host, args.port)
    return sources, engine, autoscale


def run(args: argparse.Namespace) -> None:
    sources, engine, autoscale = validate(args)
    import ray
    from ray import serve

    from blockdrop.distributed import quiet_ray_env
    from blockdrop.serve_app import build

    quiet_ray_env()
    address = args.address or os.environ.get("RAY_ADDRESS")
    # no address: a Ray of its own ("local"), never whichever cluster happens to run on this machine
    ray.init(address=address or "local", logging_level=logging.WARNING, log_to_driver=False)
    if args.gpu and ray.cluster_resources().get("GPU", 0) < 1:
        raise UserError("--gpu was given but the Ray cluster has no GPU")
    serve.start(http_options={"host": args.host, "port": args.port}, logging_config={"log_level": "WARNING"})
    app = build(sources, engine.preset.name, "cuda" if args.gpu else "cpu", args.max_batch_size,
                args.batch_wait_ms, args.max_images, int(args.max_body_mb * (1 << 20)),
                replicas=args.replicas, autoscale=autoscale, cpus=args.cpus_per_replica)
    serve.run(app, name=args.name, route_prefix="/", blocking=False)
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    default = engine.choose()
    print(f"serving {engine.preset.name} on {url}: {len(sources)} model(s), default {default}", flush=True)
    for s in sources:
        aliases = f" ({', '.join(s.aliases)})" if s.aliases else ""
        figures = (f"accuracy {s.accuracy:.3f}, FLOPs/img {s.flops:.3E}" if s.accuracy is not None and s.flops is not None
                   else "no recorded figures")
        print(f"  {s.label}{aliases}: {s.name}, {figures}", flush=True)
    print(f"try: curl -s {url}/metadata", flush=True)
    if address:
        print(f"deployed onto {address} as application {args.name!r}; stop it with `serve shutdown` or "
              f"`serve delete {args.name}`", flush=True)
        return
    port = next((n.get("MetricsExportPort") for n in ray.nodes() if n.get("Alive")), None)
    if port:  # Ray's metrics agent: blockdrop_* (requests, blocks used, FLOPs saved, batch sizes) and Serve's own
        print(f"metrics (Prometheus): http://127.0.0.1:{port}/metrics (blockdrop_* series, updated every ~10 s)",
              flush=True)
    print("Ctrl-C stops the server", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
