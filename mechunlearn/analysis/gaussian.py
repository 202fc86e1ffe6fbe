"""Gaussian-fit checks: is a neuron's value distribution on a skill close to a normal?

Neuron Adjust models every neuron's pre-activation on a skill as a Gaussian ``N(mu, sigma)``
(docs/methods.md). :func:`gaussian_fit` checks that assumption for every neuron of every
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

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from scipy import special
from torch import Tensor

from ..kernels.gaussian_rule import rule_accuracy
from ..kernels.normality import (
    CORRECTIONS,
    ad_critical,
    ad_pvalue,
    adjust_pvalues,
    ks_pvalue,
    normality_kernel,
    shapiro_kernel,
    shapiro_pvalue,
)
from ..kernels.samples import filled_rows, neuron_samples, run_layers, sorted_blocks
from ..stats import NeuronStats, check_stats
from ..validation import check_alpha, check_choice, check_same_source

__all__ = ["GaussianFit", "gaussian_fit", "TESTS", "CORRECTIONS"]

TESTS: tuple[str, ...] = ("ks", "ad", "shapiro", "jb")
"""Normality tests that a decision ``rule`` can combine."""


#: Effect-size thresholds of the per-layer summary's ``share_small_moments``.
SMALL_SKEW, SMALL_KURTOSIS = 0.5, 1.0
#: Sarle's bimodality coefficient of a uniform distribution; larger values hint at bimodality.
BIMODAL_THRESHOLD = 5.0 / 9.0

# Anderson-Darling critical values for the normal with estimated parameters (as scipy).


# ------------------------------------------------------------------------------ sample access


# ---------------------------------------------------------------------- vectorised statistics


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
        >>> fit.by_layer[["share_gaussian", "median_abs_skew"]].shape   # one row per layer
        (3, 2)
        >>> fit.tensor("kurtosis").shape  # (layers, d_mlp)
        torch.Size([3, 48])
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
            >>> fit = mu.analysis.gaussian_fit(stats_f)
            >>> fit.tensor("skew")[0, :5].shape
            torch.Size([5])
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
            >>> fit = mu.analysis.gaussian_fit(stats_f)
            >>> worst = fit.sorted_by("ks_stat", k=10)  # the 10 least Gaussian neurons by KS
            >>> len(worst), bool(worst["ks_stat"].is_monotonic_decreasing)
            (10, True)
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
        >>> fit = mu.analysis.gaussian_fit(stats_f, alpha=0.01)
        >>> fit.by_layer["share_gaussian"].shape   # share of Gaussian neurons, per layer
        (3,)
        >>> ax = fit.by_layer["share_gaussian"].plot()
    """
    alpha, rule, min_samples, shapiro_max_n = _checked_settings(
        stats, other, alpha, rule, correction, min_samples, shapiro_max_n
    )
    sample = _sample_statistics(stats, min_samples, shapiro_max_n)
    pvals, passes, gaussian = _decisions(sample, alpha, rule, correction)
    table = _table(stats, sample, pvals, passes, gaussian)
    acc = rule_accuracy(stats, other) if other is not None else {}
    for key, value in acc.items():
        table[key] = value
    table["note"] = _notes(stats, other, sample, acc, min_samples).values()
    _warn_untested(sample, min_samples)
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


def _checked_settings(
    stats: NeuronStats,
    other: NeuronStats | None,
    alpha: float,
    rule: str | Sequence[str],
    correction: str,
    min_samples: int,
    shapiro_max_n: int,
) -> tuple[float, tuple[str, ...], int, int]:
    """:func:`gaussian_fit`'s arguments checked: ``(alpha, rule, min_samples,
    shapiro_max_n)`` normalised (a rule of one test becomes a tuple)."""
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
    if other is not None:
        check_stats(other, "other")
        check_same_source(stats, other, ("stats", "other"))
    return alpha, rule, int(min_samples), int(shapiro_max_n)


@dataclass
class _Sample:
    """Per-neuron statistics of the reservoir sample, flattened over ``(layer, neuron)``.

    Attributes:
        res: ``skew``, ``kurtosis``, ``ks_stat``, ``ad_stat``, ``shapiro_w``, ``jb_stat`` and
            ``bimodality`` (NaN where not computed).
        n_used: finite values tested per neuron.
        n_sw: values the Shapiro-Wilk test used per neuron.
        constant: whether the neuron's sample is constant.
        n_filled: reservoir rows filled.
        separate_sw: whether Shapiro-Wilk ran on a subsample (more rows than its limit).
    """

    res: dict[str, np.ndarray]
    n_used: np.ndarray
    n_sw: np.ndarray
    constant: np.ndarray
    n_filled: int
    separate_sw: bool


def _sample_statistics(stats: NeuronStats, min_samples: int, shapiro_max_n: int) -> _Sample:
    """The tests' statistics of every neuron, layer by layer (Shapiro-Wilk in a second pass on a
    uniform subsample when the reservoir holds more than ``shapiro_max_n`` rows), then the
    Jarque-Bera statistic and the bimodality coefficient from the moments."""
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
        for neurons, xs in sorted_blocks(stats, row, rows):
            flat = row * d + neurons
            n = xs.shape[1]
            n_used[flat] = n
            if n < min_samples:
                continue
            out = normality_kernel(xs, shapiro=not separate_sw)
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

        def shapiro_pass(row: int) -> None:
            for neurons, xs in sorted_blocks(stats, row, sw_rows):
                flat = row * d + neurons
                n_sw[flat] = xs.shape[1]
                if xs.shape[1] >= min_samples:
                    w = shapiro_kernel(xs)
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
    return _Sample(res, n_used, n_sw, constant, n_filled, separate_sw)


def _decisions(
    sample: _Sample, alpha: float, rule: tuple[str, ...], correction: str
) -> tuple[dict[str, np.ndarray], dict[str, Any], Any]:
    """The tests' p-values (vectorised over all neurons; ``ad_crit`` too), whether each test
    passes (nullable booleans, NA where untested) and the rule's verdict.

    Returns:
        ``(p-values by test and "ad_crit", passes by test, gaussian)``.
    """
    res, n_used = sample.res, sample.n_used
    with np.errstate(all="ignore"):
        ks_p = ks_pvalue(res["ks_stat"], n_used)
        ad_crit = np.where(np.isnan(res["ad_stat"]), np.nan, ad_critical(n_used, alpha))
        ad_p = ad_pvalue(res["ad_stat"], n_used)
        sw_p = shapiro_pvalue(res["shapiro_w"], np.maximum(sample.n_sw, 0))
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
    undecided = np.zeros(n_used.shape[0], dtype=bool)
    for test in rule:
        undecided |= np.isnan(pvals[test])
    gaussian = pd.array(np.where(undecided, None, gaussian.to_numpy(na_value=False)), "boolean")
    return {**pvals, "ad_crit": ad_crit}, passes, gaussian


def _table(
    stats: NeuronStats,
    sample: _Sample,
    pvals: dict[str, np.ndarray],
    passes: dict[str, Any],
    gaussian: Any,
) -> pd.DataFrame:
    """One row per neuron: its moments, the tests' statistics, p-values and verdicts."""
    n_layers, d = stats.mean.shape
    res = sample.res
    return pd.DataFrame(
        {
            "layer": np.repeat(np.asarray(stats.layers, dtype=np.int64), d),
            "neuron": np.tile(np.arange(d, dtype=np.int64), n_layers),
            "n_tokens": stats.count.detach().cpu().numpy().ravel().astype(np.int64),
            "mean": _flat64(stats.mean),
            "std": _flat64(stats.std),
            "n": sample.n_used,
            "skew": res["skew"],
            "kurtosis": res["kurtosis"],
            "ks_stat": res["ks_stat"],
            "ks_p": pvals["ks"],
            "ad_stat": res["ad_stat"],
            "ad_crit": pvals["ad_crit"],
            "ad_p": pvals["ad"],
            "shapiro_w": res["shapiro_w"],
            "shapiro_p": pvals["shapiro"],
            "shapiro_n": sample.n_sw,
            "jb_stat": res["jb_stat"],
            "jb_p": pvals["jb"],
            "bimodality": res["bimodality"],
            **{f"{t}_pass": passes[t] for t in TESTS},
            "gaussian": gaussian,
        }
    )


def _flat64(x: Float[Tensor, "layer d"]) -> np.ndarray:
    """``x`` as a flat float64 NumPy array on the CPU."""
    return x.detach().to("cpu", torch.float64).numpy().ravel()


def _notes(
    stats: NeuronStats,
    other: NeuronStats | None,
    sample: _Sample,
    acc: dict[str, np.ndarray],
    min_samples: int,
) -> _Notes:
    """Why a neuron's tests are missing or special (the table's ``note`` column)."""
    n_used, constant = sample.n_used, sample.constant
    notes = _Notes(n_used.shape[0])
    n_excluded = sample.n_filled - n_used
    notes.add(n_excluded > 0, n_excluded, "{} non-finite sample values left out")
    few = n_used < min_samples
    notes.add(few, n_used, "n={} finite samples < " + str(min_samples) + ": tests are NaN")
    notes.add(constant, None, "constant sample (zero variance): tests are NaN")
    notes.add(~few & ~constant & (n_used < 4), None, "n < 4: no bimodality coefficient")
    notes.add(
        sample.separate_sw & (sample.n_sw >= min_samples),
        sample.n_sw,
        "Shapiro-Wilk on a uniform subsample of {} values",
    )
    if other is not None:
        sigma_ok = (_flat64(stats.std) > 0) & (_flat64(other.std) > 0)
        undefined = np.isnan(acc["rule_balanced_acc"])
        notes.add(undefined & ~sigma_ok, None, "decision rule undefined (a sigma is 0 or NaN)")
        notes.add(undefined & sigma_ok, None, "decision rule: no finite samples on a skill")
    return notes


def _warn_untested(sample: _Sample, min_samples: int) -> None:
    """Warn, in :func:`gaussian_fit`'s caller, of neurons whose tests are NaN."""
    n_few, n_const = int((sample.n_used < min_samples).sum()), int(sample.constant.sum())
    if n_few or n_const:
        parts = []
        if n_few:
            parts.append(
                f"{n_few} neurons have fewer than {min_samples} finite reservoir values "
                f"(smallest: {int(sample.n_used.min())})"
            )
        if n_const:
            parts.append(f"{n_const} neurons are constant on the sample")
        warnings.warn(
            "gaussian_fit: " + "; ".join(parts) + ": their tests are NaN (see the 'note' column).",
            stacklevel=3,
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
