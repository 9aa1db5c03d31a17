"""The accuracy-vs-FLOPs Pareto front of a set of trained models, and its plot.

A point is dominated when another is at least as accurate *and* at most as expensive, and
strictly better in one of the two. Exact duplicates do not dominate each other: both stay on the
front (two runs that reached the same point are both worth keeping).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
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


def pareto_front(points: Sequence[Point], by: Callable[[Point], Point] | None = None) -> list[Point]:
    """The non-dominated points, cheapest first (ties in FLOPs: most accurate first). `by`: the figures
    dominance is judged on (a sweep's: each point's validation figures, blockdrop.sweep.validation); the
    points returned are those given."""
    judged = [(by(p) if by else p, p) for p in points]
    judged.sort(key=lambda jp: (jp[0].flops, -jp[0].accuracy))
    front: list[tuple[Point, Point]] = []
    for j, p in judged:
        # everything that could dominate p comes before it in this order
        if not any(q.dominates(j) for q, _ in front):
            front.append((j, p))
    return [p for _, p in front]


CURVE_STYLE = {"greedy": ("greedy static", "C2", "s"), "distributek": ("DistributeK", "C4", "^"),
               "randomk": ("RandomK", "C1", "v"), "firstk": ("FirstK", "C5", "D"),
               "prune_finetune": ("prune and finetune, from your ResNet", "C3", "P"),
               "channel_prune": ("channel pruning, from your ResNet", "C8", "X")}
TRAINED_CURVES = ("prune_finetune", "channel_prune")  # models trained apart from the user's ResNet: solid lines


def plot_front(points: Sequence[Point], front: Sequence[Point], path: str | Path,
               reference: Point | None = None, title: str = "BlockDrop: accuracy vs FLOPs",
               curves: dict | None = None, lines: dict | None = None) -> Path:
    """Scatter of all points, the front as a step line, the full model as a star; written as PNG.

    `curves`: image-blind baselines (name -> points with .flops, .accuracy) drawn as dashed lines.
    A point whose info holds `best_static_accuracy` (the best baseline at its FLOPs, on its own
    ResNet) gets a hollow marker there, joined to it by a dotted line: the per-image policy's gain.
    `lines`: budget models' curves (label -> their Points), each one model's points joined by a line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    lowest = min([p.accuracy for p in points] + ([reference.accuracy] if reference else []))
    for name, curve in (curves or {}).items():
        label, colour, marker = CURVE_STYLE.get(name, (name, "0.5", "o"))
        ordered = sorted(curve, key=lambda c: c.flops)
        trained = name in TRAINED_CURVES
        ax.plot([c.flops for c in ordered], [100 * c.accuracy for c in ordered], linestyle="-" if trained else "--",
                marker=marker, markersize=4 if trained else 3, linewidth=1.5 if trained else 1, color=colour,
                label=f"{label} ({'static' if trained else 'image-blind'})", zorder=2 if trained else 1)
    statics = [p for p in points if "best_static_accuracy" in p.info]
    for p in statics:
        ax.plot([p.flops, p.flops], [100 * p.info["best_static_accuracy"], 100 * p.accuracy], ":", color="0.3",
                linewidth=1, zorder=2)
    if statics:
        ax.scatter([p.flops for p in statics], [100 * p.info["best_static_accuracy"] for p in statics],
                   facecolors="none", edgecolors="0.3", label="best image-blind policy at the same FLOPs\n"
                                                          "(on that model's own ResNet)", zorder=3)
    for i, (label, curve) in enumerate((lines or {}).items()):
        ordered = sorted(curve, key=lambda c: c.flops)
        ax.plot([c.flops for c in ordered], [100 * c.accuracy for c in ordered], "-", color=f"C{6 + i % 4}",
                linewidth=1.5, label=f"{label} (one model)", zorder=3)
    ax.scatter([p.flops for p in points], [100 * p.accuracy for p in points], color="0.6", label="trials", zorder=2)
    ax.step([p.flops for p in front], [100 * p.accuracy for p in front], where="post", color="C0", zorder=3)
    ax.scatter([p.flops for p in front], [100 * p.accuracy for p in front], color="C0", label="Pareto front", zorder=4)
    for p in front:
        if p.label:
            ax.annotate(p.label, (p.flops, 100 * p.accuracy), textcoords="offset points", xytext=(4, -10), fontsize=8)
    if reference is not None:
        ax.scatter([reference.flops], [100 * reference.accuracy], marker="*", s=160, color="C3",
                   label=reference.label or "full model", zorder=5)
    if curves:  # baselines that collapse to chance would squash the interesting range
        ax.set_ylim(bottom=max(ax.get_ylim()[0], 100 * lowest - 10))
    ax.set_ylim(top=min(ax.get_ylim()[1], 100.5))  # accuracy ends at 100%
    ax.set_xlabel("FLOPs per image (policy network included)")
    ax.set_ylabel("test accuracy (%); the front chosen on validation" if any(p.info.get("val_accuracy") is not None
                                                                            for p in front) else "test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
