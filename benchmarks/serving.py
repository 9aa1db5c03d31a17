"""Serving throughput and latency: BlockDrop against the same server running the full model.

    scripts/with-venv python benchmarks/serving.py [--checkpoint QUICKSTART_FINETUNE.pt] [--clients 1,16,64]
        [--images-per-request 1,16] [--seconds 15] [--output benchmarks/results/serving_cpu.md]

Two models, each served by one `serve_policy.py`-style Ray Serve application (one replica, dynamic
batches of up to 32, 5 ms wait) next to its full-model twin (the same weights, every block run, no
policy network; `ModelSource(full=True)`), loaded one after the other:
- R110_C10 with a policy that keeps about 30% of the blocks (seeded weights: the policy's logits are
  scaled so that decisions are crisp and vary from image to image);
- the offline preset's trained model (`--checkpoint`, e.g. the Quickstart's
  checkpoints/quickstart-*-finetune.pt; skipped when not given).
Each client sends one PNG per request (Content-Type: image/png), then, in a second series, 16 PNGs per
request (JSON, base64), as a client scoring a folder would; requests/s, images/s and p50/p99 latency
are measured at each client count. A replica has one CPU (serve_policy.py's default), so PyTorch runs
one thread. Also: a direct call of the model (Engine.predict on one image, in-process),
so that Ray Serve's own overhead per request is stated. Target (issue 10): at 16+ clients,
BlockDrop's throughput gain over the full model >= 0.8 x its FLOPs speedup.
"""
from __future__ import annotations

import argparse
import os
import base64
import io
import json
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from results_table import emit  # noqa: E402

from blockdrop.checkpoints import read_checkpoint, save_checkpoint  # noqa: E402
from blockdrop.presets import get_preset  # noqa: E402
from blockdrop.serving import Engine, ModelSource  # noqa: E402


def r110_sparse(folder: Path) -> Path:
    preset = get_preset("R110_C10")
    torch.manual_seed(0)
    backbone, policy = preset.build_backbone().eval(), preset.build_policy().eval()
    with torch.no_grad():  # crisp, image-dependent decisions around the wanted keep rate
        policy.logit.weight.mul_(40.0)
        policy.logit.bias.fill_(-7.0)  # calibrated: about 30% of the blocks kept on these images
    path = folder / "r110_sparse.pt"
    save_checkpoint(path, preset, backbone, policy, {"stage": "finetune"})
    return path


def pngs(preset, count: int = 64) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    mode = "L" if preset.in_channels == 1 else "RGB"
    shape = (preset.image_size, preset.image_size) + (() if mode == "L" else (3,))
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def bodies(images: list[bytes], per_request: int) -> tuple[list[bytes], str]:
    """Request bodies of `per_request` images each, and their Content-Type."""
    if per_request == 1:
        return images, "image/png"
    return [json.dumps({"images": [base64.b64encode(images[(i + j) % len(images)]).decode()
                                   for j in range(per_request)]}).encode() for i in range(len(images))], "application/json"


def post(url: str, data: bytes, content_type: str = "image/png") -> float:
    began = time.perf_counter()
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()
    return time.perf_counter() - began


def load(url: str, images: list[bytes], clients: int, seconds: float, content_type: str = "image/png") -> dict[str, float]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    def client(k: int) -> None:
        i = k
        while time.perf_counter() < deadline:
            latencies.append(post(url, images[i % len(images)], content_type))
            i += clients

    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - began
    latencies.sort()
    return {"rps": len(latencies) / wall, "p50": 1000 * latencies[len(latencies) // 2],
            "p99": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], "n": len(latencies)}


def direct_ms(engine: Engine, label: str, images: list[bytes], reps: int = 50) -> float:
    tensors = [engine.decode(b) for b in images]
    times = []
    for i in range(reps):
        began = time.perf_counter()
        engine.predict(label, tensors[i % len(tensors)][None])
        times.append(time.perf_counter() - began)
    return 1000 * statistics.median(times)


def batched_gain(engine: Engine, images: list[bytes], batch: int = 32, reps: int = 10) -> tuple[float, float]:
    """Images/s of the model alone (no server) on batches of `batch`: BlockDrop and its full twin."""
    tensors = torch.stack([engine.decode(images[i % len(images)]) for i in range(batch)])
    rates = []
    for label in ("blockdrop", "full"):
        engine.predict(label, tensors)  # warm-up
        began = time.perf_counter()
        for _ in range(reps):
            engine.predict(label, tensors)
        rates.append(batch * reps / (time.perf_counter() - began))
    return rates[0], rates[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="the offline preset's trained model (a finetune checkpoint)")
    parser.add_argument("--clients", default="1,16,64")
    parser.add_argument("--images-per-request", default="1,16", help="images per request, one series each (default 1,16)")
    parser.add_argument("--seconds", type=float, default=15.0, help="load per client count and model (default 15)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "serving_cpu.md"),
                        help="where the table is also written (default benchmarks/results/serving_cpu.md)")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    per_request = [int(k) for k in args.images_per_request.split(",")]

    import ray
    from ray import serve

    from blockdrop.serve_app import build

    torch.set_num_threads(1)  # as in a replica of one CPU: the in-process figures compare with the served ones
    work = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    models = [("R110_C10, policy keeping ~30% of blocks (seeded)", r110_sparse(work))]
    if args.checkpoint:
        models.append((f"{read_checkpoint(args.checkpoint).preset}, trained ({Path(args.checkpoint).name})",
                       Path(args.checkpoint)))
    ray.init(address="local", logging_level="WARNING", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port}, logging_config={"log_level": "WARNING"})
    lines = [f"### Serving on CPU: BlockDrop vs the full model, same server ({platform.node() or 'host'}, "
             f"{os.cpu_count()} cores, torch {torch.__version__}, one replica of one CPU (1 PyTorch thread), batch <= 32, "
             "5 ms wait)",
             "", "| model | images / request | clients | full model req/s / img/s | BlockDrop req/s / img/s | throughput gain | "
             "FLOPs speedup | gain / FLOPs speedup | BlockDrop p50 / p99 ms | full p50 / p99 ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    overhead = []
    for title, checkpoint in models:
        sources = [ModelSource("blockdrop", "blockdrop", None, str(checkpoint)),
                   ModelSource("full", "full", None, str(checkpoint), full=True)]
        engine = Engine(sources)
        images = pngs(engine.preset)
        tensors = torch.stack([engine.decode(b) for b in images])
        answers = engine.predict("blockdrop", tensors)
        flops_speedup = engine.costs.full / statistics.mean(a["flops"] for a in answers)
        kept = statistics.mean(a["blocks_used"] for a in answers) / engine.preset.num_blocks
        serve.run(build(sources, None, "cpu", 32, 5.0, 64, 8 << 20), name="bench", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{args.port}/predict"
        for data in images[:8]:  # warm-up
            post(url + "?model=blockdrop", data), post(url + "?model=full", data)
        for k in per_request:
            payloads, content_type = bodies(images, k)
            for c in clients:
                full = load(url + "?model=full", payloads, c, args.seconds, content_type)
                sparse = load(url + "?model=blockdrop", payloads, c, args.seconds, content_type)
                gain = sparse["rps"] / full["rps"]
                print(f"{title}: {k} image(s)/request, {c} clients: full {full['rps'] * k:.1f} img/s, "
                      f"BlockDrop {sparse['rps'] * k:.1f} img/s ({gain / flops_speedup:.2f} of the FLOPs speedup)",
                      flush=True)
                lines.append(f"| {title}, {kept:.0%} of blocks kept | {k} | {c} | {full['rps']:.1f} / {full['rps'] * k:.0f} | "
                             f"{sparse['rps']:.1f} / {sparse['rps'] * k:.0f} | {gain:.2f}x | {flops_speedup:.2f}x | "
                             f"**{gain / flops_speedup:.2f}** | {sparse['p50']:.1f} / {sparse['p99']:.1f} | "
                             f"{full['p50']:.1f} / {full['p99']:.1f} |")
        one_client = load(url + "?model=blockdrop", images, 1, min(args.seconds, 5.0))
        alone = batched_gain(engine, images)
        # At saturation one replica's time per single-image request, less the model's time per image: what the
        # server spends per request besides the model (HTTP, Serve's proxy -> replica hop, ASGI, decode, batching).
        saturated = load(url + "?model=full", images, max(clients), min(args.seconds, 8.0))
        extra_ms = 1000 / saturated["rps"] - 1000 / alone[1]
        # The overhead below which single-image requests would reach 0.8 of the FLOPs speedup:
        # (F + o) / (B + o) = 0.8 x speedup, with F, B the full and BlockDrop model's ms per image.
        f_ms, b_ms, want = 1000 / alone[1], 1000 / alone[0], 0.8 * flops_speedup
        limit = (f_ms - want * b_ms) / (want - 1) if want > 1 else float("inf")
        overhead.append((title, direct_ms(engine, "blockdrop", images), one_client["p50"], *alone, flops_speedup,
                         extra_ms, limit))
        serve.delete("bench")
    lines += ["", "Ray Serve's own overhead (one client, one image per request): "
              + "; ".join(f"{t}: model called directly {d:.1f} ms, through the server {s:.1f} ms (+{s - d:.1f} ms: HTTP, "
                          "PNG decode, batching wait, Serve's proxy and router)" for t, d, s, *_ in overhead) + ".",
              "", "The model alone, in-process, one thread, batches of 32 (what sparse execution gives without the "
              "server): " + "; ".join(f"{t}: BlockDrop {b:.0f} img/s, full model {f:.0f} img/s, gain {b / f:.2f}x for a "
                                      f"FLOPs speedup of {x:.2f}x ({b / f / x:.2f})" for t, _, _, b, f, x, *_ in overhead) + ".",
              "", "What the server spends per request besides the model, at saturation ({} clients, one image per "
              "request, one replica): ".format(max(clients))
              + "; ".join(f"{t}: {o:.1f} ms; single-image requests would reach 0.8 of the FLOPs speedup only below "
                          f"{max(lim, 0):.1f} ms" for t, *_, o, lim in overhead) + "."]
    serve.shutdown()
    ray.shutdown()
    emit(lines, args.output)


if __name__ == "__main__":
    main()
