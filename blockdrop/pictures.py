"""Pictures of what a policy does on a test set (the paper's figures 4 and 5), as PNG files.

- `block_usage.png`: how often each block runs, coloured by stage;
- `blocks_histogram.png`: how many blocks each image uses;
- `blocks_per_class.png`: blocks used per class (mean and spread);
- `top_policies.png`: the most frequent policies, each with a strip of images that use it;
- `fewest_most_blocks.png`: the images given the fewest and the most blocks.

Drawn from an evaluation's per-image records (`tally(..., records=True)`) and the dataset they
came from (for the images themselves), with matplotlib's Agg backend: no display needed.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from blockdrop.metrics import Records

STRIP = 8  # images per strip
TOP_POLICIES = 6


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _image(dataset, index: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Image `index` of a dataset of normalised tensors, back in [0, 1] as (H, W) or (H, W, 3)."""
    tensor = dataset[index][0]
    image = tensor.numpy() * np.asarray(std).reshape(-1, 1, 1) + np.asarray(mean).reshape(-1, 1, 1)
    image = np.clip(image, 0, 1)
    return image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)


def _show(ax, image: np.ndarray, title: str = "") -> None:
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def _stage_colours(stages: Sequence[int]) -> list[str]:
    return [f"C{s}" for s in stages]


def block_usage(records: Records, stages: Sequence[int], path: Path) -> Path:
    plt = _pyplot()
    usage = records.policies.mean(0)
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(usage) + 2), 3.2), dpi=110)
    ax.bar(range(len(usage)), 100 * usage, color=_stage_colours(stages))
    for s in sorted(set(stages)):
        ax.bar([0], [0], color=f"C{s}", label=f"stage {s + 1}")
    ax.set_xlabel("block k")
    ax.set_ylabel("images that run it (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"How often each block runs ({len(records.labels)} test images)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def blocks_histogram(records: Records, path: Path) -> Path:
    plt = _pyplot()
    blocks = records.blocks
    num_blocks = records.policies.shape[1]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    bins = np.arange(-0.5, num_blocks + 1.5)
    ax.hist(blocks[records.correct], bins=bins, color="C0", label="classified correctly")
    ax.hist(blocks[~records.correct], bins=bins, bottom=np.histogram(blocks[records.correct], bins)[0],
            color="C3", label="misclassified")
    ax.set_xlabel(f"blocks used (of {num_blocks})")
    ax.set_ylabel("images")
    ax.set_title(f"Blocks used per image: {blocks.mean():.2f} +- {blocks.std():.2f}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def blocks_per_class(records: Records, class_names: Sequence[str], path: Path) -> Path:
    plt = _pyplot()
    classes = np.unique(records.labels)
    if len(classes) > 40:  # ImageNet: the 20 cheapest and the 20 dearest classes
        means = np.array([records.blocks[records.labels == c].mean() for c in classes])
        order = np.argsort(means)
        classes = np.concatenate([classes[order[:20]], classes[order[-20:]]])
    data = [records.blocks[records.labels == c] for c in classes]
    labels = [class_names[c] if c < len(class_names) else str(c) for c in classes]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(classes) + 2), 3.6), dpi=110)
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(classes) + 1), labels, rotation=60 if len(classes) > 12 else 0, fontsize=7)
    accuracy = [100 * records.correct[records.labels == c].mean() for c in classes]
    for i, a in enumerate(accuracy, start=1):
        ax.annotate(f"{a:.0f}%", (i, 0), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=6,
                    color="0.4")
    ax.set_ylim(bottom=-0.5)
    ax.set_ylabel("blocks used")
    ax.set_title("Blocks used per class (triangle: mean; grey: accuracy)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def top_policies(records: Records, dataset, mean, std, path: Path, stages: Sequence[int]) -> Path:
    plt = _pyplot()
    counts = Counter(map(bytes, np.packbits(records.policies, axis=1)))
    top = counts.most_common(TOP_POLICIES)
    num_blocks = records.policies.shape[1]
    fig = plt.figure(figsize=(STRIP * 0.9 + 4, 1.1 * len(top) + 0.6), dpi=110)
    grid = fig.add_gridspec(len(top), STRIP + 1, width_ratios=[4] + [0.9] * STRIP)
    packed = np.packbits(records.policies, axis=1)
    for row, (key, count) in enumerate(top):
        members = np.flatnonzero((packed == np.frombuffer(key, dtype=np.uint8)).all(1))
        policy = records.policies[members[0]]
        ax = fig.add_subplot(grid[row, 0])
        colours = np.array([[0.85, 0.85, 0.85, 1.0]] * num_blocks)
        for k in np.flatnonzero(policy):
            colours[k] = plt.matplotlib.colors.to_rgba(f"C{stages[k]}")
        ax.imshow(colours[None], aspect="auto", interpolation="nearest")
        ax.vlines(np.arange(num_blocks - 1) + 0.5, -0.5, 0.5, colors="white", linewidth=1)
        ax.set_xticks([])
        ax.set_yticks([])
        accuracy = 100 * records.correct[members].mean()
        ax.set_title(f"{int(policy.sum())} blocks, {count} images ({100 * count / len(packed):.1f}%), "
                     f"acc {accuracy:.0f}%", fontsize=7)
        shown = np.sort(np.random.default_rng(row).choice(members, min(STRIP, len(members)), replace=False))
        for j, index in enumerate(shown):
            _show(fig.add_subplot(grid[row, j + 1]), _image(dataset, int(index), mean, std))
    fig.suptitle(f"Most frequent policies ({len(counts)} unique; coloured = block runs)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def fewest_most(records: Records, dataset, mean, std, class_names: Sequence[str], path: Path) -> Path:
    plt = _pyplot()
    ties = np.random.default_rng(0).permutation(len(records.blocks))  # not the dataset's class order
    order = np.lexsort((ties, records.blocks))
    rows = [("fewest blocks", order[:STRIP]), ("most blocks", order[::-1][:STRIP])]
    fig, axes = plt.subplots(2, STRIP, figsize=(STRIP * 1.1, 3.2), dpi=110, squeeze=False)
    for r, (label, indices) in enumerate(rows):
        for j in range(STRIP):
            ax = axes[r][j]
            if j >= len(indices):
                ax.axis("off")
                continue
            i = int(indices[j])
            name = class_names[records.labels[i]] if records.labels[i] < len(class_names) else str(records.labels[i])
            mark = "" if records.correct[i] else " x"
            _show(ax, _image(dataset, i, mean, std), f"{name}: {records.blocks[i]}{mark}")
        axes[r][0].set_ylabel(label, fontsize=8)
    fig.suptitle("Images given the fewest (top) and the most (bottom) blocks; x = misclassified", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def draw_all(records: Records, dataset, mean: Sequence[float], std: Sequence[float], stages: Sequence[int],
             class_names: Sequence[str], folder: str | Path) -> list[Path]:
    """Every picture into `folder`; `dataset[i]` must be the image of record i (same order)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [
        block_usage(records, stages, folder / "block_usage.png"),
        blocks_histogram(records, folder / "blocks_histogram.png"),
        blocks_per_class(records, class_names, folder / "blocks_per_class.png"),
        top_policies(records, dataset, mean, std, folder / "top_policies.png", stages),
        fewest_most(records, dataset, mean, std, class_names, folder / "fewest_most_blocks.png"),
    ]
