"""Datasets by name: cifar10, cifar100, imagenet, imagefolder, and the offline digits set.

`load_dataset(preset, split, name=None, data_dir=None)` returns a torch Dataset of
(normalised image tensor, label) with the preset's input size and the original's augmentation on
the train split. Missing or mismatched data is a UserError that says what to put where.
"""
from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import socket
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from blockdrop.choices import DATASETS, MAX_UNREADABLE, add_unreadable_flag, check_unreadable_share  # noqa: F401 (re-exported)
from blockdrop.errors import UserError
from blockdrop.presets import Preset

SPLITS = ("train", "val", "test")
# The validation split: what every choice is made on (a sweep's front, a criterion, a default), never the
# test images. Where the data has no validation folder, this share of each class's training images, drawn
# with a fixed seed (every stage, worker and sweep of the same data sees the same split), is held out of
# training.
VAL_SHARE = 0.1
VAL_SEED = 0
DEFAULT_DATA_DIR = Path("data")
DOWNLOAD_TIMEOUT_S = 30.0


# torchvision is imported on first use: `import torchvision` also imports its models and torch._dynamo,
# over a second of every process that imports this module (each Ray Train worker and task does), and the
# digits set never needs it.
def _datasets():
    from torchvision import datasets

    return datasets


def _transforms():
    from torchvision import transforms

    return transforms


def _normalize(preset: Preset):
    return _transforms().Normalize(preset.mean, preset.std)


def _presence_only(cls: type) -> type:
    """torchvision's CIFAR class with per-file checksums off: files are checked for presence.

    The archive's checksum is still verified on download; what is checked off is re-hashing the
    extracted batches on every start (and so small local copies in the real format load too).
    """
    return type(cls.__name__, (cls,), {
        "train_list": [[name, None] for name, _ in cls.train_list],
        "test_list": [[name, None] for name, _ in cls.test_list],
        "meta": {**cls.meta, "md5": None},
    })


CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}


@functools.cache
def cifar_class(name: str) -> type:
    datasets = _datasets()
    return _presence_only({"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name])


def _cifar(preset: Preset, name: str, root: Path, split: str, download: bool, augment: bool) -> Dataset:
    cls = cifar_class(name)
    if preset.image_size != 32 or preset.in_channels != 3:
        raise UserError(f"{name} has 32x32 RGB images; preset {preset.name} expects "
                        f"{preset.image_size}x{preset.image_size} with {preset.in_channels} channel(s)")
    folder = root / cls.base_folder
    T = _transforms()
    transform = T.Compose([*([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else []),
                           T.ToTensor(), _normalize(preset)])
    present = all((folder / f).is_file() for f, _ in cls.train_list + cls.test_list + [[cls.meta["filename"], None]])
    if not present:
        if not download:
            raise UserError(f"{name} not found in {folder}; pass --data-dir pointing at the folder that "
                            f"holds {cls.base_folder}/, or allow the download")
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            with contextlib.redirect_stdout(sys.stderr):  # torchvision prints progress on stdout
                cls(str(root), train=split != "test", download=True)
        except Exception as err:
            raise UserError(
                f"{name} is not in {folder} and could not be downloaded ({type(err).__name__}: {err}). "
                f"On a machine without internet, copy {cls.filename} (extracted) into {root}/ "
                "or pass --data-dir"
            ) from None
        finally:
            socket.setdefaulttimeout(previous)
    try:
        ds = cls(str(root), train=split != "test", transform=transform)
    except Exception as err:
        raise UserError(f"{name} in {folder} could not be read ({type(err).__name__}: {err})") from None
    return ds if split == "test" else carve(ds, split)


def _folder_transform(preset: Preset, augment: bool, imagenet: bool):
    size, T = preset.image_size, _transforms()
    gray = [T.Grayscale(preset.in_channels)] if preset.in_channels == 1 else []
    if imagenet and augment:
        geometry = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    elif imagenet:
        geometry = [T.Resize(size * 256 // 224), T.CenterCrop(size)]
    else:
        geometry = [T.Resize((size, size))] + ([T.RandomHorizontalFlip()] if augment else [])
    return T.Compose([*gray, *geometry, T.ToTensor(), _normalize(preset)])


class Split(Subset):
    """A part of a dataset (by index) that still answers what an image folder does: `classes`, and the
    `samples` and `targets` of its own images."""

    @property
    def classes(self) -> list[str]:
        return self.dataset.classes

    @property
    def samples(self) -> list:
        inner = self.dataset.samples
        return [inner[i] for i in self.indices]

    @property
    def targets(self) -> list[int]:
        inner = targets_of(self.dataset)
        return [inner[i] for i in self.indices]


def targets_of(dataset) -> list[int]:
    """Each image's label, read without loading the images."""
    if isinstance(dataset, Subset):
        inner = targets_of(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    return list(dataset.targets)


def validation_indices(labels, share: float = VAL_SHARE, seed: int = VAL_SEED) -> list[int]:
    """The images held out for validation: `share` of each class (at least one of a class that has two or
    more, never its last), drawn with `seed`; sorted positions into `labels`."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            continue
        count = min(len(members) - 1, max(1, int(share * len(members) + 0.5)))
        held += rng.permutation(members)[:count].tolist()
    return sorted(held)


def carve(dataset, split: str) -> Split:
    """The training images of `dataset` minus the validation share (`split` "train"), or that share ("val")."""
    held = validation_indices(targets_of(dataset))
    if split == "val":
        return Split(dataset, held)
    held_set = set(held)
    return Split(dataset, [i for i in range(len(dataset)) if i not in held_set])


def _folder_split(root: Path, name: str, split: str) -> tuple[Path | None, bool]:
    """Which folder holds `split` of an image folder at `root`, and whether validation is carved from it.

    train/ (and val/, test/): test/ is the test set, else val/ (ImageNet's layout: its val/ is what
    results are reported on); val/ is the validation set only beside a test/; otherwise validation is
    carved from train/. No train/ (imagefolder): the whole folder, split 90/10 (`None`)."""
    has = {d: (root / d).is_dir() for d in ("train", "val", "test")}
    if split == "test":
        return next((root / d for d in ("test", "val") if has[d]), None), False
    if has["val"] and has["test"]:
        return (root / split if split == "val" or has["train"] else None), False
    return (root / "train" if has["train"] else None), True


def _image_folder(preset: Preset, name: str, root: Path, split: str, augment: bool) -> Dataset:
    """imagenet: root/train and root/val; imagefolder: those (and root/test), or one folder split 90/10;
    validation: root/val beside a root/test, else carved from the training images (VAL_SHARE)."""
    folder, carved = _folder_split(root, name, split)
    whole = folder is None and name == "imagefolder"
    if whole:
        folder = root
    if folder is None or not folder.is_dir():
        want = f"{root}/train/ and {root}/val/" if name == "imagenet" else f"{root}/ (class subfolders)"
        raise UserError(f"{name} data not found: expected class folders under {want}; pass --data-dir")
    try:
        ds = SkipUnreadable(_image_folder_class()(str(folder), transform=_folder_transform(preset, augment,
                                                                                          name == "imagenet")), folder)
    except (FileNotFoundError, RuntimeError) as err:
        raise UserError(f"{folder} holds no images in class subfolders ({err})") from None
    if len(ds.classes) != preset.num_classes:
        raise UserError(f"{folder} has {len(ds.classes)} class folders; preset {preset.name} has "
                        f"{preset.num_classes} classes")
    train_folder = root / "train"
    if folder != train_folder and not whole and train_folder.is_dir():  # the classes are the training's, by name
        trained = sorted(d.name for d in train_folder.iterdir() if d.is_dir())
        if trained != ds.classes:
            only_here, only_train = sorted(set(ds.classes) - set(trained)), sorted(set(trained) - set(ds.classes))
            raise UserError(f"{folder}'s class folders are not {train_folder}'s (a class is the same folder name in "
                            f"both): only in {folder.name}/: {', '.join(only_here[:5]) or '-'}; only in train/: "
                            f"{', '.join(only_train[:5]) or '-'}")
    if whole:  # a deterministic split: every 10th image of each class is held out as the test set
        held_out = {i for i, _ in enumerate(ds.samples) if i % 10 == 9}
        if split == "test":
            return Split(ds, sorted(held_out))
        ds = Split(ds, [i for i in range(len(ds)) if i not in held_out])
    return carve(ds, split) if carved else ds


def scan_folder(directory: str | Path, class_to_idx: dict[str, int], extensions=None, is_valid_file=None,
                allow_empty: bool = False) -> list[tuple[str, int]]:
    """torchvision's DatasetFolder.make_dataset (every image file under each class folder, symbolic links
    followed), but each real folder walked once: a link loop (a folder linking to itself or above) would
    walk forever or list the same images many times, under wrong labels. What it skipped it says."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    extensions = extensions or IMG_EXTENSIONS
    valid = is_valid_file or (lambda path: has_file_allowed_extension(path, extensions))
    def key(path) -> tuple[int, int]:
        stat = os.stat(path)
        return stat.st_dev, stat.st_ino

    # the split's folder and its class folders are each reached once, from where they are: a link to one of
    # them from inside a class would give its images that class's label
    tops = {name: key(Path(directory) / name) for name in class_to_idx}
    samples, looped = [], []
    for name in sorted(class_to_idx):
        seen = {key(directory)} | {k for other, k in tops.items() if other != name}
        for top, folders, files in os.walk(Path(directory) / name, followlinks=True):
            if key(top) in seen:
                looped.append(top)
                folders[:] = []
                continue
            seen.add(key(top))
            folders.sort()
            samples += [(os.path.join(top, f), class_to_idx[name]) for f in sorted(files) if valid(os.path.join(top, f))]
    if looped:
        print(f"warning: {len(looped)} folder(s) under {directory} reached again through symbolic links (a link "
              f"loop?), each read once: {', '.join(looped[:3])}", file=sys.stderr)
    if not samples and not allow_empty:
        raise FileNotFoundError(f"no image files ({', '.join(extensions)}) under {directory}")
    return samples


@functools.cache
def _image_folder_class() -> type:
    """torchvision's ImageFolder with scan_folder's walk, made on first use (torchvision's import is slow) and
    found by pickle as blockdrop.data.LoopSafeImageFolder (a DataLoader's spawned workers unpickle it)."""
    folder = type("LoopSafeImageFolder", (_datasets().ImageFolder,), {"make_dataset": staticmethod(scan_folder),
                                                                       "__module__": __name__})
    return folder


def __getattr__(name: str):
    if name == "LoopSafeImageFolder":
        return _image_folder_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class SkipUnreadable(Dataset):
    """An image folder that survives files it cannot decode. Up-front checks cannot open a million
    files, so a corrupt or truncated one is found when it is loaded: the next readable image of the
    folder stands in for it, a warning names it (once per file and process), and it is counted
    (`skipped`, shared with the DataLoader's worker processes). Callers stop past a threshold:
    `check_unreadable`."""

    def __init__(self, folder, root: Path):
        self.folder, self.root = folder, root
        self.samples, self.classes, self.targets = folder.samples, folder.classes, folder.targets
        self._count = multiprocessing.Value("i", 0)  # inherited by forked DataLoader workers
        self._seen: set[str] = set()

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        for k in range(len(self.folder)):
            j = (i + k) % len(self.folder)
            try:
                return self.folder[j]
            except (OSError, SyntaxError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
                self._skip(self.samples[j][0], err)
        raise UserError(f"no readable image in {self.root}")

    def _skip(self, path: str, err: Exception) -> None:
        if path in self._seen:
            return
        self._seen.add(path)
        if self._count is not None:
            with self._count.get_lock():
                self._count.value += 1
        print(f"warning: unreadable image {path} ({type(err).__name__}); the next image stands in for it",
              file=sys.stderr, flush=True)

    @property
    def skipped(self) -> int:
        return 0 if self._count is None else self._count.value

    def __getstate__(self):  # a spawned worker cannot share the counter: it counts nothing
        return {**self.__dict__, "_count": None}


def allowed_unreadable(share: float, size: int) -> int:
    """How many unreadable files `share` allows in a dataset of `size`: at least one unless it is 0."""
    return max(int(share * size), 1) if share > 0 else 0


def eval_transform(preset: Preset):
    """The preset's evaluation transform for a decoded image: what `blockdrop.evaluate` applies to an
    image folder (grey or RGB as the preset wants, resize / crop, to tensor, normalise)."""
    return _folder_transform(preset, augment=False, imagenet=preset.dataset == "imagenet")


def difficulties(dataset) -> np.ndarray | None:
    """For an image folder whose file names say each image's difficulty (`00042-hard.png`, as
    `blockdrop.sample_data mixed` writes them): True for the hard images, in the dataset's order.
    None when the names do not say it for every image."""
    indices = None
    while isinstance(dataset, Subset):
        inner = list(dataset.indices)
        indices = inner if indices is None else [inner[i] for i in indices]
        dataset = dataset.dataset
    samples = getattr(dataset, "samples", None)
    if not samples:
        return None
    stems = [Path(samples[i][0]).stem for i in (range(len(samples)) if indices is None else indices)]
    if not all(stem.endswith(("-hard", "-easy")) for stem in stems):
        return None
    return np.array([stem.endswith("-hard") for stem in stems])


def skipped_images(dataset) -> int | None:
    """Unreadable files met so far in an image folder (None for datasets that cannot have any)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset.skipped if isinstance(dataset, SkipUnreadable) else None


def check_unreadable(dataset, share: float, flag: str = "--max-bad-images") -> int:
    """The number of unreadable files met; a UserError once they pass `share` of the dataset."""
    skipped = skipped_images(dataset) or 0
    if skipped > allowed_unreadable(share, len(dataset)):
        inner = dataset
        while isinstance(inner, Subset):
            inner = inner.dataset
        raise UserError(f"{skipped} unreadable images in {inner.root} of {len(dataset)}, more than {flag} {share:g} "
                        "allows; the warnings above name them: fix or remove them, or raise the limit")
    return skipped


@functools.cache
def _digits() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """scikit-learn's digits scaled to 0..1, their labels, and the indices of the fixed stratified
    80/20 split, its training part less the validation share ({"train", "val", "test"}); read once per
    process (the splits share it)."""
    from sklearn.datasets import load_digits  # only this set needs scikit-learn (a second to import)
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    train_idx, test_idx = train_test_split(range(len(bunch.target)), test_size=0.2, random_state=0,
                                           stratify=bunch.target)
    held = set(validation_indices(bunch.target[train_idx]))
    parts = {"train": [i for k, i in enumerate(train_idx) if k not in held],
             "val": [i for k, i in enumerate(train_idx) if k in held], "test": test_idx}
    return images, torch.tensor(bunch.target, dtype=torch.long), {k: torch.tensor(v) for k, v in parts.items()}


def random_shift(image: torch.Tensor, pad: int = 1) -> torch.Tensor:
    """The image moved by up to `pad` pixels each way, its edge pixels repeated into the gap: a random
    crop of the edge-padded image (torchvision's RandomCrop(size, padding=pad, padding_mode="edge"),
    the same draws from torch's generator, without importing torchvision)."""
    height, width = image.shape[-2:]
    padded = F.pad(image.unsqueeze(0), (pad, pad, pad, pad), mode="replicate").squeeze(0)
    top = int(torch.randint(0, 2 * pad + 1, size=(1,)).item())
    left = int(torch.randint(0, 2 * pad + 1, size=(1,)).item())
    return padded[..., top:top + height, left:left + width]


class Digits(Dataset):
    """scikit-learn's 1797 bundled 8x8 handwritten digits; a fixed stratified 80/20 split, the validation
    share held out of the 80."""

    def __init__(self, preset: Preset, split: str, augment: bool):
        if preset.image_size != 8 or preset.in_channels != 1:
            raise UserError(f"digits are 8x8 grayscale; preset {preset.name} expects "
                            f"{preset.image_size}x{preset.image_size} with {preset.in_channels} channels")
        images, labels, split_of = _digits()
        self.images = (images[split_of[split]] - preset.mean[0]) / preset.std[0]
        self.labels = labels[split_of[split]]
        self.classes = [str(d) for d in range(10)]
        self.augment = augment  # small random shifts: digits are not flip-invariant

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.images[i]
        return (random_shift(image) if self.augment else image), int(self.labels[i])


MAX_LOADER_WORKERS = 16  # beyond what one GPU needs even with mixed precision; each worker costs memory
PREFETCH_FACTOR = 2  # batches in flight per worker (torch's default): more bought nothing measurable


def default_loader_workers(dataset: str, device_type: str, cpus: int) -> int:
    """DataLoader worker processes for one training process that has `cpus` cores to itself (its
    node's cores over the training processes on that node): feeding a GPU, every core but the training
    process's own, at most MAX_LOADER_WORKERS (a GPU outruns one decoding worker several times over);
    on the CPU none (the model, not decoding, is the bottleneck, and workers would take its cores);
    digits none (a tensor in memory). The figures behind it: benchmarks/results/input_pipeline_cpu.md."""
    if dataset == "digits" or device_type != "cuda":
        return 0
    return max(1, min(cpus - 1, MAX_LOADER_WORKERS))


def loader_options(device_type: str, num_workers: int) -> dict:
    """Keyword arguments of a training or test DataLoader with `num_workers` worker processes that
    feeds a `device_type` device ("cuda", "cpu"), besides dataset, batch size and sampler:

    - pin_memory on CUDA: batches in page-locked memory, so that the non_blocking copy of
      `blockdrop.stages.to_device` overlaps the GPU's work instead of waiting on a staging copy.
    - persistent_workers: the workers live across epochs; otherwise every epoch forks them again
      and waits for their first batches (a cost per epoch that short epochs feel).
    - prefetch_factor: PREFETCH_FACTOR batches in flight per worker.
    Without workers only pin_memory applies (torch refuses the other two)."""
    options: dict = {"num_workers": num_workers, "pin_memory": device_type == "cuda"}
    if num_workers > 0:
        options |= {"persistent_workers": True, "prefetch_factor": PREFETCH_FACTOR}
    return options


def load_dataset(preset: Preset, split: str, name: str | None = None, data_dir: str | Path | None = None,
                 download: bool = True, augment: bool | None = None) -> Dataset:
    """The `split` ("train", "val" or "test") of dataset `name` (default: the preset's) for `preset`.
    "val" is the data's validation folder where it has one, else VAL_SHARE of the training images, which
    "train" then leaves out. `augment` (default: on for the train split only) applies the training
    augmentation."""
    name = name or preset.dataset
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    augment = split == "train" if augment is None else augment
    if name == "digits":
        return Digits(preset, split, augment)
    if name in CIFAR_CLASSES:
        classes = CIFAR_CLASSES[name]
        if classes != preset.num_classes:
            raise UserError(f"{name} has {classes} classes; preset {preset.name} has {preset.num_classes}")
        return _cifar(preset, name, Path(data_dir or DEFAULT_DATA_DIR), split, download, augment)
    if data_dir is None:
        raise UserError(f"dataset {name} needs --data-dir (a folder of class subfolders)")
    return _image_folder(preset, name, Path(data_dir), split, augment)
