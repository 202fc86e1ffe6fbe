"""Figures of the analyses: every function takes an analysis result and returns a Figure.

Results are computed by :mod:`mechunlearn.analysis`; this module only draws them
(matplotlib with seaborn's styling, applied per figure through :func:`style` so that the
global matplotlib state is left alone). :func:`save_figure` writes a figure as PNG and SVG.

Example:
    >>> fit = mu.analysis.gaussian_fit(stats_f, other=stats_r)
    >>> fig = mu.plots.plot_gaussian_summary(fit)
    >>> mu.plots.save_figure(fig, "figures/gaussian_summary")  # .png and .svg
    [PosixPath('figures/gaussian_summary.png'), PosixPath('figures/gaussian_summary.svg')]
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .interventions import methods

if TYPE_CHECKING:
    from .analysis.gaussian import GaussianFit
    from .analysis.separation import Separation

#: Colours of the forget and retain skills in every figure.
FORGET_COLOR = "#c0392b"
RETAIN_COLOR = "#2e6da4"
#: Display names of the normality tests.
TEST_LABELS = {
    "ks": "Kolmogorov-Smirnov",
    "ad": "Anderson-Darling",
    "shapiro": "Shapiro-Wilk",
    "jb": "Jarque-Bera",
}


def style() -> contextlib.AbstractContextManager:
    """The package's figure style as a context manager (seaborn ``whitegrid``, notebook fonts).

    Example:
        >>> with style():
        ...     fig, ax = plt.subplots()
        ...     print(plt.rcParams["axes.titlesize"])
        medium
        >>> plt.rcParams["axes.titlesize"]     # the global state is left alone
        'large'
    """
    rc: dict[str, Any] = {
        **sns.axes_style("whitegrid"),
        **sns.plotting_context("notebook", font_scale=0.85),
        "axes.titlesize": "medium",
        "legend.fontsize": "small",
        "legend.frameon": False,
        "figure.dpi": 100,
    }
    return plt.rc_context(rc)


def save_figure(fig: Figure, path: str | Path, dpi: int = 150) -> list[Path]:
    """Write ``fig`` as ``<path>.png`` and ``<path>.svg`` (folders created).

    Args:
        fig: the figure.
        path: the file path without suffix (a ``.png``/``.svg``/``.pdf`` suffix is dropped).
        dpi: resolution of the PNG.

    Returns:
        The two paths written.

    Example:
        >>> fig = plot_separation_by_layer(mu.analysis.separation(stats_f, stats_r))
        >>> save_figure(fig, "figures/separation_by_layer.png")   # the suffix is dropped
        [PosixPath('figures/separation_by_layer.png'), PosixPath('figures/separation_by_layer.svg')]
    """
    base = Path(path)
    if base.suffix.lower() in {".png", ".svg", ".pdf"}:
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for ext in ("png", "svg"):
        target = base.with_name(f"{base.name}.{ext}")
        fig.savefig(target, dpi=dpi, bbox_inches="tight")
        out.append(target)
    return out


def _grid(n: int, ncols: int, size: tuple[float, float] = (3.4, 2.8)):
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False
    )
    flat = list(axes.ravel())
    for ax in flat[n:]:
        fig.delaxes(ax)
    return fig, flat[:n]


def _layer_axis(*axes) -> None:
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _skill_names(meta: dict[str, Any], f_key: str, r_key: str) -> tuple[str, str]:
    return str(meta.get(f_key) or "forget"), str(meta.get(r_key) or "retain")


# --- Gaussian-fit and separation figures ---
def plot_gaussian_summary(fit: GaussianFit, tests: Sequence[str] | None = None) -> Figure:
    """Per-layer summary of a :class:`~mechunlearn.analysis.gaussian.GaussianFit`.

    Panels: (1) share of neurons that pass the decision rule and each test, with the share
    expected for truly Gaussian neurons under the uncorrected rule, ``(1 - alpha)^len(rule)``
    (approximate: the tests are not independent); (2) median ``|skew|`` and median excess
    kurtosis; (3) with a retain skill, the mean and best balanced accuracy of the Gaussian
    decision rule ``p_F >= p_R``.

    Example:
        >>> fig = plot_gaussian_summary(mu.analysis.gaussian_fit(stats_f, other=stats_r))
        >>> [ax.get_title() for ax in fig.axes]
        ['normality tests, alpha=0.05, correction=none', 'shape (0 for a normal)',
         'Gaussian rule p_F >= p_R']
    """
    by = fit.by_layer
    layers = by.index.to_numpy()
    tests = list(tests) if tests is not None else ["ks", "ad", "shapiro", "jb"]
    with_rule = "mean_rule_balanced_acc" in by.columns
    with style():
        fig, axes = plt.subplots(1, 3 if with_rule else 2, figsize=(13 if with_rule else 9, 3.4))
        ax = axes[0]
        rule = "+".join(fit.rule)
        ax.plot(layers, by["share_gaussian"], "o-", color="k", lw=2, label=f"rule ({rule})")
        for t in tests:
            ax.plot(layers, by[f"share_{t}_pass"], ".--", lw=1, label=TEST_LABELS.get(t, t))
        if fit.correction == "none":
            expected = (1 - fit.alpha) ** len(fit.rule)
            ax.axhline(expected, color="grey", ls=":", lw=1, label="expected if Gaussian")
        # Shares span [0, 1]: the legend gets headroom above them instead of covering a line.
        ax.set(xlabel="layer", ylabel="share of neurons passing", ylim=(-0.02, 1.45))
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.set_title(f"normality tests, alpha={fit.alpha:g}, correction={fit.correction}")
        ax.legend(loc="upper center", ncol=2, fontsize="small")
        ax = axes[1]
        ax.plot(layers, by["median_abs_skew"], "o-", label="median |skew|")
        ax.plot(layers, by["median_kurtosis"], "s-", label="median excess kurtosis")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xlabel="layer", ylabel="median", title="shape (0 for a normal)")
        ax.legend(loc="best")
        if with_rule:
            ax = axes[2]
            ax.plot(layers, by["mean_rule_balanced_acc"], "o-", label="mean over neurons")
            ax.plot(layers, by["max_rule_balanced_acc"], "^-", label="best neuron")
            ax.axhline(0.5, color="grey", ls=":", lw=1, label="chance")
            ax.set(xlabel="layer", ylabel="balanced accuracy", ylim=(0.45, 1.02))
            ax.set_title("Gaussian rule p_F >= p_R")
            ax.legend(loc="best")
        _layer_axis(*axes)
        skill = fit.meta.get("skill")
        fig.suptitle(
            f"Gaussian fit of {fit.meta.get('site')!r} values" + (f" on {skill}" if skill else "")
        )
        fig.tight_layout()
    return fig


def plot_qq(
    fit: GaussianFit,
    neurons: Sequence[tuple[int, int]] | None = None,
    n: int = 6,
    ncols: int = 3,
) -> Figure:
    """Normal Q-Q plots of chosen neurons (one panel each).

    Args:
        fit: a GaussianFit (it keeps the statistics, so the samples are at hand).
        neurons: ``(layer, neuron)`` pairs; default ``fit.representative_neurons(n)``: from the
            most to the least Gaussian by KS distance.
        n: how many neurons when ``neurons`` is not given.
        ncols: panels per row.

    Example:
        >>> fit = mu.analysis.gaussian_fit(stats_f)
        >>> fig = plot_qq(fit, neurons=[(0, 17), (2, 40)])
        >>> [ax.get_title().splitlines()[0] for ax in fig.axes]
        ['layer 0, neuron 17', 'layer 2, neuron 40']
    """
    neurons = list(neurons) if neurons is not None else fit.representative_neurons(n)
    if not neurons:
        raise ValueError("No neuron to plot (none was tested?).")
    with style():
        fig, axes = _grid(len(neurons), ncols)
        for ax, (layer, neuron) in zip(axes, neurons, strict=True):
            theory, sample = fit.qq(layer, neuron)
            row = fit.neuron(layer, neuron)
            ax.plot(theory, sample, ".", ms=3, alpha=0.6, color=FORGET_COLOR, label="sample")
            finite = theory[np.isfinite(theory)]
            lim = (finite.min(), finite.max()) if finite.size else (-3.0, 3.0)
            ax.plot(lim, lim, "-", color="k", lw=1, label="normal")
            ax.set_title(
                f"layer {layer}, neuron {neuron}\nKS={row['ks_stat']:.3f} skew={row['skew']:.2f} "
                f"kurt={row['kurtosis']:.2f}"
            )
            ax.set(xlabel="normal quantile", ylabel="standardised value")
        axes[0].legend(loc="upper left")
        fig.tight_layout()
    return fig


def plot_separation_histograms(
    sep: Separation,
    neurons: Sequence[tuple[int, int]] | None = None,
    k: int = 6,
    bins: int = 40,
    ncols: int = 3,
) -> Figure:
    """Forget vs retain histograms of top-separating neurons with the fitted Gaussians overlaid
    (the paper's Figure 3).

    Args:
        sep: a Separation (it keeps both skills' statistics for the samples).
        neurons: ``(layer, neuron)`` pairs; default the global top ``k`` by ``sep.metric``.
        k: how many top neurons when ``neurons`` is not given.
        bins: histogram bins (shared by both skills in a panel).
        ncols: panels per row.

    Example:
        >>> fig = plot_separation_histograms(mu.analysis.separation(stats_f, stats_r), k=4)
        >>> len(fig.axes)       # one panel per neuron
        4
    """
    if neurons is None:
        top = sep.top(k=k)
        neurons = [(int(a), int(b)) for a, b in zip(top["layer"], top["neuron"], strict=True)]
    neurons = list(neurons)
    if not neurons:
        raise ValueError("No neuron to plot.")
    name_f, name_r = _skill_names(sep.meta, "forget", "retain")
    with style():
        fig, axes = _grid(len(neurons), ncols)
        for ax, (layer, neuron) in zip(axes, neurons, strict=True):
            xf, xr = sep.samples(layer, neuron)
            both = np.concatenate([xf, xr])
            edges = np.histogram_bin_edges(both, bins=bins) if both.size else bins
            for x, color, name in ((xf, FORGET_COLOR, name_f), (xr, RETAIN_COLOR, name_r)):
                if x.size:
                    ax.hist(x, bins=edges, density=True, alpha=0.35, color=color, label=name)
            lo, hi = (both.min(), both.max()) if both.size else (-1.0, 1.0)
            grid = np.linspace(lo, hi, 200)
            pdf_f, pdf_r = sep.fitted_pdf(layer, neuron, grid)
            ax.plot(grid, pdf_f, color=FORGET_COLOR, lw=1.5, label=f"N fit ({name_f})")
            ax.plot(grid, pdf_r, color=RETAIN_COLOR, lw=1.5, label=f"N fit ({name_r})")
            score = sep.neuron(layer, neuron)[sep.metric]
            ax.set_title(f"layer {layer}, neuron {neuron}\n{sep.metric}={score:.3g}")
            ax.set(xlabel=f"{sep.meta.get('site', '')} value".strip(), ylabel="density")
        axes[0].legend(loc="best")
        fig.tight_layout()
    return fig


def plot_separation_by_layer(
    sep: Separation,
    metric: str | None = None,
    k: int | None = None,
    ratio: float | None = 0.01,
) -> Figure:
    """Separation across layers: the distribution of a measure per layer, and where the global
    top neurons sit.

    Panels: (1) a box plot of ``metric`` (default ``sep.metric``) per layer with the median
    line; (2) the number of global top neurons (top ``k``, else top ``ratio``) per layer, with
    the effective number of layers and Gini coefficient in the title.

    Example:
        >>> sep = mu.analysis.separation(stats_f, stats_r)
        >>> fig = plot_separation_by_layer(sep, ratio=0.03)
        >>> [ax.get_title() for ax in fig.axes]
        ['mean_diff per layer (no outliers drawn)', 'top 4 (3.00%) by mean_diff: ...']
    """
    metric = metric or sep.metric
    if k is not None:
        ratio = None
    summary = sep.layer_summary(metric)
    counts = sep.layer_counts(k=k, ratio=ratio)
    conc = sep.concentration(k=k, ratio=ratio)
    layers = list(sep.layers)
    groups = {layer: g[metric].dropna().to_numpy() for layer, g in sep.table.groupby("layer")}
    data = [groups.get(layer, np.array([])) for layer in layers]
    with style():
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.6))
        ax1.boxplot(data, positions=layers, widths=0.6, showfliers=False, manage_ticks=False)
        ax1.plot(layers, summary["median"], "-", color=FORGET_COLOR, lw=1.2, label="median")
        ax1.set(xlabel="layer", ylabel=metric, title=f"{metric} per layer (no outliers drawn)")
        ax1.legend(loc="best")
        ax2.bar(layers, counts["n_top"].to_numpy(), color=FORGET_COLOR, alpha=0.8)
        what = f"top {conc['n_top']}" + (f" ({ratio:.2%})" if ratio is not None else "")
        ax2.set(xlabel="layer", ylabel="neurons in the global top")
        ax2.set_title(
            f"{what} by {sep.metric}: effective layers {conc['effective_layers']:.1f}, "
            f"Gini {conc['gini']:.2f}"
        )
        _layer_axis(ax1, ax2)
        fig.tight_layout()
    return fig


# --- hypercube and convexity figures ---
if TYPE_CHECKING:
    from .analysis.convexity import ConvexityResult
    from .analysis.hypercube import HypercubeResult


def _pick_layers(
    all_layers: Sequence[int], layers: int | Sequence[int] | None, max_panels: int
) -> list[int]:
    """``layers`` if given, else up to ``max_panels`` evenly spaced ones (first and last kept)."""
    if layers is not None:
        layers = [layers] if isinstance(layers, int) else list(layers)
        missing = [layer for layer in layers if layer not in all_layers]
        if missing:
            raise ValueError(f"Layers {missing} are not in the result (it has {list(all_layers)}).")
        return layers
    if len(all_layers) <= max_panels:
        return list(all_layers)
    idx = np.unique(np.linspace(0, len(all_layers) - 1, max_panels).round().astype(int))
    return [all_layers[i] for i in idx]


def _other_colors(names: Sequence[str]) -> dict[str, Any]:
    """A colour per other skill: RETAIN_COLOR first, then seaborn's palette without blue/red."""
    deep = sns.color_palette("deep")
    palette = [RETAIN_COLOR] + [c for i, c in enumerate(deep) if i not in (0, 3)]
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def plot_inclusion_curves(
    result: HypercubeResult, layers: int | Sequence[int] | None = None, max_panels: int = 4
) -> Figure:
    """Inclusion rate inside ``μ_F ± α·σ_F`` vs α, one panel per layer (the paper's Figure 5).

    Lines: the forget skill's fit queries (what the paper plots, dashed), its held-out queries,
    and every other skill; a dotted vertical line marks ``k_min``.

    Args:
        result: a :class:`~mechunlearn.analysis.hypercube.HypercubeResult`.
        layers: the layers to draw (default: up to ``max_panels`` evenly spaced).
        max_panels: panels when ``layers`` is omitted.

    Example:
        >>> fig = plot_inclusion_curves(mu.analysis.hypercube(keys_f, {"copy": keys_r}))
        >>> [ax.get_title() for ax in fig.axes]
        ['layer 0', 'layer 1', 'layer 2']
    """
    layers = _pick_layers(result.layers, layers, max_panels)
    colors = _other_colors(result.others)
    kmin = result.per_layer.set_index("layer")["k_min"]
    with style():
        fig, axes = plt.subplots(
            1, len(layers), figsize=(3.4 * len(layers), 3.2), sharey=True, squeeze=False
        )
        for ax, layer in zip(axes[0], layers, strict=True):
            sub = result.curves[result.curves["layer"] == layer]
            for (skill, role, part), g in sub.groupby(["skill", "role", "part"], sort=False):
                forget = role == "forget"
                ax.plot(
                    g["alpha"].to_numpy(),
                    g["inclusion"].to_numpy(),
                    "--" if part == "fit" else "-",
                    color=FORGET_COLOR if forget else colors[skill],
                    label=f"{skill} ({part})" if forget else skill,
                )
            ax.axvline(float(kmin[layer]), color="grey", ls=":", lw=1, label="k_min")
            ax.set(title=f"layer {layer}", xlabel="α (cube μ ± α·σ)", ylim=(-0.02, 1.02))
        axes[0, 0].set_ylabel("inclusion rate")
        axes[0, -1].legend(loc="lower right")
        fig.suptitle(f"Queries inside the {result.forget!r} hypercube")
        fig.tight_layout()
    return fig


def plot_hypercube_layers(result: HypercubeResult) -> Figure:
    """Cube size, centre distance and separating α across layers (the paper's Figure 6 claim).

    Panels: (1) normalised volume, the mean over dimensions of ``log(σ_F/σ_pool)`` (the cubes
    "shrink" if it falls with depth); (2) distance between the forget centre and each other
    skill's centre, RMS over dimensions in pooled-σ units ("separate" if it grows);
    (3) ``k_min``, ``α_F`` (held-out forget coverage reaches the target) and each other skill's
    ``α_other`` (its inclusion stays under the cap below it): separated where
    ``α_F < α_other``. Panel titles give the Spearman correlation with the layer index.

    Example:
        >>> res = mu.analysis.hypercube(keys_f, {"copy": keys_r})
        >>> fig = plot_hypercube_layers(res)
        >>> [ax.get_title().split(" (")[0] for ax in fig.axes]
        ['cube size', 'centre distance', 'separating α']
    """
    trends = result.trends

    def rho(metric, other=""):
        row = trends[(trends["metric"] == metric) & (trends["other"] == other)]
        return float(row["rho"].iloc[0]) if len(row) else float("nan")

    pl, po = result.per_layer, result.per_other
    colors = _other_colors(result.others)
    with style():
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        ax = axes[0]
        ax.plot(pl["layer"], pl["log_rel_side"], "o-", color=FORGET_COLOR, label=result.forget)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(f"cube size (Spearman ρ = {rho('log_rel_side'):+.2f})")
        ax.set_ylabel("mean log(σ_F / σ_pooled)")
        ax = axes[1]
        for other, g in po.groupby("other", sort=False):
            ax.plot(g["layer"], g["centre_rms_pooled"], "o-", color=colors[other], label=other)
        rhos = ", ".join(f"{o}: {rho('centre_rms_pooled', o):+.2f}" for o in result.others)
        ax.set_title(f"centre distance (ρ {rhos})")
        ax.set_ylabel("RMS (μ_F − μ_other)/σ_pooled")
        ax = axes[2]
        ax.plot(pl["layer"], pl["k_min"], "k:", label="k_min (fit)")
        ax.plot(
            pl["layer"],
            pl["alpha_f"],
            "o-",
            color=FORGET_COLOR,
            label=f"α_F (held-out ≥ {result.target:.0%})",
        )
        for other, g in po.groupby("other", sort=False):
            alpha = g["alpha_other"].replace(np.inf, np.nan)
            ax.plot(
                g["layer"],
                alpha,
                "s--",
                color=colors[other],
                label=f"α_other {other} (≤ {result.cap:.0%})",
            )
        ax.set_yscale("log")
        ax.set(title="separating α", ylabel="α")
        for ax in axes:
            ax.set_xlabel("layer")
            ax.legend(loc="best")
        fig.tight_layout()
    return fig


def plot_convexity(result: ConvexityResult, sizing: str = "matched") -> Figure:
    """Convexity summary across layers.

    Panels: (1) share of segment points (and midpoints) between two forget keys whose nearest
    neighbour is a forget key, beside the forget keys' own leave-one-out rate and chance;
    (2) held-out balanced accuracy of a linear classifier, forget vs each other skill;
    (3) false-positive rate (other skills inside, averaged over them) of one box vs unions of
    k boxes, at ``sizing`` (``"matched"``: equal held-out forget recall; ``"h"``: each box at
    ``h × k_min``).

    Example:
        >>> fig = plot_convexity(mu.analysis.convexity(keys_f, {"copy": keys_r}))
        >>> fig.axes[0].get_title()
        'nearest neighbour is a forget key'
    """
    if sizing not in ("matched", "h"):
        raise ValueError(f"sizing must be 'matched' or 'h', got {sizing!r}.")
    pl = result.per_layer
    colors = _other_colors(result.others)
    boxes = result.boxes[result.boxes["sizing"] == sizing]
    fp = boxes.groupby(["k", "layer"], sort=True)["false_positive_rate"].mean()
    what = (
        f"held-out recall ≥ {result.settings.get('target', 0.9):.0%}"
        if sizing == "matched"
        else f"h = {result.settings.get('h', 1.0)}"
    )
    with style():
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        ax = axes[0]
        ax.plot(
            pl["layer"], pl["segment_forget_rate"], "o-", color=FORGET_COLOR, label="segment points"
        )
        ax.plot(pl["layer"], pl["midpoint_forget_rate"], "s-", label="midpoints")
        ax.plot(pl["layer"], pl["baseline_forget_rate"], "k--", label="forget keys (LOO)")
        ax.plot(pl["layer"], pl["chance_rate"], ":", color="grey", label="chance")
        ax.set(title="nearest neighbour is a forget key", ylabel="rate")
        ax = axes[1]
        for other, g in result.separability.groupby("other", sort=False):
            ax.plot(g["layer"], g["balanced_accuracy"], "o-", color=colors[other], label=other)
        ax.axhline(0.5, color="grey", ls=":", lw=1, label="chance")
        ax.set(title="linear separability (held-out)", ylabel="balanced accuracy")
        ax = axes[2]
        for k, g in fp.groupby(level="k"):
            label = "k=1 (one box)" if k == 1 else f"k={k}"
            ax.plot(g.index.get_level_values("layer"), g.to_numpy(), "o-", label=label)
        ax.set(title=f"boxes: false positives ({what})", ylabel="other skills inside")
        for ax in axes:
            ax.set(xlabel="layer", ylim=(-0.02, 1.02))
            ax.legend(loc="best")
        fig.suptitle(f"Is the {result.forget!r} key region convex?")
        fig.tight_layout()
    return fig


# --- unlearning figures ---
def close(fig: Figure) -> None:
    """Free a figure's memory (pyplot keeps every figure it made until closed)."""
    plt.close(fig)


def _family(method: str) -> str:
    return method.split()[0]


def _roles(table: pd.DataFrame) -> pd.Series:
    """Each row's role: the ``role`` column, else parsed from a ``"name (role)"`` skill label."""
    if "role" in table.columns and table["role"].notna().any():
        return table["role"].fillna("")
    return table["skill"].str.extract(r"\((forget|retain|general)\)\s*$", expand=False).fillna("")


def tradeoff_points(results: pd.DataFrame, keep: str = "mean") -> pd.DataFrame:
    """One row per method: forget and keep relative performance with their intervals.

    Args:
        results: :func:`mechunlearn.evaluate`'s table (with a ``role`` column, or skill labels
            ending in ``"(forget)"``).
        keep: ``"mean"`` over the kept skills (their interval: the mean of their bounds, an
            approximation), or ``"worst"``: the kept skill with the lowest relative performance
            (its own interval).

    Returns:
        Columns ``forget, forget_low, forget_high, keep, keep_low, keep_high, family``, indexed
        by method.
    """
    if keep not in ("mean", "worst"):
        raise ValueError(f"keep must be 'mean' or 'worst', got {keep!r}.")
    table = results[results["method"] != "base"].copy()
    if table.empty:
        raise ValueError("No intervention rows to plot (only 'base').")
    table["_role"] = _roles(table)
    forget_rows = table["_role"] == "forget"
    if not forget_rows.any() or forget_rows.all():
        raise ValueError("Need rows for one forget skill and at least one other skill.")
    for col in ("relative_low", "relative_high"):
        if col not in table.columns:
            table[col] = np.nan
    f = (
        table[forget_rows]
        .groupby("method", sort=False)[["relative", "relative_low", "relative_high"]]
        .mean()
    )
    others = table[~forget_rows]
    if keep == "mean":
        k = others.groupby("method", sort=False)[
            ["relative", "relative_low", "relative_high"]
        ].mean()
    else:
        idx = others.groupby("method", sort=False)["relative"].idxmin()
        k = others.loc[idx.dropna(), ["method", "relative", "relative_low", "relative_high"]]
        k = k.set_index("method")
    points = pd.DataFrame(
        {
            "forget": f["relative"],
            "forget_low": f["relative_low"],
            "forget_high": f["relative_high"],
            "keep": k["relative"],
            "keep_low": k["relative_low"],
            "keep_high": k["relative_high"],
        }
    ).dropna(subset=["forget", "keep"])
    if "kind" in table.columns:
        kinds = table.drop_duplicates("method").set_index("method")["kind"]
        points["family"] = [_short_kind(kinds.get(m), m) for m in points.index]
    else:
        points["family"] = [_family(m) for m in points.index]
    return points


def _short_kind(kind: Any, method: str) -> str:
    """A method's short registered name ("NA") from its class name in a results table."""
    short = {spec.cls.__name__: spec.name for spec in methods()}
    if isinstance(kind, str) and kind in short:
        return short[kind]
    return _family(method)


def _error_bars(points: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``(xerr, yerr)`` for ``errorbar`` from :func:`tradeoff_points`' intervals (keep, forget):
    each a ``[2, n]`` array of distances below and above the point."""
    return tuple(
        np.abs(np.vstack([points[c] - points[f"{c}_low"], points[f"{c}_high"] - points[c]]))
        for c in ("keep", "forget")
    )


def plot_tradeoff(
    results: pd.DataFrame,
    title: str | None = None,
    forget_goal: float = 0.5,
    keep_goal: float = 0.9,
    keep: str = "mean",
) -> Figure:
    """Forget vs keep trade-off of every method: one point per method and hyperparameter.

    ``x`` is the relative performance on the skills that are not forgotten (their mean, or the
    worst one: ``keep="worst"``), ``y`` the forget skill's relative performance, each with its
    95 % paired-bootstrap interval as an error bar (where the table has one); the shaded corner
    meets both goals. Points of one family (the ``kind`` column, else the method name's first
    word: ``"NA ratio=0.03"`` -> ``NA``) are joined in x order and labelled by the rest of the
    method name.

    Args:
        results: :func:`mechunlearn.evaluate`'s table.
        title: figure title.
        forget_goal: the forget skill's target (at most this).
        keep_goal: the other skills' target (at least this).
        keep: ``"mean"`` or ``"worst"`` (see :func:`tradeoff_points`).

    Example:
        >>> sweep = {f"NA ratio={r}": mu.NeuronAdjust(ratio=r).fit(stats_f, stats_r)
        ...          for r in (0.01, 0.05)}
        >>> table = mu.evaluate(model, [forget, retain], {**sweep, "KSD h=2": ksd},
        ...                     roles={"add": "forget", "copy": "retain"}, quiet=True)
        >>> fig = plot_tradeoff(table)
        >>> [t.get_text() for t in fig.axes[0].get_legend().get_texts()]   # the families
        ['NA', 'KSD']
    """
    points = tradeoff_points(results, keep)
    with style():
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
        ax.axvspan(keep_goal, 1.1, ymin=0, ymax=1, color="#e3f4e6", zorder=0)
        ax.axhline(forget_goal, color="0.6", ls=":", lw=1)
        ax.axvline(keep_goal, color="0.6", ls=":", lw=1)
        palette = dict(
            zip(sorted(points["family"].unique()), sns.color_palette("deep"), strict=False)
        )
        for family, group in points.groupby("family", sort=False):
            group = group.sort_values("keep")
            color = palette[family]
            ax.plot(group["keep"], group["forget"], "o-", color=color, label=family, ms=6, lw=1.2)
            xerr, yerr = _error_bars(group)
            if np.isfinite(yerr).any() or np.isfinite(xerr).any():
                ax.errorbar(
                    group["keep"], group["forget"],
                    yerr=np.nan_to_num(yerr), xerr=np.nan_to_num(xerr),
                    fmt="none", ecolor=color, alpha=0.35, lw=0.9, capsize=2,
                )  # fmt: skip
            for method, row in group.iterrows():
                label = method[len(method.split()[0]) :].strip()
                ax.annotate(
                    label,
                    (row["keep"], row["forget"]),
                    fontsize=7,
                    xytext=(4, 3),
                    textcoords="offset points",
                )
        what = "mean" if keep == "mean" else "worst"
        ax.set(
            xlabel=f"relative performance kept ({what} of retain + general)",
            ylabel="relative performance on the forget skill",
            xlim=(min(0.0, points["keep"].min() - 0.05), 1.1),
            ylim=(-0.05, max(1.1, points["forget"].max() + 0.05)),
        )
        ax.set_title(title or "forget vs keep")
        ax.legend(loc="upper left")
        fig.tight_layout()
    return fig


#: The tuning table's columns that are not a kept skill's score (:func:`mechunlearn.tune`'s
#: table with the matched study's ``method, knob, value`` in front).
_TUNING_COLUMNS = ("method", "knob", "value", "forget", "meets_floor", "rank", "chosen")


def plot_matched_frontier(
    tuning: pd.DataFrame, results: pd.DataFrame, floor: float = 0.9, title: str | None = None
) -> Figure:
    """Every method's frontier at matched collateral: its tuned candidates and its chosen one.

    Each method's candidates (the tuning table: forget score against the worst of the kept
    skills the tuning scored, both relative to the base model, on the tuning examples) are joined as
    a thin line and labelled by their knob value; the chosen candidate scored held out
    (``results``: the worst of every kept skill it has, extra ones included) is the large marker,
    with its 95 % intervals on both axes. The shaded band meets the floor.

    Args:
        tuning: one row per (method, candidate) with columns ``method``, ``value``, ``forget``,
            one per kept skill, and ``chosen`` (the matched study's ``tuning.csv``).
        results: :func:`mechunlearn.evaluate`'s table of the chosen methods, labelled
            ``"<method> <knob>=<value>"`` (the matched study's ``matched.csv``).
        floor: the kept skills' floor.
        title: figure title.

    Example:
        >>> search = mu.tune("NA", {"ratio": [0.05, 0.2]}, lambda na: na.fit(stats_f, stats_r),
        ...                  model=model, forget=forget[20:], keep={"copy": retain[20:]},
        ...                  floor=0.5)
        >>> tuning = search.table_.rename(columns={"ratio": "value"}).assign(method="NA")
        >>> label = f"NA ratio={search.best_params_['ratio']}"
        >>> table = mu.evaluate(model, [forget[:20], retain[:20]], {label: search.best_},
        ...                     roles={"add": "forget", "copy": "retain"}, quiet=True)
        >>> fig = plot_matched_frontier(tuning, table, floor=0.5)
        >>> [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        ['NA']
    """
    kept = [c for c in tuning.columns if c not in _TUNING_COLUMNS]
    if not kept:
        raise ValueError(f"The tuning table has no kept skill's column: {list(tuning.columns)}.")
    candidates = tuning.assign(keep=tuning[kept].min(axis=1))
    chosen = tradeoff_points(results, keep="worst")
    families = list(dict.fromkeys(candidates["method"]))
    with style():
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
        ax.axvspan(floor, 1.1, color="#e3f4e6", zorder=0)
        ax.axvline(floor, color="0.6", ls=":", lw=1)
        palette = dict(zip(families, sns.color_palette("deep", len(families)), strict=True))
        for family in families:
            color = palette[family]
            group = candidates[candidates["method"] == family]
            ax.plot(group["keep"], group["forget"], ".-", color=color, lw=0.8, alpha=0.6)
            for row in group.itertuples():
                ax.annotate(f"{row.value:g}" if isinstance(row.value, float) else str(row.value),
                            (row.keep, row.forget), fontsize=6, color=color,
                            xytext=(3, 2), textcoords="offset points")  # fmt: skip
            held = chosen[chosen["family"] == family]
            xerr, yerr = _error_bars(held)
            ax.errorbar(held["keep"], held["forget"], yerr=np.nan_to_num(yerr),
                        xerr=np.nan_to_num(xerr), fmt="o", color=color, ms=8, capsize=2,
                        lw=1, label=family)  # fmt: skip
        xs = pd.concat([candidates["keep"], chosen["keep"], chosen["keep_low"]])
        ys = pd.concat([candidates["forget"], chosen["forget"], chosen["forget_high"]])
        ax.set(
            xlabel="worst kept skill (relative to base)",
            ylabel="forget skill left (relative to base)",
            xlim=(min(floor - 0.1, xs.min() - 0.05), max(1.1, xs.max() + 0.05)),
            ylim=(-0.05, max(1.1, ys.max() + 0.05)),
        )
        ax.set_title(title or "at matched collateral")
        ax.legend(loc="best", fontsize=7, title="large: chosen, held out", title_fontsize=7)
        fig.tight_layout()
    return fig


def plot_language_matrix(
    table: pd.DataFrame, method: str, title: str | None = None, annotate: bool = True
) -> Figure:
    """Heatmap of relative performance: rows the forgotten language, columns the scored skill.

    Args:
        table: one row per (forgotten language, method, scored skill) with columns ``forget``,
            ``method``, ``skill``, ``relative`` and optionally ``relative_low``/``relative_high``
            (e.g. the language study's ``matrix.csv``).
        method: which method's cells to draw (a value of the ``method`` column).
        title: figure title.
        annotate: write each cell's value and interval in it.

    Example:
        >>> matrix = pd.DataFrame({"forget": ["en", "en", "de", "de"], "method": "KSD",
        ...                        "skill": ["en", "de", "en", "de"],
        ...                        "relative": [0.1, 0.9, 1.0, 0.2]})
        >>> fig = plot_language_matrix(matrix, "KSD")
        >>> fig.axes[0].get_title()
        'KSD: relative performance after forgetting each language'
    """
    rows = table[table["method"] == method]
    if rows.empty:
        raise ValueError(
            f"No rows for method {method!r}; the table has {sorted(table['method'].unique())}."
        )
    forgets = list(dict.fromkeys(rows["forget"]))
    skills = list(dict.fromkeys(rows["skill"]))
    value = rows.pivot(index="forget", columns="skill", values="relative").loc[forgets, skills]
    has_ci = {"relative_low", "relative_high"} <= set(rows.columns)
    if has_ci:
        low = rows.pivot(index="forget", columns="skill", values="relative_low").loc[
            forgets, skills
        ]
        high = rows.pivot(index="forget", columns="skill", values="relative_high").loc[
            forgets, skills
        ]
    with style():
        fig, ax = plt.subplots(figsize=(1.05 * len(skills) + 2.2, 0.62 * len(forgets) + 1.6))
        image = ax.imshow(value.to_numpy(dtype=float), cmap="RdYlGn", vmin=0.0, vmax=1.2,
                          aspect="auto")  # fmt: skip
        ax.set_xticks(range(len(skills)), labels=skills, rotation=30, ha="right")
        ax.set_yticks(range(len(forgets)), labels=forgets)
        ax.set_xlabel("scored skill (held-out)")
        ax.set_ylabel("forgotten language")
        ax.grid(False)
        if annotate:
            for i, f in enumerate(forgets):
                for j, s in enumerate(skills):
                    v = value.loc[f, s]
                    if not np.isfinite(v):
                        continue
                    text = f"{v:.2f}"
                    if has_ci and np.isfinite(low.loc[f, s]) and np.isfinite(high.loc[f, s]):
                        text += f"\n[{low.loc[f, s]:.2f},{high.loc[f, s]:.2f}]"
                    weight = "bold" if f == s else "normal"
                    ax.text(j, i, text, ha="center", va="center", fontsize=6.5, weight=weight)
        fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="relative performance")
        ax.set_title(title or f"{method}: relative performance after forgetting each language")
        fig.tight_layout()
    return fig


def plot_detection_by_format(table: pd.DataFrame) -> Figure:
    """Detection rate of each prompt format, per detector: the forget skill's (to be detected)
    beside the controls' (false positives), with 95 % intervals.

    Args:
        table: one row per (detector, skill, variant) with ``rate``, ``low``, ``high``; the first
            skill is the forget skill (e.g. the format study's ``detection.csv``).

    Example:
        >>> table = pd.DataFrame({"detector": "KSD", "skill": ["add", "add", "copy", "copy"],
        ...                       "variant": ["plain", "chat"] * 2, "rate": [1.0, 0.4, 0.0, 0.1],
        ...                       "low": [0.9, 0.2, 0.0, 0.0], "high": [1.0, 0.6, 0.1, 0.3]})
        >>> fig = plot_detection_by_format(table)   # or pd.read_csv(".../detection.csv")
        >>> [ax.get_title() for ax in fig.axes]    # one panel per detector
        ['KSD']
    """
    needed = {"detector", "skill", "variant", "rate", "low", "high"}
    if missing := needed - set(table.columns):
        raise ValueError(f"The table lacks the columns {sorted(missing)}.")
    detectors = list(dict.fromkeys(table["detector"]))
    skills = list(dict.fromkeys(table["skill"]))
    variants = list(dict.fromkeys(table["variant"]))
    colors = [FORGET_COLOR, *sns.color_palette("Blues_d", max(1, len(skills) - 1))]
    with style():
        fig, axes = plt.subplots(
            len(detectors), 1, figsize=(1.0 * len(variants) + 2.5, 2.6 * len(detectors)),
            squeeze=False, sharex=True,
        )  # fmt: skip
        width = 0.8 / len(skills)
        for ax, det in zip(axes[:, 0], detectors, strict=True):
            part = table[table["detector"] == det]
            for k, (skill, color) in enumerate(zip(skills, colors, strict=False)):
                rows = part[part["skill"] == skill].set_index("variant").reindex(variants)
                x = np.arange(len(variants)) + (k - (len(skills) - 1) / 2) * width
                err = np.vstack([rows["rate"] - rows["low"], rows["high"] - rows["rate"]])
                yerr = np.nan_to_num(np.abs(err))
                ax.bar(x, rows["rate"], width, color=color, label=skill, yerr=yerr,
                       capsize=1.5, error_kw={"lw": 0.7})  # fmt: skip
            ax.set_ylim(0, 1.05)
            ax.set_ylabel("detected")
            ax.set_title(det)
        axes[-1, 0].set_xticks(range(len(variants)), labels=variants, rotation=25, ha="right")
        axes[0, 0].legend(ncol=len(skills), loc="upper right", fontsize="x-small")
        fig.tight_layout()
    return fig


def plot_attack_recovery(table: pd.DataFrame, title: str | None = None) -> Figure:
    """The forget skill under attack: one panel per attack family, one marker per method.

    ``x`` is the attack of the family (prompt wrapper, relearning run and step count, bits,
    probe or lens), ``y`` its number (:func:`mechunlearn.attacks.recovery_table`'s ``value``:
    relative score, recovery, or best-layer accuracy) with its interval as an error bar where
    the table has one; the methods are side by side within each attack. The residual panel
    draws the bare model's value (``reference``) as a grey bar.

    Args:
        table: :func:`mechunlearn.attacks.recovery_table`'s rows (one seed).
        title: the figure's title.

    Raises:
        ValueError: an empty table.

    Example:
        >>> prompts = pd.DataFrame(dict(
        ...     attack=["none", "comment"], skill="gsm8k", role="forget", method="NA",
        ...     kind="NeuronAdjust", relative=[0.9, 0.95], relative_low=[0.8, 0.9],
        ...     relative_high=[1.0, 1.0]))
        >>> from mechunlearn.attacks import recovery_table
        >>> fig = plot_attack_recovery(recovery_table({"prompts": prompts}))
        >>> len(fig.axes)                        # one panel: the prompt attacks
        1
    """
    if table.empty:
        raise ValueError("No attack rows to plot.")
    families = list(dict.fromkeys(table["family"]))
    methods_ = list(dict.fromkeys(table["method"]))
    palette = dict(zip(methods_, sns.color_palette("tab10", len(methods_)), strict=True))
    width = 0.8 / len(methods_)
    with style():
        sizes = [max(2, table[table["family"] == f]["attack"].nunique()) for f in families]
        fig, axes = plt.subplots(
            1, len(families), figsize=(1.0 + 0.55 * sum(sizes) + 0.8 * len(families), 4.2),
            gridspec_kw={"width_ratios": sizes}, squeeze=False,
        )  # fmt: skip
        for ax, family in zip(axes[0], families, strict=True):
            rows = table[table["family"] == family]
            attacks = list(dict.fromkeys(rows["attack"]))
            if family == "residual":
                ref = rows.groupby("attack", sort=False)["reference"].max()
                ax.bar(range(len(attacks)), [ref.get(a, np.nan) for a in attacks],
                       color="0.85", width=0.9, label="bare model")  # fmt: skip
            for i, method in enumerate(methods_):
                got = rows[rows["method"] == method].set_index("attack")
                if got.empty:
                    continue
                x = np.array([attacks.index(a) for a in got.index]) - 0.4 + (i + 0.5) * width
                y = got["value"].to_numpy(float)
                low = np.nan_to_num(y - got["low"].to_numpy(float))
                high = np.nan_to_num(got["high"].to_numpy(float) - y)
                ax.errorbar(x, y, yerr=np.abs(np.vstack([low, high])), fmt="o", ms=4,
                            color=palette[method], lw=0.9, capsize=1.5,
                            label=method)  # fmt: skip
            ax.set_xticks(range(len(attacks)))
            ax.set_xticklabels(attacks, rotation=45, ha="right", fontsize=7)
            ax.grid(axis="x", visible=False)
            ax.axhline(1.0, color="0.6", ls=":", lw=0.8)
            ax.axhline(0.0, color="0.6", ls="-", lw=0.5)
            metric = "\n".join(dict.fromkeys(rows["metric"]))
            ax.set_title(family, fontsize=9)
            ax.set_ylabel(metric, fontsize=8)
        handles, labels = axes[0][-1].get_legend_handles_labels()
        for ax in axes[0][:-1]:
            h, lab = ax.get_legend_handles_labels()
            for hh, ll in zip(h, lab, strict=True):
                if ll not in labels:
                    handles.append(hh)
                    labels.append(ll)
        fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
        fig.suptitle(title or "the forget skill under attack", fontsize=10)
        fig.tight_layout(rect=(0, 0, 0.86, 1))
    return fig
