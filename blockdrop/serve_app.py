"""The Ray Serve deployment: HTTP in, dynamic batches, per-image sparse execution, the front behind one URL.

One deployment holds every served model (a sweep's front: a handful of small models of one preset),
rather than one deployment per model or Serve's model multiplexing: any replica can answer any
request without a second hop, the budget / alias routing is a lookup in the replica, and requests
for different models still share `@serve.batch` batches (grouped per model inside the batch).
Multiplexing pays off for many large models that do not fit one replica, which a front is not.
"""

import asyncio
import os
import tempfile
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import metrics

from blockdrop.parsers.serve import build_parser, check_flags
from blockdrop.serving import Engine, ModelSource, RequestError, load_sources, parse_images, routing

api = FastAPI(title="BlockDrop", description="Per-image block dropping: POST /predict, GET /metadata, GET /healthz")


@serve.deployment(name="BlockDrop")
@serve.ingress(api)
class BlockDropServer:
    def __init__(self, sources: list[dict], weights: list[bytes], preset: str | None = None, device: str = "cpu",
                 max_batch_size: int = 32, batch_wait_ms: float = 5.0, max_images: int = 64,
                 max_bytes: int = 8 << 20):
        torch.set_grad_enabled(False)
        # The checkpoints travel with the deployment (Ray's object store), not as paths: a replica may
        # run on a node that never saw the file the driver resolved or downloaded.
        self.folder = tempfile.mkdtemp(prefix="blockdrop-serve-")
        local = []
        for i, (source, data) in enumerate(zip(sources, weights)):
            path = os.path.join(self.folder, f"{i}-{os.path.basename(source['checkpoint'])}")
            with open(path, "wb") as f:
                f.write(data)
            local.append(ModelSource(**{**source, "checkpoint": path}))
        self.engine = Engine(local, preset, device)
        self.max_images, self.max_bytes = max_images, max_bytes
        self.infer.set_max_batch_size(max_batch_size)
        self.infer.set_batch_wait_timeout_s(batch_wait_ms / 1000.0)
        blocks = self.engine.preset.num_blocks
        self.requests = metrics.Counter("blockdrop_requests", "requests answered, by model", tag_keys=("model",))
        self.blocks = metrics.Histogram("blockdrop_blocks_used", "blocks run per image",
                                        boundaries=[b + 0.5 for b in range(blocks)], tag_keys=("model",))
        self.saved = metrics.Counter("blockdrop_flops_saved", "FLOPs not spent against the full model", tag_keys=("model",))
        self.batch_sizes = metrics.Histogram("blockdrop_batch_size", "images per model call",
                                             boundaries=[1.5, 2.5, 4.5, 8.5, 16.5, 32.5, 64.5])
        self.largest_batch = 0

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def infer(self, items: list[tuple[str, torch.Tensor, tuple]]) -> list[dict]:
        """One dynamic batch: images of every request that arrived together, grouped per model; each image at
        its own request's budget (a (mean target, cap) pair), so different budgets share one batch."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, (label, _, _) in enumerate(items):
            groups[label].append(i)
        answers: list[dict | None] = [None] * len(items)
        for label, idx in groups.items():
            batch = torch.stack([items[i][1] for i in idx])
            self.batch_sizes.observe(len(idx))
            self.largest_batch = max(self.largest_batch, len(idx))
            for i, answer in zip(idx, self.engine.predict(label, batch, [items[i][2] for i in idx])):
                answers[i] = answer
                self.blocks.observe(answer["blocks_used"], tags={"model": label})
                if answer["flops"] < answer["full_flops"]:  # Ray's counters refuse increments of 0
                    self.saved.inc(answer["full_flops"] - answer["flops"], tags={"model": label})
        return answers

    @api.post("/predict")
    async def predict(self, request: Request):
        try:
            body = await self.read_body(request)
            images, fields = parse_images(body, request.headers.get("content-type", ""), self.max_images)
            ask = routing({**dict(request.query_params), **fields})
            label = self.engine.choose(ask.model, self.engine.mean_flops(ask), ask.max_flops)
            budget = self.engine.ask(label, ask)
            tensors = [self.engine.decode(data) for data in images]
        except RequestError as err:
            return JSONResponse({"error": str(err)}, status_code=err.status)
        answers = await asyncio.gather(*(self.infer((label, t, budget)) for t in tensors))
        self.requests.inc(tags={"model": label})
        return {"predictions": answers}

    async def read_body(self, request: Request) -> bytes:
        """The body, or a 413 once it passes the limit; the rest is read and dropped (not kept in memory)
        so that the client, still sending, gets the answer rather than a reset connection."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= self.max_bytes:
                chunks.append(chunk)
        if size > self.max_bytes:
            raise RequestError(f"body of {size} bytes; the limit is {self.max_bytes} (--max-body-mb)", 413)
        return b"".join(chunks)

    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok", "models": len(self.engine.models)}

    @api.get("/metadata")
    async def metadata(self):
        return {**self.engine.metadata(), "largest_batch_seen": self.largest_batch}


def build(sources: list[ModelSource], preset: str | None, device: str, max_batch_size: int, batch_wait_ms: float,
          max_images: int, max_bytes: int, replicas: int | None = None, autoscale: tuple[int, int] | None = None,
          cpus: int = 1):
    """The application to `serve.run`. Ray gives a replica's process as many OpenMP (PyTorch) threads as
    the CPUs it reserves for it."""
    options: dict = {"ray_actor_options": {"num_gpus": 1 if device == "cuda" else 0, "num_cpus": cpus}}
    if autoscale:
        options["autoscaling_config"] = {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                         "target_ongoing_requests": 2 * max_batch_size}
    else:
        options["num_replicas"] = replicas or 1
    options["max_ongoing_requests"] = 4 * max_batch_size
    weights = [Path(s.checkpoint).read_bytes() for s in sources]
    return BlockDropServer.options(**options).bind(
        [asdict(s) for s in sources], weights, preset, device, max_batch_size, batch_wait_ms, max_images, max_bytes)


def app_builder(args: dict):
    """For a Serve config file (`serve deploy`, KubeRay's RayService): `import_path:
    blockdrop.serve_app:app_builder` with `args` = serve_policy.py's flags as keys (model_uris, preset,
    backbone, mlflow_uri, gpu, max_batch_size, batch_wait_ms, max_images, max_body_mb, replicas, autoscale,
    cpus_per_replica)."""
    argv = [f"--model-uri={uri}" for uri in args.get("model_uris", [])]
    for key in ("preset", "backbone", "mlflow_uri", "max_batch_size", "cpus_per_replica", "batch_wait_ms", "max_images", "max_body_mb",
                "replicas", "autoscale"):
        if args.get(key) is not None:
            argv.append(f"--{key.replace('_', '-')}={args[key]}")
    if args.get("gpu"):
        argv.append("--gpu")
    parsed = build_parser().parse_args(argv)
    autoscale = check_flags(parsed)
    sources, engine = load_sources(parsed)  # Serve's proxy owns the port here: no port check
    return build(sources, engine.preset.name, "cuda" if parsed.gpu else "cpu", parsed.max_batch_size,
                 parsed.batch_wait_ms, parsed.max_images, int(parsed.max_body_mb * (1 << 20)),
                 replicas=parsed.replicas, autoscale=autoscale, cpus=parsed.cpus_per_replica)
