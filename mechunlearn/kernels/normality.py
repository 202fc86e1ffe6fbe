"""Vectorised normality tests: many samples (one per row) at once, equal to scipy's to ~1e-12.

Skewness, excess kurtosis, the Kolmogorov-Smirnov distance to the fitted normal (exact p-value),
Anderson-Darling ``A^2`` (Stephens' critical values, D'Agostino & Stephens' p-value),
Shapiro-Wilk ``W`` (Royston's coefficients and p-value), and multiple-testing corrections.
:func:`mechunlearn.analysis.gaussian_fit` runs them over every neuron.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from scipy import special
from scipy import stats as sps

from ..validation import check_choice

_AD_LEVELS = np.array([0.15, 0.10, 0.05, 0.025, 0.01])


_AD_AVALS = np.array([0.561, 0.631, 0.752, 0.873, 1.035])


_EPS = float(np.finfo(np.float64).eps)


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


def normality_kernel(xs: np.ndarray, shapiro: bool) -> dict[str, np.ndarray]:
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


def shapiro_kernel(xs: np.ndarray) -> np.ndarray:
    """Shapiro-Wilk W per row of ``xs`` (sorted, finite, 3 <= n)."""
    n = xs.shape[1]
    x = xs.astype(np.float64)
    x -= x.mean(axis=1)[:, None]
    ss = np.einsum("ij,ij->i", x, x)
    with np.errstate(all="ignore"):
        return np.minimum(1.0, np.einsum("ij,j->i", x, shapiro_coefficients(n)) ** 2 / ss)


CORRECTIONS: tuple[str, ...] = ("none", "bonferroni", "holm", "bh")
"""Multiple-testing corrections of :func:`gaussian_fit`."""
