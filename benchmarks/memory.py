"""Peak memory per training step (each stage) and per serving replica, at the default batch sizes per worker.

    scripts/with-venv python benchmarks/memory.py [--quick] [--device cpu|cuda] [--steps 3]
        [--presets R110_C10,R101_ImgNet] [--threads 1] [--max-rss-gib 18] [--output FILE]

Each measurement runs in a fresh subprocess, so that one peak never hides in another's. A training
cell builds what a Ray Train worker builds (blockdrop.distributed.train_loop_per_worker): the preset's
ResNet inside an Executor and the policy network, channels_last, wrapped in DistributedDataParallel
as `ray.train.torch.prepare_model` does with the default 2 workers (here a 1-process gloo group:
same reducer and buckets; find_unused_parameters as the worker sets it), the stage's optimizer
(blockdrop.stages.make_optimizer); then it runs `--steps` real steps of the stage (pretrain_step,
curriculum_step, finetune_step; adapt is the pretrain step with stochastic depth 0.5) on random
images of the preset's size, moved with blockdrop.stages.to_device as the training loop does.
Curriculum: the phase in which every block is decided (sparse backbone passes with mixed per-image
policies). Finetune and adapt run a policy through the Executor: with its default, sparse execution
(each block on the rows that keep it), memory follows the share of blocks kept (finetune: the
policy's samples, here a freshly initialised policy's; adapt: stochastic depth's ~3/4), so they are
also measured with masked execution (--train-execution masked: every block on every row, the upper
bound whatever the policy). One PyTorch thread per process by default (--threads): Ray gives a Train
worker or a Serve replica of one CPU (the defaults) one OpenMP thread; time per step depends on it.

Reported: RSS after imports, model build, DDP (its gradient buckets) and optimizer (the baseline),
the process's peak RSS (getrusage ru_maxrss) over the steps, and peak - baseline: what a step adds
(activations kept for backward, gradients, the optimizer's lazily created state, allocator slack).
Also the sizes of parameters, gradients and optimizer state. Not counted: the training set a worker
holds (CIFAR's arrays, ~150 MB; an image folder is read lazily), DataLoader worker processes (none
on CPU: blockdrop.data.default_loader_workers) and the end-of-epoch evaluation (no gradients).
With --device cuda, also torch.cuda.max_memory_allocated (the caching allocator's peak, which is
what GPU memory means), and the default batches are measured too (a GPU has the memory and speed);
CPU RSS and GPU memory differ (oneDNN's reorder buffers and glibc's free lists on one side, cuDNN
workspaces and the caching allocator's rounding on the other), so treat CPU figures as an estimate.

The default per-worker batch is the preset's StageDefaults.batch_size (per job) split over
train_job.py's default 2 workers (blockdrop.distributed: batch_size // world). Where that does not
fit --max-rss-gib or is too slow on this machine (R101_ImgNet's 224 px training steps), the cell is
measured at several smaller batches, a line a + b * batch is fitted to peak - baseline, and the
default is extrapolated (labelled so in the table). The parent kills a child whose RSS passes
--max-rss-gib.

Serving: a process holding what a replica holds (blockdrop.serve_app imported: Ray Serve, FastAPI;
an Engine with one model of the preset, random weights) after predicting a max-size batch (32:
serve_policy.py's --max-batch-size default, also the @serve.batch default) a few times.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))
from results_table import emit  # noqa: E402

WORKERS = 2  # train_job.py's --num-workers default
SERVE_BATCH = 32  # serve_policy.py's --max-batch-size default
# (stage, Executor execution): None where the step runs no policy through the Executor
TRAIN_CELLS = (("pretrain", None), ("adapt", "sparse"), ("adapt", "masked"), ("curriculum", None),
               ("finetune", "sparse"), ("finetune", "masked"))
GIB = 1 << 30
MIB = 1 << 20

# Batches measured per (preset, stage) in full mode, and steps per measurement (None: --steps).
# R101_ImgNet's 224 px backward passes take 0.1-0.25 GiB per image, 18-37 GiB at the defaults (128-160
# per worker): measured at 8-32 and extrapolated, 2 steps each (a step of 32 images takes ~30 s here).
# Its curriculum step has no backward through the ResNet and is measured at the default.
FULL_BATCHES = {
    ("R110_C10", "pretrain"): ((16, 32, 64), None),
    ("R110_C10", "adapt"): ((16, 32, 64), None),
    ("R110_C10", "curriculum"): ((256, 512, 1024), 2),
    ("R110_C10", "finetune"): ((32, 64, 128), None),
    ("R101_ImgNet", "pretrain"): ((8, 16, 32), 2),
    ("R101_ImgNet", "adapt"): ((8, 16, 32), 2),
    ("R101_ImgNet", "curriculum"): ((128,), 2),
    ("R101_ImgNet", "finetune"): ((8, 16, 32), 2),
}


# ---------------------------------------------------------------- in the child

def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def train_cell(preset_name: str, stage: str, execution: str | None, batch: int, steps: int, device_name: str,
               ddp: bool) -> dict:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from blockdrop.presets import get_preset
    from blockdrop.stages import (SUPERVISED, StageConfig, blocks_can_go_unused, curriculum_step, finetune_step,
                                  pretrain_step, set_modes, setup_stage, survival, to_device)

    rss_imports = rss_bytes()
    device = torch.device(device_name)
    if device.type == "cuda" and device.index is None:  # DDP's device_ids want an index
        device = torch.device("cuda", torch.cuda.current_device())
    preset = get_preset(preset_name)
    d = preset.stages[stage]
    torch.manual_seed(0)
    if ddp:
        store = tempfile.NamedTemporaryFile(prefix="blockdrop-memory-", delete=False).name
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}",
                                rank=0, world_size=1)

    def prepare(module, parallel_strategy_kwargs=None):  # ray.train.torch.prepare_model: DDP
        if not ddp:
            return module
        return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                       **(parallel_strategy_kwargs or {}))

    cfg = StageConfig(preset=preset.name, stage=stage, epochs=d.epochs, batch_size=batch, lr=d.lr,
                      weight_decay=d.weight_decay, gamma=preset.penalty, drop_rate=d.drop_rate, dataset=None,
                      data_dir=None, policy_lr=d.policy_lr,
                      execution=execution or "sparse")
    # as the workers set a stage up (blockdrop.distributed.train_loop_per_worker) and train_epoch starts it
    models, optimizer, _ = setup_stage(cfg, preset, None, None, device, prepare,
                                       unused=blocks_can_go_unused(cfg, preset.num_blocks, batch, steps))
    backbone, policy = models.backbone, models.policy
    keep = survival(backbone.num_blocks, d.drop_rate, device) if d.drop_rate > 0 else None
    set_modes(stage, models)
    shape = (batch, preset.in_channels, preset.image_size, preset.image_size)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_baseline = torch.cuda.memory_allocated()
    baseline = rss_bytes()
    times, kept = [], []
    for _ in range(steps):
        began = time.perf_counter()
        # the loader's batch (CPU, contiguous), then to_device as the training loop does
        images = to_device(torch.randn(shape), device)
        labels = torch.randint(preset.num_classes, (batch,)).to(device)
        optimizer.zero_grad(set_to_none=True)
        if stage in SUPERVISED:
            out = pretrain_step(models.executor_train, images, labels, keep)
        elif stage == "curriculum":
            out = curriculum_step(models.policy_train, models.backbone, images, labels, preset.num_blocks - 1,
                                  preset.curriculum_penalty)
        else:
            out = finetune_step(models.policy_train, models.executor_train, models.backbone, images, labels,
                                preset.penalty)
        if out.blocks is not None:
            kept.append(out.blocks.float().mean().item() / preset.num_blocks)
        elif keep is not None:
            kept.append(keep.mean().item())
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
        del images, labels, out
    all_params = list(backbone.parameters()) + (list(policy.parameters()) if policy is not None else [])
    result = {
        "rss_imports": rss_imports, "baseline": baseline, "peak": peak_rss_bytes(), "after": rss_bytes(),
        "params": tensor_bytes(all_params),
        "trained_params": tensor_bytes(p for p in all_params if p.requires_grad),
        "grads": tensor_bytes(p.grad for p in all_params),
        "optimizer_state": tensor_bytes(v for s in optimizer.state.values() for v in s.values()
                                        if isinstance(v, torch.Tensor)),
        "seconds_per_step": min(times[1:] or times), "threads": torch.get_num_threads(), "steps": steps,
        "kept": sum(kept) / len(kept) if kept else None,
    }
    if device.type == "cuda":
        result |= {"cuda_baseline": cuda_baseline, "cuda_peak": torch.cuda.max_memory_allocated()}
    if ddp:
        dist.destroy_process_group()
        os.unlink(store)
    return result


def serve_cell(preset_name: str, checkpoint: str, batch: int, steps: int, device_name: str) -> dict:
    import torch

    try:  # a replica's process has Ray Serve and FastAPI loaded
        import blockdrop.serve_app  # noqa: F401
        serve_imported = True
    except ImportError:
        serve_imported = False
    from blockdrop.presets import get_preset
    from blockdrop.serving import Engine, ModelSource

    torch.set_grad_enabled(False)  # as BlockDropServer.__init__
    preset = get_preset(preset_name)
    gc.collect()
    rss_imports = rss_bytes()
    engine = Engine([ModelSource(label="m", name="m", version=None, checkpoint=checkpoint)], None, device_name)
    gc.collect()
    holding = rss_bytes()
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        # a dynamic batch: decoded images stacked (BlockDropServer.infer)
        images = torch.stack([torch.randn(preset.in_channels, preset.image_size, preset.image_size)
                              for _ in range(batch)])
        answers = engine.predict("m", images)
        times.append(time.perf_counter() - began)
        del images, answers
    served = engine.models["m"].model
    result = {
        "rss_imports": rss_imports, "baseline": holding, "peak": peak_rss_bytes(), "after": rss_bytes(),
        "params": tensor_bytes(list(served.backbone.parameters()) + list(served.policy.parameters())),
        "buffers": tensor_bytes(list(served.backbone.buffers()) + list(served.policy.buffers())),
        "seconds_per_step": min(times[1:] or times), "threads": torch.get_num_threads(),
        "serve_imported": serve_imported,
    }
    if device_name == "cuda":
        result |= {"cuda_peak": torch.cuda.max_memory_allocated()}
    return result


def imported_sources() -> dict[str, str]:
    """The hash of each blockdrop module this process imported: others may edit the tree while a long
    run goes on, and each measurement imports it afresh."""
    import hashlib

    out = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if name.split(".")[0] == "blockdrop" and path:
            out[os.path.relpath(path, ROOT)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return out


def child(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["kind"] == "serve":
        result = serve_cell(spec["preset"], spec["checkpoint"], spec["batch"], spec["steps"], spec["device"])
    else:
        result = train_cell(spec["preset"], spec["stage"], spec["execution"], spec["batch"], spec["steps"],
                            spec["device"], spec["ddp"])
    result["sources"] = imported_sources()
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- in the parent

def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def proc_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_child(spec: dict, limit: int) -> dict:
    """One measurement in a fresh interpreter; killed if its RSS passes `limit` bytes."""
    env = os.environ | {"OMP_NUM_THREADS": str(spec["threads"])}
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    began, highest, killed = time.time(), 0, False
    while proc.poll() is None:
        rss = proc_rss(proc.pid)
        highest = max(highest, rss)
        if rss > limit:
            proc.kill()
            killed = True
            break
        time.sleep(0.1)
    out, err = proc.communicate()
    wall = time.time() - began
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):]) | {"wall": wall}
    why = f"RSS passed {limit / GIB:.0f} GiB" if killed else f"exit {proc.returncode}: {err.strip()[-2000:]}"
    return {"error": why, "wall": wall, "highest_seen": highest}


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float, float]:
    """Least squares a + b * x; also the largest residual relative to the measured value."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    a = my - b * mx
    worst = max(abs(y - (a + b * x)) / max(abs(y), 1) for x, y in points)
    return a, b, worst


def default_batch(preset, stage: str) -> int:
    return max(preset.stages[stage].batch_size // WORKERS, 1)  # blockdrop.distributed: batch_size // world


def plan(presets: list[str], quick: bool, steps: int, device: str = "cpu",
         ) -> list[tuple[str, str, str | None, tuple[int, ...], int]]:
    """(preset, stage, execution, batches, steps) of every training measurement."""
    from blockdrop.presets import get_preset

    cells = []
    for name in presets:
        preset = get_preset(name)
        for stage, execution in TRAIN_CELLS:
            if quick and execution == "masked":
                continue
            default = default_batch(preset, stage)
            batches, cell_steps = FULL_BATCHES.get((name, stage), ((default,), None))
            if quick:  # the smallest batch, 2 steps: the whole run within 2 minutes
                batches, cell_steps = batches[:1], 2
            elif device == "cuda" and default not in batches:
                batches = (*batches, default)
            cells.append((name, stage, execution, batches, min(steps, cell_steps or steps)))
    return cells


def label(stage: str, execution: str | None) -> str:
    if execution is None:
        return stage
    return f"{stage}, {execution}" + (" (default)" if execution == "sparse" else "")


def source_state() -> str:
    """The commit measured, and whether the files a measurement runs were edited since."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return ""
    commit = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "blockdrop").splitlines()]
    return f"commit {commit}" + (f" with uncommitted changes to {', '.join(dirty)}" if dirty else "")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) * 1024
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cores, {total / GIB:.0f} GiB RAM"


def gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def mib(x: float) -> str:
    return f"{x / MIB:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="R110_C10 only, the smallest batch of each stage (not the default), 2 steps, and its "
                             "serving replica: under 2 minutes")
    parser.add_argument("--presets", default="R110_C10,R101_ImgNet", help="ignored with --quick")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (default) or cuda (adds torch.cuda.max_memory_allocated)")
    parser.add_argument("--steps", type=int, default=3,
                        help="steps (or served batches) per measurement, at most (R101_ImgNet's cells run 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="PyTorch threads per measurement (default 1: what Ray gives a Train worker or a Serve "
                             "replica of one CPU, the defaults; also robust when others load the machine)")
    parser.add_argument("--no-ddp", action="store_true", help="leave the modules unwrapped (one-worker training)")
    parser.add_argument("--max-rss-gib", type=float, default=18.0, help="kill a measurement past this RSS")
    parser.add_argument("--output", help="default benchmarks/results/memory_DEVICE.md (memory_cpu.md, memory_cuda.md)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    import torch

    from blockdrop.checkpoints import save_checkpoint
    from blockdrop.presets import get_preset

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU here")
    args.output = args.output or f"benchmarks/results/memory_{args.device}.md"
    command = "scripts/with-venv python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    began = time.time()
    presets = ["R110_C10"] if args.quick else args.presets.split(",")
    limit = int(args.max_rss_gib * GIB)
    print(f"available memory {available_bytes() / GIB:.1f} GiB; a measurement is killed past {args.max_rss_gib:g} GiB",
          flush=True)

    measured: dict[tuple[str, str], list[tuple[int, dict]]] = {}
    source = source_state()
    for name, stage, execution, batches, steps in plan(presets, args.quick, args.steps, args.device):
        for batch in batches:
            spec = {"kind": "train", "preset": name, "stage": stage, "execution": execution, "batch": batch,
                    "steps": steps, "device": args.device, "ddp": not args.no_ddp, "threads": args.threads}
            r = run_child(spec, limit)
            measured.setdefault((name, stage, execution), []).append((batch, r))
            if "error" in r:
                print(f"{name} {label(stage, execution)} batch {batch}: FAILED ({r['error']})", flush=True)
            else:
                print(f"{name} {label(stage, execution):26s} batch {batch:5d}: baseline {gib(r['baseline'])} GiB  "
                      f"peak {gib(r['peak'])} GiB  +{gib(r['peak'] - r['baseline'])} GiB  "
                      f"{r['seconds_per_step']:.1f} s/step  ({r['wall']:.0f} s)", flush=True)

    serving: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in presets:
            preset = get_preset(name)
            torch.manual_seed(0)
            path = Path(folder) / f"{name}.pt"
            save_checkpoint(path, preset, preset.build_backbone().eval(), preset.build_policy().eval(),
                            {"stage": "finetune"})
            r = run_child({"kind": "serve", "preset": name, "checkpoint": str(path), "batch": SERVE_BATCH,
                           "steps": args.steps, "device": args.device, "threads": args.threads}, limit)
            serving[name] = r
            if "error" in r:
                print(f"{name} serving: FAILED ({r['error']})", flush=True)
            else:
                print(f"{name} serving batch {SERVE_BATCH}: holding {gib(r['baseline'])} GiB  "
                      f"peak {gib(r['peak'])} GiB", flush=True)
    elapsed = time.time() - began
    seen: dict[str, set[str]] = {}
    for r in [r for cells in measured.values() for _, r in cells] + list(serving.values()):
        for path, digest in r.get("sources", {}).items():
            seen.setdefault(path, set()).add(digest)
    changed = sorted(path for path, digests in seen.items() if len(digests) > 1)
    if changed:
        source += (f"; **the measurements ran different versions of {', '.join(changed)}** (edited during "
                   "the run): run again")
        print(f"warning: {', '.join(changed)} changed between measurements", flush=True)

    # ---- tables
    threads = next((r["threads"] for cells in measured.values() for _, r in cells if "threads" in r), "?")
    cuda = args.device == "cuda"
    wrap = "no DDP" if args.no_ddp else "DDP-wrapped as with 2 workers"
    cuda_head, cuda_rule = (" CUDA peak GiB |", "---|") if cuda else ("", "")

    def kept(r: dict) -> str:
        return "all" if r.get("kept") is None else f"{r['kept']:.0%}"

    lines = [
        f"### Peak memory per training step and per serving replica, {args.device}, torch {torch.__version__}",
        "",
        f"Machine: {machine()}; {threads} PyTorch thread(s) per process; {dt.date.today().isoformat()}; "
        f"blockdrop at {source}; each measurement in a fresh process, {wrap}; steps (or served batches) per "
        f"measurement in the last table; the whole run took {elapsed / 60:.1f} min.",
        "",
        f"Command: `{command}`",
        "",
        "Per-worker batch = the preset's per-job batch (blockdrop/presets.py StageDefaults.batch_size) // 2 "
        "(train_job.py's default --num-workers; blockdrop/distributed.py `per_worker`). "
        "Baseline: RSS after imports, model build, DDP wrap and optimizer. Step peak: peak RSS (ru_maxrss) "
        "over the steps minus the baseline: activations kept for backward, gradients, the optimizer's state "
        "(created at the first step), allocator slack. `blocks run`: the share of blocks the step ran per image "
        "(finetune: sampled from a freshly initialised policy; adapt: stochastic depth's survival rates); "
        "sparse execution's memory follows it, masked execution's does not. "
        + ("" if cuda else "CPU RSS, not GPU memory: on a GPU the same step's tensors live in the CUDA caching "
           "allocator (rounded blocks, cuDNN workspaces) and the host process keeps its own ~1-3 GiB of CUDA "
           "context and libraries; the activation figures carry over roughly, the baselines do not."),
        "",
        "#### Training steps at the default batch per worker",
        "",
        "| preset | stage, execution | batch / worker (job) | how | blocks run | baseline GiB | peak GiB "
        "| step peak - baseline GiB | params MiB | grads MiB | optimizer state MiB | s / step |" + cuda_head,
        "|---|---|---|---|---|---|---|---|---|---|---|---|" + cuda_rule,
    ]
    fits = []
    for (name, stage, execution), cells in measured.items():
        preset = get_preset(name)
        default = default_batch(preset, stage)
        ok = [(b, r) for b, r in cells if "error" not in r]
        row = f"| {name} | {label(stage, execution)} | {default} ({preset.stages[stage].batch_size}) |"
        if not ok:
            lines.append(f"{row} failed: {cells[-1][1]['error'][:80]} |" + " |" * (8 + cuda))
            continue
        fit = None
        if len(ok) >= 2:
            fit = fit_line([(bt, r["peak"] - r["baseline"]) for bt, r in ok])
            fits.append((name, label(stage, execution), ok, *fit))
        exact = next((r for bt, r in ok if bt == default), None)
        ref = exact or ok[-1][1]
        sizes = f"{mib(ref['params'])} | {mib(ref['grads'])} | {mib(ref['optimizer_state'])}"
        if exact is not None:
            how, delta, baseline = "measured", exact["peak"] - exact["baseline"], exact["baseline"]
            secs = f"{exact['seconds_per_step']:.1f}"
            cuda_cell = f" {gib(exact['cuda_peak'])} |" if cuda else ""
        elif fit is not None:
            how = f"**extrapolated** (line fitted at batches {', '.join(str(bt) for bt, _ in ok)})"
            delta = fit[0] + fit[1] * default
            baseline = sum(r["baseline"] for _, r in ok) / len(ok)
            secs = f"~{ref['seconds_per_step'] * default / ok[-1][0]:.0f} (scaled)"
            cuda_cell = " (measured batches below) |" if cuda else ""
        else:
            bt = ok[-1][0]
            lines.append(f"{row} only batch {bt} measured | {kept(ref)} | {gib(ref['baseline'])} | {gib(ref['peak'])} "
                         f"| {gib(ref['peak'] - ref['baseline'])} (batch {bt}) | {sizes} | "
                         f"{ref['seconds_per_step']:.1f} |" + (f" {gib(ref['cuda_peak'])} |" if cuda else ""))
            continue
        lines.append(f"{row} {how} | {kept(ref)} | {gib(baseline)} | {gib(baseline + delta)} | **{gib(delta)}** | "
                     f"{sizes} | {secs} |{cuda_cell}")

    lines += [
        "",
        f"#### Serving replica (an Engine with one model, random weights, after predicting batches of {SERVE_BATCH})",
        "",
        "| preset | batch | RSS after imports GiB | RSS holding the Engine GiB | peak GiB | peak - after imports GiB "
        "| RSS after serving GiB | weights + buffers MiB | s / batch |" + cuda_head,
        "|---|---|---|---|---|---|---|---|---|" + cuda_rule,
    ]
    for name, r in serving.items():
        if "error" in r:
            lines.append(f"| {name} | {SERVE_BATCH} | failed: {r['error'][:80]} |" + " |" * (6 + cuda))
            continue
        lines.append(f"| {name} | {SERVE_BATCH} | {gib(r['rss_imports'])} | {gib(r['baseline'])} | {gib(r['peak'])} | "
                     f"**{gib(r['peak'] - r['rss_imports'])}** | {gib(r['after'])} | "
                     f"{mib(r['params'] + r['buffers'])} | "
                     f"{r['seconds_per_step']:.2f} |" + (f" {gib(r['cuda_peak'])} |" if cuda else ""))
    if any(not r.get("serve_imported", True) for r in serving.values()):
        lines += ["", "(blockdrop.serve_app could not be imported: the import baseline lacks Ray Serve and FastAPI.)"]

    if fits:
        lines += [
            "",
            "#### Linearity in the batch: step peak - baseline = a + b x batch (least squares)",
            "",
            "| preset | stage, execution | batches | a (MiB) | b (MiB / image) | largest residual / measured |",
            "|---|---|---|---|---|---|",
        ]
        for name, stage_label, ok, a, b, worst in fits:
            lines.append(f"| {name} | {stage_label} | {', '.join(str(bt) for bt, _ in ok)} | {mib(a)} | "
                         f"{b / MIB:,.1f} | {worst:.1%} |")

    lines += [
        "",
        "#### Every measurement",
        "",
        "| preset | stage, execution | batch | blocks run | RSS after imports GiB | baseline GiB | peak GiB "
        "| peak - baseline GiB | per image MiB | steps | s / step |" + cuda_head,
        "|---|---|---|---|---|---|---|---|---|---|---|" + cuda_rule,
    ]
    for (name, stage, execution), cells in measured.items():
        for bt, r in cells:
            row = f"| {name} | {label(stage, execution)} | {bt} |"
            if "error" in r:
                lines.append(f"{row} failed: {r['error'][:80]} |" + " |" * (7 + cuda))
                continue
            delta = r["peak"] - r["baseline"]
            lines.append(f"{row} {kept(r)} | {gib(r['rss_imports'])} | {gib(r['baseline'])} | {gib(r['peak'])} "
                         f"| {gib(delta)} | {delta / bt / MIB:,.1f} | {r['steps']} | {r['seconds_per_step']:.2f} |"
                         + (f" {gib(r['cuda_peak'])} |" if cuda else ""))
    emit(lines, args.output)


if __name__ == "__main__":
    main()
