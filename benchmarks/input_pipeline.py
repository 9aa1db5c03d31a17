"""Input pipeline: can JPEG decoding and augmentation keep a GPU fed on ImageNet-like data?

    scripts/with-venv python benchmarks/input_pipeline.py [--quick] [--images 2000] [--classes 10]
        [--batch 64] [--model-batch 16] [--output benchmarks/results/input_pipeline_cpu.md]

A folder of real JPEGs is generated in a temporary directory: 500x375 (ImageNet's most common size),
quality 95, about ImageNet's average file size (~110 KB), cut from the two photographs that ship with
scikit-learn (random crops, colour gains, flips and a little noise, so that no two files are alike),
in class subfolders as `--dataset imagenet` expects (DATA/train/CLASS/*.JPEG). It is read through
`blockdrop.data.load_dataset(preset, "train", "imagenet", DATA)`, i.e. torchvision's ImageFolder
(Pillow decode) and the train transform of the ImageNet path: RandomResizedCrop(224),
RandomHorizontalFlip, ToTensor, Normalize. (The preset is R101_ImgNet with its class count set to
the folder's; nothing else about it reaches the loader.)

Measured:
1. The CPU time of each step per image on one core (one PyTorch thread, as in a DataLoader worker),
   for this repository's pipeline and two alternatives: the same Pillow pipeline stopping at uint8
   (the float conversion and normalisation would then happen on the GPU), and
   torchvision.io.decode_jpeg with tensor (v2) transforms.
2. The training DataLoader (the dataset as `blockdrop.distributed` builds it, shuffled, batch
   `--batch`) over num_workers, persistent_workers and prefetch_factor, two epochs each: time to the
   first batch of each epoch, images/s once every worker is busy (the batches of the first wave
   left out), and the CPU time per image of the worker processes and of the loading process. The
   CPU time gives the images/s of one worker core, the figure that sizes a GPU node.
3. The model's side: R101_ImgNet training steps on one thread of this CPU (blockdrop.stages'
   pretrain and finetune steps, set up as blockdrop.distributed.train_loop_per_worker does:
   channels_last, the stage's optimiser, one process, no DDP) at batch `--model-batch`.
4. Context, not measured here: published GPU training throughput of ResNet-50/101, and from it and
   (2) the loader cores that one GPU needs.

CPU times hold when other processes share the machine; wall-clock rates do not (the report gives
the load average before and after). pin_memory needs CUDA: without it its row is not run.
`--quick` (< 2 minutes on an idle 2-core machine) uses fewer images, settings and steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import io
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from blockdrop.data import load_dataset
from blockdrop.presets import get_preset
from results_table import emit

PRESET = "R101_ImgNet"
SIZE = (500, 375)  # ImageNet's most common image size (landscape 4:3)
QUALITY = 95
NOISE = 8.0  # grey levels of Gaussian noise: brings the files to ImageNet's ~110 KB average

# Published training throughput, one GPU (not measured here). Sources:
# - NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md, "Training
#   performance: NVIDIA DGX A100 (8x A100 80GB)", 1 GPU, pytorch-21.03 NGC container, DALI loader.
# - timm (huggingface/pytorch-image-models) results/benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv:
#   resnet50 1218 img/s, resnet101 748 img/s (same GPU, AMP, channels_last), ratio 0.61.
RESNET50_A100 = {"TF32 (fp32 code)": 938, "AMP (fp16)": 2470}
RESNET101_PER_RESNET50 = 748 / 1218


# -- the data ------------------------------------------------------------------------------------

def source_photos() -> list[np.ndarray]:
    import sklearn
    from PIL import Image

    folder = Path(sklearn.__file__).parent / "datasets" / "images"
    return [np.asarray(Image.open(folder / name).convert("RGB")) for name in ("china.jpg", "flower.jpg")]


def make_folder(root: Path, images: int, classes: int, seed: int = 0) -> float:
    """`images` JPEGs in `classes` class folders under root/train; returns the mean file size in KB."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = source_photos()
    total = 0
    for i in range(images):
        folder = root / "train" / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        photo = photos[i % len(photos)]
        h, w, _ = photo.shape
        ch = int(h * rng.uniform(0.6, 1.0))
        cw = min(int(ch * SIZE[0] / SIZE[1]), w)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = np.asarray(Image.fromarray(photo[y:y + ch, x:x + cw]).resize(SIZE, Image.BILINEAR), dtype=np.float32)
        crop = crop * rng.uniform(0.8, 1.2, 3).astype(np.float32) + NOISE * rng.standard_normal(crop.shape, dtype=np.float32)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        buffer = io.BytesIO()
        Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=QUALITY)
        data = buffer.getvalue()
        (folder / f"img_{i:06d}.JPEG").write_bytes(data)
        total += len(data)
    return total / images / 1e3


# -- 1. per-image cost, one core -----------------------------------------------------------------

COLUMNS = ("decode", "crop + resize", "flip", "to tensor", "normalise")


def pipelines(train_transform, preset) -> dict[str, list[tuple[str, object]]]:
    """Each pipeline as (column, step) pairs; a step maps the previous step's output (first: a path)."""
    from torchvision.datasets.folder import pil_loader
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from torchvision.transforms import PILToTensor, v2

    steps = list(train_transform.transforms)
    names = [type(t).__name__ for t in steps]
    if names != ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]:
        raise SystemExit(f"blockdrop.data's ImageNet train transform changed ({names}); update this benchmark")
    repo = [("decode", pil_loader), *zip(COLUMNS[1:], steps)]
    uint8 = [("decode", pil_loader), *zip(COLUMNS[1:3], steps[:2]), ("to tensor", PILToTensor())]
    tensor = [("decode", lambda path: decode_jpeg(read_file(path), mode=ImageReadMode.RGB)),
              ("crop + resize", v2.RandomResizedCrop(preset.image_size, antialias=True)),
              ("flip", v2.RandomHorizontalFlip()),
              ("to tensor", v2.ToDtype(torch.float32, scale=True)),
              ("normalise", v2.Normalize(preset.mean, preset.std))]
    return {"Pillow, as blockdrop.data (float32 out)": repo,
            "Pillow, uint8 out (normalise on the GPU)": uint8,
            "torchvision.io.decode_jpeg + v2 tensor transforms (float32 out)": tensor}


def step_costs(pipeline: list[tuple[str, object]], paths: list[str], rounds: int = 2) -> dict[str, float]:
    """CPU seconds per image of each column (this thread's CPU time, which other processes on the
    machine do not inflate as they do wall-clock time), the best of `rounds` passes over `paths`."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        spent = dict.fromkeys(COLUMNS, 0.0)
        for path in paths:
            x = path
            for column, step in pipeline:
                t0 = time.thread_time()
                x = step(x)
                spent[column] += time.thread_time() - t0
        for column, s in spent.items():
            best[column] = min(best.get(column, s), s)
    return {column: s / len(paths) for column, s in best.items()}


# -- 2. the DataLoader ----------------------------------------------------------------------------

class StepsFolder(Dataset):
    """The samples of an ImageFolder read through one of `pipelines`' step lists."""

    def __init__(self, samples, steps):
        self.samples, self.steps = samples, [step for _, step in steps]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        x = path
        for step in self.steps:
            x = step(x)
        return x, label


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def time_loader(dataset, batch: int, workers: int, persistent: bool, prefetch: int | None, pin: bool,
                epochs: int = 2) -> dict:
    """Per epoch: seconds to the first batch, and images/s after the first wave of batches (one per
    worker, all started together) until the end of the epoch. Over all epochs: CPU seconds per image
    of the worker processes (counted once they have exited) and of this process."""
    kwargs = {"num_workers": workers, "pin_memory": pin}
    if workers:
        kwargs |= {"persistent_workers": persistent, "prefetch_factor": prefetch}
    gc.collect()
    children, own = cpu_seconds(resource.RUSAGE_CHILDREN), cpu_seconds(resource.RUSAGE_SELF)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, **kwargs)
    out: dict = {"epochs": []}
    images = 0
    for _ in range(epochs):
        start = time.perf_counter()
        arrivals, sizes = [], []
        for _, labels in loader:
            arrivals.append(time.perf_counter() - start)
            sizes.append(len(labels))
        wave = max(workers, 1)
        steady = sum(sizes[wave:]) / (arrivals[-1] - arrivals[wave - 1]) if len(sizes) > wave else float("nan")
        out["epochs"].append({"first": arrivals[0], "steady": steady, "epoch": sum(sizes) / arrivals[-1]})
        images += sum(sizes)
    del loader  # persistent workers exit here
    gc.collect()
    out["worker_cpu"] = (cpu_seconds(resource.RUSAGE_CHILDREN) - children) / images
    out["main_cpu"] = (cpu_seconds(resource.RUSAGE_SELF) - own) / images
    return out


# -- 3. the model's step on this CPU ---------------------------------------------------------------

def model_steps(batch: int, steps: int) -> tuple[dict[str, dict[str, float]], str]:
    """Per stage (pretrain, finetune of R101_ImgNet), on one PyTorch thread: the median CPU seconds
    and wall-clock seconds per training step; and the execution the finetune step trains the ResNet
    with (blockdrop.execution.Executor's default)."""
    from blockdrop.execution import Executor
    from blockdrop.stages import finetune_step, make_optimizer, pretrain_step, to_device

    preset = get_preset(PRESET)
    torch.manual_seed(0)
    device = torch.device("cpu")
    images = torch.randn(batch, 3, preset.image_size, preset.image_size)
    labels = torch.randint(preset.num_classes, (batch,))
    out = {}
    execution = "masked"
    for stage in ("pretrain", "finetune"):
        backbone = preset.build_backbone()
        executor = Executor(backbone).to(device, memory_format=torch.channels_last)
        execution = getattr(executor, "execution", execution)
        backbone.train()
        if stage == "pretrain":
            optimizer = make_optimizer(stage, list(backbone.parameters()), 0.1, 1e-4)

            def step():
                return pretrain_step(executor, x, labels)
        else:
            policy = preset.build_policy().to(device, memory_format=torch.channels_last).train()
            optimizer = make_optimizer(stage, [{"params": list(policy.parameters())},
                                               {"params": list(backbone.parameters())}], 1e-4, 0.0)

            def step():
                return finetune_step(policy, executor, backbone, x, labels, preset.penalty)
        cpu, wall = [], []
        for i in range(steps + 1):  # the first is a warm-up
            c0, w0 = time.thread_time(), time.perf_counter()
            x = to_device(images, device)
            optimizer.zero_grad(set_to_none=True)
            step()
            optimizer.step()
            c, w = time.thread_time() - c0, time.perf_counter() - w0
            if i:
                cpu.append(c)
                wall.append(w)
            print(f"  {stage} step {i}: {c:.2f} CPU s, {w:.2f} s", flush=True)
        out[stage] = {"cpu": statistics.median(cpu), "wall": statistics.median(wall)}
        del backbone, executor, optimizer
    return out, execution


# -- the report ------------------------------------------------------------------------------------

def versions() -> str:
    import PIL
    import torchvision
    from PIL import features

    jpeg = (f"libjpeg-turbo {features.version_feature('libjpeg_turbo')}" if features.check_feature("libjpeg_turbo")
            else f"libjpeg {features.version('jpg')} (not turbo)")
    simd = "pillow-simd" if ".post" in PIL.__version__ else "not pillow-simd"
    return (f"torch {torch.__version__}, torchvision {torchvision.__version__}, Pillow {PIL.__version__} "
            f"({simd}; JPEG: {jpeg}), Python {platform.python_version()}")


def machine() -> str:
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def loadavg() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images, settings and steps (< 2 minutes)")
    parser.add_argument("--images", type=int, help="JPEGs to generate (default 2000; --quick 400)")
    parser.add_argument("--classes", type=int, default=10, help="class folders (default 10)")
    parser.add_argument("--batch", type=int, help="loader batch size (default 64; --quick 32)")
    parser.add_argument("--model-batch", type=int, help="R101_ImgNet batch of the model steps (default 16; --quick 4)")
    parser.add_argument("--model-steps", type=int, help="timed model steps per stage (default 3; --quick 1)")
    parser.add_argument("--output", default="benchmarks/results/input_pipeline_cpu.md",
                        help="markdown file to write ('' for none; default %(default)s)")
    args = parser.parse_args()
    quick = args.quick
    n_images = args.images or (400 if quick else 2000)
    batch = args.batch or (32 if quick else 64)
    model_batch = args.model_batch or (4 if quick else 16)
    model_steps_n = args.model_steps or (1 if quick else 3)
    cuda = torch.cuda.is_available()
    cores = os.cpu_count() or 1
    load_before = loadavg()
    began = time.time()

    preset = get_preset(PRESET)
    folder_preset = dataclasses.replace(preset, num_classes=args.classes)
    with tempfile.TemporaryDirectory(prefix="blockdrop-jpegs-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        kb = make_folder(root, n_images, args.classes)
        print(f"{n_images} JPEGs {SIZE[0]}x{SIZE[1]}, mean {kb:.0f} KB, in {time.perf_counter() - t0:.1f} s", flush=True)
        dataset = load_dataset(folder_preset, "train", "imagenet", root)
        transform = dataset.folder.transform
        paths = [p for p, _ in dataset.samples[: (80 if quick else 300)]]

        # 1. per image, one core
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        costs = {}
        for name, pipeline in pipelines(transform, preset).items():
            costs[name] = step_costs(pipeline, paths)
            print(f"{name}: " + ", ".join(f"{c} {1e3 * s:.2f} ms" for c, s in costs[name].items()), flush=True)
        torch.set_num_threads(threads)

        # 2. the DataLoader
        steps = pipelines(transform, preset)
        # (workers, persistent_workers, prefetch_factor, pin_memory, torch threads of the loading process)
        settings = [(0, False, None, False, 1), (1, False, 2, False, 1), (1, True, 2, False, 1),
                    (cores, False, 2, False, 1), (cores, True, 2, False, 1), (cores, True, 4, False, 1)]
        if not quick:  # on a busy machine the first of these crawls
            settings = [(0, False, None, False, threads)] + settings + [(cores + 1, True, 2, False, 1)]
        if cuda:
            settings += [(cores, True, 2, True, 1)]
        alternatives = {
            "Pillow (blockdrop.data)": (dataset, settings),
            "Pillow, uint8 out": (StepsFolder(dataset.samples, steps["Pillow, uint8 out (normalise on the GPU)"]),
                                  [] if quick else [(cores, True, 2, False, 1)]),
            "decode_jpeg + v2": (StepsFolder(dataset.samples, steps[
                "torchvision.io.decode_jpeg + v2 tensor transforms (float32 out)"]),
                [(1, True, 2, False, 1)] + ([] if quick else [(cores, True, 2, False, 1)])),
        }
        loader_rows = []
        for name, (ds, runs) in alternatives.items():
            for workers, persistent, prefetch, pin, n_threads in runs:
                torch.set_num_threads(n_threads)  # a DataLoader's workers run one thread whatever this says
                # decoding on several threads of a busy machine crawls: 10 batches of it tell
                part = Subset(ds, range(min(len(ds), 10 * batch))) if n_threads > 1 else ds
                run = time_loader(part, batch, workers, persistent, prefetch, pin)
                run["images"] = len(part)
                torch.set_num_threads(threads)
                loader_rows.append((name, workers, persistent, prefetch, pin, n_threads, run))
                print(f"{name} workers={workers} persistent={persistent} prefetch={prefetch} pin={pin} "
                      f"threads={n_threads}: "
                      + "; ".join(f"first {e['first']:.2f} s, {e['steady']:.0f} img/s steady, {e['epoch']:.0f} img/s epoch"
                                  for e in run["epochs"])
                      + f"; CPU ms/img: workers {1e3 * run['worker_cpu']:.2f}, main {1e3 * run['main_cpu']:.2f}",
                      flush=True)

    # 3. the model, on one thread: its CPU time per step is what one core does, whatever else runs here
    print(f"R101_ImgNet training steps at batch {model_batch}, one thread:", flush=True)
    torch.set_num_threads(1)
    step_s, execution = model_steps(model_batch, model_steps_n)
    torch.set_num_threads(threads)
    load_after = loadavg()

    # the report
    command = "scripts/with-venv python benchmarks/input_pipeline.py" + "".join(
        f" {shlex.quote(a)}" for a in sys.argv[1:])
    repo = "Pillow, as blockdrop.data (float32 out)"
    pillow_workers = [r for r in loader_rows if r[0] == "Pillow (blockdrop.data)" and r[1] > 0]
    worker_cpu = statistics.median(r[-1]["worker_cpu"] for r in pillow_workers)
    main_cpu = statistics.median(r[-1]["main_cpu"] for r in pillow_workers)
    per_core = 1 / worker_cpu
    lines = [
        f"### Input pipeline: JPEG decode + augmentation vs the {PRESET} training step (CPU)",
        "",
        f"- machine: {machine()}; " + ("CUDA present" if cuda else "no GPU"),
        f"- {versions()}",
        f"- {datetime.date.today().isoformat()}; load average (1/5/15 min) {load_before} before, {load_after} after; "
        f"{time.time() - began:.0f} s in all",
        f"- `{command}`",
        f"- data: {n_images} generated JPEGs, {SIZE[0]}x{SIZE[1]}, quality {QUALITY}, mean {kb:.0f} KB "
        "(ImageNet's train set: ~110 KB), "
        f"{args.classes} class folders, read by `load_dataset(..., \"train\", \"imagenet\", ...)`: ImageFolder + "
        f"`{' -> '.join(type(t).__name__ for t in transform.transforms)}`",
        "- CPU times (getrusage, thread CPU time) are what a core spends and hold under load from other "
        "processes; wall-clock rates (img/s) do not.",
        "",
        "#### 1. CPU ms per image on one core (one PyTorch thread, as in a loader worker)",
        "",
        "| pipeline | " + " | ".join(COLUMNS) + " | total | img/s per core |",
        "|---|" + "---|" * (len(COLUMNS) + 2),
    ]
    for name, c in costs.items():
        total = sum(c.values())
        lines.append(f"| {name} | " + " | ".join(f"{1e3 * c[col]:.2f}" if c[col] else "-" for col in COLUMNS)
                     + f" | {1e3 * total:.2f} | {1 / total:.0f} |")
    lines += [
        "",
        f"#### 2. Training DataLoader, batch {batch}, shuffled, 2 epochs ({cores} cores here)",
        "",
        "first batch: seconds from `iter(loader)` to the first batch (epoch 1 / epoch 2); steady: images/s "
        "once every worker is busy (the first wave of batches left out); epoch 2: the whole epoch, start-up "
        "included; CPU ms / image: the worker processes' CPU time (fork to exit, collation into shared memory "
        "included) and this process's (receiving batches; with no workers, everything) over both epochs; "
        "img/s per worker core = 1000 / worker CPU ms.",
        "",
        "| pipeline | num_workers | torch threads where images are decoded | persistent_workers | prefetch_factor "
        "| pin_memory | first batch s (ep 1 / 2) | steady img/s (ep 1 / 2) | epoch-2 img/s "
        "| worker CPU ms / image | main-process CPU ms / image | img/s per worker core |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, workers, persistent, prefetch, pin, n_threads, run in loader_rows:
        e1, e2 = run["epochs"]
        cpu = run["worker_cpu"] if workers else run["main_cpu"]
        part = "" if run["images"] == n_images else f" (first {run['images']} images)"
        worker_ms = f"{1e3 * run['worker_cpu']:.2f}" if workers else "-"
        lines.append(f"| {name}{part} | {workers}{' (in-process)' if not workers else ''} | "
                     f"{n_threads if not workers else '1 (worker)'} | "
                     f"{persistent if workers else '-'} | {prefetch or '-'} | {pin} | "
                     f"{e1['first']:.2f} / {e2['first']:.2f} | {e1['steady']:.0f} / {e2['steady']:.0f} | "
                     f"{e2['epoch']:.0f} | {worker_ms} | {1e3 * run['main_cpu']:.2f} | "
                     f"{1 / cpu:.0f} |")
    if not cuda:
        lines += ["", "pin_memory: not run (no CUDA here; without it the option does nothing)."]

    lines += [
        "",
        f"#### 3. {PRESET} training step on this CPU (one thread, channels_last, batch {model_batch}, "
        f"median of {model_steps_n} after a warm-up step)",
        "",
        "| stage | CPU s / step | img/s per core | wall s / step | one Pillow loader worker feeds it x times over |",
        "|---|---|---|---|---|",
    ]
    for stage, t in step_s.items():
        what = ("plain ResNet-101 training" if stage == "pretrain"
                else f"policy + sparse greedy baseline + {execution} ResNet-101 training")
        rate = model_batch / t["cpu"]
        lines.append(f"| {stage} ({what}) | {t['cpu']:.2f} | {rate:.2f} | {t['wall']:.2f} | {per_core / rate:.0f} |")
    ratio = step_s["finetune"]["cpu"] / step_s["pretrain"]["cpu"]
    uint8_share = sum(costs["Pillow, uint8 out (normalise on the GPU)"].values()) / sum(costs[repo].values())
    uint8_rows = [r for r in loader_rows if r[0] == "Pillow, uint8 out"]
    uint8_main = (f" ({1e3 * uint8_rows[0][-1]['main_cpu']:.2f} ms for uint8 batches, a quarter of the bytes)"
                  if uint8_rows else "")
    lines += [
        "",
        "#### 4. One GPU (not measured here: published figures, and estimates from them)",
        "",
        f"Loader workers = GPU img/s x {1e3 * worker_cpu:.2f} CPU ms per image (median of the Pillow rows above: "
        f"{per_core:.0f} img/s per worker core); the training process spends {1e3 * main_cpu:.2f} CPU ms per image "
        f"receiving float32 batches{uint8_main}, beside its own work. Pillow stopping at uint8 (normalising on the GPU) would cost "
        f"x{uint8_share:.2f} of the worker time (section 1). This project trains in fp32, which Ampere and Hopper "
        f"GPUs run as TF32 in cuDNN's convolutions by default. BlockDrop's finetune step cost x{ratio:.2f} a plain "
        "training step here (CPU); on a GPU its throughput relative to the figures below is not measured.",
        "",
        "| GPU, model, precision | training img/s | source | loader workers (cores) it needs, plus one core for "
        "the training process |",
        "|---|---|---|---|",
    ]
    for precision, r50 in RESNET50_A100.items():
        r101 = r50 * RESNET101_PER_RESNET50
        lines += [
            f"| A100 80GB, ResNet-50, {precision} | {r50} | published: NVIDIA DeepLearningExamples, 1 GPU "
            f"| {r50 / per_core:.1f} |",
            f"| A100 80GB, ResNet-101, {precision} | ~{r101:.0f} | estimate: ResNet-50 x {RESNET101_PER_RESNET50:.2f} "
            f"(timm's RTX 3090 table) | {r101 / per_core:.1f} |",
            f"| H100 SXM, ResNet-101, {precision} | ~{1.5 * r101:.0f}-{2 * r101:.0f} | assumption: 1.5-2x A100 "
            f"| {1.5 * r101 / per_core:.1f}-{2 * r101 / per_core:.1f} |",
        ]
    emit(lines, args.output or None)


if __name__ == "__main__":
    main()
