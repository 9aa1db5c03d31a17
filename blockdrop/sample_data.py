"""Small labelled image folders made on this machine (nothing is downloaded).

- `digits`: scikit-learn's 1797 bundled 8x8 handwritten digits, upsampled and written as RGB PNGs
  of any size: the shape of a user's own small dataset (say 28x28 grey digits padded to 32x32 RGB).
- `shapes`: ten kinds of shape (circle, square, triangle, ...) drawn with a per-image difficulty:
  easy images are large, high-contrast and clean; hard ones are small, faint, noisy and cluttered.
  A second dataset of the same shape as `digits`, and one where image difficulty really varies
  (`--per-class` sets its size; file names say `-easy` or `-hard`, at difficulty 0.5).
- `mixed`: the digits of `digits`, half of them (per class, at random) degraded: pixel noise, an
  occluding bar, low contrast and a shift. Each file name says which (`00042-hard.png`,
  `00043-easy.png`; blockdrop.data.difficulties reads it back), so reports can show the blocks a
  policy gives easy and hard images.

All are written as `ROOT/train/<class>/*.png` and `ROOT/test/<class>/*.png` (80/20, stratified,
fixed seed), which `--dataset imagefolder --data-dir ROOT` reads.

    python -m blockdrop.sample_data digits data/digits32 [--size 32]
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from blockdrop.errors import UserError, run_cli

SETS = ("digits", "shapes", "mixed")
HARD_SHARE = 0.5  # mixed: the share of degraded images
SHAPES = ("circle", "square", "triangle", "plus", "ring", "diamond", "cross", "star", "hexagon", "crescent")


def _split(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """True for the test images: a stratified 20%."""
    from sklearn.model_selection import train_test_split

    _, test = train_test_split(np.arange(len(labels)), test_size=0.2, random_state=seed, stratify=labels)
    mask = np.zeros(len(labels), dtype=bool)
    mask[test] = True
    return mask


def _write(root: Path, images: np.ndarray, labels: np.ndarray, class_names: list[str],
           hard: np.ndarray | None = None) -> None:
    """`hard` (per image): the difficulty goes into the file name."""
    from PIL import Image

    test = _split(labels)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / ("test" if test[i] else "train") / f"{label}_{class_names[label]}"
        folder.mkdir(parents=True, exist_ok=True)
        suffix = "" if hard is None else ("-hard" if hard[i] else "-easy")
        Image.fromarray(image).save(folder / f"{i:05d}{suffix}.png")


def digits_images(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, size, size, 3) uint8 images and their labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = (bunch.images * (255 / 16)).round().astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in small])
    return np.repeat(images[..., None], 3, axis=3), bunch.target.astype(np.int64)


def degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A hard version of one (H, W, 3) uint8 image: shifted, low contrast, an occluding bar, noise."""
    size = image.shape[0]
    shift = rng.integers(-size // 8, size // 8 + 1, 2)
    out = np.roll(image.astype(np.float64), tuple(shift), axis=(0, 1))
    out = 128 + (out - 128) * rng.uniform(0.4, 0.6)  # contrast
    bar = rng.integers(size // 10, size // 6 + 1)
    at = rng.integers(0, size - bar)
    if rng.uniform() < 0.5:
        out[at:at + bar, :, :] = rng.uniform(60, 200)
    else:
        out[:, at:at + bar, :] = rng.uniform(60, 200)
    out += rng.normal(0, rng.uniform(18, 32), out.shape[:2])[..., None]
    return np.clip(out, 0, 255).round().astype(np.uint8)


def mixed_images(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`digits_images` with HARD_SHARE of each class degraded: images, labels, and which are hard."""
    images, labels = digits_images(size)
    rng = np.random.default_rng(seed)
    hard = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        hard[rng.choice(members, int(round(HARD_SHARE * len(members))), replace=False)] = True
    images = np.stack([degrade(im, rng) if h else im for im, h in zip(images, hard)])
    return images, labels, hard


def _polygon(cx: float, cy: float, r: float, sides: int, angle: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(angle + 2 * math.pi * i / sides), cy + r * math.sin(angle + 2 * math.pi * i / sides))
            for i in range(sides)]


def _draw_shape(draw, kind: str, cx: float, cy: float, r: float, angle: float, color: tuple, background: tuple) -> None:
    w = max(r * 0.35, 1.5)
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        draw.ellipse([cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55], fill=background)
    elif kind == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        ox, oy = r * 0.5 * math.cos(angle), r * 0.5 * math.sin(angle)
        draw.ellipse([cx + ox - r * 0.85, cy + oy - r * 0.85, cx + ox + r * 0.85, cy + oy + r * 0.85], fill=background)
    elif kind == "square":
        draw.polygon(_polygon(cx, cy, r * 1.2, 4, math.pi / 4 + angle * 0.1), fill=color)
    elif kind == "diamond":
        draw.polygon(_polygon(cx, cy, r * 1.2, 4, angle * 0.1), fill=color)
    elif kind == "triangle":
        draw.polygon(_polygon(cx, cy, r * 1.2, 3, -math.pi / 2 + angle * 0.3), fill=color)
    elif kind == "hexagon":
        draw.polygon(_polygon(cx, cy, r * 1.1, 6, angle), fill=color)
    elif kind == "star":
        points = []
        for i in range(10):
            radius = r * 1.25 if i % 2 == 0 else r * 0.5
            a = -math.pi / 2 + angle * 0.3 + math.pi * i / 5
            points.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
        draw.polygon(points, fill=color)
    elif kind in ("plus", "cross"):
        base = angle * 0.1 + (math.pi / 4 if kind == "cross" else 0.0)
        for a in (base, base + math.pi / 2):
            dx, dy = r * math.cos(a), r * math.sin(a)
            draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=color, width=int(round(w * 1.4)))
    else:
        raise ValueError(kind)


def shapes_images(size: int, per_class: int = 180, seed: int = 0, difficulty_power: float = 1.0,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, size, size, 3) uint8 images of SHAPES with a difficulty drawn per image, their labels, and which
    are hard (difficulty >= 0.5)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    scale = 4  # drawn large, then downsampled: smooth edges
    images, labels, hard = [], [], []
    for label in range(len(SHAPES)):
        for _ in range(per_class):
            d = rng.uniform() ** difficulty_power  # 0 easy .. 1 hard
            hard.append(d >= 0.5)
            # light shapes on darker, tinted backgrounds; contrast falls as difficulty rises
            background = rng.uniform(0, 90, 3)
            tint = rng.uniform(0.3, 1.0, 3)
            color = np.clip(background + (210 * (1 - d) + 50 * d) * tint / tint.max(), 0, 255)
            big = size * scale
            canvas = Image.new("RGB", (big, big), tuple(int(v) for v in background))
            draw = ImageDraw.Draw(canvas)
            for _ in range(int(d * 4)):  # clutter: lines in random colours
                line = tuple(int(v) for v in np.clip(background + rng.uniform(20, 160, 3), 0, 255))
                draw.line(list(rng.uniform(0, big, 4)), fill=line, width=scale)
            r = big * (0.36 - 0.16 * d) * rng.uniform(0.85, 1.0)
            cx, cy = big / 2 + rng.uniform(-1, 1, 2) * (big / 2 - r * 1.2) * 0.5
            _draw_shape(draw, SHAPES[label], cx, cy, r, rng.uniform(-math.pi, math.pi),
                        tuple(int(v) for v in color), tuple(int(v) for v in background))
            image = np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.float64)
            image += rng.normal(0, 30 * d ** 2, image.shape)  # pixel noise grows with difficulty
            images.append(np.clip(image, 0, 255).round().astype(np.uint8))
            labels.append(label)
    return np.stack(images), np.array(labels, dtype=np.int64), np.array(hard)


def write_folder(name: str, root: str | Path, size: int = 32, per_class: int = 180) -> Path:
    """Write sample set `name` under `root` (train/ and test/ class folders); returns `root`."""
    if name not in SETS:
        raise UserError(f"unknown sample set {name!r}; choose one of: {', '.join(SETS)}")
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise UserError(f"{root} exists and is not empty; give a new folder")
    hard = None
    if name == "digits":
        images, labels = digits_images(size)
        names = [str(d) for d in range(10)]
    elif name == "mixed":
        images, labels, hard = mixed_images(size)
        names = [str(d) for d in range(10)]
    else:
        images, labels, hard = shapes_images(size, per_class)
        names = list(SHAPES)
    _write(root, images, labels, names, hard)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m blockdrop.sample_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=SETS, help="which set to write")
    parser.add_argument("root", help="folder to create (train/ and test/ inside)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--per-class", type=int, default=180,
                        help="shapes: images per class (default 180; digits and mixed have scikit-learn's 1797)")
    args = parser.parse_args(argv)
    if args.size < 8:
        raise UserError(f"--size must be at least 8, not {args.size}")
    if args.per_class < 5:
        raise UserError(f"--per-class must be at least 5 (a test split per class), not {args.per_class}")
    root = write_folder(args.name, args.root, args.size, args.per_class)
    count = sum(1 for _ in root.rglob("*.png"))
    print(f"wrote {count} images of {args.name} ({args.size}x{args.size} RGB) under {root}/train and {root}/test")


if __name__ == "__main__":
    run_cli(main)
