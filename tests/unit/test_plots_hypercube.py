"""Hypercube and convexity figures: the data and labels they draw (not pixels)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from mechunlearn import KeyVectors
from mechunlearn.analysis.convexity import convexity
from mechunlearn.analysis.hypercube import hypercube
from mechunlearn.plots import plot_convexity, plot_hypercube_layers, plot_inclusion_curves


def keys(values, name):
    return KeyVectors(values, list(range(values.shape[1])), {"skill": name, "model": "m"})


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(30, 6, 5, generator=g)
    o1 = torch.randn(20, 6, 5, generator=g) + torch.arange(6.0)[None, :, None]
    o2 = torch.randn(20, 6, 5, generator=g) * 3
    return keys(f, "gsm8k"), {"mbpp": keys(o1, "mbpp"), "mlqa": keys(o2, "mlqa")}


@pytest.fixture(scope="module")
def cube(data):
    return hypercube(data[0], data[1])


@pytest.fixture(scope="module")
def conv(data):
    return convexity(data[0], data[1], ks=(1, 2), n_pairs=16)


def test_inclusion_curves(cube):
    fig = plot_inclusion_curves(cube)
    assert isinstance(fig, Figure)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["layer 0", "layer 2", "layer 3", "layer 5"]
    lines = {line.get_label(): line for line in axes[0].get_lines()}
    assert set(lines) == {"gsm8k (fit)", "gsm8k (held-out)", "mbpp", "mlqa", "k_min"}
    ref = cube.curves.query("layer == 0 and skill == 'mbpp'")
    np.testing.assert_allclose(lines["mbpp"].get_xdata(), ref["alpha"])
    np.testing.assert_allclose(lines["mbpp"].get_ydata(), ref["inclusion"])
    kmin = cube.per_layer.set_index("layer").loc[0, "k_min"]
    assert lines["k_min"].get_xdata()[0] == pytest.approx(kmin)
    assert lines["gsm8k (fit)"].get_ydata()[-1] == 1.0
    assert axes[0].get_ylabel() == "inclusion rate"
    plt.close(fig)
    fig = plot_inclusion_curves(cube, layers=[4])
    assert [ax.get_title() for ax in fig.axes] == ["layer 4"]
    plt.close(fig)
    with pytest.raises(ValueError, match="not in the result"):
        plot_inclusion_curves(cube, layers=[9])


def test_hypercube_layers(cube):
    fig = plot_hypercube_layers(cube)
    size, dist, alpha = fig.axes[:3]
    (line,) = [ln for ln in size.get_lines() if ln.get_label() == "gsm8k"]
    np.testing.assert_allclose(line.get_ydata(), cube.per_layer["log_rel_side"])
    np.testing.assert_allclose(line.get_xdata(), cube.per_layer["layer"])
    rho = cube.trends.query("metric == 'log_rel_side'")["rho"].iloc[0]
    assert f"{rho:+.2f}" in size.get_title()
    labels = [ln.get_label() for ln in dist.get_lines()]
    assert labels == ["mbpp", "mlqa"]
    ref = cube.per_other.query("other == 'mbpp'")["centre_rms_pooled"]
    np.testing.assert_allclose(dist.get_lines()[0].get_ydata(), ref)
    labels = [ln.get_label() for ln in alpha.get_lines()]
    assert labels[:2] == ["k_min (fit)", "α_F (held-out ≥ 90%)"]
    assert any(lb.startswith("α_other mbpp") for lb in labels)
    assert all(ax.get_xlabel() == "layer" for ax in (size, dist, alpha))
    plt.close(fig)


def test_convexity_figure(conv):
    fig = plot_convexity(conv)
    seg, sep, boxes = fig.axes[:3]
    lines = {ln.get_label(): ln for ln in seg.get_lines()}
    assert {"segment points", "midpoints", "forget keys (LOO)", "chance"} <= set(lines)
    np.testing.assert_allclose(
        lines["segment points"].get_ydata(), conv.per_layer["segment_forget_rate"]
    )
    assert [ln.get_label() for ln in sep.get_lines()] == ["mbpp", "mlqa", "chance"]
    np.testing.assert_allclose(
        sep.get_lines()[0].get_ydata(),
        conv.separability.query("other == 'mbpp'")["balanced_accuracy"],
    )
    box_lines = {ln.get_label(): ln for ln in boxes.get_lines()}
    assert set(box_lines) == {"k=1 (one box)", "k=2"}
    ref = (
        conv.boxes.query("sizing == 'matched' and k == 2")
        .groupby("layer")["false_positive_rate"]
        .mean()
    )
    np.testing.assert_allclose(box_lines["k=2"].get_ydata(), ref.to_numpy())
    assert "90%" in boxes.get_title()
    plt.close(fig)
    fig = plot_convexity(conv, sizing="h")
    assert "h = 1.0" in fig.axes[2].get_title()
    plt.close(fig)
    with pytest.raises(ValueError, match="sizing"):
        plot_convexity(conv, sizing="bogus")
