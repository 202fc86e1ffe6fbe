"""Gaussian-fit and separation figures: the data and labels they draw (not pixels)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from mechunlearn import NeuronStats  # noqa: E402
from mechunlearn.analysis.gaussian import gaussian_fit  # noqa: E402
from mechunlearn.analysis.separation import separation  # noqa: E402
from mechunlearn.plots import (  # noqa: E402
    plot_gaussian_summary,
    plot_qq,
    plot_separation_by_layer,
    plot_separation_histograms,
    save_figure,
    style,
)


def make_stats(x, skill):
    x = torch.as_tensor(x, dtype=torch.float32)
    n_layers, n, d = x.shape
    meta = {"model": "toy", "n_layers": n_layers, "d_mlp": d, "skill": skill}
    st = NeuronStats.empty("pre", "all", [1, 3, 5][:n_layers], d, n, "cpu", meta)
    x64 = x.double()
    st.count[:] = n
    st.mean[:] = x64.mean(1)
    st.m2[:] = x64.var(1) * (n - 1)
    st.samples[:] = x
    st.sample_keys[:] = torch.linspace(0, 1, n, dtype=torch.float64)
    return st


@pytest.fixture(scope="module")
def results():
    rng = np.random.default_rng(0)
    xf = rng.standard_normal((3, 200, 8))
    xf[..., 1] = rng.exponential(size=(3, 200))
    xf[..., 2] += 2.0
    xr = rng.standard_normal((3, 150, 8))
    sf, sr = make_stats(xf, "gsm8k"), make_stats(xr, "mbpp")
    return gaussian_fit(sf, other=sr), separation(sf, sr, metric="cohens_d")


def test_gaussian_summary(results):
    fit, _ = results
    fig = plot_gaussian_summary(fit)
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    shares, shape, rule = fig.axes
    lines = {ln.get_label(): ln for ln in shares.get_lines()}
    assert {"rule (ad+jb)", "Kolmogorov-Smirnov", "Anderson-Darling", "Shapiro-Wilk",
            "Jarque-Bera"} <= set(lines)  # fmt: skip
    np.testing.assert_allclose(lines["rule (ad+jb)"].get_xdata(), [1, 3, 5])
    np.testing.assert_allclose(lines["rule (ad+jb)"].get_ydata(), fit.by_layer["share_gaussian"])
    np.testing.assert_allclose(lines["Jarque-Bera"].get_ydata(), fit.by_layer["share_jb_pass"])
    assert lines["expected if Gaussian"].get_ydata()[0] == pytest.approx(0.95**2)
    shape_lines = {ln.get_label(): ln for ln in shape.get_lines()}
    np.testing.assert_allclose(
        shape_lines["median |skew|"].get_ydata(), fit.by_layer["median_abs_skew"]
    )
    rule_lines = {ln.get_label(): ln for ln in rule.get_lines()}
    np.testing.assert_allclose(
        rule_lines["mean over neurons"].get_ydata(), fit.by_layer["mean_rule_balanced_acc"]
    )
    assert all(ax.get_xlabel() == "layer" for ax in fig.axes)
    assert "gsm8k" in fig._suptitle.get_text()
    plt.close(fig)
    no_rule = gaussian_fit(fit.stats)
    fig = plot_gaussian_summary(no_rule, tests=["ks"])
    assert len(fig.axes) == 2
    assert [ln.get_label() for ln in fig.axes[0].get_lines()][:2] == [
        "rule (ad+jb)",
        "Kolmogorov-Smirnov",
    ]
    plt.close(fig)


def test_qq(results):
    fit, _ = results
    fig = plot_qq(fit, neurons=[(1, 0), (5, 1)])
    assert len(fig.axes) == 2
    ax = fig.axes[1]
    assert ax.get_title().startswith("layer 5, neuron 1")
    sample = next(ln for ln in ax.get_lines() if ln.get_label() == "sample")
    theory, z = fit.qq(5, 1)
    np.testing.assert_allclose(sample.get_xdata(), theory)
    np.testing.assert_allclose(sample.get_ydata(), z)
    assert ax.get_xlabel() == "normal quantile" and ax.get_ylabel() == "standardised value"
    plt.close(fig)
    fig = plot_qq(fit, n=4)
    assert len(fig.axes) == 4
    plt.close(fig)


def test_separation_histograms(results):
    _, sep = results
    fig = plot_separation_histograms(sep, k=4, bins=20)
    assert len(fig.axes) == 4
    top = sep.top(k=4)
    ax = fig.axes[0]
    layer, neuron = int(top.iloc[0]["layer"]), int(top.iloc[0]["neuron"])
    assert ax.get_title().startswith(f"layer {layer}, neuron {neuron}")
    assert "cohens_d=" in ax.get_title()
    curves = {ln.get_label(): ln for ln in ax.get_lines()}
    pf, pr = sep.fitted_pdf(layer, neuron, curves["N fit (gsm8k)"].get_xdata())
    np.testing.assert_allclose(curves["N fit (gsm8k)"].get_ydata(), pf)
    np.testing.assert_allclose(curves["N fit (mbpp)"].get_ydata(), pr)
    bars = [p for p in ax.patches]
    assert len(bars) == 40  # 20 bins per skill
    heights = np.array([p.get_height() for p in bars[:20]])
    f, _ = sep.samples(layer, neuron)
    edges = np.histogram_bin_edges(np.concatenate(sep.samples(layer, neuron)), bins=20)
    np.testing.assert_allclose(heights, np.histogram(f, bins=edges, density=True)[0])
    labels = ax.get_legend_handles_labels()[1]
    assert {"gsm8k", "mbpp"} <= set(labels)
    plt.close(fig)
    fig = plot_separation_histograms(sep, neurons=[(3, 2)])
    assert len(fig.axes) == 1 and fig.axes[0].get_title().startswith("layer 3, neuron 2")
    plt.close(fig)


def test_separation_by_layer(results):
    _, sep = results
    fig = plot_separation_by_layer(sep, k=5)
    assert len(fig.axes) == 2
    box, bars = fig.axes
    median = next(ln for ln in box.get_lines() if ln.get_label() == "median")
    np.testing.assert_allclose(median.get_xdata(), [1, 3, 5])
    np.testing.assert_allclose(median.get_ydata(), sep.layer_summary()["median"])
    assert box.get_ylabel() == "cohens_d"
    heights = [p.get_height() for p in bars.patches]
    assert heights == sep.layer_counts(k=5)["n_top"].tolist()
    assert "top 5" in bars.get_title() and "Gini" in bars.get_title()
    plt.close(fig)
    fig = plot_separation_by_layer(sep, metric="ks", ratio=0.25)
    assert fig.axes[0].get_ylabel() == "ks"
    assert [p.get_height() for p in fig.axes[1].patches] == sep.layer_counts(ratio=0.25)[
        "n_top"
    ].tolist()
    plt.close(fig)


def test_save_figure_and_style(tmp_path):
    before = dict(plt.rcParams)
    with style():
        assert plt.rcParams["axes.grid"]
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.plot([0, 1], [1, 0])
    assert dict(plt.rcParams) == before
    paths = save_figure(fig, tmp_path / "sub" / "summary.png")
    assert [p.name for p in paths] == ["summary.png", "summary.svg"]
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
    paths = save_figure(fig, tmp_path / "fig.v2")
    assert [p.name for p in paths] == ["fig.v2.png", "fig.v2.svg"]
    plt.close(fig)
