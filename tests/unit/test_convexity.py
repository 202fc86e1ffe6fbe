"""Convexity analysis: k-means, logistic regression, boxes, segments, on synthetic shapes."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from mechunlearn import KeyVectors
from mechunlearn.analysis.convexity import (
    box_union_margin,
    convexity,
    fit_boxes,
    fit_logistic,
    kmeans,
)
from mechunlearn.analysis.hypercube import hypercube
from mechunlearn.kernels.regions import fit_cube


def keys(values, name="skill") -> KeyVectors:
    values = torch.as_tensor(values, dtype=torch.float32)
    if values.ndim == 2:
        values = values[:, None, :]
    return KeyVectors(values, list(range(values.shape[1])), {"skill": name, "model": "m"})


def blobs(centres, n, sd=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.as_tensor(centres, dtype=torch.float64)
    x = centres.repeat_interleave(n, 0)
    return x + sd * torch.randn(x.shape, generator=g, dtype=torch.float64)


def ring(n, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi
    r = 1 + 0.05 * torch.randn(n, generator=g, dtype=torch.float64)
    x = torch.zeros(n, d, dtype=torch.float64)
    x[:, 0], x[:, 1] = r * theta.cos(), r * theta.sin()
    if d > 2:
        x[:, 2:] = 0.05 * torch.randn(n, d - 2, generator=g, dtype=torch.float64)
    return x


# ------------------------------------------------------------------------------ building blocks
def test_kmeans_recovers_separated_clusters():
    x = blobs([[0, 0, 0], [10, 0, 0], [0, 10, 5]], 20)
    labels, centres, inertia = kmeans(x, 3, seed=1)
    truth = torch.arange(3).repeat_interleave(20)
    # each true cluster is one predicted cluster, and the map is a bijection
    pairs = {(int(t), int(p)) for t, p in zip(truth, labels, strict=True)}
    assert len(pairs) == 3 and len({p for _, p in pairs}) == 3
    brute = sum(float((x[i] - centres[labels[i]]).square().sum()) for i in range(len(x)))
    assert inertia == pytest.approx(brute)
    assert kmeans(x, 1)[0].eq(0).all()
    with pytest.raises(ValueError, match="k <= n"):
        kmeans(x, 61)
    # Duplicate points: fewer distinct points than k still returns k labels.
    dup = torch.zeros(5, 2, dtype=torch.float64)
    assert kmeans(dup, 3)[0].shape == (5,)


def test_fit_logistic_is_a_stationary_point_and_separates():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.3 * torch.randn(40, generator=g, dtype=torch.float64) > 0.4).long()
    l2 = 0.1
    w, b = fit_logistic(x, y, l2=l2, max_iter=200)
    # gradient of the (class-balanced) objective vanishes
    p = torch.sigmoid(x @ w + b)
    yf = y.double()
    wt = torch.where(yf > 0.5, 0.5 / yf.sum(), 0.5 / (1 - yf).sum())
    grad_w = x.T @ (wt * (p - yf)) + l2 * w
    grad_b = (wt * (p - yf)).sum()
    assert grad_w.abs().max() < 1e-6 and abs(float(grad_b)) < 1e-6
    sep = blobs([[0, 0], [5, 5]], 20)
    w, b = fit_logistic(sep, torch.arange(2).repeat_interleave(20), l2=1e-2)
    assert ((sep @ w + b > 0).long() == torch.arange(2).repeat_interleave(20)).all()
    with pytest.raises(ValueError, match="both classes"):
        fit_logistic(sep, torch.ones(40))
    with torch.inference_mode():  # works from inside inference mode too
        fit_logistic(sep, torch.arange(2).repeat_interleave(20))


def test_fit_boxes_against_loops():
    x = blobs([[0, 0, 0], [4, 4, 4]], 6, sd=1.0) * torch.tensor([1.0, 2.0, 0.5])
    x = torch.cat([x, torch.tensor([[9.0, 9.0, 9.0]], dtype=torch.float64)])  # a singleton
    labels = torch.tensor([0] * 6 + [2] * 6 + [5])  # label ids need not be contiguous
    floor = 1e-3
    boxes, alphas = fit_boxes(x, labels, floor)
    assert boxes.mu.shape == (3, 3) and alphas.shape == (3,)
    for c, lab in enumerate([0, 2, 5]):
        members = x[labels == lab]
        mu = members.mean(0)
        sd = members.std(0) if len(members) > 1 else torch.zeros(3, dtype=torch.float64)
        sd = sd.clamp(min=floor)
        torch.testing.assert_close(boxes.mu[c], mu)
        torch.testing.assert_close(boxes.sigma[c], sd)
        assert float(alphas[c]) == pytest.approx(float(((members - mu).abs() / sd).max()))
    assert float(alphas[2]) == 0  # the singleton's box is its point
    r = box_union_margin(x, boxes, alphas)
    assert (r <= 1 + 1e-12).all()  # every fit point is in the union at h = 1
    outside = torch.tensor([[20.0, -20.0, 3.0]], dtype=torch.float64)
    assert float(box_union_margin(outside, boxes, alphas)) > 1


# ------------------------------------------------------------------------------ the analysis
def test_ring_is_flagged_non_convex_and_a_blob_is_not():
    f = ring(120)
    centre = blobs([[0, 0]], 40, sd=0.15, seed=1)
    res = convexity(keys(f, "ring"), {"centre": keys(centre, "centre")}, n_pairs=200, ks=(1,))
    row = res.per_layer.iloc[0]
    assert row.baseline_forget_rate > 0.95
    assert row.segment_forget_rate < 0.8 * row.baseline_forget_rate
    assert row.midpoint_forget_rate < row.segment_forget_rate  # worst in the middle
    seg = res.segments.set_index("t")["forget_rate"]
    assert seg[0.5] < seg[0.25] and seg[0.5] < seg[0.75]
    # A Gaussian blob beside the other skill: segments stay in the forget region.
    blob = blobs([[0, 0]], 120, sd=1.0)
    away = blobs([[8, 0]], 40, sd=1.0, seed=1)
    ok = convexity(keys(blob, "blob"), {"away": keys(away, "away")}, n_pairs=200, ks=(1,))
    assert ok.per_layer.iloc[0].segment_forget_rate > 0.97
    assert ok.per_layer.iloc[0].chance_rate == pytest.approx(120 / 160)


def test_linear_separability():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(60, 2, 10, generator=g)
    o = torch.randn(60, 2, 10, generator=g)
    o[:, 0] += 4.0  # layer 0: far apart; layer 1: the same distribution
    res = convexity(keys(f, "f"), {"o": keys(o, "o")}, ks=(1,), n_pairs=8)
    sep = res.separability.set_index("layer")
    assert sep.loc[0, "accuracy"] == 1.0 and sep.loc[0, "balanced_accuracy"] == 1.0
    assert sep.loc[1, "balanced_accuracy"] < 0.75
    assert (sep["majority_baseline"] == 0.5).all() and (sep["n_test"] == 60).all()


def test_two_boxes_beat_one_box_on_a_dumbbell():
    """Forget keys in two lobes with another skill in between: one box holds the other skill,
    two boxes do not."""
    f = blobs([[-3, -3, -3, -3], [3, 3, 3, 3]], 40, sd=0.5)
    o = blobs([[0, 0, 0, 0]], 40, sd=0.5, seed=2)
    res = convexity(keys(f, "f"), {"o": keys(o, "o")}, ks=(1, 2), n_pairs=50)
    b = res.boxes.set_index(["k", "sizing"])
    assert b.loc[(1, "h"), "false_positive_rate"] > 0.9
    assert b.loc[(2, "h"), "false_positive_rate"] == 0
    assert b.loc[(2, "matched"), "false_positive_rate"] == 0
    assert (res.boxes["forget_heldout_inclusion"][res.boxes.sizing == "matched"] >= 0.9).all()
    assert (res.boxes["forget_fit_inclusion"][res.boxes.sizing == "h"] == 1).all()
    assert b.loc[(2, "h"), "n_boxes"] == 2
    # the segments between the lobes cross the other skill
    assert res.per_layer.iloc[0].segment_forget_rate < 0.8


def test_one_box_equals_the_hypercube():
    g = torch.Generator().manual_seed(4)
    kf = keys(torch.randn(40, 2, 6, generator=g), "f")
    ko = keys(torch.randn(30, 2, 6, generator=g) + 1.0, "o")
    conv = convexity(kf, {"o": ko}, ks=(1,), n_pairs=8)
    cube = hypercube(kf, {"o": ko})
    one = conv.boxes.query("k == 1 and sizing == 'h'").set_index("layer")
    pl = cube.per_layer.set_index("layer")
    po = cube.per_other.set_index("layer")
    for layer in (0, 1):
        assert one.loc[layer, "forget_heldout_inclusion"] == pytest.approx(
            pl.loc[layer, "heldout_at_kmin"]
        )
        assert one.loc[layer, "false_positive_rate"] == pytest.approx(
            po.loc[layer, "other_at_kmin"]
        )


def test_invariant_to_per_dimension_affine_maps():
    g = torch.Generator().manual_seed(5)
    f, o = torch.randn(30, 1, 4, generator=g), torch.randn(30, 1, 4, generator=g) + 1
    scale = torch.tensor([2.0, -3.0, 0.1, 10.0])
    shift = torch.tensor([1.0, 0.0, -4.0, 50.0])
    kw = dict(ks=(1, 2), n_pairs=64)
    a = convexity(keys(f), {"o": keys(o)}, **kw)
    b = convexity(keys(f * scale + shift), {"o": keys(o * scale + shift)}, **kw)
    pd.testing.assert_frame_equal(a.per_layer, b.per_layer)
    pd.testing.assert_frame_equal(a.segments, b.segments)
    pd.testing.assert_frame_equal(a.separability, b.separability, rtol=1e-4)
    pd.testing.assert_frame_equal(a.boxes, b.boxes, rtol=1e-4)


def test_errors_and_warnings():
    f, o = keys(torch.randn(10, 3)), keys(torch.randn(6, 3))
    with pytest.raises(ValueError, match="`others` is empty"):
        convexity(f, {})
    with pytest.raises(ValueError, match="at least 2 examples"):
        convexity(f, {"o": o.subset([0])})
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        convexity(f, {"o": o}, ts=(0.0, 0.5))
    with pytest.raises(ValueError, match="positive numbers of boxes"):
        convexity(f, {"o": o}, ks=(0, 2))
    with pytest.raises(ValueError, match="at least 4"):
        convexity(f.subset([0, 1, 2]), {"o": o})
    with pytest.warns(UserWarning, match="skipping k"):
        res = convexity(f, {"o": o}, ks=(1, 50), n_pairs=4)
    assert res.settings["ks"] == [1]
    assert set(res.boxes["k"]) == {1}
    assert torch.isfinite(fit_cube(torch.randn(4, 2)).sigma).all()
