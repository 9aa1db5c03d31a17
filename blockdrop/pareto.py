"""The accuracy-vs-FLOPs Pareto front of a set of trained models, and its plot.

A point is dominated when another is at least as accurate *and* at most as expensive, and
strictly better in one of the two. Exact duplicates do not dominate each other: both stay on the
front (two runs that reached the same point are both worth keeping).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Point:
    accuracy: float
    flops: float
    label: str = ""
    info: dict = field(default_factory=dict, compare=False, hash=False)

    def dominates(self, other: Point) -> bool:
        no_worse = self.accuracy >= other.accuracy and self.flops <= other.flops
        return no_worse and (self.accuracy > other.accuracy or self.flops < other.flops)


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """The non-dominated points, cheapest first (ties in FLOPs: most accurate first)."""
    ordered = sorted(points, key=lambda p: (p.flops, -p.accuracy))
    front: list[Point] = []
    for p in ordered:
        # everything that could dominate p comes before it in this order
        if not any(q.dominates(p) for q in front):
            front.append(p)
    return front


def plot_front(points: Sequence[Point], front: Sequence[Point], path: str | Path,
               reference: Point | None = None, title: str = "BlockDrop: accuracy vs FLOPs") -> Path:
    """Scatter of all points, the front as a step line, the full model as a star; written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.scatter([p.flops for p in points], [100 * p.accuracy for p in points], color="0.6", label="trials", zorder=2)
    ax.step([p.flops for p in front], [100 * p.accuracy for p in front], where="post", color="C0", zorder=3)
    ax.scatter([p.flops for p in front], [100 * p.accuracy for p in front], color="C0", label="Pareto front", zorder=4)
    for p in front:
        if p.label:
            ax.annotate(p.label, (p.flops, 100 * p.accuracy), textcoords="offset points", xytext=(4, -10), fontsize=8)
    if reference is not None:
        ax.scatter([reference.flops], [100 * reference.accuracy], marker="*", s=160, color="C3",
                   label=reference.label or "full model", zorder=5)
    ax.set_xlabel("FLOPs per image (policy network included)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
