"""Hypercube primitives and analysis against brute-force references and synthetic cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from mechunlearn import KeyVectors, collect_keys
from mechunlearn.analysis.hypercube import hypercube, spearman
from mechunlearn.kernels.regions import (
    Cube,
    contains,
    fit_cube,
    inclusion_rate,
    k_min,
    log_volume,
    normalized_distance,
)


def keys(values, name="skill", model="m", layers=None) -> KeyVectors:
    values = torch.as_tensor(values, dtype=torch.float32)
    if values.ndim == 2:
        values = values[:, None, :]
    layers = list(range(values.shape[1])) if layers is None else layers
    return KeyVectors(values, layers, {"skill": name, "model": model, "d_mlp": values.shape[2]})


def gaussians(n_f=40, n_o=50, layers=3, d=6, shift=10.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n_f, layers, d, generator=g)
    o = torch.randn(n_o, layers, d, generator=g) + shift
    return keys(f, "forget"), keys(o, "other")


# ------------------------------------------------------------------------------ primitives
def test_fit_cube_matches_numpy_per_layer():
    x = torch.randn(30, 3, 5, dtype=torch.float64)
    cube = fit_cube(x)
    assert cube.mu.shape == (3, 5) and cube.sigma.shape == (3, 5) and cube.n == 30
    np.testing.assert_allclose(cube.mu, x.numpy().mean(0))
    np.testing.assert_allclose(cube.sigma, x.numpy().std(0, ddof=1))
    assert cube.n_floored.tolist() == [0, 0, 0]
    one = cube[1]
    assert isinstance(one, Cube) and one.mu.shape == (5,)
    torch.testing.assert_close(one.sigma, fit_cube(x[:, 1]).sigma)


def test_constant_dimension_is_floored_without_division_by_zero():
    x = torch.randn(20, 4, dtype=torch.float64)
    x[:, 2] = 3.0
    cube = fit_cube(x)
    raw = x.std(0)
    expected_floor = 1e-6 * raw.median()  # lower median of [s0, s1, 0, s3]
    assert int(cube.n_floored) == 1
    torch.testing.assert_close(cube.floor, expected_floor)
    assert cube.sigma[2] == cube.floor > 0
    d = normalized_distance(x, cube)
    assert torch.isfinite(d).all()
    # The constant dimension contributes nothing for vectors that keep its value...
    torch.testing.assert_close(d, normalized_distance(x[:, [0, 1, 3]], fit_cube(x[:, [0, 1, 3]])))
    # ...and a vector off it by 1e-3 is far outside.
    y = x[:1].clone()
    y[0, 2] += 1e-3
    assert normalized_distance(y, cube) > 100
    # An all-constant layer falls back to the absolute floor.
    flat = fit_cube(torch.ones(5, 3))
    assert float(flat.floor) == 1e-12 and int(flat.n_floored) == 3
    assert normalized_distance(torch.ones(2, 3), flat).eq(0).all()


def test_distance_contains_inclusion_against_loops():
    g = torch.Generator().manual_seed(1)
    train, x = torch.randn(7, 3, generator=g), torch.randn(9, 3, generator=g) * 2
    cube = fit_cube(train)
    mu, sd = train.double().mean(0).tolist(), train.double().std(0).tolist()
    brute = [max(abs(float(v[i]) - mu[i]) / sd[i] for i in range(3)) for v in x]
    np.testing.assert_allclose(normalized_distance(x, cube), brute, rtol=1e-12)
    alphas = [0.3, 1.1, 2.2, 5.0]
    rate = inclusion_rate(x, cube, alphas)
    for j, a in enumerate(alphas):
        inside = [all(abs(float(v[i]) - mu[i]) <= a * sd[i] for i in range(3)) for v in x]
        assert contains(x, cube, a).tolist() == inside
        assert float(rate[j]) == pytest.approx(sum(inside) / len(inside))


def test_k_min_closed_form_equals_search():
    g = torch.Generator().manual_seed(2)
    train = torch.randn(25, 2, 6, generator=g)
    cube = fit_cube(train)
    km = k_min(train, cube)
    assert km.shape == (2,)
    torch.testing.assert_close(km, k_min(train))  # fitted on the same vectors by default
    for layer in range(2):
        lo, hi = 0.0, 100.0  # bisection on "every probe vector inside"
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if contains(train[:, layer], cube[layer], mid).all() else (mid, hi)
        assert float(km[layer]) == pytest.approx(hi, rel=1e-9)
    # Every fit vector is inside at exactly alpha = k_min (per layer alphas broadcast).
    assert contains(train, cube, km).all()


@pytest.mark.parametrize("n", [2, 5, 50, 227])
def test_k_min_samuelson_bound_is_attained_by_one_outlier(n):
    x = torch.zeros(n, 3, dtype=torch.float64)
    x[-1] = torch.tensor([1.0, -2.0, 5.0])
    assert float(k_min(x)) == pytest.approx((n - 1) / math.sqrt(n))
    assert float(k_min(torch.randn(n, 40))) <= (n - 1) / math.sqrt(n) + 1e-9


def test_log_volume():
    x = torch.randn(10, 2, 4, dtype=torch.float64)
    cube = fit_cube(x)
    expected = np.log(2 * 3.0 * x.numpy().std(0, ddof=1)).sum(-1)
    np.testing.assert_allclose(log_volume(cube, 3.0), expected)
    alphas = torch.tensor([1.0, 2.0], dtype=torch.float64)
    np.testing.assert_allclose(
        cube.log_volume(alphas), np.log(2 * alphas[:, None].numpy() * cube.sigma.numpy()).sum(-1)
    )


def test_primitive_errors():
    with pytest.raises(ValueError, match="at least 2 vectors"):
        fit_cube(torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"shape \[n, \.\.\., d\]"):
        fit_cube(torch.randn(5))
    bad = torch.randn(5, 3)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        fit_cube(bad)
    with pytest.raises(ValueError, match="do not match"):
        normalized_distance(torch.randn(3, 4), fit_cube(torch.randn(5, 3)))
    # A NaN query is never inside.
    assert not contains(bad, fit_cube(torch.randn(5, 3)), 1e9)[2]


def test_spearman_exact_small_and_nan_cases():
    rho, p = spearman([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    assert rho == pytest.approx(1.0) and p == pytest.approx(2 / 120)
    x = [0, 1, 2, 3, 4, 5]
    y = [3, 1, 4, 1, 5, 9]
    rho, p = spearman(x, y)
    rx = stats.rankdata(x)
    null = [np.corrcoef(rx, stats.rankdata(q))[0, 1] for q in itertools.permutations(y)]
    assert p == pytest.approx(np.mean(np.abs(null) >= abs(rho) - 1e-12))
    assert math.isnan(spearman([0, 1], [1, 2])[0])
    assert math.isnan(spearman([0, 1, 2], [1, 1, 1])[0])


# ------------------------------------------------------------------------------ the analysis
def test_separated_gaussians():
    kf, ko = gaussians()
    res = hypercube(kf, {"other": ko})
    assert res.layers == [0, 1, 2] and res.others == ["other"] and res.forget == "forget"
    curves = res.curves
    assert set(curves.columns) == {"layer", "alpha", "skill", "role", "part", "inclusion"}
    assert set(curves["part"]) == {"fit", "held-out", "all"}
    moderate = res.inclusion([4.0])
    assert (moderate.query("role == 'other'")["inclusion"] == 0).all()
    assert (moderate.query("part == 'fit'")["inclusion"] == 1).all()
    assert res.per_other["separated"].all()
    assert (res.per_other["alpha_f"] < res.per_other["alpha_other"]).all()
    assert (res.per_other["other_at_kmin"] == 0).all()
    assert (res.per_other["centre_rms"] > 5).all()
    pl = res.per_layer
    assert (pl["n_fit"] == 20).all() and (pl["n_heldout"] == 20).all()
    # held-out inclusion at k_min agrees with the margins
    for row in pl.itertuples():
        m = res.margins.query("layer == @row.layer and part == 'held-out'")["margin"]
        assert row.heldout_at_kmin == pytest.approx((m <= row.k_min).mean())
        fit = res.margins.query("layer == @row.layer and part == 'fit'")["margin"]
        assert row.k_min == pytest.approx(fit.max())
        assert row.alpha_f == pytest.approx(np.sort(m)[math.ceil(0.9 * len(m)) - 1])


def test_definitions_of_volume_and_centre_distance():
    kf, ko = gaussians(layers=1, d=4, shift=2.0)
    res = hypercube(kf, {"other": ko}, test_size=10)
    f_all, o_all = kf.values[:, 0].double(), ko.values[:, 0].double()
    idx = res.margins.query("part == 'fit'")["example"].tolist()
    f_fit = f_all[idx]
    mu, sd = f_fit.mean(0), f_fit.std(0)
    sd_pool = torch.cat([f_all, o_all]).std(0)
    row = res.per_layer.iloc[0]
    kmin = float(((f_fit - mu).abs() / sd).max())
    assert row.k_min == pytest.approx(kmin)
    assert row.log_volume == pytest.approx(float(torch.log(2 * kmin * sd).sum()))
    assert row.log_side == pytest.approx(row.log_volume / 4)
    assert row.log_rel_volume == pytest.approx(float(torch.log(sd / sd_pool).sum()))
    assert row.log_rel_side == pytest.approx(row.log_rel_volume / 4)
    z = (mu - o_all.mean(0)) / sd
    other = res.per_other.iloc[0]
    assert other.centre_rms == pytest.approx(float(z.square().mean().sqrt()))
    assert other.centre_max == pytest.approx(float(z.abs().max()))
    zp = (mu - o_all.mean(0)) / sd_pool
    assert other.centre_rms_pooled == pytest.approx(float(zp.square().mean().sqrt()))
    # alpha_other: every alpha below keeps the other's inclusion <= cap; alpha_other does not
    m_o = res.margins.query("role == 'other'")["margin"].to_numpy()
    a = other.alpha_other
    assert (m_o <= np.nextafter(a, 0)).mean() <= res.cap < (m_o <= a).mean()


def test_invariant_to_per_dimension_affine_maps_and_permutations():
    kf, ko = gaussians(layers=2, d=5, shift=1.5)
    res = hypercube(kf, {"o": ko}, alphas=np.linspace(0, 8, 33))
    scale = torch.tensor([3.0, -0.5, 100.0, 1e-2, 7.0])
    shift = torch.tensor([5.0, -2.0, 0.0, 1.0, 1e3])
    kf2 = keys(kf.values * scale + shift, "forget")
    ko2 = keys((ko.values * scale + shift)[torch.randperm(len(ko))], "other")
    res2 = hypercube(kf2, {"o": ko2}, alphas=np.linspace(0, 8, 33))
    pd.testing.assert_frame_equal(res.curves, res2.curves)
    cols = ["k_min", "alpha_f", "heldout_at_kmin", "log_rel_volume"]
    pd.testing.assert_frame_equal(res.per_layer[cols], res2.per_layer[cols], rtol=1e-4)
    cols = ["centre_rms", "centre_max", "centre_rms_pooled", "alpha_other", "separated"]
    pd.testing.assert_frame_equal(res.per_other[cols], res2.per_other[cols], rtol=1e-4)


def test_trends_detect_shrinking_and_separating_cubes_and_their_absence():
    g = torch.Generator().manual_seed(3)
    n_layers, d = 6, 8
    width = torch.linspace(2.0, 0.5, n_layers)[None, :, None]
    shift = torch.linspace(0.5, 4.0, n_layers)[None, :, None]
    f = torch.randn(60, n_layers, d, generator=g) * width
    o = torch.randn(60, n_layers, d, generator=g) + shift
    res = hypercube(keys(f, "f"), {"o": keys(o, "o")})
    t = res.trends.set_index("metric")
    assert set(t.index) >= {"log_rel_side", "log_side", "centre_rms_pooled", "centre_rms"}
    for metric in ("log_rel_side", "centre_rms_pooled", "centre_rms"):
        assert t.loc[metric, "supports_claim"], metric
    assert t.loc["log_rel_side", "rho"] == pytest.approx(-1.0)
    assert t.loc["log_rel_side", "p_value"] == pytest.approx(2 / math.factorial(6))
    # Reversed layer order: the same data contradicts the claim.
    rev = hypercube(keys(f.flip(1), "f"), {"o": keys(o.flip(1), "o")})
    r = rev.trends.set_index("metric")
    assert not r["supports_claim"].any()
    assert r.loc["centre_rms_pooled", "rho"] < 0
    assert "Spearman" in res.summary()


def test_layers_argument_and_negative_index():
    kf, ko = gaussians(layers=3)
    res = hypercube(kf, {"o": ko}, layers=[-1, 0])
    assert res.layers == [2, 0]
    assert res.per_layer["layer"].tolist() == [2, 0]
    kf2 = KeyVectors(kf.values, [4, 7, 9], kf.meta)
    ko2 = KeyVectors(ko.values[:, 1:], [7, 9], ko.meta)
    assert hypercube(kf2, {"o": ko2}, layers=[9, 7]).layers == [9, 7]
    with pytest.raises(ValueError, match="holds layers"):
        hypercube(kf2, {"o": ko2})


def test_errors():
    kf, ko = gaussians()
    with pytest.raises(ValueError, match="`others` is empty"):
        hypercube(kf, {})
    with pytest.raises(TypeError, match="dict"):
        hypercube(kf, ko)
    with pytest.raises(TypeError, match="KeyVectors"):
        hypercube(kf.values, {"o": ko})
    with pytest.raises(ValueError, match="at least 4"):
        hypercube(kf.subset([0, 1, 2]), {"o": ko})
    with pytest.raises(ValueError, match="model"):
        hypercube(kf, {"o": keys(ko.values, model="other-model")})
    with pytest.raises(ValueError, match="neurons per layer"):
        hypercube(kf, {"o": KeyVectors(ko.values[..., :3], ko.layers, {})})
    bad = kf.values.clone()
    bad[3, 1, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        hypercube(keys(bad), {"o": ko})
    with pytest.raises(ValueError, match="non-finite"):
        hypercube(ko, {"bad": keys(bad)})
    with pytest.raises(ValueError, match="at least 2"):
        hypercube(kf.subset(range(4)), {"o": ko}, test_size=3)
    with pytest.raises(ValueError, match="test_size=0.0 is a fraction outside"):
        hypercube(kf, {"o": ko}, test_size=0.0)
    with pytest.raises(ValueError, match="target"):
        hypercube(kf, {"o": ko}, target=1.5)
    with pytest.raises(ValueError, match="alphas"):
        hypercube(kf, {"o": ko}, alphas=[-1.0])


def test_end_to_end_on_tiny_model(tiny_llama):
    from mechunlearn.analysis.convexity import convexity

    math_q = [f"What is {a} plus {b}?" for a, b in zip(range(8), range(3, 11), strict=True)]
    code_q = [f"def f{i}(x): return x * {i}" for i in range(6)]
    kf = collect_keys(tiny_llama, math_q, quiet=True)
    ko = collect_keys(tiny_llama, code_q, quiet=True)
    res = hypercube(kf, {"code": ko})
    n_layers = tiny_llama.cfg.n_layers
    assert res.layers == list(range(n_layers))
    assert len(res.per_layer) == n_layers and len(res.per_other) == n_layers
    assert res.margins.groupby("layer").size().tolist() == [8 + 6] * n_layers
    assert np.isfinite(res.per_layer[["k_min", "log_volume", "log_rel_volume"]]).all().all()
    conv = convexity(kf, {"code": ko}, ks=(1, 2), n_pairs=16)
    assert len(conv.per_layer) == n_layers
    assert conv.separability["balanced_accuracy"].between(0, 1).all()
