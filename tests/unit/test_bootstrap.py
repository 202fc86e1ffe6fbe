"""The paired bootstrap behind every interval: values against a loop, coverage, seeding, blocks."""

from __future__ import annotations

import numpy as np
import pytest

from mechunlearn.kernels.bootstrap import (
    _index_blocks,
    bootstrap_indices,
    paired_ratio_interval,
    ratio_interval,
    resampled_sums,
    wilson_interval,
)


def test_blocks_are_the_rows_of_one_draw():
    one_draw = np.random.default_rng(7).integers(0, 13, size=(101, 13))
    blocks = list(_index_blocks(13, 101, seed=7, block_elements=40))  # 3 rows per block
    assert len(blocks) == 34
    np.testing.assert_array_equal(np.concatenate(blocks), one_draw)
    np.testing.assert_array_equal(bootstrap_indices(13, 101, seed=7), one_draw)


def test_paired_interval_equals_a_loop_over_resamples():
    rng = np.random.default_rng(0)
    total = rng.integers(1, 20, size=40).astype(float)
    before = rng.binomial(total.astype(int), 0.7).astype(float)
    after = rng.binomial(before.astype(int), 0.5).astype(float)
    ratios = []
    for row in bootstrap_indices(40, 500, seed=3):
        t = total[row].sum()
        ratios.append((after[row].sum() / t) / (before[row].sum() / t))
    expected = np.percentile(ratios, [2.5, 97.5])
    np.testing.assert_allclose(
        paired_ratio_interval(after, before, total, n_boot=500, seed=3), expected
    )
    sums = resampled_sums(after, total, n_boot=500, seed=3)
    rows = bootstrap_indices(40, 500, seed=3)
    np.testing.assert_allclose(sums[0], after[rows].sum(1))
    np.testing.assert_allclose(sums[1], total[rows].sum(1))


def test_paired_interval_covers_the_known_ratio():
    """Each example is right before with p = 0.8 and kept right after with q = 0.6: the true
    relative performance is 0.6. Over 200 data sets the 95 % interval must cover it ~95 % of the
    time (a binomial 99.9 % band around 0.95 for 200 trials is about [0.89, 0.99])."""
    rng = np.random.default_rng(1)
    hits = 0
    for trial in range(200):
        before = rng.random(120) < 0.8
        after = before & (rng.random(120) < 0.6)
        low, high = paired_ratio_interval(after, before, np.ones(120), n_boot=1000, seed=trial)
        hits += low <= 0.6 <= high
    assert 0.89 <= hits / 200 <= 0.99


def test_ratio_interval_covers_the_known_rate():
    rng = np.random.default_rng(2)
    hits = sum(
        lo <= 0.3 <= hi
        for lo, hi in (
            ratio_interval(rng.random(150) < 0.3, np.ones(150), n_boot=1000, seed=s)
            for s in range(200)
        )
    )
    assert 0.89 <= hits / 200 <= 0.99


def test_same_seed_same_interval_other_seed_other_interval():
    rng = np.random.default_rng(4)
    before = (rng.random(60) < 0.7).astype(float)
    after = before * (rng.random(60) < 0.5)
    first = paired_ratio_interval(after, before, np.ones(60), seed=11)
    assert paired_ratio_interval(after, before, np.ones(60), seed=11) == first
    assert paired_ratio_interval(after, before, np.ones(60), seed=12) != first


def test_undefined_resamples_are_left_out_and_all_undefined_is_nan():
    # before is right on one example only: resamples that miss it are undefined (0 / 0).
    before = np.array([1.0, 0, 0, 0, 0])
    low, high = paired_ratio_interval(before, before, np.ones(5), n_boot=200)
    assert (low, high) == (1.0, 1.0)
    low, high = paired_ratio_interval(np.zeros(5), np.zeros(5), np.ones(5), n_boot=50)
    assert np.isnan(low) and np.isnan(high)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: paired_ratio_interval([1, 0], [1, 1, 1], [1, 1]), "1-D of one length"),
        (lambda: paired_ratio_interval([1], [1], [1], level=1.0), "level must lie in"),
        (lambda: ratio_interval([], []), "no examples"),
        (lambda: bootstrap_indices(3, n_boot=0), "n_boot must be at least 1"),
        (lambda: wilson_interval(5, 3), "0 <= k <= n"),
        (lambda: wilson_interval(1, 3, level=0), "level must lie in"),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_wilson_interval_matches_the_closed_form_and_covers():
    # 0 of 30 and 30 of 30: one-sided bounds z^2 / (n + z^2) from the formula, not a point.
    z2 = 1.959963984540054**2
    assert wilson_interval(0, 30) == (0.0, pytest.approx(z2 / (30 + z2)))
    low, high = wilson_interval(30, 30)
    assert high == 1.0 and low == pytest.approx(30 / (30 + z2))
    assert np.isnan(wilson_interval(0, 0)).all()
    # coverage of p = 0.1 with n = 60 over 2,000 draws: near 95 %
    rng = np.random.default_rng(0)
    ks = rng.binomial(60, 0.1, size=2000)
    cover = np.mean([lo <= 0.1 <= hi for lo, hi in (wilson_interval(int(k), 60) for k in ks)])
    assert 0.92 <= cover <= 0.98
