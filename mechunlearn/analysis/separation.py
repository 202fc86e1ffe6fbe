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
    >>> sep.top(k=20)                       # the 20 best-separating neurons, all layers
    >>> sep.layer_counts(ratio=0.01)        # where the top 1 % sit
    >>> scores = mu.analysis.separation_scores(stats_f, stats_r, "mean_diff")  # [layers, d_mlp]
    >>> mask = mu.analysis.top_neurons(scores, ratio=0.03)
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..collect import NeuronStats
from ._checks import check_choice, check_same_source, check_stats
from .gaussian import filled_rows, layer_samples, neuron_samples, run_layers

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

GAUSSIAN_METRICS: tuple[str, ...] = (
    "mean_diff",
    "cohens_d",
    "kl",
    "sym_kl",
    "bhattacharyya",
    "wasserstein",
)
"""Closed-form measures between the two fitted Gaussians."""
SAMPLE_METRICS: tuple[str, ...] = ("ks", "auroc")
"""Distribution-free measures on the reservoir samples."""
METRICS: tuple[str, ...] = GAUSSIAN_METRICS + SAMPLE_METRICS
"""Every separation measure, each a column of :attr:`Separation.table`."""

#: Elements (neurons x (n_F + n_R)) sorted per block: a few MB, so each pass stays in the cache.
BLOCK_ELEMENTS = 1 << 19


# ---------------------------------------------------------------------- Gaussian closed forms
def gaussian_separation(
    mu_f: Float[Tensor, "*shape"],
    sd_f: Float[Tensor, "*shape"],
    mu_r: Float[Tensor, "*shape"],
    sd_r: Float[Tensor, "*shape"],
    n_f: Tensor | None = None,
    n_r: Tensor | None = None,
) -> dict[str, Float[Tensor, "*shape"]]:
    """The closed-form measures of :data:`GAUSSIAN_METRICS` between ``N(mu_f, sd_f)`` and
    ``N(mu_r, sd_r)``, elementwise in float64.

    A measure that needs a positive standard deviation is NaN where it is zero (for Cohen's d:
    where the pooled one is zero). ``n_f``/``n_r`` (token counts) weight Cohen's pooled
    variance; without them the two variances are averaged.

    Example:
        >>> m = gaussian_separation(torch.tensor([0.0]), torch.tensor([1.0]),
        ...                         torch.tensor([1.0]), torch.tensor([1.0]))
        >>> float(m["kl"][0])  # (mu_F - mu_R)^2 / 2 for equal unit variances
        0.5
    """
    mu_f, sd_f, mu_r, sd_r = (
        torch.as_tensor(t).to(torch.float64) for t in (mu_f, sd_f, mu_r, sd_r)
    )
    diff = mu_f - mu_r
    d2 = diff.square()
    vf, vr = sd_f.square(), sd_r.square()
    if n_f is not None and n_r is not None:
        nf = torch.as_tensor(n_f, device=mu_f.device).to(torch.float64)
        nr = torch.as_tensor(n_r, device=mu_f.device).to(torch.float64)
        pooled = ((nf - 1) * vf + (nr - 1) * vr) / (nf + nr - 2)
    else:
        pooled = 0.5 * (vf + vr)
    nan = torch.tensor(torch.nan, dtype=torch.float64, device=mu_f.device)
    pos_f, pos_r = sd_f > 0, sd_r > 0
    both = pos_f & pos_r
    kl_fr = torch.log(sd_r / sd_f) + (vf + d2) / (2 * vr) - 0.5
    kl_rf = torch.log(sd_f / sd_r) + (vr + d2) / (2 * vf) - 0.5
    return {
        "mean_diff": diff,
        "cohens_d": torch.where(pooled > 0, diff.abs() / pooled.sqrt(), nan),
        "kl": torch.where(both, kl_fr, nan),
        "sym_kl": torch.where(both, kl_fr + kl_rf, nan),
        "bhattacharyya": torch.where(
            both, d2 / (4 * (vf + vr)) + 0.5 * torch.log((vf + vr) / (2 * sd_f * sd_r)), nan
        ),
        "wasserstein": torch.sqrt(d2 + (sd_f - sd_r).square()),
    }


# ------------------------------------------------------------------ distribution-free on samples
def _sortable_keys(x: np.ndarray, finite: np.ndarray | None, out: np.ndarray, label: int) -> None:
    """Write ``x`` (float32) into ``out`` (uint64) as order-preserving integers, shifted left by
    one with ``label`` in the lowest bit; non-finite values become +inf with label 0."""
    if finite is not None:
        x = np.where(finite, x, np.float32(np.inf))
    x = x + np.float32(0.0)  # -0.0 -> +0.0: equal floats must get equal keys
    bits = x.view(np.uint32)
    flip = (bits.view(np.int32) >> 31).view(np.uint32) | np.uint32(0x80000000)
    np.left_shift(bits ^ flip, np.uint64(1), out=out, dtype=np.uint64)
    if label:
        out |= np.uint64(1) if finite is None else finite


def _merge_sorted(xf: np.ndarray, xr: np.ndarray, ff, fr) -> tuple[np.ndarray, np.ndarray, bool]:
    """Sort each row of F and R together.

    Returns ``(labels, order_values, packed)``: ``labels`` (uint8, 1 = F) in sorted order, ties
    with R (label 0) first; ``order_values`` the sorted uint64 keys with the label in the lowest
    bit (``packed``) or, for float64 input, the sorted values.
    """
    b, nf_cap = xf.shape
    n = nf_cap + xr.shape[1]
    if xf.dtype == np.float32 and xr.dtype == np.float32:
        key = np.empty((b, n), dtype=np.uint64)
        _sortable_keys(xf, ff, key[:, :nf_cap], 1)
        _sortable_keys(xr, fr, key[:, nf_cap:], 0)
        key.sort(axis=1)
        if sys.byteorder == "little":  # the lowest byte of each key, read in one pass
            labels = key.view(np.uint8)[:, ::8] & np.uint8(1)
        else:
            labels = (key & np.uint64(1)).astype(np.uint8)
        return labels, key, True
    # float64 samples: a stable lexicographic sort (value, then label)
    vals = np.concatenate([xf, xr], axis=1).astype(np.float64)
    lab = np.zeros((b, n), dtype=np.uint8)
    lab[:, :nf_cap] = 1 if ff is None else ff
    if ff is not None or fr is not None:
        fin = np.concatenate(
            [np.isfinite(xf) if ff is None else ff, np.isfinite(xr) if fr is None else fr], axis=1
        )
        vals[~fin] = np.inf
    vals += 0.0
    order = np.lexsort((lab, vals), axis=-1)
    return np.take_along_axis(lab, order, axis=1), np.take_along_axis(vals, order, axis=1), False


def _same_as_next(order_values: np.ndarray, packed: bool) -> np.ndarray:
    """``[rows, n-1]``: whether each sorted value equals the next one."""
    if packed:
        return (order_values[:, :-1] ^ order_values[:, 1:]) < 2
    return order_values[:, :-1] == order_values[:, 1:]


def two_sample_ks_auroc(
    xf: np.ndarray, xr: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two-sample KS statistic and ``A = P(x_F > x_R) + P(x_F = x_R)/2`` per row, vectorised.

    Args:
        xf: ``[rows, n_F]`` forget values (float32 or float64); non-finite values are left out.
        xr: ``[rows, n_R]`` retain values.

    Returns:
        ``(ks, auroc_f, n_f, n_r)``: arrays of ``rows`` values; NaN where a row has no finite F or
        R value. ``ks`` equals ``scipy.stats.ks_2samp(f, r).statistic`` and ``auroc_f`` equals
        ``scipy.stats.mannwhitneyu(f, r).statistic / (n_f * n_r)`` (ties count one half).

    Example:
        >>> ks, auc, *_ = two_sample_ks_auroc(np.random.randn(5, 100), np.random.randn(5, 80) + 1)
    """
    xf, xr = np.asarray(xf), np.asarray(xr)
    if xf.dtype not in (np.float32, np.float64):
        xf = xf.astype(np.float32 if xf.dtype.itemsize <= 4 else np.float64)
    if xr.dtype not in (np.float32, np.float64):
        xr = xr.astype(np.float32 if xr.dtype.itemsize <= 4 else np.float64)
    if xf.dtype != xr.dtype:
        xf, xr = xf.astype(np.float64), xr.astype(np.float64)
    b, nf_cap = xf.shape
    nr_cap = xr.shape[1]
    n = nf_cap + nr_cap
    ff, fr = np.isfinite(xf), np.isfinite(xr)
    nf, nr = np.count_nonzero(ff, axis=1), np.count_nonzero(fr, axis=1)
    bad_f, bad_r = nf < nf_cap, nr < nr_cap
    labels, ordered, packed = _merge_sorted(
        xf, xr, ff if bad_f.any() else None, fr if bad_r.any() else None
    )
    wide = np.int64 if n * n >= 2**31 else np.int32
    c_f = np.cumsum(labels, axis=1, dtype=wide)  # F values at or before each position
    pos1 = np.arange(1, n + 1, dtype=wide)
    # n_F n_R (F_F - F_R) after each position, as an integer
    if b and (nf == nf[0]).all() and (nr == nr[0]).all():
        diff = c_f * wide(nf[0] + nr[0])
        diff -= pos1 * wide(nf[0])
    else:
        diff = c_f * (nf + nr).astype(wide)[:, None]
        diff -= pos1 * nf.astype(wide)[:, None]
    d_int = np.maximum(diff.max(axis=1), -diff.min(axis=1)).astype(np.float64)
    # rank sum of F = sum_p label_p (p + 1) = (n + 1) n_F - sum_p c_F[p]
    u = (n + 1.0) * nf - c_f.sum(axis=1, dtype=np.int64) - nf * (nf + 1) / 2.0
    # A tie group holding both skills (sorted R first) makes positions inside it overshoot
    # and counts all its R below its F; such rows, and rows with left-out values, are redone
    # over the ends of tie groups only.
    if packed:
        mixed_rows = ((ordered[:, :-1] ^ ordered[:, 1:]) == 1).any(axis=1)
    else:
        same = _same_as_next(ordered, packed)
        mixed_rows = (same & (labels[:, :-1] == 0) & (labels[:, 1:] == 1)).any(axis=1)
    special = mixed_rows | bad_f | bad_r
    if special.any():
        rows = np.flatnonzero(special)
        same = _same_as_next(ordered[rows], packed)
        end = np.ones((rows.size, n), dtype=bool)
        end[:, :-1] = ~same
        end &= pos1[None, :] <= (nf + nr)[rows, None]
        dd = np.abs(diff[rows])
        dd[~end] = 0
        d_int[rows] = dd.max(axis=1)
        lab = labels[rows]
        mix = same & (lab[:, :-1] == 0) & (lab[:, 1:] == 1)
        if mix.any():
            # Each mixed tie group holds n_R,g retain then n_F,g forget values; the rank sum
            # counted all of its R below its F: take half of those n_R,g n_F,g pairs back.
            gid = np.zeros((rows.size, n), dtype=np.int64)
            gid[:, 1:] = np.cumsum(~same, axis=1)
            gid += (np.arange(rows.size, dtype=np.int64) * (n + 1))[:, None]
            flat = gid.ravel()
            r_i, c_i = np.nonzero(mix)
            p = r_i * n + c_i
            start = np.searchsorted(flat, flat[p], "left")
            stop = np.searchsorted(flat, flat[p], "right")
            pairs = (p - start + 1) * (stop - p - 1)
            u[rows] -= 0.5 * np.bincount(r_i, weights=pairs, minlength=rows.size)
    with np.errstate(all="ignore"):
        denom = (nf * nr).astype(np.float64)
        ok = denom > 0
        ks = np.where(ok, d_int / denom, np.nan)
        auroc = np.where(ok, u / denom, np.nan)
    return ks, auroc, nf, nr


def sample_separation(stats_f: NeuronStats, stats_r: NeuronStats) -> dict[str, Tensor]:
    """KS and AUROC of every neuron on the two skills' reservoirs.

    Returns:
        ``{"ks", "auroc_f", "n_f", "n_r"}``: ``[layers, d_mlp]`` tensors (float64; counts int64)
        on ``stats_f``'s device. See :func:`two_sample_ks_auroc`.

    Raises:
        ValueError: either statistics have no reservoir samples.
    """
    check_stats(stats_f, "stats_f")
    check_stats(stats_r, "stats_r")
    check_same_source(stats_f, stats_r, ("stats_f", "stats_r"))
    rows_f, rows_r = filled_rows(stats_f), filled_rows(stats_r)
    for name, rows in (("stats_f", rows_f), ("stats_r", rows_r)):
        if rows.numel() == 0:
            raise ValueError(
                f"{name} has no reservoir samples (collected with reservoir_size=0?): KS and "
                "AUROC need them; collect again with reservoir_size > 0."
            )
    n_layers, d = stats_f.mean.shape
    out = {k: np.empty((n_layers, d)) for k in ("ks", "auroc_f")}
    counts = {k: np.empty((n_layers, d), dtype=np.int64) for k in ("n_f", "n_r")}
    step = max(1, BLOCK_ELEMENTS // (rows_f.numel() + rows_r.numel()))

    def job(row: int) -> None:
        xf = layer_samples(stats_f, row, rows_f)
        xr = layer_samples(stats_r, row, rows_r)
        for s in range(0, d, step):
            ks, auc, nf, nr = two_sample_ks_auroc(xf[s : s + step], xr[s : s + step])
            out["ks"][row, s : s + step] = ks
            out["auroc_f"][row, s : s + step] = auc
            counts["n_f"][row, s : s + step] = nf
            counts["n_r"][row, s : s + step] = nr

    run_layers(job, n_layers)
    device = stats_f.mean.device
    res = {k: torch.from_numpy(v).to(device) for k, v in out.items()}
    res.update({k: torch.from_numpy(v).to(device) for k, v in counts.items()})
    return res


# ------------------------------------------------------------------------------- scores, top
def separation_scores(
    stats_f: NeuronStats, stats_r: NeuronStats, metric: str = "mean_diff"
) -> Float[Tensor, "layer d_mlp"]:
    """The separation score of every neuron for one metric: the ranking Neuron Adjust selects by.

    Higher means "more separated" (for ``mean_diff``: higher on F than on R). NaN where the
    metric is undefined (see the module documentation); callers that select should treat NaN as
    never selected (:func:`top_neurons` does).

    Args:
        stats_f: forget-skill statistics.
        stats_r: retain-skill statistics (same model, site and layers).
        metric: one of :data:`METRICS`. Gaussian metrics need only the streaming moments;
            ``"ks"``/``"auroc"`` need reservoir samples.

    Returns:
        ``[layers, d_mlp]`` float64 tensor on ``stats_f``'s device.

    Raises:
        TypeError: not NeuronStats.
        ValueError: unknown metric, mismatched statistics, or a sample metric without
            reservoir samples.

    Example:
        >>> scores = separation_scores(stats_f, stats_r, "mean_diff")
        >>> mask = top_neurons(scores, ratio=0.03)  # NA's selection of the paper
    """
    check_stats(stats_f, "stats_f")
    check_stats(stats_r, "stats_r")
    check_choice(metric, METRICS, "metric")
    check_same_source(stats_f, stats_r, ("stats_f", "stats_r"))
    if metric in SAMPLE_METRICS:
        res = sample_separation(stats_f, stats_r)
        if metric == "ks":
            return res["ks"]
        return torch.maximum(res["auroc_f"], 1.0 - res["auroc_f"])
    device = stats_f.mean.device
    g = gaussian_separation(
        stats_f.mean,
        stats_f.std,
        stats_r.mean.to(device),
        stats_r.std.to(device),
        stats_f.count,
        stats_r.count.to(device),
    )
    score = g[metric]
    empty = (stats_f.count == 0) | (stats_r.count.to(device) == 0)
    return torch.where(empty, torch.nan, score)


def n_top(total: int, ratio: float | None = None, k: int | None = None) -> int:
    """How many of ``total`` neurons a selection keeps: ``k``, or ``round(ratio * total)`` (at
    least 1 for a positive ratio). Exactly one of ``ratio`` and ``k`` must be given."""
    if (ratio is None) == (k is None):
        raise ValueError("Give exactly one of ratio (a fraction) and k (a count).")
    if k is not None:
        if int(k) != k or k < 0:
            raise ValueError(f"k must be a non-negative integer, got {k}.")
        return min(int(k), total)
    ratio = float(ratio)
    if not 0.0 <= ratio <= 1.0 or math.isnan(ratio):
        raise ValueError(f"ratio must be in [0, 1], got {ratio}.")
    if ratio == 0.0:
        return 0
    return min(total, max(1, int(math.floor(ratio * total + 0.5))))


def top_neurons(
    scores: Float[Tensor, "layer d_mlp"], ratio: float | None = None, k: int | None = None
) -> Bool[Tensor, "layer d_mlp"]:
    """Mask of the global top ``ratio`` (or top ``k``) neurons by score, across all layers.

    ``n = round(ratio * scores.numel())`` (at least 1 for a positive ratio; see :func:`n_top`).
    NaN and ``-inf`` scores are never selected (if fewer candidates remain, all are selected and
    a warning says so). Ties are broken by position (lower layer row, then lower neuron first),
    so the selection is deterministic.

    Args:
        scores: ``[layers, d_mlp]`` (any shape works; the mask has the same shape and device).
        ratio: fraction of all neurons to keep, e.g. 0.03.
        k: or a number of neurons.

    Returns:
        Bool mask like ``scores``; ``mask.nonzero()`` lists (layer row, neuron) pairs.

    Example:
        >>> mask = top_neurons(separation_scores(stats_f, stats_r), ratio=0.005)
        >>> mask.sum(1)  # selected neurons per layer
    """
    scores = torch.as_tensor(scores)
    total = scores.numel()
    want = n_top(total, ratio, k)
    flat = scores.detach().reshape(-1).to(torch.float64)
    ok = ~torch.isnan(flat) & (flat != -torch.inf)
    n_ok = int(ok.sum())
    if want > n_ok:
        warnings.warn(
            f"top_neurons: {want} neurons requested but only {n_ok} have a defined score; "
            "selecting those.",
            stacklevel=2,
        )
        want = n_ok
    keyed = torch.where(ok, flat, -torch.inf)
    order = torch.sort(keyed, descending=True, stable=True).indices[:want]
    mask = torch.zeros(total, dtype=torch.bool, device=scores.device)
    mask[order] = True
    return mask.reshape(scores.shape)


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
        >>> sep.top(ratio=0.01).groupby("layer").size()
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
        >>> sep.top(k=10)[["layer", "neuron", "cohens_d", "ks", "auroc"]]
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
