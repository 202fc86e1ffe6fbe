"""Is a skill's key region convex? (docs/methods.md; the paper's open question 4.)

Key Space Detection treats the forget skill's key vectors as filling one axis-aligned box.
That is only sensible if the region they occupy is (roughly) convex and apart from other
skills. :func:`convexity` measures three things per layer:

1. **Segments.** Points ``(1 − t)·a + t·b`` between two forget keys ``a, b``: is their nearest
   neighbour a forget key or another skill's key? Distances are Euclidean after standardising
   every dimension by the mean and (floored) std of all skills pooled. The endpoints ``a`` and
   ``b`` are left out of the neighbours: otherwise points near them — and, in high
   dimension, even midpoints, which lie at ``|a − b|/2`` from both — are trivially nearest to
   their own endpoints. Baseline: the same nearest-neighbour rate for the forget keys
   themselves (leave-one-out). A segment rate well below the baseline means the straight line
   between two forget keys leaves the forget region (the region is not convex).
2. **Linear separability.** Held-out accuracy of an L2-regularised logistic regression on
   standardised features (forget vs each other skill; fit on a split, test on the rest; classes
   weighted equally so that imbalance cannot hide behind accuracy).
3. **Boxes.** k-means clusters of the forget keys (fit part), one box ``μ_c ± α_c·σ_c`` per
   cluster, sized to hold its fit points (``α_c`` = the cluster's ``k_min``, times a multiplier
   ``h``). Does a union of k boxes hold the held-out forget keys with fewer false positives
   (other skills inside) than one box (k = 1: KSD's cube)? Reported at the given ``h`` and at
   the ``h`` matching a common held-out recall ``target``.

Example:
    >>> res = mu.analysis.convexity(keys_f, others={"copy": keys_r})
    >>> res.per_layer[["layer", "segment_forget_rate", "baseline_forget_rate"]].shape
    (3, 3)
    >>> matched = res.boxes.query("sizing == 'matched'")   # one row per layer and k
    >>> sorted(set(matched["k"]))
    [1, 2, 4, 8]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from ..kernels.regions import ABS_FLOOR, REL_FLOOR, Cube, fit_cube, normalized_distance
from ..stats import KeyVectors
from .hypercube import (
    prepare_keys,
    quantile_alpha,
    select_layers,
    split_forget,
)


# ------------------------------------------------------------------------------ building blocks
def kmeans(
    x: Float[Tensor, "n d"],
    k: int,
    n_init: int = 4,
    max_iter: int = 100,
    seed: int = 0,
) -> tuple[Int[Tensor, " n"], Float[Tensor, "k d"], float]:
    """Lloyd's k-means with k-means++ seeding; the best of ``n_init`` runs.

    Empty clusters are re-seeded at the point farthest from its centre.

    Returns:
        ``(labels, centres, inertia)``: cluster of each point, the centres and the sum of
        squared distances to them.

    Example:
        >>> labels, centres, inertia = kmeans(torch.randn(100, 8), k=3)
        >>> labels.shape, centres.shape, bool(labels.max() < 3)
        (torch.Size([100]), torch.Size([3, 8]), True)
    """
    x = torch.as_tensor(x)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans needs 1 <= k <= n, got k={k} for n={n} points.")
    gen = torch.Generator().manual_seed(seed)
    best = None
    for _ in range(max(1, n_init)):
        first = int(torch.randint(n, (1,), generator=gen))
        centres = [x[first]]
        d2 = (x - x[first]).square().sum(1)
        for _ in range(1, k):
            total = float(d2.sum())
            probs = (d2 / total if total > 0 else torch.ones_like(d2)).double().cpu()
            nxt = int(torch.multinomial(probs, 1, generator=gen))
            centres.append(x[nxt])
            d2 = torch.minimum(d2, (x - x[nxt]).square().sum(1))
        c = torch.stack(centres)
        labels = None
        for _ in range(max_iter):
            dist = torch.cdist(x, c).square()
            new = dist.argmin(1)
            if labels is not None and torch.equal(new, labels):
                break
            labels = new
            onehot = F.one_hot(labels, k).to(x.dtype)
            counts = onehot.sum(0)
            c = torch.where(counts[:, None] > 0, onehot.T @ x / counts.clamp(min=1)[:, None], c)
            for empty in torch.nonzero(counts == 0).flatten().tolist():
                far = int(dist.gather(1, labels[:, None]).squeeze(1).argmax())
                c[empty] = x[far]
        inertia = float(torch.cdist(x, c).square().min(1).values.sum())
        labels = torch.cdist(x, c).argmin(1)
        if best is None or inertia < best[2] - 1e-12:
            best = (labels, c, inertia)
    return best


def fit_logistic(
    x: Float[Tensor, "n d"],
    y: Tensor,
    l2: float = 1e-2,
    max_iter: int = 100,
) -> tuple[Float[Tensor, " d"], float]:
    """L2-regularised logistic regression, full batch, L-BFGS; classes weighted equally.

    Minimises ``Σ_j w_j·BCE(x_j·w + b, y_j) + (l2/2)·‖w‖²`` with weights ``w_j`` summing to 1
    and each class's weights summing to 1/2 (scikit-learn's ``class_weight="balanced"``;
    ``l2`` corresponds to its ``C ≈ 1/(l2·n)``). Features should be standardised.

    Returns:
        ``(weights, bias)``; predict ``x @ weights + bias > 0``.

    Example:
        >>> w, b = fit_logistic(torch.randn(50, 4), torch.arange(50) % 2)
        >>> w.shape
        torch.Size([4])
    """
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.as_tensor(x).double().clone()
        y = torch.as_tensor(y).to(x.device, torch.float64).clone()
        pos = y.sum()
        neg = y.numel() - pos
        if pos == 0 or neg == 0:
            raise ValueError("fit_logistic needs examples of both classes.")
        weight = torch.where(y > 0.5, 0.5 / pos, 0.5 / neg)
        w = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
        b = torch.zeros((), dtype=x.dtype, device=x.device, requires_grad=True)
        opt = torch.optim.LBFGS(
            [w, b],
            lr=1.0,
            max_iter=max_iter,
            history_size=20,
            tolerance_grad=1e-10,
            tolerance_change=1e-14,
            line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            logits = x @ w + b
            bce = F.softplus(logits) - y * logits  # BCE with logits (the fused op is slow)
            loss = (weight * bce).sum() + 0.5 * l2 * w.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
    return w.detach(), float(b.detach())


def box_union_margin(
    x: Float[Tensor, "m d"], boxes: Cube, alphas: Float[Tensor, " k"]
) -> Float[Tensor, " m"]:
    """``min_c margin_c(x) / α_c``: a vector is in the union of boxes ``μ_c ± h·α_c·σ_c`` iff
    this is ``≤ h``. A box of size ``α_c = 0`` (a one-point cluster) holds only its centre."""
    dist = normalized_distance(x.unsqueeze(1), boxes)  # [m, k]
    alphas = alphas.to(dist.dtype)
    ratio = torch.where(
        dist == 0, torch.zeros_like(dist), dist / alphas.clamp(min=torch.finfo(dist.dtype).tiny)
    )
    return ratio.amin(1)


def fit_boxes(
    x: Float[Tensor, "n d"], labels: Int[Tensor, " n"], floor: Tensor | float
) -> tuple[Cube, Float[Tensor, " k"]]:
    """One box per label (non-empty clusters only): μ, σ (ddof=1, 0 for a one-point cluster)
    floored at ``floor``, and ``α_c`` = the largest margin of the cluster's own points."""
    x = x.double()
    labels = torch.unique(labels, return_inverse=True)[1]
    k = int(labels.max()) + 1
    onehot = F.one_hot(labels, k).double()
    counts = onehot.sum(0)
    mu = onehot.T @ x / counts[:, None]
    dev = (x - mu[labels]).square()
    var = onehot.T @ dev / (counts - 1).clamp(min=1)[:, None]
    floor = torch.as_tensor(floor, dtype=x.dtype, device=x.device)
    sigma = torch.maximum(var.sqrt(), floor)
    n_floored = (var.sqrt() < floor).sum(1)
    boxes = Cube(mu, sigma, floor.expand(k), n_floored, int(x.shape[0]))
    own = normalized_distance(x.unsqueeze(1), boxes).gather(1, labels[:, None]).squeeze(1)
    alphas = torch.zeros(k, dtype=x.dtype, device=x.device).scatter_reduce(
        0, labels, own, reduce="amax", include_self=True
    )
    return boxes, alphas


def _nearest_is_forget(
    points: Float[Tensor, "p d"],
    ref: Float[Tensor, "r d"],
    n_forget: int,
    exclude: Int[Tensor, "p e"] | None,
) -> Tensor:
    """Whether each point's nearest reference vector is one of the first ``n_forget``."""
    out = []
    step = max(1, (1 << 22) // max(ref.shape[0], 1))
    for start in range(0, points.shape[0], step):
        dist = torch.cdist(points[start : start + step], ref)
        if exclude is not None:
            dist.scatter_(1, exclude[start : start + step], math.inf)
        out.append(dist.argmin(1) < n_forget)
    return torch.cat(out)


# ------------------------------------------------------------------------------ the analysis
@dataclass
class ConvexityResult:
    """What :func:`convexity` measured, as tables.

    Attributes:
        forget: name of the forget skill.
        others: names of the other skills.
        layers: the model layers analysed.
        per_layer: one row per layer: ``segment_forget_rate`` (segment points, all ``t``, whose
            nearest neighbour is a forget key), ``midpoint_forget_rate`` (t = 0.5, or the ``t``
            nearest to it), ``baseline_forget_rate`` (the forget keys' own leave-one-out rate),
            ``chance_rate`` (share of forget keys among all keys), ``n_segments``.
        segments: the segment rate per ``t``: ``layer, t, forget_rate, n_points``.
        separability: one row per (layer, other): ``accuracy`` and ``balanced_accuracy`` on
            the held-out parts, ``train_accuracy``, ``majority_baseline`` (held-out accuracy of
            always answering the larger class), ``n_fit``, ``n_test``.
        boxes: one row per (layer, k, sizing, other): ``k`` boxes requested, ``n_boxes``
            non-empty; ``sizing`` is ``"h"`` (each box at ``h × its k_min``) or ``"matched"``
            (the multiplier giving held-out forget inclusion ≥ ``target``; chosen on the
            held-out keys, so an oracle comparison at equal recall); ``multiplier``;
            ``forget_fit_inclusion``; ``forget_heldout_inclusion``; ``false_positive_rate``
            (share of the other skill's keys inside the union; ``other`` is that skill).
        settings: the arguments.
    """

    forget: str
    others: list[str]
    layers: list[int]
    per_layer: pd.DataFrame
    segments: pd.DataFrame
    separability: pd.DataFrame
    boxes: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"ConvexityResult(forget={self.forget!r}, others={self.others}, "
            f"layers={len(self.layers)}, ks={self.settings.get('ks')})"
        )


def convexity(
    keys_f: KeyVectors,
    others: Mapping[str, KeyVectors],
    *,
    layers: int | Sequence[int] | None = None,
    test_size: float | int = 0.5,
    seed: int = 0,
    n_pairs: int = 256,
    ts: Sequence[float] = (0.25, 0.5, 0.75),
    ks: Sequence[int] = (1, 2, 4, 8),
    h: float = 1.0,
    target: float = 0.9,
    l2: float = 1e-2,
    max_iter: int = 100,
    n_init: int = 8,
    rel_floor: float = REL_FLOOR,
    abs_floor: float = ABS_FLOOR,
) -> ConvexityResult:
    """Convexity and separability of the forget skill's key region, layer by layer.

    The forget keys are split as in :func:`~mechunlearn.analysis.hypercube.hypercube`
    (``keys_f.split(test_size, seed)``); each other skill is split the same way for the
    classifier. Segments use every forget key.

    Args:
        keys_f: key vectors of the forget skill (``mu.collect_keys``).
        others: ``{name: KeyVectors}`` of the other skills (same model and layers), each with
            at least 2 examples.
        layers: model layers to analyse (default: every collected layer).
        test_size: held-out fraction (float) or count (int).
        seed: seed of the splits, the pairs and k-means.
        n_pairs: random pairs of distinct forget keys per layer.
        ts: positions on each segment, strictly between 0 and 1.
        ks: numbers of boxes to compare (k = 1 is KSD's single cube); a k above the number of
            fit keys is skipped with a warning.
        h: box multiplier for the ``"h"`` sizing (KSD's ``h``).
        target: held-out forget inclusion of the ``"matched"`` sizing.
        l2: L2 strength of the logistic regression (see :func:`fit_logistic`).
        max_iter: L-BFGS iterations.
        n_init: k-means restarts (k-means++ seeding, best inertia kept). Clustering is done
            on the fit keys standardised by their own mean and σ.
        rel_floor, abs_floor: the σ floor (see :func:`~mechunlearn.analysis.hypercube.fit_cube`).

    Returns:
        A :class:`ConvexityResult`.

    Raises:
        ValueError: empty ``others``, fewer than 4 forget or 2 other examples, key vectors of
            different models or layers, non-finite values, bad ``ts``/``ks``/``target``.

    Example:
        >>> res = mu.analysis.convexity(keys_f, others={"copy": keys_r}, ks=(1, 2, 4))
        >>> res.separability[["layer", "other", "balanced_accuracy"]]  # tiny model: disjoint
           layer other  balanced_accuracy
        0      0  copy                1.0
        1      1  copy                1.0
        2      2  copy                1.0
        >>> fig = mu.plots.plot_convexity(res)
    """
    what = "convexity()"
    ts_t, ks = _checked_grid(ts, ks, h, target, n_pairs)
    layers, others = prepare_keys(keys_f, others, layers, 4, 2, what)
    keys_f = select_layers(keys_f, layers)
    fit, test, _, _ = split_forget(keys_f, test_size, seed, what)
    other_splits = {}
    for name, kv in others.items():
        try:
            other_splits[name] = kv.split(test_size, seed)
        except ValueError as err:
            raise ValueError(f"{what}: others[{name!r}]: {err}") from None
    too_big = [k for k in ks if k > len(fit)]
    if too_big:
        warnings.warn(
            f"{what}: skipping k={too_big}: only {len(fit)} forget keys to cluster.", stacklevel=2
        )
        ks = [k for k in ks if k <= len(fit)]
    name_f = str(keys_f.meta.get("skill", "forget"))
    pairs = _random_pairs(len(keys_f), n_pairs, seed, keys_f.values.device)

    layer_rows, seg_rows, sep_rows, box_rows = [], [], [], []
    for col, layer in enumerate(layers):
        xf = keys_f.values[:, col].double()
        xo = [kv.values[:, col].double() for kv in others.values()]
        layer_row, rows = _segments(xf, xo, pairs, ts_t, layer, rel_floor, abs_floor)
        layer_rows.append(layer_row)
        seg_rows += rows
        ff, tf = fit.values[:, col].double(), test.values[:, col].double()
        splits = {
            name: (fo.values[:, col].double(), to.values[:, col].double())
            for name, (fo, to) in other_splits.items()
        }
        sep_rows += _separability(ff, tf, splits, layer, l2, max_iter, rel_floor, abs_floor)
        others_col = {name: kv.values[:, col] for name, kv in others.items()}
        box_rows += _box_unions(
            ff, tf, others_col, layer, ks, h, target, n_init, seed, rel_floor, abs_floor
        )

    return ConvexityResult(
        forget=name_f,
        others=list(others),
        layers=list(layers),
        per_layer=pd.DataFrame(layer_rows),
        segments=pd.DataFrame(seg_rows),
        separability=pd.DataFrame(sep_rows),
        boxes=pd.DataFrame(box_rows),
        settings={
            "test_size": test_size,
            "seed": seed,
            "n_pairs": n_pairs,
            "ts": ts_t.tolist(),
            "ks": list(ks),
            "h": h,
            "target": target,
            "l2": l2,
            "model": keys_f.meta.get("model"),
        },
    )


def _checked_grid(
    ts: Sequence[float], ks: Sequence[int], h: float, target: float, n_pairs: int
) -> tuple[Float[Tensor, " t"], list[int]]:
    """:func:`convexity`'s positions (float64) and sorted distinct box counts, checked with
    ``h``, ``target`` and ``n_pairs``."""
    ts_t = torch.as_tensor(list(ts), dtype=torch.float64).reshape(-1)
    if ts_t.numel() == 0 or not bool(((ts_t > 0) & (ts_t < 1)).all()):
        raise ValueError(f"ts must be positions strictly between 0 and 1, got {list(ts)}.")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive numbers of boxes, got {ks}.")
    if not 0 < target <= 1 or h <= 0 or n_pairs < 1:
        raise ValueError(
            f"Need 0 < target <= 1, h > 0, n_pairs >= 1 (got {target}, {h}, {n_pairs})."
        )
    return ts_t, ks


def _random_pairs(n_f: int, n_pairs: int, seed: int, device: torch.device) -> Int[Tensor, "p 2"]:
    """``n_pairs`` random pairs of distinct forget keys (the same for every layer)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(n_f, (n_pairs,), generator=gen)
    b = torch.randint(n_f - 1, (n_pairs,), generator=gen)
    b = b + (b >= a).long()
    return torch.stack([a, b], 1).to(device)


def _segments(
    xf: Float[Tensor, "n_f d"],
    xo: Sequence[Float[Tensor, "n_o d"]],
    pairs: Int[Tensor, "p 2"],
    ts_t: Float[Tensor, " t"],
    layer: int,
    rel_floor: float,
    abs_floor: float,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One layer's segment test: the layer's row and one row per position ``t``.

    Keys are standardised by the pooled cube of every skill's keys; a point of a segment
    between two forget keys counts as forget when its nearest key (the two ends left out) is a
    forget key; the baseline is the same test for each forget key, itself left out.
    """
    device = xf.device
    n_f, n_pairs = len(xf), len(pairs)
    pool = torch.cat([xf, *xo])
    pooled = fit_cube(pool, rel_floor, abs_floor)
    z = (pool - pooled.mu) / pooled.sigma
    zf = z[:n_f]
    t = ts_t.to(device)[:, None, None]
    points = ((1 - t) * zf[pairs[:, 0]] + t * zf[pairs[:, 1]]).reshape(-1, z.shape[1])
    exclude = pairs.repeat(len(ts_t), 1)
    on_f = _nearest_is_forget(points, z, n_f, exclude).reshape(len(ts_t), n_pairs).double()
    self_idx = torch.arange(n_f, device=device)[:, None]
    loo = _nearest_is_forget(zf, z, n_f, self_idx).double()
    rows = [
        {"layer": layer, "t": tv, "forget_rate": float(on_f[i].mean()), "n_points": n_pairs}
        for i, tv in enumerate(ts_t.tolist())
    ]
    mid = int((ts_t - 0.5).abs().argmin())
    layer_row = {
        "layer": layer,
        "segment_forget_rate": float(on_f.mean()),
        "midpoint_forget_rate": float(on_f[mid].mean()),
        "baseline_forget_rate": float(loo.mean()),
        "chance_rate": n_f / z.shape[0],
        "n_segments": n_pairs,
    }
    return layer_row, rows


def _separability(
    ff: Float[Tensor, "n_fit d"],
    tf: Float[Tensor, "n_test d"],
    splits: Mapping[str, tuple[Float[Tensor, "m d"], Float[Tensor, "k d"]]],
    layer: int,
    l2: float,
    max_iter: int,
    rel_floor: float,
    abs_floor: float,
) -> list[dict[str, Any]]:
    """One layer's linear separability: a logistic regression per other skill, fitted on the
    fit halves (standardised by their cube), scored on the held-out halves."""
    device = ff.device
    rows = []
    for name, (fo, to) in splits.items():
        x_fit = torch.cat([ff, fo])
        y_fit = torch.cat([torch.ones(len(ff)), torch.zeros(len(fo))]).to(device)
        x_test = torch.cat([tf, to])
        y_test = torch.cat([torch.ones(len(tf)), torch.zeros(len(to))]).to(device)
        scale = fit_cube(x_fit, rel_floor, abs_floor)
        w, bias = fit_logistic((x_fit - scale.mu) / scale.sigma, y_fit, l2, max_iter)
        pred_fit = ((x_fit - scale.mu) / scale.sigma) @ w + bias > 0
        pred = ((x_test - scale.mu) / scale.sigma) @ w + bias > 0
        correct = (pred == (y_test > 0.5)).double()
        rows.append(
            {
                "layer": layer,
                "other": name,
                "accuracy": float(correct.mean()),
                "balanced_accuracy": 0.5
                * (float(correct[: len(tf)].mean()) + float(correct[len(tf) :].mean())),
                "train_accuracy": float((pred_fit == (y_fit > 0.5)).double().mean()),
                "majority_baseline": max(len(tf), len(to)) / (len(tf) + len(to)),
                "n_fit": len(x_fit),
                "n_test": len(x_test),
            }
        )
    return rows


def _box_unions(
    ff: Float[Tensor, "n_fit d"],
    tf: Float[Tensor, "n_test d"],
    others: Mapping[str, Float[Tensor, "n_o d"]],
    layer: int,
    ks: Sequence[int],
    h: float,
    target: float,
    n_init: int,
    seed: int,
    rel_floor: float,
    abs_floor: float,
) -> list[dict[str, Any]]:
    """One layer's one box vs a union of k boxes (k-means on the standardised fit keys): the
    forget inclusion and the other skills' false positives, sized by ``h`` and matched to
    ``target``."""
    cube = fit_cube(ff, rel_floor, abs_floor)
    zfit = (ff - cube.mu) / cube.sigma
    rows = []
    for k in ks:
        labels = kmeans(zfit, k, n_init=n_init, seed=seed)[0]
        boxes, alphas = fit_boxes(ff, labels, cube.floor)
        r_fit = box_union_margin(ff, boxes, alphas)
        r_test = box_union_margin(tf, boxes, alphas)
        r_other = {name: box_union_margin(x, boxes, alphas) for name, x in others.items()}
        for sizing, mult in (("h", h), ("matched", quantile_alpha(r_test, target))):
            for name, r_o in r_other.items():
                rows.append(
                    {
                        "layer": layer,
                        "k": k,
                        "n_boxes": int(alphas.numel()),
                        "sizing": sizing,
                        "multiplier": mult,
                        "other": name,
                        "forget_fit_inclusion": float((r_fit <= mult).double().mean()),
                        "forget_heldout_inclusion": float((r_test <= mult).double().mean()),
                        "false_positive_rate": float((r_o <= mult).double().mean()),
                    }
                )
    return rows
