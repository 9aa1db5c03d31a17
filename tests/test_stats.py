"""The paired interval that decides "better", "worse" or "tie" between two models on the same images."""
from __future__ import annotations

import numpy as np
import pytest

from blockdrop.stats import paired_difference


def test_a_known_difference_is_detected():
    rng = np.random.default_rng(1)
    b = (rng.uniform(size=2000) < 0.80).astype(float)
    a = b.copy()
    a[np.flatnonzero(b == 0)[:100]] = 1  # a gets 100 more images right: +5 points
    result = paired_difference(a, b)
    assert result.difference == pytest.approx(0.05)
    assert result.verdict == "better"
    assert 0 < result.low < 0.05 < result.high < 0.07
    assert paired_difference(b, a).verdict == "worse"


def test_a_known_tie_is_called_a_tie():
    rng = np.random.default_rng(2)
    b = (rng.uniform(size=400) < 0.9).astype(float)
    a = b.copy()
    wrong, right = np.flatnonzero(b == 0), np.flatnonzero(b == 1)
    a[wrong[:3]], a[right[:3]] = 1, 0  # three images swap outcome each way: no difference
    result = paired_difference(a, b)
    assert result.difference == 0
    assert result.verdict == "tie"
    assert result.low < 0 < result.high
    # two images in 400 more is what the old rule called a tie; the interval says it too
    a[wrong[3:5]] = 1
    assert paired_difference(a, b).verdict == "tie"


def test_pairing_cancels_what_both_models_share():
    """The same +1.5 points: significant when the two models err on the same images, not when they
    err independently (an unpaired test could not tell them apart)."""
    rng = np.random.default_rng(3)
    n = 2000
    b = (rng.uniform(size=n) < 0.85).astype(float)
    paired = b.copy()
    paired[np.flatnonzero(b == 0)[:30]] = 1
    independent = (rng.permutation(paired))
    assert paired_difference(paired, b).verdict == "better"
    shared = paired_difference(paired, b)
    unshared = paired_difference(independent, b)
    assert unshared.high - unshared.low > 3 * (shared.high - shared.low)


def test_fractional_scores_and_reproducibility():
    a = np.array([1, 1, 0, 1, 0.5, 1.0])
    b = np.array([0.25, 1, 0, 1, 0.5, 0.75])
    first, second = paired_difference(a, b), paired_difference(a, b)
    assert first == second
    assert first.difference == pytest.approx(1 / 6)
    assert first.text().startswith("+16.67 points [")


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="equal-length"):
        paired_difference([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="non-empty"):
        paired_difference([], [])
    with pytest.raises(ValueError, match="confidence"):
        paired_difference([1], [0], confidence=1.5)


def test_an_interval_over_seeds_and_images_is_wider_when_the_seeds_disagree():
    """Three seeds whose differences agree give about the image interval; three that disagree (a training
    noise the image bootstrap of one seed cannot see) give a wide one around the same mean."""
    from blockdrop.stats import seeded_difference

    rng = np.random.default_rng(1)
    base = (rng.random(400) < 0.8).astype(float)
    agree = [(np.clip(base + (rng.random(400) < 0.05), 0, 1), base) for _ in range(3)]
    one = seeded_difference([agree[0][0]], [agree[0][1]])
    pooled = seeded_difference([x for x, _ in agree], [y for _, y in agree])
    assert pooled.low > 0 and pooled.high - pooled.low < 2 * (one.high - one.low)
    flip = [(base, np.roll(base, 1)), (np.ones(400), base), (np.zeros(400), base)]  # +0, +0.2, -0.8 per seed
    wide = seeded_difference([x for x, _ in flip], [y for _, y in flip])
    assert wide.difference == pytest.approx(np.mean([(x - y).mean() for x, y in flip]))
    assert wide.low < -0.5 and wide.high > 0.1 and wide.verdict == "tie" and wide.images == 1200
