"""Is one model more accurate than another on the same images? A paired interval, not a count.

Both models are scored on the same test images, so the question is about the per-image difference
d_i = a_i - b_i (a_i, b_i in [0, 1]: 1 correct, 0 wrong, or a fraction for a baseline read off its
curve between two block counts). `paired_difference` gives the mean difference with a percentile
bootstrap interval over images (resampling images keeps each image's pair together, so what both
models get right or wrong cancels); the verdict is a tie whenever the interval holds 0.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 4000
_CHUNK = 1 << 22  # bootstrap indices drawn at a time: memory stays bounded on ImageNet's 50k images


@dataclass(frozen=True)
class PairedDifference:
    """mean(a) - mean(b) over `images` paired images, with its bootstrap interval [low, high]."""

    difference: float
    low: float
    high: float
    images: int
    confidence: float = CONFIDENCE

    @property
    def verdict(self) -> str:
        """"better" (the interval is above 0), "worse" (below 0) or "tie" (it holds 0)."""
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "tie"

    def text(self) -> str:
        """`+1.20 points [-0.30, +2.70]` (in accuracy points)."""
        return f"{100 * self.difference:+.2f} points [{100 * self.low:+.2f}, {100 * self.high:+.2f}]"


def paired_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                      confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0) -> PairedDifference:
    """The mean of a - b with a percentile bootstrap interval over images (seeded: the same inputs give
    the same interval)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or len(a) == 0:
        raise ValueError(f"paired_difference needs two equal-length, non-empty score vectors, not shapes {a.shape} "
                         f"and {b.shape}")
    diff = a - b
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), not {confidence}")
    rng = np.random.default_rng(seed)
    n = len(diff)
    means = np.empty(resamples)
    per_chunk = max(_CHUNK // n, 1)
    for start in range(0, resamples, per_chunk):
        count = min(per_chunk, resamples - start)
        means[start:start + count] = diff[rng.integers(0, n, (count, n))].mean(1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return PairedDifference(float(diff.mean()), float(low), float(high), n, confidence)


def seeded_difference(a: Sequence[np.ndarray], b: Sequence[np.ndarray], confidence: float = CONFIDENCE,
                      resamples: int = RESAMPLES, seed: int = 0) -> PairedDifference:
    """The mean over seeds of mean(a_s - b_s) (a_s, b_s: per-image scores of the models of seed s on the same
    images), with a bootstrap interval that resamples both the seeds and, within each seed drawn, the images:
    it holds training noise (seeds) as well as test-set noise (images). One seed: paired_difference."""
    diffs = [np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64) for x, y in zip(a, b, strict=True)]
    if not diffs or any(d.ndim != 1 or len(d) == 0 for d in diffs):
        raise ValueError("seeded_difference needs, for each seed, two equal-length non-empty score vectors")
    if len(diffs) == 1:
        return paired_difference(a[0], b[0], confidence, resamples, seed)
    rng = np.random.default_rng(seed)
    # each seed's image-resampled means, drawn once; a resample picks seeds, then one of each seed's draws
    banks = [d[rng.integers(0, len(d), (resamples, len(d)))].mean(1) for d in diffs]
    picks = rng.integers(0, len(diffs), (resamples, len(diffs)))
    draws = rng.integers(0, resamples, (resamples, len(diffs)))
    means = np.stack([banks[s][r] for s, r in zip(picks.ravel(), draws.ravel())]).reshape(resamples, -1).mean(1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return PairedDifference(float(np.mean([d.mean() for d in diffs])), float(low), float(high),
                            sum(len(d) for d in diffs), confidence)
