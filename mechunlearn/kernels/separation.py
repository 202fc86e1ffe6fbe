"""Per-neuron separation measures between two skills, and the global top-fraction selection.

Closed forms between the two fitted Gaussians (``mean_diff``, ``cohens_d``, ``kl``, ``sym_kl``,
``bhattacharyya``, ``wasserstein``) and distribution-free measures on the reservoir samples
(``ks``, ``auroc``); :func:`top_neurons` keeps the global top ``ratio`` (or ``k``) across all
layers. Neuron Adjust, Selective Pruning and :func:`mechunlearn.analysis.separation` build on
these; see that analysis for the definitions of the measures.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..validation import check_choice, check_same_source
from .samples import BLOCK_ELEMENTS, filled_rows, layer_samples, run_layers

if TYPE_CHECKING:
    from ..stats import NeuronStats


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
    _check_stats(stats_f, "stats_f")
    _check_stats(stats_r, "stats_r")
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
        >>> scores.shape, scores.dtype                # [layers, d_mlp]
        (torch.Size([3, 48]), torch.float64)
        >>> mask = top_neurons(scores, ratio=0.03)  # NA's selection of the paper
    """
    _check_stats(stats_f, "stats_f")
    _check_stats(stats_r, "stats_r")
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
        >>> mask = top_neurons(separation_scores(stats_f, stats_r), ratio=0.02)
        >>> mask.shape, int(mask.sum())   # 2 % of 3 x 48 neurons, across all layers
        (torch.Size([3, 48]), 3)
        >>> mask.sum(1).shape             # selected neurons per layer
        torch.Size([3])
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


def _check_stats(stats: Any, name: str) -> None:
    """A TypeError unless ``stats`` looks like :class:`~mechunlearn.stats.NeuronStats`."""
    if not all(hasattr(stats, a) for a in ("mean", "std", "count", "sample_keys", "layers")):
        raise TypeError(
            f"{name} must be NeuronStats (from mechunlearn.collect), got {type(stats).__name__}."
        )
