"""Distribution-separation rankings: which neurons tell the forget skill from the retain skill?

For every neuron of every layer, :func:`separation` computes how far apart its value
distributions on the forget skill F and the retain skill R are, by eight measures:

=================  ======================================================================
``mean_diff``      ``mu_F - mu_R``, **signed** (the authors' Neuron Adjust selection: only
                   neurons higher on F rank first)
``cohens_d``       ``|mu_F - mu_R| / s_pooled``, ``s_pooled^2 = ((n_F-1) s_F^2 + (n_R-1) s_R^2)
                   / (n_F + n_R - 2)`` with the token counts
``kl``             ``KL(N_F || N_R) = log(s_R/s_F) + (s_F^2 + (mu_F-mu_R)^2) / (2 s_R^2) - 1/2``
``sym_kl``         ``KL(N_F || N_R) + KL(N_R || N_F)`` (Jeffreys divergence, the sum)
``bhattacharyya``  ``(mu_F-mu_R)^2 / (4 (s_F^2+s_R^2)) + 1/2 log((s_F^2+s_R^2) / (2 s_F s_R))``
``wasserstein``    2-Wasserstein distance between the Gaussians,
                   ``sqrt((mu_F-mu_R)^2 + (s_F-s_R)^2)``
``ks``             two-sample Kolmogorov-Smirnov statistic ``sup |F_F(x) - F_R(x)|`` on the
                   reservoir samples (``scipy.stats.ks_2samp``)
``auroc``          ``max(A, 1 - A)`` with ``A = P(x_F > x_R) + P(x_F = x_R)/2`` on the reservoir
                   samples (``mannwhitneyu(F, R).statistic / (n_F n_R)``); ``A`` itself is
                   the column ``auroc_f``
=================  ======================================================================

The Gaussian measures are closed forms of the streaming mean and standard deviation (float64,
every counted token: the Gaussians Neuron Adjust uses). Every measure except ``mean_diff`` is a
non-negative magnitude. KS and AUROC are distribution-free and computed on the reservoirs,
vectorised over neurons: each block of neurons' F and R values is encoded as sortable integers
with the skill in the lowest bit, sorted once (NumPy's SIMD sort), and both statistics follow
from a cumulative count and a rank sum; ties (common in low-precision models) are handled
exactly as scipy does.

**Bad input.** Statistics from different models, sites or layers raise a ValueError. A measure
that is undefined for a neuron is NaN and the table's ``note`` says why: a standard deviation of
zero (constant neuron) or undefined (fewer than two tokens) for the divergences, no finite
reservoir value for KS/AUROC. Non-finite reservoir values are left out per neuron. NaN scores
are never selected by :func:`top_neurons` and sort last.

Example:
    >>> sep = mu.analysis.separation(stats_f, stats_r, metric="cohens_d")
    >>> len(sep.top(k=20))                  # the 20 best-separating neurons, all layers
    20
    >>> counts = sep.layer_counts(ratio=0.05)   # where the top 5 % sit
    >>> counts.shape, int(counts["n_top"].sum())  # a row per layer; round(0.05 * 3 * 48)
    ((3, 3), 7)
    >>> scores = mu.analysis.separation_scores(stats_f, stats_r, "mean_diff")  # [layers, d_mlp]
    >>> mask = mu.analysis.top_neurons(scores, ratio=0.03)
    >>> scores.shape, int(mask.sum())       # round(0.03 * 144) neurons selected
    (torch.Size([3, 48]), 4)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..kernels.samples import neuron_samples
from ..kernels.separation import (
    GAUSSIAN_METRICS,
    METRICS,
    SAMPLE_METRICS,
    gaussian_separation,
    n_top,
    sample_separation,
    separation_scores,
    top_neurons,
    two_sample_ks_auroc,
)
from ..stats import NeuronStats, check_stats
from ..validation import check_choice, check_same_source

__all__ = [
    "METRICS",
    "GAUSSIAN_METRICS",
    "SAMPLE_METRICS",
    "Separation",
    "separation",
    "separation_scores",
    "gaussian_separation",
    "sample_separation",
    "two_sample_ks_auroc",
    "top_neurons",
    "n_top",
]


# ---------------------------------------------------------------------- Gaussian closed forms


# ------------------------------------------------------------------ distribution-free on samples


# ------------------------------------------------------------------------------- scores, top


# ------------------------------------------------------------------------------------ result
@dataclass
class Separation:
    """Result of :func:`separation`: every neuron's separation measures, ranked by ``metric``.

    Attributes:
        table: one row per (layer, neuron), sorted by ``metric`` (descending, NaN last, ties in
            layer-neuron order). Columns: ``layer``, ``neuron``, ``mu_f``, ``sigma_f``,
            ``mu_r``, ``sigma_r``, ``n_tokens_f``, ``n_tokens_r``, the measures of
            :data:`METRICS`, ``auroc_f`` (``P(x_F > x_R)``), ``n_f``/``n_r`` (finite
            reservoir values), ``rank`` (1 = best; NA for a NaN score) and ``note``.
        metric: the ranking measure.
        layers: the model layers.
        d_mlp: neurons per layer.
        meta: model, site, forget and retain skill names.
        stats_f, stats_r: the statistics compared (kept by reference for plots).

    Example:
        >>> sep = separation(stats_f, stats_r, metric="ks")
        >>> per_layer = sep.top(ratio=0.05).groupby("layer").size()   # top 5 %, by layer
        >>> int(per_layer.sum())
        7
    """

    table: pd.DataFrame
    metric: str
    layers: list[int]
    d_mlp: int
    meta: dict[str, Any] = field(default_factory=dict)
    stats_f: NeuronStats | None = field(default=None, repr=False)
    stats_r: NeuronStats | None = field(default=None, repr=False)

    @property
    def n_neurons(self) -> int:
        """All neurons of all layers."""
        return len(self.layers) * self.d_mlp

    def ranked_by(self, metric: str) -> Separation:
        """The same measures ranked by another metric."""
        check_choice(metric, METRICS, "metric")
        if metric in SAMPLE_METRICS and self.table[metric].isna().all():
            raise ValueError(f"{metric!r} was not computed (sample_metrics=False).")
        return Separation(
            _rank(self.table, metric),
            metric,
            list(self.layers),
            self.d_mlp,
            dict(self.meta),
            self.stats_f,
            self.stats_r,
        )

    def top(self, k: int | None = None, ratio: float | None = None) -> pd.DataFrame:
        """The global top ``k`` (or top ``ratio``) neurons across all layers, best first.

        The same neurons as ``top_neurons(self.scores(), ratio=ratio, k=k)``.
        """
        want = n_top(self.n_neurons, ratio, k)
        return self.table[self.table["rank"].notna()].head(want)

    def top_per_layer(self, k: int) -> pd.DataFrame:
        """The top ``k`` neurons of every layer (layers in order, best first within a layer)."""
        ranked = self.table[self.table["rank"].notna()]
        out = ranked.groupby("layer", sort=False).head(int(k))
        return out.sort_values(["layer", "rank"], kind="stable")

    def layer_counts(self, k: int | None = None, ratio: float | None = None) -> pd.DataFrame:
        """How the global top neurons are spread over layers.

        Returns:
            DataFrame indexed by every layer: ``n_top``, ``share_of_top`` (of the selected
            neurons), ``share_of_layer`` (of the layer's neurons).
        """
        top = self.top(k=k, ratio=ratio)
        counts = top.groupby("layer").size().reindex(self.layers, fill_value=0)
        total = max(1, int(counts.sum()))
        out = pd.DataFrame(
            {
                "n_top": counts.astype(np.int64),
                "share_of_top": counts / total,
                "share_of_layer": counts / self.d_mlp,
            }
        )
        out.index.name = "layer"
        return out

    def concentration(self, k: int | None = None, ratio: float | None = None) -> dict[str, Any]:
        """How concentrated the global top neurons are across layers.

        Returns:
            ``n_top``; ``layers_with_top``; ``effective_layers`` = ``exp(entropy)`` of the
            layer shares (1 = all in one layer, the number of layers = spread evenly); ``gini``
            of the per-layer counts (0 = even, towards 1 = concentrated); ``top_layer`` and
            ``top_layer_share``.
        """
        counts = self.layer_counts(k=k, ratio=ratio)
        n = counts["n_top"].to_numpy(dtype=np.float64)
        total = float(n.sum())
        if total == 0:
            return {
                "n_top": 0,
                "layers_with_top": 0,
                "effective_layers": float("nan"),
                "gini": float("nan"),
                "top_layer": None,
                "top_layer_share": float("nan"),
            }
        share = n / total
        nz = share[share > 0]
        srt = np.sort(n)
        m = n.size
        gini = float((2 * np.arange(1, m + 1) - m - 1) @ srt / (m * srt.sum())) if m > 1 else 0.0
        best = int(np.argmax(n))
        return {
            "n_top": int(total),
            "layers_with_top": int((n > 0).sum()),
            "effective_layers": float(np.exp(-(nz * np.log(nz)).sum())),
            "gini": gini,
            "top_layer": int(counts.index[best]),
            "top_layer_share": float(share[best]),
        }

    def layer_summary(self, metric: str | None = None) -> pd.DataFrame:
        """Per-layer ``mean``, ``median``, ``max`` and ``q90`` of a measure (default: the
        ranking metric)."""
        metric = metric or self.metric
        check_choice(metric, METRICS, "metric")
        g = self.table.groupby("layer")[metric]
        out = pd.DataFrame(
            {"mean": g.mean(), "median": g.median(), "max": g.max(), "q90": g.quantile(0.9)}
        ).reindex(self.layers)
        out.index.name = "layer"
        return out

    def tensor(self, column: str) -> Float[Tensor, "layer d_mlp"]:
        """A numeric column as a ``[layers, d_mlp]`` float64 tensor in layer-neuron order."""
        if column not in self.table.columns:
            raise KeyError(f"No column {column!r}; columns: {list(self.table.columns)}.")
        rows = self.table["layer"].map({layer: i for i, layer in enumerate(self.layers)})
        flat = rows.to_numpy() * self.d_mlp + self.table["neuron"].to_numpy()
        values = np.full(self.n_neurons, np.nan)
        values[flat] = self.table[column].astype("Float64").to_numpy(np.float64, na_value=np.nan)
        return torch.from_numpy(values.reshape(len(self.layers), self.d_mlp))

    def scores(self, metric: str | None = None) -> Float[Tensor, "layer d_mlp"]:
        """The scores of ``metric`` (default: the ranking metric) as ``[layers, d_mlp]``."""
        metric = metric or self.metric
        check_choice(metric, METRICS, "metric")
        return self.tensor(metric)

    def mask(self, ratio: float | None = None, k: int | None = None) -> Bool[Tensor, "layer d_mlp"]:
        """:func:`top_neurons` of the ranking metric's scores."""
        return top_neurons(self.scores(), ratio=ratio, k=k)

    def neuron(self, layer: int, neuron: int) -> pd.Series:
        """The table's row of one neuron."""
        hit = self.table[(self.table["layer"] == layer) & (self.table["neuron"] == neuron)]
        if hit.empty:
            raise ValueError(
                f"No neuron ({layer}, {neuron}); layers {self.layers}, d_mlp {self.d_mlp}."
            )
        return hit.iloc[0]

    def samples(self, layer: int, neuron: int) -> tuple[np.ndarray, np.ndarray]:
        """Finite reservoir values of one neuron on F and on R (float64), e.g. for histograms."""
        if self.stats_f is None or self.stats_r is None:
            raise ValueError("This Separation keeps no statistics.")
        return neuron_samples(self.stats_f, layer, neuron), neuron_samples(
            self.stats_r, layer, neuron
        )

    def fitted_pdf(self, layer: int, neuron: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Densities of the two fitted Gaussians ``N(mu_F, sigma_F)``, ``N(mu_R, sigma_R)`` at
        ``x`` (NaN where a sigma is not positive)."""
        row = self.neuron(layer, neuron)
        x = np.asarray(x, dtype=np.float64)
        out = []
        for mu, sd in ((row["mu_f"], row["sigma_f"]), (row["mu_r"], row["sigma_r"])):
            if not sd > 0:
                out.append(np.full(x.shape, np.nan))
            else:
                out.append(np.exp(-0.5 * ((x - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi)))
        return out[0], out[1]

    def __repr__(self) -> str:
        return (
            f"Separation(forget={self.meta.get('forget')!r}, retain={self.meta.get('retain')!r}, "
            f"site={self.meta.get('site')!r}, metric={self.metric!r}, layers={len(self.layers)}, "
            f"d_mlp={self.d_mlp})"
        )


def _rank(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    out = table.drop(columns="rank", errors="ignore")
    out = out.sort_values(["layer", "neuron"], kind="stable")
    out = out.sort_values(metric, ascending=False, na_position="last", kind="stable")
    out = out.reset_index(drop=True)
    valid = out[metric].notna().to_numpy()
    rank = np.where(valid, np.arange(1, len(out) + 1), 0)
    out.insert(out.columns.get_loc("note"), "rank", pd.array(np.where(valid, rank, None), "Int64"))
    return out


# -------------------------------------------------------------------------------- analysis
def separation(
    stats_f: NeuronStats,
    stats_r: NeuronStats,
    metric: str = "mean_diff",
    sample_metrics: bool = True,
) -> Separation:
    """Rank every neuron of every layer by how well it separates the forget and retain skills.

    Args:
        stats_f: forget-skill statistics (:func:`mechunlearn.collect`).
        stats_r: retain-skill statistics, same model, site and layers.
        metric: the ranking measure, one of :data:`METRICS` (default ``"mean_diff"``, signed).
        sample_metrics: compute KS and AUROC on the reservoirs (set False to skip them: they
            stay NaN; they need reservoir samples).

    Returns:
        A :class:`Separation` with every measure as a column.

    Raises:
        TypeError: not NeuronStats.
        ValueError: unknown metric, statistics from different models/sites/layers, or sample
            metrics without reservoir samples.

    Example:
        >>> sep = mu.analysis.separation(stats_f, stats_r, metric="cohens_d")
        >>> top = sep.top(k=10)[["layer", "neuron", "cohens_d", "ks", "auroc", "rank"]]
        >>> top.shape, top["rank"].tolist()[:3]     # best first
        ((10, 6), [1, 2, 3])
    """
    check_stats(stats_f, "stats_f")
    check_stats(stats_r, "stats_r")
    check_choice(metric, METRICS, "metric")
    check_same_source(stats_f, stats_r, ("stats_f", "stats_r"))
    if metric in SAMPLE_METRICS and not sample_metrics:
        raise ValueError(f"metric={metric!r} needs sample_metrics=True.")
    device = stats_f.mean.device
    n_layers, d = stats_f.mean.shape
    total = n_layers * d
    mu_f, sd_f, cnt_f = stats_f.mean, stats_f.std, stats_f.count
    mu_r, sd_r = stats_r.mean.to(device), stats_r.std.to(device)
    cnt_r = stats_r.count.to(device)
    g = gaussian_separation(mu_f, sd_f, mu_r, sd_r, cnt_f, cnt_r)
    empty = ((cnt_f == 0) | (cnt_r == 0)).cpu().numpy().ravel()

    def host(t: Tensor) -> np.ndarray:
        return t.detach().to("cpu", torch.float64).numpy().ravel().copy()

    cols: dict[str, Any] = {
        "layer": np.repeat(np.asarray(stats_f.layers, dtype=np.int64), d),
        "neuron": np.tile(np.arange(d, dtype=np.int64), n_layers),
        "mu_f": host(mu_f),
        "sigma_f": host(sd_f),
        "mu_r": host(mu_r),
        "sigma_r": host(sd_r),
        "n_tokens_f": cnt_f.cpu().numpy().ravel().astype(np.int64),
        "n_tokens_r": cnt_r.cpu().numpy().ravel().astype(np.int64),
    }
    for name in GAUSSIAN_METRICS:
        v = host(g[name])
        v[empty] = np.nan
        cols[name] = v
    if sample_metrics:
        s = sample_separation(stats_f, stats_r)
        auc = host(s["auroc_f"])
        cols["ks"] = host(s["ks"])
        cols["auroc"] = np.maximum(auc, 1.0 - auc)
        cols["auroc_f"] = auc
        cols["n_f"] = s["n_f"].cpu().numpy().ravel()
        cols["n_r"] = s["n_r"].cpu().numpy().ravel()
    else:
        for name in ("ks", "auroc", "auroc_f"):
            cols[name] = np.full(total, np.nan)
        cols["n_f"] = cols["n_r"] = np.zeros(total, dtype=np.int64)
    table = pd.DataFrame(cols)
    table["note"] = _separation_notes(table, sample_metrics)
    n_const = int(((table["sigma_f"] == 0) | (table["sigma_r"] == 0)).sum())
    if n_const:
        warnings.warn(
            f"separation: {n_const} neurons have zero standard deviation on a skill (constant): "
            "their divergences and Cohen's d are NaN (see the 'note' column).",
            stacklevel=2,
        )
    meta = {
        "model": stats_f.meta.get("model"),
        "site": stats_f.site,
        "forget": stats_f.meta.get("skill"),
        "retain": stats_r.meta.get("skill"),
    }
    return Separation(_rank(table, metric), metric, list(stats_f.layers), d, meta, stats_f, stats_r)


def _separation_notes(table: pd.DataFrame, sample_metrics: bool) -> np.ndarray:
    notes = np.full(len(table), "", dtype=object)

    def add(mask, text):
        mask = np.asarray(mask, dtype=bool)
        old = notes[mask]
        notes[mask] = np.where(old == "", text, old + "; " + text)

    for skill in ("f", "r"):
        n_tok = table[f"n_tokens_{skill}"].to_numpy()
        sig = table[f"sigma_{skill}"].to_numpy()
        add(n_tok == 0, f"no tokens on {skill.upper()}: every measure is NaN")
        add((n_tok == 1), f"one token on {skill.upper()}: sigma undefined")
        add(sig == 0, f"sigma_{skill} = 0 (constant on {skill.upper()}): divergences are NaN")
        if sample_metrics:
            add(
                table[f"n_{skill}"].to_numpy() == 0,
                f"no finite {skill.upper()} samples: ks, auroc NaN",
            )
    return notes
