"""separation() measures against scipy / numerical integration; rankings, selection, bad input."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import integrate
from scipy import stats as sps

from mechunlearn import NeuronStats, collect
from mechunlearn.analysis.separation import Separation, separation
from mechunlearn.kernels.separation import (
    METRICS,
    gaussian_separation,
    n_top,
    separation_scores,
    top_neurons,
    two_sample_ks_auroc,
)


def make_stats(samples, model="toy", site="pre", layers=None, dtype=torch.float32):
    """NeuronStats whose reservoir holds ``samples`` ``[layer, n, d]`` (keys in sample order) and
    whose moments are the samples' own (non-finite values left out)."""
    x = torch.as_tensor(np.asarray(samples), dtype=dtype)
    n_layers, n, d = x.shape
    meta = {"model": model, "n_layers": n_layers, "d_mlp": d, "skill": f"skill-{n}"}
    keys = torch.linspace(0, 1, n, dtype=torch.float64)
    return NeuronStats.from_samples(
        x, site=site, layers=layers, keys=keys, samples_dtype=dtype, meta=meta
    )


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    shift = np.array([0.0, 0.5, -1.0, 2.0, 0.1, 0.0])
    scale = np.array([1.0, 1.0, 2.0, 0.5, 1.0, 3.0])
    xf = rng.standard_normal((3, 300, 6)) * scale + shift
    xr = rng.standard_normal((3, 240, 6))
    return make_stats(xf), make_stats(xr)


def test_gaussian_closed_forms_against_integrals():
    cases = [(0.0, 1.0, 1.0, 1.0), (0.3, 0.5, -1.2, 2.0), (2.0, 3.0, 2.0, 0.7)]
    mf, sf, mr, sr = (torch.tensor(c, dtype=torch.float64) for c in zip(*cases, strict=True))
    out = gaussian_separation(mf, sf, mr, sr)
    for i, (a, sa, b, sb) in enumerate(cases):
        p, q = sps.norm(a, sa), sps.norm(b, sb)
        lo, hi = min(a - 12 * sa, b - 12 * sb), max(a + 12 * sa, b + 12 * sb)
        kl = integrate.quad(lambda x, p=p, q=q: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), lo, hi)[0]
        kl_rev = integrate.quad(lambda x, p=p, q=q: q.pdf(x) * (q.logpdf(x) - p.logpdf(x)), lo, hi)[
            0
        ]
        bc = integrate.quad(lambda x, p=p, q=q: math.sqrt(p.pdf(x) * q.pdf(x)), lo, hi)[0]
        w2 = integrate.quad(lambda u, p=p, q=q: (p.ppf(u) - q.ppf(u)) ** 2, 0, 1)[0]
        assert float(out["mean_diff"][i]) == pytest.approx(a - b)
        assert float(out["kl"][i]) == pytest.approx(kl, abs=1e-8)
        assert float(out["sym_kl"][i]) == pytest.approx(kl + kl_rev, abs=1e-8)
        assert float(out["bhattacharyya"][i]) == pytest.approx(-math.log(bc), abs=1e-8)
        assert float(out["wasserstein"][i]) == pytest.approx(math.sqrt(w2), abs=1e-6)
        pooled = math.sqrt((sa**2 + sb**2) / 2)
        assert float(out["cohens_d"][i]) == pytest.approx(abs(a - b) / pooled)
    # zero sigma: divergences NaN, the rest defined
    z = gaussian_separation(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.0]),
                            torch.tensor([1.0]))  # fmt: skip
    assert all(math.isnan(float(z[m][0])) for m in ("kl", "sym_kl", "bhattacharyya"))
    assert float(z["wasserstein"][0]) == pytest.approx(math.sqrt(2))
    assert float(z["cohens_d"][0]) == pytest.approx(1 / math.sqrt(0.5))


def ref_ks_auc(f, r):
    f, r = f[np.isfinite(f)].astype(np.float64), r[np.isfinite(r)].astype(np.float64)
    if f.size == 0 or r.size == 0:
        return np.nan, np.nan
    return sps.ks_2samp(f, r).statistic, sps.mannwhitneyu(f, r).statistic / (f.size * r.size)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_two_sample_ks_auroc_against_scipy(dtype):
    rng = np.random.default_rng(1)
    f = rng.standard_normal((12, 90)).astype(dtype)
    r = (rng.standard_normal((12, 70)) + 0.4).astype(dtype)
    f[0, :40] = r[0, :40]  # ties across skills
    f[1, :30] = 0.0
    r[1, :25] = -0.0  # -0.0 equals 0.0
    f[2, 3] = np.nan
    r[2, 5] = np.inf
    f[3], r[3] = np.round(f[3]), np.round(r[3])  # heavy ties everywhere
    f[4] = np.nan  # no forget value at all
    f[5], r[5] = 1.0, 1.0  # identical constants
    f[6] = np.round(4 * f[6]) / 4
    r[6] = np.round(2 * r[6]) / 2
    r[6, :3] = -np.inf
    ks, auc, nf, nr = two_sample_ks_auroc(f, r)
    for i in range(12):
        ref_ks, ref_auc = ref_ks_auc(f[i], r[i])
        np.testing.assert_allclose([ks[i], auc[i]], [ref_ks, ref_auc], atol=1e-14)
    assert nf[2] == 89 and nr[2] == 69 and nf[4] == 0 and nr[6] == 67
    assert ks[5] == 0 and auc[5] == 0.5


def test_table_metrics_ranking(pair):
    sf, sr = pair
    sep = separation(sf, sr, metric="cohens_d")
    t = sep.table
    assert isinstance(sep, Separation) and len(t) == 18
    assert set(METRICS) <= set(t.columns)
    assert t["cohens_d"].is_monotonic_decreasing
    assert t["rank"].tolist() == list(range(1, 19))
    for _, row in t.sample(5, random_state=0).iterrows():
        layer, j = int(row["layer"]), int(row["neuron"])
        f = sf.samples[layer, :, j].double().numpy()
        r = sr.samples[layer, :, j].double().numpy()
        assert row["mu_f"] == pytest.approx(f.mean()) and row["sigma_r"] == pytest.approx(
            r.std(ddof=1)
        )
        pooled = math.sqrt(((299) * f.var(ddof=1) + 239 * r.var(ddof=1)) / (300 + 240 - 2))
        assert row["cohens_d"] == pytest.approx(abs(f.mean() - r.mean()) / pooled)
        assert row["mean_diff"] == pytest.approx(f.mean() - r.mean())
        ks, auc = ref_ks_auc(f, r)
        assert row["ks"] == pytest.approx(ks, abs=1e-14)
        assert row["auroc_f"] == pytest.approx(auc, abs=1e-14)
        assert row["auroc"] == pytest.approx(max(auc, 1 - auc), abs=1e-14)
        assert row["n_f"] == 300 and row["n_r"] == 240
    # every metric's scores equal its column, in layer-neuron order
    for metric in METRICS:
        scores = separation_scores(sf, sr, metric)
        assert scores.shape == (3, 6) and scores.dtype == torch.float64
        torch.testing.assert_close(scores, sep.tensor(metric), equal_nan=True)
        torch.testing.assert_close(scores, sep.ranked_by(metric).scores(), equal_nan=True)
        assert sep.ranked_by(metric).table[metric].is_monotonic_decreasing


def test_mean_diff_is_signed(pair):
    sf, sr = pair
    sep = separation(sf, sr)
    assert sep.metric == "mean_diff"
    top = sep.top(k=3)
    assert (top["neuron"] == 3).all()  # shifted +2: highest on F
    assert (sep.table.tail(3)["neuron"] == 2).all()  # shifted -1 ranks last, not first
    assert sep.table["mean_diff"].min() < 0 and (sep.table["cohens_d"] >= 0).all()


def test_top_neurons_and_selection_views(pair):
    sf, sr = pair
    sep = separation(sf, sr, metric="ks")
    scores = sep.scores()
    for ratio in (0.05, 0.2, 0.5):
        mask = top_neurons(scores, ratio=ratio)
        assert mask.dtype == torch.bool and mask.shape == (3, 6)
        assert int(mask.sum()) == n_top(18, ratio) == max(1, math.floor(ratio * 18 + 0.5))
        top = sep.top(ratio=ratio)
        got = {(int(a), int(b)) for a, b in zip(top["layer"], top["neuron"], strict=True)}
        want = {(int(r), int(c)) for r, c in mask.nonzero().tolist()}
        assert got == want
        assert torch.equal(sep.mask(ratio=ratio), mask)
        assert float(scores[mask].min()) >= float(scores[~mask].max())
    per_layer = sep.top_per_layer(2)
    assert per_layer.groupby("layer").size().tolist() == [2, 2, 2]
    for layer, g in per_layer.groupby("layer"):
        best = sep.table[sep.table.layer == layer]["ks"].nlargest(2).to_numpy()
        np.testing.assert_allclose(np.sort(g["ks"].to_numpy()), np.sort(best))
    counts = sep.layer_counts(k=6)
    assert counts["n_top"].sum() == 6 and list(counts.index) == [0, 1, 2]
    assert counts["share_of_top"].sum() == pytest.approx(1.0)
    top6 = sep.top(k=6)
    assert counts["n_top"].tolist() == [int((top6.layer == layer).sum()) for layer in range(3)]
    summary = sep.layer_summary()
    assert summary.loc[1, "max"] == sep.table[sep.table.layer == 1]["ks"].max()


def test_top_neurons_edge_cases():
    s = torch.tensor([[1.0, float("nan"), 3.0], [3.0, -float("inf"), 0.5]])
    assert top_neurons(s, k=2).tolist() == [[False, False, True], [True, False, False]]
    assert top_neurons(s, k=1).tolist() == [[False, False, True], [False, False, False]]  # tie
    with pytest.warns(UserWarning, match="only 4 have a defined score"):
        assert int(top_neurons(s, k=6).sum()) == 4
    assert int(top_neurons(s, ratio=0.01).sum()) == 1  # at least one for a positive ratio
    assert int(top_neurons(s, ratio=0.0).sum()) == 0
    with pytest.raises(ValueError, match="exactly one"):
        top_neurons(s)
    with pytest.raises(ValueError, match="exactly one"):
        top_neurons(s, ratio=0.1, k=2)
    with pytest.raises(ValueError, match="ratio"):
        top_neurons(s, ratio=1.5)


def test_concentration():
    # 4 layers x 5 neurons; the top 5 by mean_diff all in layer 2
    xf = np.zeros((4, 50, 5)) + np.random.default_rng(2).standard_normal((4, 50, 5))
    xf[2] += 10
    xr = np.random.default_rng(3).standard_normal((4, 40, 5))
    sep = separation(make_stats(xf), make_stats(xr), sample_metrics=False)
    c = sep.concentration(k=5)
    assert c == {
        "n_top": 5,
        "layers_with_top": 1,
        "effective_layers": pytest.approx(1.0),
        "gini": pytest.approx(0.75),
        "top_layer": 2,
        "top_layer_share": 1.0,
    }
    even = sep.concentration(k=20)
    assert even["effective_layers"] == pytest.approx(4.0) and even["gini"] == pytest.approx(0.0)
    assert sep.table["ks"].isna().all()
    with pytest.raises(ValueError, match="not computed"):
        sep.ranked_by("ks")


def test_constant_and_degenerate_neurons():
    rng = np.random.default_rng(4)
    xf = rng.standard_normal((1, 30, 4))
    xr = rng.standard_normal((1, 30, 4))
    xf[0, :, 0] = 1.0  # constant on F
    xr[0, :, 1] = -2.0  # constant on R
    xf[0, :, 2] = np.nan  # no finite F values
    sf, sr = make_stats(xf), make_stats(xr)
    with pytest.warns(UserWarning, match="2 neurons have zero standard deviation"):
        sep = separation(sf, sr, metric="kl")
    t = sep.table.set_index("neuron")
    for j in (0, 1):
        assert t.loc[j, ["kl", "sym_kl", "bhattacharyya"]].isna().all()
        assert not np.isnan(t.loc[j, "wasserstein"]) and not np.isnan(t.loc[j, "ks"])
    assert "sigma_f = 0" in t.loc[0, "note"] and "sigma_r = 0" in t.loc[1, "note"]
    assert t.loc[2, list(METRICS)].isna().all()
    assert "no tokens on F" in t.loc[2, "note"] and "no finite F samples" in t.loc[2, "note"]
    assert t.loc[3, "note"] == ""
    assert sep.table.tail(3)["rank"].isna().all()  # NaN scores rank last, without a rank
    assert top_neurons(sep.scores(), k=1)[0, 3]
    scores = separation_scores(sf, sr, "kl")
    assert torch.isnan(scores[0, :3]).all() and not torch.isnan(scores[0, 3])


def test_bad_input(pair):
    sf, sr = pair
    x = np.random.default_rng(5).standard_normal((3, 20, 6))
    with pytest.raises(TypeError, match="NeuronStats"):
        separation(sf, x)
    with pytest.raises(ValueError, match="different models"):
        separation(sf, make_stats(x, model="other"))
    with pytest.raises(ValueError, match="site"):
        separation_scores(sf, make_stats(x, site="key"))
    with pytest.raises(ValueError, match="layers"):
        separation(sf, make_stats(x, layers=[1, 2, 3]))
    with pytest.raises(ValueError, match="Unknown metric"):
        separation(sf, sr, metric="euclid")
    no_res = make_stats(x)
    no_res.sample_keys[:] = torch.inf
    with pytest.raises(ValueError, match="no reservoir samples"):
        separation_scores(sf, no_res, "auroc")
    with pytest.raises(ValueError, match="no reservoir samples"):
        separation(sf, no_res)
    # Gaussian metrics need no reservoir
    ok = separation_scores(sf, no_res, "cohens_d")
    assert torch.isfinite(ok).all()
    sep = separation(sf, no_res, sample_metrics=False)
    assert sep.table["ks"].isna().all() and sep.table["cohens_d"].notna().all()


def test_float64_reservoir(pair):
    rng = np.random.default_rng(6)
    xf, xr = rng.standard_normal((1, 40, 3)), rng.standard_normal((1, 50, 3)) + 0.2
    sep = separation(make_stats(xf, dtype=torch.float64), make_stats(xr, dtype=torch.float64),
                     metric="auroc")  # fmt: skip
    for j in range(3):
        ks, auc = ref_ks_auc(xf[0, :, j], xr[0, :, j])
        row = sep.neuron(0, j)
        assert row["ks"] == pytest.approx(ks, abs=1e-14)
        assert row["auroc_f"] == pytest.approx(auc, abs=1e-14)


def test_result_accessors(pair):
    sf, sr = pair
    sep = separation(sf, sr)
    f, r = sep.samples(1, 4)
    np.testing.assert_allclose(f, sf.samples[1, :, 4].double().numpy())
    assert r.shape == (240,)
    x = np.linspace(-3, 3, 7)
    pf, pr = sep.fitted_pdf(1, 4, x)
    row = sep.neuron(1, 4)
    np.testing.assert_allclose(pf, sps.norm.pdf(x, row["mu_f"], row["sigma_f"]))
    np.testing.assert_allclose(pr, sps.norm.pdf(x, row["mu_r"], row["sigma_r"]))
    assert "Separation(" in repr(sep) and sep.meta["forget"] == "skill-300"
    assert isinstance(sep.top(k=2), pd.DataFrame)
    with pytest.raises(ValueError, match="No neuron"):
        sep.neuron(9, 0)


def test_on_tiny_model(tiny_gpt2):
    sf = collect(tiny_gpt2, [f"2+{i}={i + 2}" for i in range(6)], reservoir_size=48, quiet=True)
    sr = collect(tiny_gpt2, [f"print('{i}')" for i in range(6)], reservoir_size=48, quiet=True)
    sep = separation(sf, sr, metric="auroc")
    d = tiny_gpt2.cfg.d_mlp
    assert len(sep.table) == tiny_gpt2.cfg.n_layers * d
    assert sep.table["auroc"].between(0.5, 1).all()
    row = sep.top(k=1).iloc[0]
    layer, j = int(row["layer"]), int(row["neuron"])
    ks, auc = ref_ks_auc(sf.sample_values(layer)[:, j].double().numpy(),
                         sr.sample_values(layer)[:, j].double().numpy())  # fmt: skip
    assert row["ks"] == pytest.approx(ks, abs=1e-14) and row["auroc_f"] == pytest.approx(auc)
    mask = top_neurons(separation_scores(sf, sr, "mean_diff"), ratio=0.05)
    assert int(mask.sum()) == n_top(mask.numel(), 0.05)
