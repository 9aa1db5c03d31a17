"""serve_policy.py's work: check the models, start Ray and Serve, deploy, answer until Ctrl-C."""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time

import ray
from ray import serve

from blockdrop.console import drop_harmless_worker_lines, quiet_ray, quiet_serve, stop_on_sigterm
from blockdrop.errors import UserError
from blockdrop.parsers.serve import check_flags
from blockdrop.serve_app import build
from blockdrop.serving import Engine, ModelSource, load_sources


def _port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port") from None


def _print_served(args: argparse.Namespace, sources: list[ModelSource], engine: Engine, url: str) -> None:
    print(f"serving {engine.preset.name} on {url}: {len(sources)} model(s), default {engine.choose()}", flush=True)
    for s in sources:
        aliases = f" ({', '.join(s.aliases)})" if s.aliases else ""
        figures = (f"accuracy {s.accuracy:.3f}, FLOPs/img {s.flops:.3E}" if s.accuracy is not None and s.flops is not None
                   else "no recorded figures")
        print(f"  {s.label}{aliases}: {s.name}, {figures}", flush=True)
    print(f"try: curl -s {url}/metadata", flush=True)


def _wait_until_interrupted() -> None:
    port = next((n.get("MetricsExportPort") for n in ray.nodes() if n.get("Alive")), None)
    if port:  # Ray's metrics agent: blockdrop_* (requests, blocks used, FLOPs saved, batch sizes) and Serve's own
        print(f"metrics (Prometheus): http://127.0.0.1:{port}/metrics (blockdrop_* series, updated every ~10 s)",
              flush=True)
    print("Ctrl-C (or SIGTERM) stops the server", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


def run(args: argparse.Namespace) -> None:
    """Every check first (flags, URIs, the models themselves, the port), then Ray, Serve and the app."""
    autoscale = check_flags(args)
    sources, engine = load_sources(args)
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address is None:
        _port_free(args.host, args.port)
    quiet_ray()
    quiet_serve()
    # no address: a Ray of its own ("local"), never whichever cluster happens to run on this machine
    ray.init(address=address or "local", logging_level=logging.WARNING, log_to_driver=False)
    drop_harmless_worker_lines()
    stop_on_sigterm()
    if args.gpu and ray.cluster_resources().get("GPU", 0) < 1:
        raise UserError("--gpu was given but the Ray cluster has no GPU")
    if address is None:  # a local Ray: no node will join, so a replica that does not fit would wait forever
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if args.cpus_per_replica > cpus:
            ray.shutdown()
            raise UserError(f"--cpus-per-replica {args.cpus_per_replica}: this machine's Ray has {cpus} CPU(s); "
                            f"a replica could never start")
    serve.start(http_options={"host": args.host, "port": args.port}, logging_config={"log_level": "WARNING"})
    app = build(sources, engine.preset.name, "cuda" if args.gpu else "cpu", args.max_batch_size,
                args.batch_wait_ms, args.max_images, int(args.max_body_mb * (1 << 20)),
                replicas=args.replicas, autoscale=autoscale, cpus=args.cpus_per_replica)
    serve.run(app, name=args.name, route_prefix="/", blocking=False)
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    _print_served(args, sources, engine, url)
    if address:
        print(f"deployed onto {address} as application {args.name!r}; stop it with `serve shutdown` or "
              f"`serve delete {args.name}`", flush=True)
        return
    _wait_until_interrupted()
