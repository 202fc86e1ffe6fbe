"""gaussian_fit() against scipy.stats on sampled neurons, and its handling of bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import special
from scipy import stats as sps

from mechunlearn import NeuronStats, collect
from mechunlearn.analysis.gaussian import GaussianFit, gaussian_fit
from mechunlearn.kernels.normality import (
    ad_critical,
    ad_pvalue,
    adjust_pvalues,
    ks_pvalue,
    shapiro_coefficients,
    shapiro_pvalue,
    smirnov_sf,
)
from mechunlearn.kernels.samples import filled_rows, run_layers
from mechunlearn.validation import check_same_source


def make_stats(samples, model="toy", site="pre", layers=None, seed=0):
    """NeuronStats whose reservoir holds ``samples`` ``[layer, n, d]`` and whose moments are the
    samples' own (non-finite values left out, as collect() does)."""
    x = torch.as_tensor(np.asarray(samples), dtype=torch.float32)
    n_layers, n, d = x.shape
    meta = {"model": model, "n_layers": n_layers, "d_mlp": d, "d_model": 8, "skill": "toy"}
    return NeuronStats.from_samples(x.double(), site=site, layers=layers, seed=seed, meta=meta)


def mixed_samples(n, n_layers=2, d=6, seed=0):
    """Normal, skewed, heavy-tailed and bimodal neurons."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_layers, n, d))
    shapes = [
        lambda: rng.exponential(size=(n_layers, n)),
        lambda: rng.standard_t(3, size=(n_layers, n)),
        lambda: rng.standard_normal((n_layers, n)) + 3 * (rng.random((n_layers, n)) < 0.5),
        lambda: 5 + 0.1 * rng.standard_normal((n_layers, n)),
    ]
    for j, make in zip(range(1, d), shapes, strict=False):
        x[..., j] = make()
    return x


def scipy_reference(v: np.ndarray) -> dict[str, float]:
    mean, sd = v.mean(), v.std(ddof=1)
    ks = sps.kstest(v, "norm", args=(mean, sd))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = sps.anderson(v, "norm")
    sw = sps.shapiro(v)
    jb = sps.jarque_bera(v)
    return {
        "skew": sps.skew(v),
        "kurtosis": sps.kurtosis(v),
        "ks_stat": ks.statistic,
        "ks_p": ks.pvalue,
        "ad_stat": ad.statistic,
        "ad_crit": ad.critical_values[2],  # 5 %
        "shapiro_w": sw.statistic,
        "shapiro_p": sw.pvalue,
        "jb_stat": jb.statistic,
        "jb_p": jb.pvalue,
    }


TOL = {  # absolute tolerances against scipy
    "skew": 1e-10,
    "kurtosis": 1e-10,
    "ks_stat": 1e-12,
    "ks_p": 1e-8,
    "ad_stat": 1e-9,
    "ad_crit": 0.0,
    "shapiro_w": 1e-8,  # scipy's swilk uses a lower-precision normal quantile
    "shapiro_p": 1e-6,
    "jb_stat": 1e-8,
    "jb_p": 1e-10,
}


@pytest.mark.parametrize("n", [3, 4, 5, 6, 11, 12, 60, 700])
def test_matches_scipy(n):
    x = mixed_samples(n, seed=n)
    stats = make_stats(x)
    fit = gaussian_fit(stats)
    assert isinstance(fit, GaussianFit) and len(fit.table) == 2 * 6
    t = fit.table
    for i in range(len(t)):
        layer, neuron = divmod(i, 6)
        v = stats.samples[layer, :, neuron].double().numpy()
        ref = scipy_reference(v)
        for key, value in ref.items():
            assert t[key].iloc[i] == pytest.approx(value, abs=TOL[key], rel=1e-9), (key, i)
        assert t["n"].iloc[i] == n
        g1 = sps.skew(v, bias=False) if n > 2 else np.nan
        g2 = sps.kurtosis(v, bias=False) if n > 3 else np.nan
        bc = (g1**2 + 1) / (g2 + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3))) if n > 3 else np.nan
        np.testing.assert_allclose(t["bimodality"].iloc[i], bc, rtol=1e-9)
    np.testing.assert_allclose(t["mean"], stats.mean.numpy().ravel())
    np.testing.assert_allclose(t["std"], stats.std.numpy().ravel())


def test_ks_pvalue_all_branches():
    for n in (5, 60, 141, 400, 2048, 150000):
        d = np.concatenate([np.linspace(0.0, 1.0, 21), np.sqrt(np.linspace(0.05, 30, 30) / n)])
        if n > 100000:  # the Pelz-Good region only (scipy's reference is slow elsewhere)
            d = np.sqrt(np.linspace(0.05, 2.1, 20) / n)
        d = np.clip(d, 0, 1)
        got = ks_pvalue(d, np.full(d.shape, n))
        ref = sps.kstwo.sf(d, n)
        np.testing.assert_allclose(got, ref, atol=2e-7, rtol=1e-6, err_msg=f"n={n}")
    assert np.isnan(ks_pvalue(np.array([np.nan]), np.array([10])))[0]


def test_smirnov_sf_matches_scipy():
    for n in (141, 1000, 3000):
        d = np.sqrt(np.linspace(2.2, 300, 25) / n)
        ref = special.smirnov(n, d)
        got = smirnov_sf(np.full(d.shape, n), d)
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-300)


def test_shapiro_coefficients_and_pvalue():
    for n in (3, 4, 5, 6, 7, 20, 101, 5000):
        a = shapiro_coefficients(n)
        assert a.shape == (n,) and a @ a == pytest.approx(1.0)
        np.testing.assert_allclose(a, -a[::-1], atol=1e-15)
        assert np.all(np.diff(a) >= 0)
    with pytest.raises(ValueError, match="n >= 3"):
        shapiro_coefficients(2)
    rng = np.random.default_rng(1)
    for n in (3, 8, 30, 2000):
        v = rng.exponential(size=n)
        w = (np.sort(v) @ shapiro_coefficients(n)) ** 2 / ((v - v.mean()) ** 2).sum()
        ref = sps.shapiro(v)
        assert w == pytest.approx(ref.statistic, abs=1e-8)
        assert shapiro_pvalue(np.array([w]), np.array([n]))[0] == pytest.approx(
            ref.pvalue, rel=1e-5, abs=1e-8
        )


def test_shapiro_subsample_above_max_n():
    x = mixed_samples(400, n_layers=1, d=3, seed=3)
    stats = make_stats(x)
    fit = gaussian_fit(stats, shapiro_max_n=100)
    rows = filled_rows(stats, 100)
    assert rows.numel() == 100
    smallest = torch.argsort(stats.sample_keys)[:100].sort().values
    assert torch.equal(rows, smallest)
    for j in range(3):
        v = stats.samples[0, rows, j].double().numpy()
        assert fit.table["shapiro_w"].iloc[j] == pytest.approx(sps.shapiro(v).statistic, abs=1e-8)
        assert fit.table["shapiro_n"].iloc[j] == 100
        assert "subsample of 100" in fit.table["note"].iloc[j]
    assert (fit.table["n"] == 400).all()  # the other tests use every value


def test_anderson_darling_critical_values_and_decision():
    n = np.array([10, 50, 2048])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = sps.anderson(np.random.default_rng(0).standard_normal(50), "norm")
    for level, crit in zip([0.15, 0.10, 0.05, 0.025, 0.01], ref.critical_values, strict=True):
        assert ad_critical(n, level)[1] == pytest.approx(crit)
    assert np.isnan(ad_critical(n, 0.2)).all()
    # the approximate p-value crosses each level close to its critical value
    for level in (0.10, 0.05, 0.01):
        p = ad_pvalue(ad_critical(np.array([2048]), level), np.array([2048]))[0]
        assert p == pytest.approx(level, rel=0.2)
    stats = make_stats(mixed_samples(300, seed=4))
    fit = gaussian_fit(stats, alpha=0.05, rule="ad")
    t = fit.table
    expected = t["ad_stat"] <= t["ad_crit"]
    assert (t["ad_pass"].astype(bool) == expected).all()
    assert (t["gaussian"].astype(bool) == expected).all()
    fit = gaussian_fit(stats, alpha=0.07, rule="ad")  # not in the table: the p-value decides
    assert fit.table["ad_crit"].isna().all()
    assert (fit.table["ad_pass"].astype(bool) == (fit.table["ad_p"] >= 0.07)).all()


def brute_adjust(p, method):
    m = len(p)
    order = np.argsort(p)
    out = np.empty(m)
    for rank, i in enumerate(order):
        if method == "bonferroni":
            out[i] = min(1, p[i] * m)
        elif method == "holm":
            out[i] = min(1, max((m - r) * p[order[r]] for r in range(rank + 1)))
        else:
            out[i] = min(1, min(m * p[order[r]] / (r + 1) for r in range(rank, m)))
    return out


@pytest.mark.parametrize("method", ["bonferroni", "holm", "bh"])
def test_adjust_pvalues(method):
    p = np.random.default_rng(5).random(30) ** 3
    np.testing.assert_allclose(adjust_pvalues(p, method), brute_adjust(p, method))
    with_nan = np.concatenate([p, [np.nan]])
    got = adjust_pvalues(with_nan, method)
    assert np.isnan(got[-1])
    np.testing.assert_allclose(got[:-1], brute_adjust(p, method))
    np.testing.assert_array_equal(adjust_pvalues(p, "none"), p)


def test_decision_rule_and_correction():
    stats = make_stats(mixed_samples(500, n_layers=3, d=8, seed=6))
    fit = gaussian_fit(stats, rule=("ks", "jb", "shapiro"))
    t = fit.table
    both = t["ks_pass"] & t["jb_pass"] & t["shapiro_pass"]
    assert (t["gaussian"] == both).all()
    assert (t["ks_pass"].astype(bool) == (t["ks_p"] >= 0.05)).all()
    fit_bh = gaussian_fit(stats, rule="jb", correction="bh")
    adj = adjust_pvalues(t["jb_p"].to_numpy(), "bh")
    assert (fit_bh.table["jb_pass"].astype(bool) == (adj >= 0.05)).all()
    assert fit_bh.table["gaussian"].sum() >= fit.table["jb_pass"].sum() - 1e-9
    # normal neurons (column 0) pass far more often than exponential ones (column 1)
    assert t.loc[t.neuron == 0, "gaussian"].mean() > t.loc[t.neuron == 1, "gaussian"].mean()
    # per-layer summary agrees with the table
    by = fit.by_layer
    assert list(by.index) == [0, 1, 2]
    for layer, g in t.groupby("layer"):
        assert by.loc[layer, "share_gaussian"] == pytest.approx(g["gaussian"].astype(float).mean())
        assert by.loc[layer, "median_abs_skew"] == pytest.approx(g["skew"].abs().median())
        assert by.loc[layer, "n_neurons"] == 8
    assert 0.0 <= fit.share_gaussian <= 1.0


def test_rule_accuracy_brute_force():
    rng = np.random.default_rng(7)
    xf = rng.standard_normal((2, 200, 4))
    xr = 1.5 * rng.standard_normal((2, 150, 4)) + np.array([0.0, 1.0, 3.0, -2.0])
    sf, sr = make_stats(xf), make_stats(xr)
    fit = gaussian_fit(sf, other=sr)
    t = fit.table
    for i in range(8):
        layer, j = divmod(i, 4)
        mf, sdf = float(sf.mean[layer, j]), float(sf.std[layer, j])
        mr, sdr = float(sr.mean[layer, j]), float(sr.std[layer, j])

        def to_f(v, mf=mf, sdf=sdf, mr=mr, sdr=sdr):
            return sps.norm.logpdf(v, mf, sdf) >= sps.norm.logpdf(v, mr, sdr)

        acc_f = to_f(sf.samples[layer, :, j].double().numpy()).mean()
        acc_r = (~to_f(sr.samples[layer, :150, j].double().numpy())).mean()
        assert t["rule_acc_forget"].iloc[i] == pytest.approx(acc_f)
        assert t["rule_acc_retain"].iloc[i] == pytest.approx(acc_r)
        assert t["rule_balanced_acc"].iloc[i] == pytest.approx(0.5 * (acc_f + acc_r))
    # far-apart means separate well; identical distributions sit near or below chance
    assert t.loc[t.neuron == 2, "rule_balanced_acc"].min() > 0.8
    assert fit.by_layer["max_rule_balanced_acc"].max() == t["rule_balanced_acc"].max()
    assert fit.meta["other_skill"] == "toy"


def test_nonfinite_values_are_left_out():
    x = mixed_samples(80, n_layers=1, d=4, seed=8)
    x[0, :5, 0] = np.nan
    x[0, 10, 1] = np.inf
    stats = make_stats(x)
    fit = gaussian_fit(stats)
    t = fit.table
    assert t["n"].tolist() == [75, 79, 80, 80]
    for j in (0, 1):
        v = x[0, :, j].astype(np.float32).astype(np.float64)
        v = v[np.isfinite(v)]
        ref = scipy_reference(v)
        for key in ("skew", "ks_stat", "ad_stat", "shapiro_w", "jb_stat"):
            assert t[key].iloc[j] == pytest.approx(ref[key], abs=TOL[key], rel=1e-9)
    assert t["note"].iloc[0] == "5 non-finite sample values left out"
    assert t["note"].iloc[2] == ""


def test_too_few_samples_and_constant_neurons():
    x = mixed_samples(30, n_layers=1, d=4, seed=9)
    x[0, 2:, 0] = np.nan  # 2 finite values
    x[0, :, 1] = 1.25  # constant
    x[0, 3:, 2] = np.nan  # 3 finite: tests run, no bimodality coefficient
    stats = make_stats(x)
    with pytest.warns(UserWarning, match="1 neurons have fewer than 3.*1 neurons are constant"):
        fit = gaussian_fit(stats)
    t = fit.table
    cols = ["skew", "kurtosis", "ks_stat", "ks_p", "ad_stat", "shapiro_w", "jb_stat"]
    assert t.loc[0, cols].isna().all() and t.loc[1, cols].isna().all()
    assert "n=2 finite samples < 3" in t["note"].iloc[0]
    assert "constant sample" in t["note"].iloc[1]
    assert t["gaussian"].isna().iloc[0] and t["gaussian"].isna().iloc[1]
    assert not np.isnan(t["shapiro_w"].iloc[2]) and np.isnan(t["bimodality"].iloc[2])
    assert "no bimodality" in t["note"].iloc[2]
    assert fit.by_layer.loc[0, "n_tested"] == 2
    with pytest.warns(UserWarning, match="fewer than 10"):
        fit = gaussian_fit(make_stats(mixed_samples(8, n_layers=1, d=2)), min_samples=10)
    assert fit.table["skew"].isna().all()


def test_constant_neuron_in_rule_accuracy():
    x = mixed_samples(50, n_layers=1, d=3, seed=10)
    x[0, :, 0] = 2.0
    with pytest.warns(UserWarning, match="constant"):
        fit = gaussian_fit(make_stats(x), other=make_stats(mixed_samples(40, 1, 3, seed=11)))
    assert np.isnan(fit.table["rule_balanced_acc"].iloc[0])
    assert "decision rule undefined" in fit.table["note"].iloc[0]
    assert not np.isnan(fit.table["rule_balanced_acc"].iloc[1])


def test_bad_input():
    a = make_stats(mixed_samples(20, seed=1))
    with pytest.raises(TypeError, match="NeuronStats"):
        gaussian_fit(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="different models"):
        gaussian_fit(a, other=make_stats(mixed_samples(20), model="other"))
    with pytest.raises(ValueError, match="site"):
        gaussian_fit(a, other=make_stats(mixed_samples(20), site="key"))
    with pytest.raises(ValueError, match="layers"):
        gaussian_fit(a, other=make_stats(mixed_samples(20), layers=[3, 4]))
    b = make_stats(mixed_samples(20, d=5))
    with pytest.raises(ValueError, match="d_mlp is 6 vs 5"):
        check_same_source(a, b, ("a", "b"))
    b.meta = {}  # no recorded model: the shapes still differ
    with pytest.raises(ValueError, match="a has 6 neurons per layer but b has 5"):
        check_same_source(a, b, ("a", "b"))
    with pytest.raises(ValueError, match="alpha"):
        gaussian_fit(a, alpha=1.5)
    with pytest.raises(ValueError, match="test in rule"):
        gaussian_fit(a, rule=("ks", "lilliefors"))
    with pytest.raises(ValueError, match="correction"):
        gaussian_fit(a, correction="fdr")
    with pytest.raises(ValueError, match="min_samples"):
        gaussian_fit(a, min_samples=2)
    empty = make_stats(mixed_samples(20))
    empty.sample_keys[:] = torch.inf
    with pytest.raises(ValueError, match="no reservoir samples"):
        gaussian_fit(empty)


def test_result_accessors():
    stats = make_stats(mixed_samples(100, n_layers=2, d=5, seed=12), layers=[3, 7])
    fit = gaussian_fit(stats)
    assert fit.layers == [3, 7] and fit.d_mlp == 5
    k = fit.tensor("kurtosis")
    assert k.shape == (2, 5) and k.dtype == torch.float64
    assert float(k[1, 2]) == pytest.approx(fit.neuron(7, 2)["kurtosis"])
    assert fit.tensor("gaussian").shape == (2, 5)
    worst = fit.sorted_by("ks_stat", k=3)
    assert len(worst) == 3 and worst["ks_stat"].is_monotonic_decreasing
    picks = fit.representative_neurons(4)
    assert len(picks) == 4 and all(layer in (3, 7) for layer, _ in picks)
    theory, z = fit.qq(3, 1)
    v = np.sort(stats.samples[0, :, 1].double().numpy())
    np.testing.assert_allclose(z, (v - v.mean()) / v.std(ddof=1))
    np.testing.assert_allclose(theory, sps.norm.ppf((np.arange(1, 101) - 0.375) / 100.25))
    assert "GaussianFit(" in repr(fit)
    with pytest.raises(ValueError, match="not analysed"):
        fit.neuron(5, 0)
    with pytest.raises(KeyError):
        fit.tensor("nope")


def test_parallel_layers_give_the_same_numbers():
    stats = make_stats(mixed_samples(64, n_layers=4, d=3, seed=13))
    out = {}
    for workers in (1, 3):
        res = np.zeros(4)

        def job(row, res=res):
            res[row] = row**2

        run_layers(job, 4, workers)
        out[workers] = res
    np.testing.assert_array_equal(out[1], out[3])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = gaussian_fit(stats).table
    finally:
        torch.set_num_threads(before)
    two = gaussian_fit(stats).table
    num = one.select_dtypes("number").columns
    np.testing.assert_array_equal(one[num].to_numpy(), two[num].to_numpy())


def test_on_tiny_model(tiny_llama):
    texts = [f"Q: {i} plus {i + 2}? A: {2 * i + 2}" for i in range(6)]
    other = [f"def f{i}(x): return x * {i}" for i in range(6)]
    sf = collect(tiny_llama, texts, layers=[0, 2], reservoir_size=64, quiet=True)
    sr = collect(tiny_llama, other, layers=[0, 2], reservoir_size=64, quiet=True)
    fit = gaussian_fit(sf, other=sr)
    d = tiny_llama.cfg.d_mlp
    assert len(fit.table) == 2 * d and list(fit.by_layer.index) == [0, 2]
    assert (fit.table["n"] == 64).all()
    v = sf.samples[1, :, 5].double().numpy()
    assert fit.neuron(2, 5)["ks_stat"] == pytest.approx(scipy_reference(v)["ks_stat"], abs=1e-12)
    assert fit.table["rule_balanced_acc"].between(0, 1).all()
