"""Gaussian-fit checks: is a neuron's value distribution on a skill close to a normal?

Neuron Adjust models every neuron's pre-activation on a skill as a Gaussian ``N(mu, sigma)``
(METHODS.md section 1). :func:`gaussian_fit` checks that assumption for every neuron of every
layer at once, from the reservoir sample that :func:`~mechunlearn.collect` keeps (a uniform
sample of tokens, the same tokens for every neuron):

* moments: skewness and excess kurtosis (the biased estimators, as ``scipy.stats.skew`` and
  ``scipy.stats.kurtosis`` compute them by default);
* Kolmogorov-Smirnov distance to the normal fitted to the sample (``scipy.stats.kstest``
  against ``N(mean, sd)`` with the sample's mean and ``ddof=1`` standard deviation) and its
  p-value from the exact distribution of the statistic (``scipy.stats.kstwo``);
* Anderson-Darling ``A^2`` against a normal with estimated parameters (``scipy.stats.anderson``),
  its critical value at ``alpha`` (Stephens' table, as scipy) and an approximate p-value
  (D'Agostino & Stephens 1986, the formula of R's ``nortest::ad.test``);
* Shapiro-Wilk ``W`` with Royston's coefficients and Royston's normal approximation of the
  p-value (``scipy.stats.shapiro``; defined for 3 <= n <= 5000: a larger reservoir is
  subsampled to its ``shapiro_max_n`` tokens with the smallest reservoir keys, still a uniform
  sample);
* Jarque-Bera (``scipy.stats.jarque_bera``) and Sarle's bimodality coefficient
  ``b = (g1^2 + 1) / (g2 + 3 (n-1)^2 / ((n-2)(n-3)))`` from the bias-corrected skewness ``g1``
  and excess kurtosis ``g2`` (``b > 5/9`` hints at bimodality or a very skewed shape).

Everything is vectorised over neurons: the reservoir is copied to host memory one layer at a
time, sorted with NumPy (its SIMD sort is far faster than ``torch.sort`` on a CPU) in blocks that
fit the cache, and every statistic is a handful of array passes and dot products. The numbers
equal scipy's to about 1e-12 (the tests check sampled neurons against ``scipy.stats``).

**Decision rule.** A neuron "looks Gaussian" when none of the tests named in ``rule`` rejects
normality at level ``alpha``. The default ``rule=("ad", "jb")`` combines an EDF test that is
calibrated for estimated parameters and sensitive to the tails (Anderson-Darling, rejected when
``A^2`` exceeds the critical value) with a moment test (Jarque-Bera, rejected when ``p < alpha``).
The KS p-value is reported but not used by default: with the mean and standard deviation
estimated from the same sample it is conservative (Lilliefors' problem), so KS rarely rejects.

**Multiple testing.** With ``correction="none"`` (default) the pass rates are raw per-neuron
rates: even for perfectly Gaussian neurons each test rejects about ``alpha`` of them, so the
share that passes two tests is at most about ``(1 - alpha)^2`` (0.90 at 0.05). ``"bonferroni"``,
``"holm"`` or ``"bh"`` (Benjamini-Hochberg) adjust each test's p-values over all tested neurons
of all layers instead (then Anderson-Darling uses its approximate p-value). Note also that with
thousands of tokens every test detects tiny departures; the per-layer summary therefore also
reports effect sizes (median ``|skew|``, median excess kurtosis, the share with
``|skew| <= 0.5`` and ``|excess kurtosis| <= 1``).

**Decision rule accuracy.** Given ``other`` (the retain skill's statistics on the same model,
site and layers), every neuron's Gaussian rule ``p_F(x) >= p_R(x)`` (the condition of Neuron
Adjust, with both skills' streaming mean and standard deviation) is applied to the reservoir
values of both skills: ``rule_acc_forget`` is the share of forget values assigned to the forget
skill, ``rule_acc_retain`` the share of retain values assigned to the retain skill, and
``rule_balanced_acc`` their mean (0.5 = chance). The reservoir tokens are part of the data the
Gaussians were fitted on (in-sample, a negligible optimism for thousands of tokens).

**Bad input.** Non-finite reservoir values (NaN, inf) are left out per neuron (``n`` counts the
finite ones used and the ``note`` column says how many were dropped). A neuron with fewer than
``min_samples`` (at least 3) finite values, or with a constant sample (zero variance), gets NaN
statistics and a ``note``; a warning names the counts. Statistics of a different model, site or
layers than ``other`` raise a ValueError.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from scipy import special
from scipy import stats as sps
from torch import Tensor

from ..collect import NeuronStats
from ._checks import check_alpha, check_choice, check_same_source, check_stats

__all__ = ["GaussianFit", "gaussian_fit", "TESTS", "CORRECTIONS"]

TESTS: tuple[str, ...] = ("ks", "ad", "shapiro", "jb")
"""Normality tests that a decision ``rule`` can combine."""
CORRECTIONS: tuple[str, ...] = ("none", "bonferroni", "holm", "bh")
"""Multiple-testing corrections of :func:`gaussian_fit`."""

#: Elements (neurons x samples) handled per block: a few MB, so each pass stays in the cache.
BLOCK_ELEMENTS = 1 << 19
#: Effect-size thresholds of the per-layer summary's ``share_small_moments``.
SMALL_SKEW, SMALL_KURTOSIS = 0.5, 1.0
#: Sarle's bimodality coefficient of a uniform distribution; larger values hint at bimodality.
BIMODAL_THRESHOLD = 5.0 / 9.0

# Anderson-Darling critical values for the normal with estimated parameters (as scipy).
_AD_LEVELS = np.array([0.15, 0.10, 0.05, 0.025, 0.01])
_AD_AVALS = np.array([0.561, 0.631, 0.752, 0.873, 1.035])
_EPS = float(np.finfo(np.float64).eps)


# ------------------------------------------------------------------------------ sample access
def filled_rows(stats: NeuronStats, max_rows: int | None = None) -> Tensor:
    """Indices of the filled reservoir rows (ascending), or of the ``max_rows`` with the smallest
    keys (a uniform subsample: the keys are independent of the values)."""
    keys = stats.sample_keys
    rows = torch.nonzero(torch.isfinite(keys)).flatten()
    if max_rows is not None and rows.numel() > max_rows:
        order = torch.argsort(keys[rows], stable=True)[:max_rows]
        rows = rows[order].sort().values
    return rows


def layer_samples(stats: NeuronStats, row: int, rows: Tensor) -> np.ndarray:
    """Reservoir values of layer row ``row`` as a host array ``[d_mlp, n]`` (one neuron a row).

    ``rows``: ascending distinct reservoir rows (from :func:`filled_rows`).

    float64 samples stay float64; anything else becomes float32 (exact for float32, bf16, f16).
    """
    x = stats.samples[row]
    if rows.numel() != x.shape[0]:  # rows are ascending and distinct: all rows, or a subset
        x = x.index_select(0, rows.to(x.device))
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.detach().to("cpu", dtype).t().contiguous().numpy()  # torch transposes in blocks


def _sorted_groups(block: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Sort each row of ``block`` without its non-finite values.

    Yields ``(rows, sorted)`` per distinct number of finite values: ``sorted`` is ``[len(rows),
    n]`` with every value finite. Usually there is a single group (no non-finite values).
    """
    finite = np.isfinite(block)
    n_valid = np.count_nonzero(finite, axis=1)
    n = block.shape[1]
    if n_valid.min(initial=n) == n:
        yield np.arange(block.shape[0]), np.sort(block, axis=1)
        return
    x = np.where(finite, block, np.inf).astype(block.dtype, copy=False)
    x.sort(axis=1)
    for u in np.unique(n_valid):
        rows = np.flatnonzero(n_valid == u)
        yield rows, x[rows, : int(u)]


def run_layers(job, n_layers: int, workers: int | None = None) -> None:
    """Call ``job(row)`` for every layer row, on up to ``workers`` threads (default: torch's
    intra-op thread count). NumPy's sort and array loops release the GIL, so layers run in
    parallel; each job writes disjoint outputs, so the result does not depend on the order."""
    workers = torch.get_num_threads() if workers is None else int(workers)
    workers = max(1, min(workers, n_layers))
    if workers == 1:
        for row in range(n_layers):
            job(row)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(job, range(n_layers)))


# ---------------------------------------------------------------------- vectorised statistics
@lru_cache(maxsize=64)
def shapiro_coefficients(n: int) -> np.ndarray:
    """Royston's (1992, 1995) Shapiro-Wilk coefficients ``a`` for a sorted sample of size ``n``.

    Antisymmetric (``a[i] = -a[n-1-i]``), unit norm; ``W = (a @ x_sorted)^2 / sum((x - mean)^2)``.
    The same approximation as ``scipy.stats.shapiro`` (algorithm AS R94).

    Example:
        >>> a = shapiro_coefficients(50)
        >>> float(a @ a)
        1.0
    """
    if n < 3:
        raise ValueError(f"Shapiro-Wilk needs n >= 3, got n={n}.")
    half = n // 2
    a_hi = np.zeros(half)
    if n == 3:
        a_hi[0] = math.sqrt(0.5)
    else:
        i = np.arange(1, half + 1)
        m = special.ndtri((i - 0.375) / (n + 0.25))  # the lower half, most negative first
        summ2 = 2.0 * float(m @ m)
        ssumm2 = math.sqrt(summ2)
        u = 1.0 / math.sqrt(n)
        c1 = (0.0, 0.221157, -0.147981, -2.071190, 4.434685, -2.706056)
        c2 = (0.0, 0.042981, -0.293762, -1.752461, 5.682633, -3.582633)
        a1 = _poly(c1, u) - m[0] / ssumm2
        if n > 5:
            first = 2
            a2 = -m[1] / ssumm2 + _poly(c2, u)
            fac = math.sqrt(
                (summ2 - 2.0 * m[0] ** 2 - 2.0 * m[1] ** 2) / (1.0 - 2.0 * a1**2 - 2.0 * a2**2)
            )
            a_hi[1] = a2
        else:
            first = 1
            fac = math.sqrt((summ2 - 2.0 * m[0] ** 2) / (1.0 - 2.0 * a1**2))
        a_hi[0] = a1
        a_hi[first:] = -m[first:] / fac
    a = np.zeros(n)
    a[n - half :] = a_hi[::-1]  # ascending order: largest positive coefficient last
    a[:half] = -a_hi
    a.setflags(write=False)
    return a


def _poly(coef: Sequence[float], x):
    out = 0.0
    for c in reversed(coef):
        out = out * x + c
    return out


def shapiro_pvalue(w: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Royston's normal approximation of the Shapiro-Wilk p-value (exact for ``n = 3``).

    Vectorised over ``w`` and ``n`` (arrays of the same shape); NaN where ``n < 3`` or ``w`` is
    NaN. The same formulas as ``scipy.stats.shapiro``.
    """
    w = np.asarray(w, dtype=np.float64)
    n = np.broadcast_to(np.asarray(n, dtype=np.float64), w.shape)
    p = np.full(w.shape, np.nan)
    with np.errstate(all="ignore"):
        three = n == 3
        p[three] = np.maximum(
            0.0, 6.0 / math.pi * (np.arcsin(np.sqrt(w[three])) - math.asin(math.sqrt(0.75)))
        )
        y = np.log1p(-w)
        small = (n >= 4) & (n <= 11)
        ns = n[small]
        gamma = -2.273 + 0.459 * ns
        ys = y[small]
        m = _poly((0.544, -0.39978, 0.025054, -6.714e-4), ns)
        s = np.exp(_poly((1.3822, -0.77857, 0.062767, -0.0020322), ns))
        ps = special.ndtr(-((-np.log(gamma - ys) - m) / s))
        p[small] = np.where(ys >= gamma, 1e-99, ps)
        large = n >= 12
        xx = np.log(n[large])
        m = _poly((-1.5861, -0.31082, -0.083751, 0.0038915), xx)
        s = np.exp(_poly((-0.4803, -0.082676, 0.0030302), xx))
        p[large] = special.ndtr(-((y[large] - m) / s))
    p[np.isnan(w)] = np.nan
    return p


def ks_pvalue(d: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Two-sided one-sample Kolmogorov-Smirnov p-value ``P(D_n >= d)``, vectorised.

    Equals ``scipy.stats.kstwo.sf(d, n)`` (the exact distribution; what ``scipy.stats.kstest``
    reports) to about 1e-6: the same branches as scipy (Simard & L'Ecuyer 2011), with the
    Pelz-Good series evaluated as array operations and scipy's own code called only for the rare
    cases it computes by matrix powers (``n <= 140`` or ``n d^1.5 <= 1.4``).
    """
    d = np.asarray(d, dtype=np.float64)
    n = np.broadcast_to(np.asarray(n, dtype=np.float64), d.shape)
    p = np.full(d.shape, np.nan)
    ok = np.isfinite(d) & (n >= 1)
    with np.errstate(all="ignore"):
        t = n * d
        nx2 = t * d
        done = ~ok
        for mask, value in (
            (ok & (d >= 1.0), 0.0),
            (ok & (d <= 0.0), 1.0),
            (ok & (t <= 0.5), 1.0),
        ):
            sel = mask & ~done
            p[sel] = value
            done |= sel
        sel = ok & ~done & (t >= n - 1) & (t > 1.0)
        p[sel] = 2.0 * (1.0 - d[sel]) ** n[sel]
        done |= sel
        smirnov = ok & ~done & (t > 1.0) & ((d >= 0.5) | ((n > 140) & (nx2 >= 2.2)))
        p[smirnov] = 2.0 * smirnov_sf(n[smirnov], d[smirnov])
        done |= smirnov
        zero = ok & ~done & (n > 140) & (nx2 >= 370.0)
        p[zero] = 0.0
        done |= zero
        pelz = ok & ~done & (n > 140) & (t > 1.0) & ((n > 100000) | (n * d**1.5 > 1.4))
        p[pelz] = _pelz_good_sf(n[pelz], d[pelz])
        done |= pelz
        rest = ok & ~done
        if rest.any():
            p[rest] = sps.kstwo.sf(d[rest], n[rest])
    return np.clip(p, 0.0, 1.0)


def smirnov_sf(n: np.ndarray, d: np.ndarray) -> np.ndarray:
    """One-sided Kolmogorov-Smirnov tail ``P(D_n^+ >= d)`` (``scipy.special.smirnov``), vectorised.

    The exact Birnbaum-Tingey sum ``d * sum_j C(n, j) (1 - d - j/n)^(n-j) (d + j/n)^(j-1)``
    (all terms positive) in log space, as array operations per distinct ``n``; equals scipy's
    to about 1e-12 relative and is an order of magnitude faster for large ``n``.
    """
    n = np.asarray(n).astype(np.int64)
    d = np.asarray(d, dtype=np.float64)
    out = np.empty(d.shape)
    for nv in np.unique(n):
        sel = np.flatnonzero(n == nv)
        j = np.arange(nv + 1, dtype=np.float64)
        log_c = special.gammaln(nv + 1.0) - special.gammaln(j + 1) - special.gammaln(nv - j + 1)
        step = max(1, (1 << 16) // (int(nv) + 1))
        for s in range(0, sel.size, step):
            idx = sel[s : s + step]
            dd = d[idx][:, None]
            p = dd + j / nv
            with np.errstate(all="ignore"):
                t = (j - 1) * np.log(p) + (nv - j) * np.log1p(-p) + log_c
                t[~(p < 1)] = -np.inf  # j beyond n(1 - d): no term
                top = t.max(axis=1)
                out[idx] = dd[:, 0] * np.exp(top) * np.exp(t - top[:, None]).sum(axis=1)
    return out


def _pelz_good_sf(n: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Pelz-Good (1976) approximation of ``P(D_n > x)``, as ``scipy.stats._ksstats``, vectorised."""
    if x.size == 0:
        return x.copy()
    pi2, pi4, pi6 = math.pi**2, math.pi**4, math.pi**6
    z = np.sqrt(n) * x
    z2, z3, z4, z6 = z**2, z**3, z**4, z**6
    q = np.exp(-pi2 / 8 / z2)
    k1a, k1b = -z2, pi2 / 4
    k2a = 6 * z6 + 2 * z4
    k2b = (2 * z4 - 5 * z2) * pi2 / 4
    k2c = pi4 * (1 - 2 * z2) / 16
    k3d = pi6 * (5 - 30 * z2) / 64
    k3c = pi4 * (-60 * z2 + 212 * z4) / 16
    k3b = pi2 * (135 * z4 - 96 * z6) / 4
    k3a = -30 * z6 - 90 * z**8
    maxk = int(np.ceil(16 * z.max() / math.pi))
    k0 = np.zeros_like(z)
    k1, k2, k3 = k0.copy(), k0.copy(), k0.copy()
    for k in range(maxk, 0, -1):
        m = 2 * k - 1
        qp = q ** (8 * k)
        k0 = k0 * qp + 1.0
        k1 = k1 * qp + (k1a + k1b * m**2)
        k2 = k2 * qp + (k2a + k2b * m**2 + k2c * m**4)
        k3 = k3 * qp + (k3a + k3b * m**2 + k3c * m**4 + k3d * m**6)
    s = q * math.sqrt(2 * math.pi)
    k0, k1, k2, k3 = k0 * s / z, k1 * s / (6 * z4), k2 * s / (72 * z**7), k3 * s / (6480 * z**10)
    q2 = np.exp(-pi2 / 2 / z2)
    ks = np.arange(maxk, 0, -1, dtype=np.float64)[:, None]
    qk = q2[None, :] ** (ks**2)
    k2 = k2 + np.sum(ks**2 * qk, axis=0) * pi2 * math.sqrt(2 * math.pi) / (-36 * z3)
    sqrt3z = math.sqrt(3) * z[None, :]
    kspi = math.pi * ks
    k3 = k3 + np.sum((sqrt3z + kspi) * (sqrt3z - kspi) * ks**2 * qk, axis=0) * (
        pi2 * math.sqrt(2 * math.pi) / (216 * z6)
    )
    cdf = k0 + k1 / np.sqrt(n) + k2 / n + k3 / n**1.5
    return 1.0 - cdf


def ad_critical(n: np.ndarray, alpha: float) -> np.ndarray:
    """Anderson-Darling critical values for the normal with estimated parameters at ``alpha``.

    Stephens' table as in ``scipy.stats.anderson`` (levels 15, 10, 5, 2.5 and 1 %), rounded to
    three decimals as scipy does; NaN for another ``alpha``.
    """
    n = np.asarray(n, dtype=np.float64)
    hit = np.flatnonzero(np.isclose(_AD_LEVELS, alpha, rtol=0, atol=1e-12))
    if hit.size == 0:
        return np.full(n.shape, np.nan)
    with np.errstate(all="ignore"):
        return np.around(_AD_AVALS[hit[0]] / (1.0 + 0.75 / n + 2.25 / n / n), 3)


def ad_pvalue(a2: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Approximate Anderson-Darling p-value for normality with estimated parameters.

    D'Agostino & Stephens (1986, Table 4.9) on ``A* = A^2 (1 + 0.75/n + 2.25/n^2)``, the formula
    of R's ``nortest::ad.test``; accurate to a few percent of ``p`` (it is an approximation).
    """
    a2 = np.asarray(a2, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(all="ignore"):
        a = a2 * (1.0 + 0.75 / n + 2.25 / n**2)
        p = np.where(
            a < 0.2,
            1 - np.exp(-13.436 + 101.14 * a - 223.73 * a**2),
            np.where(
                a < 0.34,
                1 - np.exp(-8.318 + 42.796 * a - 59.938 * a**2),
                np.where(
                    a < 0.6,
                    np.exp(0.9177 - 4.279 * a - 1.38 * a**2),
                    np.exp(1.2937 - 5.709 * a + 0.0186 * a**2),
                ),
            ),
        )
    return np.where(np.isnan(a2), np.nan, np.clip(p, 0.0, 1.0))


def adjust_pvalues(p: np.ndarray, method: str) -> np.ndarray:
    """Multiple-testing adjusted p-values over the non-NaN entries of ``p``.

    ``method``: ``"none"``, ``"bonferroni"``, ``"holm"`` (step-down) or ``"bh"``
    (Benjamini-Hochberg step-up, controls the false discovery rate). NaN stays NaN.
    """
    check_choice(method, CORRECTIONS, "correction")
    p = np.asarray(p, dtype=np.float64)
    out = p.copy()
    idx = np.flatnonzero(~np.isnan(p))
    m = idx.size
    if method == "none" or m == 0:
        return out
    v = p[idx]
    if method == "bonferroni":
        out[idx] = np.minimum(1.0, v * m)
        return out
    order = np.argsort(v, kind="stable")
    ranked = v[order]
    if method == "holm":
        adj = np.maximum.accumulate((m - np.arange(m)) * ranked)
    else:  # bh
        adj = np.minimum.accumulate(m / np.arange(m, 0, -1) * ranked[::-1])[::-1]
    res = np.empty(m)
    res[order] = np.minimum(1.0, adj)
    out[idx] = res
    return out


def _normality_kernel(xs: np.ndarray, shapiro: bool) -> dict[str, np.ndarray]:
    """All per-row statistics of ``xs`` (``[rows, n]``, each row sorted, finite, n >= 3).

    Row dot products use ``einsum`` rather than BLAS: a multithreaded BLAS matrix-vector product
    is slow on a busy machine, and these are memory-bound anyway.
    """
    b, n = xs.shape
    x = xs.astype(np.float64)  # a copy, centred then standardised in place
    mean = x.mean(axis=1)
    x -= mean[:, None]
    d2 = x * x
    m2 = d2.mean(axis=1)
    m3 = np.einsum("ij,ij->i", d2, x) / n
    m4 = np.einsum("ij,ij->i", d2, d2) / n
    del d2
    constant = m2 <= (_EPS * mean) ** 2
    with np.errstate(all="ignore"):
        g1 = m3 / m2**1.5
        g2 = m4 / m2**2 - 3.0
        out = {"skew": g1, "kurtosis": g2, "constant": constant}
        if shapiro:
            num = np.einsum("ij,j->i", x, shapiro_coefficients(n))
            out["shapiro_w"] = np.minimum(1.0, num**2 / (n * m2))
        sd = np.sqrt(m2 * (n / (n - 1.0)))
        x /= sd[:, None]  # z, as scipy: (x - mean) / std(ddof=1)
        cdf = special.ndtr(x)
        i = np.arange(1, n + 1, dtype=np.float64)
        e = cdf - i / n
        ks = np.maximum(-e.min(axis=1), e.max(axis=1) + 1.0 / n)
        log_cdf = np.log(cdf, out=e)
        log_sf = np.log1p(-cdf, out=cdf)
        # log(1 - cdf) loses precision (and is -inf past z = 8.3) in the upper tail, log(cdf)
        # underflows far in the lower tail: recompute those few values as scipy does.
        # Rows are sorted: only if some row ends (starts) far out is there anything to fix.
        if (x[:, -1] > 5.0).any():
            far = np.nonzero(x > 5.0)
            log_sf[far] = special.log_ndtr(-x[far])
        if (x[:, 0] < -20.0).any():
            far = np.nonzero(x < -20.0)
            log_cdf[far] = special.log_ndtr(x[far])
        w_cdf = 2.0 * i - 1.0
        ad = (
            -n
            - (np.einsum("ij,j->i", log_cdf, w_cdf) + np.einsum("ij,j->i", log_sf, w_cdf[::-1])) / n
        )
    out["ks_stat"], out["ad_stat"] = ks, ad
    return out


def _shapiro_kernel(xs: np.ndarray) -> np.ndarray:
    """Shapiro-Wilk W per row of ``xs`` (sorted, finite, 3 <= n)."""
    n = xs.shape[1]
    x = xs.astype(np.float64)
    x -= x.mean(axis=1)[:, None]
    ss = np.einsum("ij,ij->i", x, x)
    with np.errstate(all="ignore"):
        return np.minimum(1.0, np.einsum("ij,j->i", x, shapiro_coefficients(n)) ** 2 / ss)


# ----------------------------------------------------------------------------------- result
@dataclass
class GaussianFit:
    """Result of :func:`gaussian_fit`: per-neuron normality statistics and per-layer summaries.

    Attributes:
        table: one row per (layer, neuron), in layer then neuron order. Columns: ``layer``,
            ``neuron``, ``n_tokens`` and ``mean``/``std`` (streaming, over every counted token:
            the Gaussian Neuron Adjust uses), ``n`` (finite reservoir values used), ``skew``,
            ``kurtosis`` (excess), ``ks_stat``/``ks_p``, ``ad_stat``/``ad_crit``/``ad_p``,
            ``shapiro_w``/``shapiro_p``/``shapiro_n``, ``jb_stat``/``jb_p``, ``bimodality``,
            ``<test>_pass`` per test (nullable booleans: not rejected at ``alpha`` after the
            correction), ``gaussian`` (the decision rule), with ``other`` also
            ``rule_acc_forget``/``rule_acc_retain``/``rule_balanced_acc``, and ``note`` (why a
            value is NaN, or what was left out; empty when nothing is to say).
        by_layer: per-layer summary indexed by layer: ``n_neurons``, ``n_tested``,
            ``share_gaussian``, ``share_<test>_pass``, ``median_abs_skew``, ``median_kurtosis``,
            ``share_small_moments``, ``share_bimodal``, ``median_ks_stat``,
            ``median_shapiro_w`` and, with ``other``, ``mean_rule_balanced_acc``,
            ``median_rule_balanced_acc``, ``max_rule_balanced_acc``.
        alpha, rule, correction: the decision's settings.
        layers: the model layers.
        meta: model, site, skill (and ``other_skill``).
        stats, other: the statistics analysed (kept by reference for plots).

    Example:
        >>> fit = mu.analysis.gaussian_fit(stats_f, other=stats_r)
        >>> fit.by_layer[["share_gaussian", "median_abs_skew"]]
        >>> fit.tensor("kurtosis").shape  # (layers, d_mlp)
    """

    table: pd.DataFrame
    by_layer: pd.DataFrame
    alpha: float
    rule: tuple[str, ...]
    correction: str
    layers: list[int]
    meta: dict[str, Any] = field(default_factory=dict)
    stats: NeuronStats | None = field(default=None, repr=False)
    other: NeuronStats | None = field(default=None, repr=False)

    @property
    def d_mlp(self) -> int:
        """Neurons per layer."""
        return len(self.table) // max(1, len(self.layers))

    @property
    def share_gaussian(self) -> float:
        """Share of all tested neurons (every layer) that pass the decision rule."""
        return float(self.table["gaussian"].astype("Float64").mean())

    def tensor(self, column: str) -> Float[Tensor, "layer d_mlp"]:
        """A column as a ``[layers, d_mlp]`` float64 tensor (NaN where undefined).

        Example:
            >>> fit.tensor("skew")[0, :5]
        """
        if column not in self.table.columns:
            raise KeyError(f"No column {column!r}; columns: {list(self.table.columns)}.")
        values = self.table[column].astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
        return torch.from_numpy(values.reshape(len(self.layers), -1).copy())

    def neuron(self, layer: int, neuron: int) -> pd.Series:
        """The table's row of one neuron."""
        row = self._row(layer, neuron)
        return self.table.iloc[row]

    def sorted_by(self, column: str, k: int | None = None, ascending: bool = False):
        """The table sorted by ``column`` (NaN last), its first ``k`` rows if given.

        Example:
            >>> fit.sorted_by("ks_stat", k=10)  # the 10 least Gaussian neurons by KS
        """
        out = self.table.sort_values(column, ascending=ascending, na_position="last", kind="stable")
        return out if k is None else out.head(k)

    def samples(self, layer: int, neuron: int) -> np.ndarray:
        """The finite reservoir values of one neuron (float64), for Q-Q plots and histograms."""
        if self.stats is None:
            raise ValueError("This GaussianFit keeps no statistics (stats=None).")
        return neuron_samples(self.stats, layer, neuron)

    def qq(self, layer: int, neuron: int) -> tuple[np.ndarray, np.ndarray]:
        """Normal Q-Q points of one neuron: ``(theoretical, sample)``.

        ``sample`` is the sorted finite reservoir standardised with its own mean and standard
        deviation (``ddof=1``); ``theoretical`` the standard normal quantiles at Blom's plotting
        positions ``(i - 3/8) / (n + 1/4)``. A Gaussian neuron lies on the diagonal.
        """
        x = np.sort(self.samples(layer, neuron))
        n = x.size
        if n < 2 or not np.std(x) > 0:
            return np.full(n, np.nan), np.full(n, np.nan)
        z = (x - x.mean()) / x.std(ddof=1)
        theory = special.ndtri((np.arange(1, n + 1) - 0.375) / (n + 0.25))
        return theory, z

    def representative_neurons(self, n: int = 6, by: str = "ks_stat") -> list[tuple[int, int]]:
        """``n`` tested neurons spread evenly over the range of ``by``, from the smallest value
        (most Gaussian, for ``ks_stat``) to the largest: a fair sample for Q-Q plots."""
        tested = self.table[self.table[by].notna()].sort_values(by, kind="stable")
        if tested.empty or n <= 0:
            return []
        idx = np.unique(np.round(np.linspace(0, len(tested) - 1, min(n, len(tested)))).astype(int))
        pick = tested.iloc[idx]
        return [(int(a), int(b)) for a, b in zip(pick["layer"], pick["neuron"], strict=True)]

    def _row(self, layer: int, neuron: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"Layer {layer} was not analysed; layers: {self.layers}.")
        if not 0 <= neuron < self.d_mlp:
            raise ValueError(f"Neuron {neuron} out of range [0, {self.d_mlp}).")
        return self.layers.index(layer) * self.d_mlp + neuron

    def __repr__(self) -> str:
        return (
            f"GaussianFit(skill={self.meta.get('skill')!r}, site={self.meta.get('site')!r}, "
            f"layers={len(self.layers)}, d_mlp={self.d_mlp}, alpha={self.alpha}, "
            f"rule={self.rule}, correction={self.correction!r}, "
            f"share_gaussian={self.share_gaussian:.3f})"
        )


def neuron_samples(stats: NeuronStats, layer: int, neuron: int) -> np.ndarray:
    """Finite reservoir values of neuron ``neuron`` of model layer ``layer`` (float64)."""
    row = stats.layer_index(layer)
    if not 0 <= neuron < stats.d_mlp:
        raise ValueError(f"Neuron {neuron} out of range [0, {stats.d_mlp}).")
    rows = filled_rows(stats)
    x = stats.samples[row, rows.to(stats.samples.device), neuron]
    x = x.detach().to("cpu", torch.float64).numpy()
    return x[np.isfinite(x)]


# ---------------------------------------------------------------------------------- analysis
def gaussian_fit(
    stats: NeuronStats,
    other: NeuronStats | None = None,
    alpha: float = 0.05,
    rule: str | Sequence[str] = ("ad", "jb"),
    correction: str = "none",
    min_samples: int = 3,
    shapiro_max_n: int = 5000,
) -> GaussianFit:
    """Check every neuron's distribution against a normal, on the reservoir sample.

    See the module documentation for the statistics, the decision rule and how bad input is
    handled.

    Args:
        stats: one skill's statistics (from :func:`mechunlearn.collect`, with a reservoir).
        other: optionally the retain skill's statistics (same model, site and layers), to
            score the Gaussian decision rule ``p_F(x) >= p_R(x)`` with ``stats`` as F.
        alpha: significance level of every test.
        rule: the tests that must all not reject for a neuron to count as Gaussian, among
            ``"ks"``, ``"ad"``, ``"shapiro"``, ``"jb"``.
        correction: ``"none"`` (raw per-neuron tests), ``"bonferroni"``, ``"holm"`` or
            ``"bh"``, applied per test over all tested neurons of all layers.
        min_samples: fewest finite reservoir values for any test (at least 3).
        shapiro_max_n: the Shapiro-Wilk test uses at most this many values (at most 5000,
            where Royston's approximation holds).

    Returns:
        A :class:`GaussianFit`.

    Raises:
        TypeError: ``stats`` or ``other`` is not NeuronStats.
        ValueError: bad settings, ``stats`` has no reservoir samples, or ``other`` comes from
            another model, site or layers.

    Example:
        >>> fit = mu.analysis.gaussian_fit(mu.collect(model, gsm8k), alpha=0.01)
        >>> fit.by_layer["share_gaussian"].plot()
    """
    check_stats(stats, "stats")
    alpha = check_alpha(alpha)
    rule = (rule,) if isinstance(rule, str) else tuple(rule)
    if not rule:
        raise ValueError(f"rule names no test; choose among {list(TESTS)}.")
    for name in rule:
        check_choice(name, TESTS, "test in rule")
    check_choice(correction, CORRECTIONS, "correction")
    if int(min_samples) < 3:
        raise ValueError(f"min_samples must be >= 3, got {min_samples}.")
    if not 3 <= int(shapiro_max_n) <= 5000:
        raise ValueError(f"shapiro_max_n must be in [3, 5000], got {shapiro_max_n}.")
    min_samples, shapiro_max_n = int(min_samples), int(shapiro_max_n)
    if other is not None:
        check_stats(other, "other")
        check_same_source(stats, other, ("stats", "other"))

    n_layers, d = stats.mean.shape
    total = n_layers * d
    res = {
        k: np.full(total, np.nan)
        for k in ("skew", "kurtosis", "ks_stat", "ad_stat", "shapiro_w", "jb_stat", "bimodality")
    }
    n_used = np.zeros(total, dtype=np.int64)
    n_sw = np.zeros(total, dtype=np.int64)
    constant = np.zeros(total, dtype=bool)

    rows = filled_rows(stats)
    n_filled = int(rows.numel())
    if n_filled == 0:
        raise ValueError(
            "stats has no reservoir samples (collected with reservoir_size=0?): the normality "
            "tests need them; collect again with reservoir_size > 0 (e.g. 1024)."
        )
    separate_sw = n_filled > shapiro_max_n

    def first_pass(row: int) -> None:
        xt = layer_samples(stats, row, rows)
        step = max(1, BLOCK_ELEMENTS // n_filled)
        for start in range(0, d, step):
            for sub, xs in _sorted_groups(xt[start : start + step]):
                flat = row * d + start + sub
                n = xs.shape[1]
                n_used[flat] = n
                if n < min_samples:
                    continue
                out = _normality_kernel(xs, shapiro=not separate_sw)
                const = out["constant"]
                constant[flat] = const
                for key in ("skew", "kurtosis", "ks_stat", "ad_stat", "shapiro_w"):
                    if key in out:
                        res[key][flat] = np.where(const, np.nan, out[key])
                if not separate_sw:
                    n_sw[flat] = n

    run_layers(first_pass, n_layers)
    if separate_sw:
        sw_rows = filled_rows(stats, shapiro_max_n)
        m = int(sw_rows.numel())

        def shapiro_pass(row: int) -> None:
            xt = layer_samples(stats, row, sw_rows)
            step = max(1, BLOCK_ELEMENTS // m)
            for start in range(0, d, step):
                for sub, xs in _sorted_groups(xt[start : start + step]):
                    flat = row * d + start + sub
                    n_sw[flat] = xs.shape[1]
                    if xs.shape[1] >= min_samples:
                        w = _shapiro_kernel(xs)
                        res["shapiro_w"][flat] = np.where(constant[flat], np.nan, w)

        run_layers(shapiro_pass, n_layers)

    with np.errstate(all="ignore"):
        nf = n_used.astype(np.float64)
        g1, g2 = res["skew"], res["kurtosis"]
        res["jb_stat"] = nf / 6.0 * (g1**2 + g2**2 / 4.0)
        c1 = np.sqrt(nf * (nf - 1.0)) / (nf - 2.0) * g1
        c2 = (nf - 1.0) / ((nf - 2.0) * (nf - 3.0)) * ((nf + 1.0) * g2 + 6.0)
        bc = (c1**2 + 1.0) / (c2 + 3.0 * (nf - 1.0) ** 2 / ((nf - 2.0) * (nf - 3.0)))
        res["bimodality"] = np.where(n_used >= 4, bc, np.nan)

    # p-values, vectorised over all neurons
    with np.errstate(all="ignore"):
        ks_p = ks_pvalue(res["ks_stat"], n_used)
        ad_crit = np.where(np.isnan(res["ad_stat"]), np.nan, ad_critical(n_used, alpha))
        ad_p = ad_pvalue(res["ad_stat"], n_used)
        sw_p = shapiro_pvalue(res["shapiro_w"], np.maximum(n_sw, 0))
        jb_p = np.exp(-res["jb_stat"] / 2.0)
    pvals = {"ks": ks_p, "ad": ad_p, "shapiro": sw_p, "jb": jb_p}
    passes = {}
    for test, p in pvals.items():
        if correction == "none" and test == "ad" and not np.isnan(ad_crit).all():
            reject = res["ad_stat"] > ad_crit
        else:
            reject = adjust_pvalues(p, correction) < alpha
        passes[test] = pd.array(np.where(np.isnan(p), None, ~reject), dtype="boolean")
    gaussian = passes[rule[0]]
    for test in rule[1:]:
        gaussian = gaussian & passes[test]
    # Kleene logic: False & NA is False; a neuron is only decided when every rule test ran.
    undecided = np.zeros(total, dtype=bool)
    for test in rule:
        undecided |= np.isnan(pvals[test])
    gaussian = pd.array(np.where(undecided, None, gaussian.to_numpy(na_value=False)), "boolean")

    mean = stats.mean.detach().to("cpu", torch.float64).numpy().ravel()
    std = stats.std.detach().to("cpu", torch.float64).numpy().ravel()
    table = pd.DataFrame(
        {
            "layer": np.repeat(np.asarray(stats.layers, dtype=np.int64), d),
            "neuron": np.tile(np.arange(d, dtype=np.int64), n_layers),
            "n_tokens": stats.count.detach().cpu().numpy().ravel().astype(np.int64),
            "mean": mean,
            "std": std,
            "n": n_used,
            "skew": res["skew"],
            "kurtosis": res["kurtosis"],
            "ks_stat": res["ks_stat"],
            "ks_p": ks_p,
            "ad_stat": res["ad_stat"],
            "ad_crit": ad_crit,
            "ad_p": ad_p,
            "shapiro_w": res["shapiro_w"],
            "shapiro_p": sw_p,
            "shapiro_n": n_sw,
            "jb_stat": res["jb_stat"],
            "jb_p": jb_p,
            "bimodality": res["bimodality"],
            **{f"{t}_pass": passes[t] for t in TESTS},
            "gaussian": gaussian,
        }
    )
    notes = _Notes(total)
    n_excluded = n_filled - n_used
    notes.add(n_excluded > 0, n_excluded, "{} non-finite sample values left out")
    few = n_used < min_samples
    notes.add(few, n_used, "n={} finite samples < " + str(min_samples) + ": tests are NaN")
    notes.add(constant, None, "constant sample (zero variance): tests are NaN")
    notes.add(~few & ~constant & (n_used < 4), None, "n < 4: no bimodality coefficient")
    notes.add(
        separate_sw & (n_sw >= min_samples),
        n_sw,
        "Shapiro-Wilk on a uniform subsample of {} values",
    )
    if other is not None:
        acc = _rule_accuracy(stats, other)
        for key, value in acc.items():
            table[key] = value
        std_r = other.std.detach().to("cpu", torch.float64).numpy().ravel()
        sigma_ok = (std > 0) & (std_r > 0)
        undefined = np.isnan(acc["rule_balanced_acc"])
        notes.add(undefined & ~sigma_ok, None, "decision rule undefined (a sigma is 0 or NaN)")
        notes.add(undefined & sigma_ok, None, "decision rule: no finite samples on a skill")
    table["note"] = notes.values()

    n_few, n_const = int(few.sum()), int(constant.sum())
    if n_few or n_const:
        parts = []
        if n_few:
            parts.append(
                f"{n_few} neurons have fewer than {min_samples} finite reservoir values "
                f"(smallest: {int(n_used.min())})"
            )
        if n_const:
            parts.append(f"{n_const} neurons are constant on the sample")
        warnings.warn(
            "gaussian_fit: " + "; ".join(parts) + ": their tests are NaN (see the 'note' column).",
            stacklevel=2,
        )
    meta = {k: stats.meta.get(k) for k in ("model", "skill") if k in stats.meta}
    meta["site"] = stats.site
    if other is not None:
        meta["other_skill"] = other.meta.get("skill")
    return GaussianFit(
        table=table,
        by_layer=_summarise(table, other is not None),
        alpha=alpha,
        rule=rule,
        correction=correction,
        layers=list(stats.layers),
        meta=meta,
        stats=stats,
        other=other,
    )


class _Notes:
    """Per-neuron notes built by vectorised masks (one string per neuron, '; '-separated)."""

    def __init__(self, n: int):
        self._notes = np.full(n, "", dtype=object)

    def add(self, mask: np.ndarray, values: np.ndarray | None, template: str) -> None:
        idx = np.flatnonzero(mask)
        if idx.size == 0:
            return
        if values is None:
            msgs = np.full(idx.size, template, dtype=object)
        else:
            msgs = np.array([template.format(int(v)) for v in np.asarray(values)[idx]], object)
        old = self._notes[idx]
        self._notes[idx] = np.where(old == "", msgs, old + "; " + msgs)

    def values(self) -> np.ndarray:
        return self._notes


def _rule_accuracy(stats_f: NeuronStats, stats_r: NeuronStats) -> dict[str, np.ndarray]:
    """Share of each skill's reservoir values that ``p_F(x) >= p_R(x)`` assigns correctly.

    ``log p_F(x) - log p_R(x) = ((x - mu_R)^2 / sigma_R^2 - (x - mu_F)^2 / sigma_F^2) / 2
    + log(sigma_R / sigma_F)``, evaluated as a quadratic ``(a x + b) x + c`` in float64 per
    block of neurons (ties, ``p_F = p_R``, go to F as in Neuron Adjust).
    """

    def host(t: Tensor) -> np.ndarray:
        return t.detach().to("cpu", torch.float64).numpy()

    n_layers, d = stats_f.mean.shape
    mu_f, sd_f, mu_r, sd_r = (
        host(t) for t in (stats_f.mean, stats_f.std, stats_r.mean, stats_r.std)
    )
    with np.errstate(all="ignore"):
        # log p_F - log p_R = (a x + b) x + c
        inv_f2, inv_r2 = 1.0 / sd_f**2, 1.0 / sd_r**2
        qa = 0.5 * (inv_r2 - inv_f2)
        qb = mu_f * inv_f2 - mu_r * inv_r2
        qc = 0.5 * (mu_r**2 * inv_r2 - mu_f**2 * inv_f2) + np.log(sd_r / sd_f)
    ok = (sd_f > 0) & (sd_r > 0) & np.isfinite(qa) & np.isfinite(qb) & np.isfinite(qc)
    out = {}
    for name, stats, want_f in (
        ("rule_acc_forget", stats_f, True),
        ("rule_acc_retain", stats_r, False),
    ):
        rows = filled_rows(stats)
        n = int(rows.numel())
        hits = np.zeros((n_layers, d))
        count = np.zeros((n_layers, d))

        def job(row: int, stats=stats, rows=rows, n=n, want_f=want_f, hits=hits, count=count):
            x = layer_samples(stats, row, rows)
            step = max(1, BLOCK_ELEMENTS // max(1, n))
            for s in range(0, d, step):
                e = min(d, s + step)
                xb = x[s:e].astype(np.float64)
                with np.errstate(all="ignore"):
                    v = xb * qa[row, s:e, None]
                    v += qb[row, s:e, None]
                    v *= xb
                    to_f = v >= -qc[row, s:e, None]  # NaN (a left-out value) compares False
                finite = np.isfinite(xb)
                n_finite = np.count_nonzero(finite, axis=1)
                if n_finite.min(initial=n) < n:
                    to_f = (to_f if want_f else ~to_f) & finite
                    hits[row, s:e] = np.count_nonzero(to_f, axis=1)
                else:
                    hit_f = np.count_nonzero(to_f, axis=1)
                    hits[row, s:e] = hit_f if want_f else n - hit_f
                count[row, s:e] = n_finite

        if n:
            run_layers(job, n_layers)
        with np.errstate(all="ignore"):
            acc = np.where(ok & (count > 0), hits / count, np.nan)
        out[name] = acc.ravel()
    out["rule_balanced_acc"] = 0.5 * (out["rule_acc_forget"] + out["rule_acc_retain"])
    return out


def _summarise(table: pd.DataFrame, with_rule: bool) -> pd.DataFrame:
    """Per-layer summary of a GaussianFit table."""
    t = table.assign(
        abs_skew=table["skew"].abs(),
        small_moments=(table["skew"].abs() <= SMALL_SKEW)
        & (table["kurtosis"].abs() <= SMALL_KURTOSIS),
        bimodal=table["bimodality"] > BIMODAL_THRESHOLD,
        tested=~np.isnan(table["skew"]),
    )
    for col in ["gaussian"] + [f"{x}_pass" for x in TESTS]:
        t[col] = t[col].astype("Float64")
    g = t.groupby("layer", sort=False)
    tested = t[t["tested"]].groupby("layer", sort=False)
    out = pd.DataFrame(
        {
            "n_neurons": g.size(),
            "n_tested": g["tested"].sum().astype(np.int64),
            "share_gaussian": g["gaussian"].mean(),
            **{f"share_{x}_pass": g[f"{x}_pass"].mean() for x in TESTS},
            "median_abs_skew": g["abs_skew"].median(),
            "median_kurtosis": g["kurtosis"].median(),
            "share_small_moments": tested["small_moments"].mean(),
            "share_bimodal": tested["bimodal"].mean(),
            "median_ks_stat": g["ks_stat"].median(),
            "median_shapiro_w": g["shapiro_w"].median(),
        }
    )
    if with_rule:
        acc = g["rule_balanced_acc"]
        out["mean_rule_balanced_acc"] = acc.mean()
        out["median_rule_balanced_acc"] = acc.median()
        out["max_rule_balanced_acc"] = acc.max()
    out.index.name = "layer"
    return out.astype({c: np.float64 for c in out.columns if c.startswith(("share_", "median_"))})
