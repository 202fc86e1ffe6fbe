"""Hypercube geometry of a skill's key vectors, layer by layer (docs/methods.md).

Key Space Detection models a skill by the axis-aligned box ``μ ± α·σ`` of its key vectors
(``hook_post`` at the last prompt token). This module holds

* the **cube primitives** that :class:`~mechunlearn.interventions.key_space.KeySpaceDetector`
  imports: :func:`fit_cube`, :func:`normalized_distance`, :func:`contains`, :func:`k_min`,
  :func:`inclusion_rate`, :func:`log_volume`;
* the **analysis** :func:`hypercube`: per layer, how much of the forget skill F (on the queries
  the cube was fitted on *and* on held-out queries) and of each other skill lies inside the cube
  as α grows (the paper's Figure 5), ``k_min``, the cube's volume, the distance between skill
  centres, the α range that separates F from the others, and whether the cubes really shrink
  and separate in deeper layers (the paper's Figure 6 claim), as Spearman correlations.

Conventions, shared with KSD:

* ``σ`` is the sample standard deviation (``ddof=1``) of the fit vectors, computed in float64.
* **σ floor.** A dimension that is constant on the fit vectors (σ = 0) would divide by zero.
  σ is floored, per layer, at ``max(rel_floor * median_i σ_i, abs_floor)`` with
  ``rel_floor = 1e-6`` and ``abs_floor = 1e-12`` (the median over the layer's dimensions, the
  lower median when their number is even). So a constant dimension admits only values within
  ``α · 1e-6`` typical σ of its constant: practically "equal", and nothing is divided by zero.
  The number of floored dimensions is recorded (``Cube.n_floored``).
* **Margin.** ``normalized_distance(x, cube) = max_i |x_i − μ_i| / σ_i``, the smallest α whose
  cube holds ``x``. A vector is inside the cube of size α when its margin is ``≤ α``; this is
  "every dimension satisfies ``|x_i − μ_i| ≤ α·σ_i``", decided with the same division as
  ``k_min`` so that every fit vector is inside at ``α = k_min`` exactly (multiplying ``α·σ``
  instead can flip the boundary vector by one rounding error). A vector with a NaN is never
  inside.
* **k_min** is the largest margin of the fit vectors (closed form, no search). By Samuelson's
  inequality it can never exceed ``(n − 1)/√n`` for ``n`` fit vectors (9.9 for 100, 15 for
  227): a cube of α = 15 holds every one of up to 227 fit vectors whatever the data.

Example:
    >>> from mechunlearn.analysis import contains, fit_cube, k_min
    >>> cube = fit_cube(keys_f.layer(-1))            # [n, d_mlp] -> μ, σ of shape [d_mlp]
    >>> alpha = 1.5 * k_min(keys_f.layer(-1), cube)   # KSD's α = h · k_min
    >>> contains(keys_r.layer(-1), cube, alpha).shape  # [m] bool
    torch.Size([30])
    >>> bool(contains(keys_f.layer(-1), cube, alpha).all())   # α ≥ k_min holds every fit key
    True
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..kernels.regions import (
    ABS_FLOOR,
    REL_FLOOR,
    Cube,
    check_finite,
    fit_cube,
    log_volume,
    normalized_distance,
)
from ..stats import KeyVectors
from ..validation import check_same_source

# ------------------------------------------------------------------------------ cube primitives


# ------------------------------------------------------------------------------ input checks
def prepare_keys(
    keys_f: KeyVectors,
    others: Mapping[str, KeyVectors],
    layers: int | Sequence[int] | None,
    min_forget: int,
    min_other: int,
    what: str,
) -> tuple[list[int], dict[str, KeyVectors]]:
    """Validate the inputs of :func:`hypercube` / ``convexity`` and resolve ``layers``.

    Returns the model layers to analyse and the other skills, restricted to those layers and
    moved to ``keys_f``'s device. ``keys_f`` is checked and restricted by the caller via
    :func:`select_layers`.

    Raises:
        TypeError: wrong types.
        ValueError: no other skill; too few examples; different models, widths or missing
            layers; non-finite values.
    """
    if not isinstance(keys_f, KeyVectors):
        raise TypeError(
            f"{what}: keys_f must be KeyVectors (from mu.collect_keys), "
            f"got {type(keys_f).__name__}."
        )
    if isinstance(others, KeyVectors) or not isinstance(others, Mapping):
        raise TypeError(
            f"{what}: others must be a dict {{name: KeyVectors}}, e.g. "
            "others={'mbpp': mu.collect_keys(model, mbpp)}; "
            f"got {type(others).__name__}."
        )
    if len(others) == 0:
        raise ValueError(
            f"{what} compares the forget skill with other skills, but `others` is empty: pass "
            "others={'name': KeyVectors} (use fit_cube/k_min for the forget skill alone)."
        )
    name_f = keys_f.meta.get("skill", "forget")
    if len(keys_f) < min_forget:
        raise ValueError(
            f"{what} splits the forget skill {name_f!r} into fit and held-out parts and needs "
            f"at least {min_forget} examples, got {len(keys_f)}."
        )
    if layers is None:
        layers = list(keys_f.layers)
    elif isinstance(layers, int):
        layers = [layers]
    layers = [keys_f.layers[keys_f.layer_index(int(layer))] for layer in layers]
    if len(set(layers)) != len(layers):
        raise ValueError(f"{what}: layers {layers} repeat a layer.")
    out = {}
    for name, kv in others.items():
        if not isinstance(kv, KeyVectors):
            raise TypeError(
                f"{what}: others[{name!r}] must be KeyVectors, got {type(kv).__name__}."
            )
        missing = [layer for layer in layers if layer not in kv.layers]
        if missing:
            raise ValueError(
                f"{what}: others[{name!r}] holds layers {kv.layers}, not {missing}; collect the "
                f"same layers for every skill or pass layers= a common subset."
            )
        if len(kv) < min_other:
            raise ValueError(
                f"{what} needs at least {min_other} examples of others[{name!r}], got {len(kv)}."
            )
        sel = select_layers(kv, layers).to(keys_f.values.device)
        check_same_source(select_layers(keys_f, layers), sel, ("keys_f", f"others[{name!r}]"))
        check_finite(sel.values, f"The key vectors of others[{name!r}] at layers {layers}")
        out[str(name)] = sel
    check_finite(select_layers(keys_f, layers).values, f"The forget keys at layers {layers}")
    return layers, out


def select_layers(keys: KeyVectors, layers: Sequence[int]) -> KeyVectors:
    """``keys`` restricted to the model layers ``layers`` (in that order)."""
    cols = torch.as_tensor(
        [keys.layers.index(layer) for layer in layers], device=keys.values.device
    )
    return KeyVectors(keys.values.index_select(1, cols), list(layers), dict(keys.meta))


def split_forget(
    keys_f: KeyVectors, test_size: float | int, seed: int, what: str
) -> tuple[KeyVectors, KeyVectors, np.ndarray, np.ndarray]:
    """``keys_f.split(test_size, seed)`` plus the row indices of both parts.

    Raises:
        ValueError: a part would be empty, or the fit part has fewer than 2 examples.
    """
    n = len(keys_f)
    probe = KeyVectors(torch.arange(n, dtype=torch.float64).reshape(n, 1, 1), [0], {})
    try:
        fit, test = probe.split(test_size, seed)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None
    fit_idx = fit.values.reshape(-1).long().numpy()
    test_idx = test.values.reshape(-1).long().numpy()
    if fit_idx.size < 2:
        raise ValueError(
            f"{what}: test_size={test_size} leaves {fit_idx.size} of {n} forget examples to "
            "fit the cube; a standard deviation needs at least 2."
        )
    return keys_f.subset(fit_idx.tolist()), keys_f.subset(test_idx.tolist()), fit_idx, test_idx


def order_statistic(sorted_values: Tensor, rank: int) -> float:
    """``sorted_values[rank]`` (0-based), ``inf`` past the end."""
    return float(sorted_values[rank]) if rank < sorted_values.numel() else math.inf


def quantile_alpha(margins: Tensor, target: float) -> float:
    """Smallest α with ``mean(margins ≤ α) ≥ target``: the ``ceil(target·n)``-th margin."""
    rank = max(math.ceil(target * margins.numel() - 1e-9), 1) - 1
    return order_statistic(margins.sort().values, rank)


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Spearman's rho and its two-sided p-value over the finite pairs.

    The p-value is exact (all permutations) for up to 8 points and the t approximation
    (scipy) above. NaN with fewer than 3 points or a constant input.
    """
    from scipy import stats

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = x.size
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    rho = float(np.corrcoef(rx, ry)[0, 1])
    if n > 8:
        return rho, float(stats.spearmanr(x, y).pvalue)
    perms = np.array(list(itertools.permutations(range(n))))
    ryp = ry[perms]
    cx, cy = rx - rx.mean(), ryp - ryp.mean(1, keepdims=True)
    null = (cy @ cx) / np.sqrt((cx @ cx) * (cy * cy).sum(1))
    p = float(np.mean(np.abs(null) >= abs(rho) - 1e-12))
    return rho, p


# ------------------------------------------------------------------------------ the analysis
@dataclass
class HypercubeResult:
    """What :func:`hypercube` measured, as tables (one row per layer, skill, α, ...).

    Attributes:
        forget: name of the forget skill.
        others: names of the other skills.
        layers: the model layers analysed.
        curves: inclusion rate vs α (the paper's Figure 5), long format with columns
            ``layer, alpha, skill, role, part, inclusion``. ``role`` is ``"forget"`` or
            ``"other"``; ``part`` is ``"fit"`` (the forget queries the cube was fitted on, as the
            authors measure), ``"held-out"`` (forget queries not used to fit it) or ``"all"``.
        margins: every example's margin ``max_i |x_i − μ_i|/σ_i`` (the α from which it is
            inside), columns ``layer, skill, role, part, example, margin``; ``example`` is the
            row in the KeyVectors it came from. :meth:`inclusion` recomputes curves from it.
        per_layer: one row per layer: ``n_fit``, ``n_heldout``, ``d_mlp``; ``k_min`` (on the fit
            part); ``alpha_f`` (smallest α holding ≥ ``target`` of the held-out forget queries);
            ``heldout_at_kmin`` (held-out forget inclusion at α = k_min: KSD's recall at h = 1);
            ``log_volume`` = ``Σ_i log(2·k_min·σ_F,i)`` (nats, the cube at α = k_min);
            ``log_side`` = ``log_volume / d_mlp`` (mean log side length);
            ``log_rel_volume`` = ``Σ_i log(σ_F,i / σ_pool,i)`` where ``σ_pool`` is the floored
            std of all skills' key vectors pooled (every forget and other example), so that
            layers of different scale compare (α-free: at a common α the α terms cancel);
            ``log_rel_side`` = its per-dimension mean (``exp`` of it is the geometric mean of
            ``σ_F/σ_pool``: below 1 the forget cube is narrower than the overall spread);
            ``n_floored`` and ``sigma_floor`` of the forget cube.
        per_other: one row per (layer, other skill): ``centre_rms`` = RMS over dimensions of
            ``(μ_F − μ_O)/σ_F``; ``centre_max`` = max over dimensions of its absolute value
            (= the margin of the other skill's centre in F's cube); ``centre_rms_pooled`` = RMS
            of ``(μ_F − μ_O)/σ_pool`` (scale-free, not inflated by near-constant F
            dimensions); ``alpha_other`` = the largest α keeping the other skill's inclusion
            ``≤ cap`` (a supremum: every α below it does); ``separated`` = ``alpha_f <
            alpha_other``, i.e. some α holds ≥ ``target`` of held-out F and ≤ ``cap`` of the
            other skill (the separating interval is ``[alpha_f, alpha_other)``);
            ``alpha_ratio`` = ``alpha_other / alpha_f``; ``min_margin`` (the other skill's
            closest example); ``other_at_kmin`` and ``other_at_alpha_f`` (false positive rates).
        trends: Spearman correlation with the layer index of each metric, columns
            ``metric, other, expected_sign, rho, p_value, n_layers, supports_claim``.
            ``expected_sign`` is the sign the paper's claim predicts (volumes shrink: −1,
            centres separate: +1); ``supports_claim`` is True when rho has that sign with
            p < 0.05.
        target, cap, test_size, seed: the settings.
    """

    forget: str
    others: list[str]
    layers: list[int]
    curves: pd.DataFrame
    margins: pd.DataFrame
    per_layer: pd.DataFrame
    per_other: pd.DataFrame
    trends: pd.DataFrame
    target: float = 0.9
    cap: float = 0.05
    test_size: float | int = 0.5
    seed: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def inclusion(self, alphas: Sequence[float]) -> pd.DataFrame:
        """Inclusion curves (as :attr:`curves`) at other values of α, from the margins."""
        alphas = np.asarray(alphas, dtype=float).reshape(-1)
        rows = []
        for (layer, skill, role, part), g in self.margins.groupby(
            ["layer", "skill", "role", "part"], sort=False
        ):
            rate = (g["margin"].to_numpy()[None, :] <= alphas[:, None]).mean(1)
            rows.append(
                pd.DataFrame(
                    {
                        "layer": layer,
                        "alpha": alphas,
                        "skill": skill,
                        "role": role,
                        "part": part,
                        "inclusion": rate,
                    }
                )
            )
        return pd.concat(rows, ignore_index=True)

    def summary(self) -> str:
        """A few lines: the layer trends and where F separates from each other skill."""
        lines = [f"Hypercube of {self.forget!r} vs {self.others} over layers {self.layers}:"]
        for row in self.trends.itertuples():
            who = f" vs {row.other}" if isinstance(row.other, str) and row.other else ""
            lines.append(
                f"  {row.metric}{who}: Spearman rho={row.rho:+.2f} (p={row.p_value:.2g}); "
                f"claim {'supported' if row.supports_claim else 'not supported'}"
            )
        sep = self.per_other.groupby("other")["separated"].mean()
        for other, frac in sep.items():
            lines.append(f"  separated from {other!r} in {frac:.0%} of layers")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"HypercubeResult(forget={self.forget!r}, others={self.others}, "
            f"layers={len(self.layers)}, target={self.target}, cap={self.cap})"
        )


TREND_METRICS: dict[str, int] = {
    "log_rel_side": -1,
    "log_side": -1,
    "centre_rms_pooled": +1,
    "centre_rms": +1,
    "alpha_ratio": +1,
}
"""Metrics whose trend over layers :func:`hypercube` tests, with the sign the paper predicts."""


def hypercube(
    keys_f: KeyVectors,
    others: Mapping[str, KeyVectors],
    alphas: Sequence[float] | Tensor | None = None,
    *,
    layers: int | Sequence[int] | None = None,
    test_size: float | int = 0.5,
    seed: int = 0,
    target: float = 0.9,
    cap: float = 0.05,
    rel_floor: float = REL_FLOOR,
    abs_floor: float = ABS_FLOOR,
) -> HypercubeResult:
    """Hypercube geometry of the forget skill against other skills, layer by layer.

    Per layer, the forget keys are split (``keys_f.split(test_size, seed)``) into a fit part,
    on which ``μ_F`` and ``σ_F`` are estimated, and a held-out part. The paper fits and measures
    on the same queries, which flatters the cube; both are reported. Other skills are never
    fitted on, so all their examples are measured.

    Args:
        keys_f: key vectors of the forget skill (``mu.collect_keys``).
        others: ``{name: KeyVectors}`` of the other skills (same model and layers).
        alphas: the α grid of :attr:`HypercubeResult.curves`; default 201 points from 0 to
            1.25 × the largest of the layers' ``k_min`` and 99th percentile of held-out margins.
            The other results do not depend on the grid (they come from exact order
            statistics of the margins).
        layers: model layers to analyse (default: every collected layer; negative indices count
            from the last collected layer).
        test_size: held-out fraction (float) or count (int) of the forget keys.
        seed: seed of the split.
        target: held-out forget inclusion that α must reach (``alpha_f``).
        cap: largest tolerated inclusion of another skill (``alpha_other``).
        rel_floor, abs_floor: the σ floor (see :func:`fit_cube`).

    Returns:
        A :class:`HypercubeResult`.

    Raises:
        ValueError: empty ``others``, fewer than 4 forget examples, key vectors of different
            models or layers, non-finite values, ``target``/``cap`` outside [0, 1].

    Example:
        >>> res = mu.analysis.hypercube(keys_f, others={"copy": keys_r})
        >>> res.per_layer[["layer", "k_min", "alpha_f", "log_rel_side"]].shape  # one row per layer
        (3, 4)
        >>> list(res.trends["metric"])   # do the cubes shrink / separate with depth?
        ['log_rel_side', 'log_side', 'centre_rms_pooled', 'centre_rms', 'alpha_ratio']
        >>> fig = mu.plots.plot_inclusion_curves(res)
    """
    what = "hypercube()"
    if not (0 < target <= 1 and 0 <= cap < 1):
        raise ValueError(f"Need 0 < target <= 1 and 0 <= cap < 1, got target={target}, cap={cap}.")
    layers, others = prepare_keys(keys_f, others, layers, 4, 1, what)
    keys_f = select_layers(keys_f, layers)
    fit, test, fit_idx, test_idx = split_forget(keys_f, test_size, seed, what)
    name_f = str(keys_f.meta.get("skill", "forget"))

    margin_rows, layer_rows, other_rows = [], [], []
    for col, layer in enumerate(layers):
        xf, xt = fit.values[:, col], test.values[:, col]
        cube = fit_cube(xf, rel_floor, abs_floor)
        m_fit, m_test = normalized_distance(xf, cube), normalized_distance(xt, cube)
        pool = torch.cat([keys_f.values[:, col]] + [kv.values[:, col] for kv in others.values()])
        pooled = fit_cube(pool, rel_floor, abs_floor)
        row = _layer_row(layer, cube, pooled, m_fit, m_test, target)
        layer_rows.append(row)
        margin_rows += [
            _margin_frame(layer, name_f, "forget", "fit", fit_idx, m_fit),
            _margin_frame(layer, name_f, "forget", "held-out", test_idx, m_test),
        ]
        for name, kv in others.items():
            xo = kv.values[:, col]
            m_o = normalized_distance(xo, cube)
            margin_rows.append(_margin_frame(layer, name, "other", "all", np.arange(len(kv)), m_o))
            other_rows.append(_other_row(layer, name, xo, m_o, cube, pooled, row, cap))

    margins = pd.concat(margin_rows, ignore_index=True)
    per_layer = pd.DataFrame(layer_rows)
    per_other = pd.DataFrame(other_rows)
    alphas = _alpha_grid(alphas, margins, per_layer)

    result = HypercubeResult(
        forget=name_f,
        others=list(others),
        layers=list(layers),
        curves=pd.DataFrame(),
        margins=margins,
        per_layer=per_layer,
        per_other=per_other,
        trends=_trends(per_layer, per_other),
        target=target,
        cap=cap,
        test_size=test_size,
        seed=seed,
        meta={"model": keys_f.meta.get("model"), "rel_floor": rel_floor, "abs_floor": abs_floor},
    )
    result.curves = result.inclusion(alphas)
    return result


def _layer_row(
    layer: int,
    cube: Cube,
    pooled: Cube,
    m_fit: Float[Tensor, " n_fit"],
    m_test: Float[Tensor, " n_test"],
    target: float,
) -> dict[str, Any]:
    """One layer's row of :attr:`HypercubeResult.per_layer`, from the forget cube, the cube of
    every skill's keys pooled, and the forget keys' margins."""
    kmin = float(m_fit.max())
    lv = float(log_volume(cube, kmin))
    rel = (cube.sigma.log() - pooled.sigma.log()).sum()
    return {
        "layer": layer,
        "n_fit": len(m_fit),
        "n_heldout": len(m_test),
        "d_mlp": cube.d,
        "k_min": kmin,
        "alpha_f": quantile_alpha(m_test, target),
        "heldout_at_kmin": float((m_test <= kmin).double().mean()),
        "log_volume": lv,
        "log_side": lv / cube.d,
        "log_rel_volume": float(rel),
        "log_rel_side": float(rel) / cube.d,
        "n_floored": int(cube.n_floored),
        "sigma_floor": float(cube.floor),
    }


def _other_row(
    layer: int,
    name: str,
    xo: Float[Tensor, "n_o d"],
    m_o: Float[Tensor, " n_o"],
    cube: Cube,
    pooled: Cube,
    forget_row: Mapping[str, Any],
    cap: float,
) -> dict[str, Any]:
    """One other skill's row of :attr:`HypercubeResult.per_other` at one layer: the distance
    between the skills' centres and the α the other skill's inclusion reaches ``cap`` at."""
    kmin, alpha_f = forget_row["k_min"], forget_row["alpha_f"]
    gap = cube.mu - xo.to(cube.mu.dtype).mean(0)
    z, zp = gap / cube.sigma, gap / pooled.sigma
    alpha_o = order_statistic(m_o.sort().values, math.floor(cap * len(xo) + 1e-9))
    return {
        "layer": layer,
        "other": name,
        "n_other": len(xo),
        "centre_rms": float(z.square().mean().sqrt()),
        "centre_max": float(z.abs().max()),
        "centre_rms_pooled": float(zp.square().mean().sqrt()),
        "alpha_f": alpha_f,
        "alpha_other": alpha_o,
        "separated": bool(alpha_f < alpha_o),
        "alpha_ratio": alpha_o / alpha_f if alpha_f > 0 else math.inf,
        "min_margin": float(m_o.min()),
        "other_at_kmin": float((m_o <= kmin).double().mean()),
        "other_at_alpha_f": float((m_o <= alpha_f).double().mean()),
    }


def _alpha_grid(
    alphas: Sequence[float] | Tensor | None, margins: pd.DataFrame, per_layer: pd.DataFrame
) -> np.ndarray:
    """The α grid of the inclusion curves: ``alphas`` checked, or by default 201 points from 0
    to 1.25 × the largest ``k_min`` and 99th percentile of held-out margins."""
    if alphas is None:
        held = margins[margins["part"] == "held-out"].groupby("layer")["margin"].quantile(0.99)
        top = max(float(per_layer["k_min"].max()), float(held.max()), 1e-12)
        alphas = np.linspace(0.0, 1.25 * top, 201)
    alphas = np.asarray(torch.as_tensor(alphas, dtype=torch.float64).cpu()).reshape(-1)
    if alphas.size == 0 or not np.isfinite(alphas).all() or (alphas < 0).any():
        raise ValueError("alphas must be a non-empty sequence of finite numbers >= 0.")
    return alphas


def _margin_frame(layer, skill, role, part, index, margin: Tensor) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "layer": layer,
            "skill": skill,
            "role": role,
            "part": part,
            "example": np.asarray(index, dtype=int),
            "margin": margin.detach().double().cpu().numpy(),
        }
    )


def _trends(per_layer: pd.DataFrame, per_other: pd.DataFrame) -> pd.DataFrame:
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for metric, sign in TREND_METRICS.items():
            if metric in per_layer:
                groups = [("", per_layer)]
            else:
                groups = list(per_other.groupby("other", sort=False))
            for other, g in groups:
                y = g[metric].to_numpy(dtype=float)
                if metric == "alpha_ratio":
                    y = np.log(y)  # ranks are unchanged; inf ratios stay inf and drop out
                rho, p = spearman(g["layer"].to_numpy(dtype=float), y)
                rows.append(
                    {
                        "metric": metric,
                        "other": other,
                        "expected_sign": sign,
                        "rho": rho,
                        "p_value": p,
                        "n_layers": int(np.isfinite(y).sum()),
                        "supports_claim": bool(np.sign(rho) == sign and p < 0.05),
                    }
                )
    return pd.DataFrame(rows)
