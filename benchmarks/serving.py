"""Serving throughput and latency: BlockDrop against the same server running the full model.

    scripts/with-venv python benchmarks/serving.py [--checkpoint QUICKSTART_FINETUNE.pt] [--clients 1,16,64]
        [--seconds 15] [--output benchmarks/results/serving_cpu.md]

Two models, each served by one `serve_policy.py`-style Ray Serve application (one replica, dynamic
batches of up to 32, 5 ms wait) next to its full-model twin (the same weights, every block run, no
policy network; `ModelSource(full=True)`), loaded one after the other:
- R110_C10 with a policy that keeps about 30% of the blocks (seeded weights: the policy's logits are
  scaled so that decisions are crisp and vary from image to image);
- the offline preset's trained model (`--checkpoint`, e.g. the Quickstart's
  checkpoints/quickstart-*-finetune.pt; skipped when not given).
Each client sends one PNG per request, as a user would; requests/s and p50/p99 latency are measured
at each client count. Also: a direct call of the model (Engine.predict on one image, in-process),
so that Ray Serve's own overhead per request is stated. Target (issue 10): at 16+ clients,
BlockDrop's throughput gain over the full model >= 0.8 x its FLOPs speedup.
"""
from __future__ import annotations

import argparse
import io
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


def post(url: str, data: bytes) -> float:
    began = time.perf_counter()
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "image/png"})
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()
    return time.perf_counter() - began


def load(url: str, images: list[bytes], clients: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    def client(k: int) -> None:
        i = k
        while time.perf_counter() < deadline:
            latencies.append(post(url, images[i % len(images)]))
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
    parser.add_argument("--seconds", type=float, default=15.0, help="load per client count and model (default 15)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--output", default="benchmarks/results/serving_cpu.md")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]

    import ray
    from ray import serve

    from blockdrop.serve_app import build

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    models = [("R110_C10, policy keeping ~30% of blocks (seeded)", r110_sparse(work))]
    if args.checkpoint:
        models.append((f"{read_checkpoint(args.checkpoint).preset}, trained ({Path(args.checkpoint).name})",
                       Path(args.checkpoint)))
    ray.init(logging_level="WARNING", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port}, logging_config={"log_level": "WARNING"})
    lines = [f"### Serving on CPU: BlockDrop vs the full model, same server ({platform.node() or 'host'}, "
             f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, one replica, batch <= 32, 5 ms wait)",
             "", "| model | clients | full model req/s | BlockDrop req/s | throughput gain | FLOPs speedup | "
             "gain / FLOPs speedup | BlockDrop p50 / p99 ms | full p50 / p99 ms |", "|---|---|---|---|---|---|---|---|---|"]
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
        for c in clients:
            full = load(url + "?model=full", images, c, args.seconds)
            sparse = load(url + "?model=blockdrop", images, c, args.seconds)
            gain = sparse["rps"] / full["rps"]
            print(f"{title}: {c} clients: full {full['rps']:.1f} req/s, BlockDrop {sparse['rps']:.1f} req/s", flush=True)
            lines.append(f"| {title}, {kept:.0%} of blocks kept | {c} | {full['rps']:.1f} | {sparse['rps']:.1f} | "
                         f"{gain:.2f}x | {flops_speedup:.2f}x | {gain / flops_speedup:.2f} | "
                         f"{sparse['p50']:.1f} / {sparse['p99']:.1f} | {full['p50']:.1f} / {full['p99']:.1f} |")
        one_client = load(url + "?model=blockdrop", images, 1, min(args.seconds, 5.0))
        overhead.append((title, direct_ms(engine, "blockdrop", images), one_client["p50"], *batched_gain(engine, images),
                         flops_speedup))
        serve.delete("bench")
    lines += ["", "Ray Serve's own overhead (one client, one image per request): "
              + "; ".join(f"{t}: model called directly {d:.1f} ms, through the server {s:.1f} ms (+{s - d:.1f} ms: HTTP, "
                          "PNG decode, batching wait, Serve's proxy and router)" for t, d, s, *_ in overhead) + ".",
              "", "The model alone, in-process, batches of 32 (what sparse execution gives without the server): "
              + "; ".join(f"{t}: BlockDrop {b:.0f} img/s, full model {f:.0f} img/s, gain {b / f:.2f}x for a FLOPs speedup "
                          f"of {x:.2f}x ({b / f / x:.2f})" for t, _, _, b, f, x in overhead) + "."]
    serve.shutdown()
    ray.shutdown()
    emit(lines, args.output)


if __name__ == "__main__":
    main()
