"""Fits that need the model in the loop: iterative pruning and Neuron Adjust's automatic ratio.

Estimators fit on collected statistics only (:mod:`mechunlearn.interventions`); the helpers here
drive collection and scoring around them:

* :func:`prune_iteratively`: Selective Pruning ``step`` at a time, the importances measured
  again on the pruned model between steps (the SP paper's iterative schedule).
* :func:`tune_neuron_adjust`: Neuron Adjust's ratio chosen on held-back **probe** examples
  (never the scored ones): the ratio with the largest effect on the forget skill whose kept
  skills all stay at or above a floor of their base score (the paper's open question 1).

Example:
    >>> forget_probe, forget_heldback = forget.split(0.5)
    >>> retain_probe, retain_heldback = retain.split(0.5)
    >>> sp = prune_iteratively(model, forget_probe, retain_probe, ratio=0.06, step=0.02)
    >>> len(sp.history_)                             # 3 steps of 2 %
    3
    >>> stats_f = mu.collect(model, forget_probe, quiet=True)
    >>> stats_r = mu.collect(model, retain_probe, quiet=True)
    >>> na = tune_neuron_adjust(model, stats_f, stats_r, forget_heldback, {"copy": retain_heldback})
    >>> list(na.tuning_.columns)                     # the sweep it chose from
    ['ratio', 'n_selected', 'forget', 'copy', 'meets_floor', 'chosen']
    >>> int(na.tuning_["chosen"].sum())
    1
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from .collect import as_skill, collect_importance
from .evaluation import teacher_forced
from .interventions import NeuronAdjust, SelectivePruning
from .models import d_mlp
from .validation import check_fraction, check_probability, resolve_layers

#: Ratios :func:`tune_neuron_adjust` tries by default (0.5 % to 20 %).
NA_RATIOS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2)


def prune_iteratively(
    model,
    forget,
    retain,
    ratio: float = 0.06,
    step: float = 0.02,
    eps: float = 1e-6,
    layers: int | Sequence[int] | None = None,
    batch_size: int = 16,
) -> SelectivePruning:
    """Selective Pruning ``step`` at a time until ``ratio`` of all neurons are pruned.

    Each step measures ``mean |x|`` on both skills with the current pruning attached
    (:func:`mechunlearn.collect_importance` with its hooks), then prunes the next ``step``
    (:meth:`SelectivePruning.fit` with ``pruned=``). The result's ``history_`` has one entry per
    step.

    Args:
        model: the model.
        forget, retain: Skills (or lists of texts).
        ratio: total fraction to prune, in (0, 1].
        step: fraction pruned per step, in (0, 1].
        eps: as for :class:`~mechunlearn.interventions.SelectivePruning`.
        layers: layers to prune in (None: all).
        batch_size: examples per forward pass.

    Returns:
        The fitted SelectivePruning.
    """
    ratio, step = check_fraction("ratio", ratio), check_fraction("step", step)
    if step > ratio:
        raise ValueError(
            f"step={step} is larger than ratio={ratio}: a step cannot prune more than the total; "
            "pass step <= ratio (step=ratio prunes everything in one step)."
        )
    forget, retain = as_skill(forget, "forget skill"), as_skill(retain, "retain skill")
    layers = resolve_layers(model, layers)
    total = len(layers) * d_mlp(model)
    target = max(1, round(ratio * total))
    current: SelectivePruning | None = None
    done = 0
    while done < target:
        k = min(max(1, round(step * total)), target - done)
        hooks = current.hooks(model) if current is not None else []
        kw = {"layers": layers, "batch_size": batch_size, "fwd_hooks": hooks}
        imp_f = collect_importance(model, forget, **kw)
        imp_r = collect_importance(model, retain, **kw)
        nxt = SelectivePruning(ratio=k / total, eps=eps).fit(imp_f, imp_r, pruned=current)
        added = int(nxt.selected_.sum()) - done
        current = nxt
        if added <= 0:
            break
        done += added
    assert current is not None
    current.ratio = done / total  # what was pruned in all (get_params and save reflect it)
    return current


def tune_neuron_adjust(
    model,
    stats_f,
    stats_r,
    forget,
    keep: Mapping[str, Any],
    ratios: Sequence[float] = NA_RATIOS,
    floor: float = 0.9,
    batch_size: int = 16,
    **params: Any,
) -> NeuronAdjust:
    """Neuron Adjust at the ratio with the largest effect on ``forget`` whose kept skills stay
    at or above ``floor`` of their base score, chosen on held-back probe examples.

    Every ratio is fitted on the same statistics and scored (teacher-forced) on ``forget`` and
    each kept skill relative to the bare model. Among the ratios whose every kept skill has
    relative performance ``>= floor``, the one with the lowest forget relative performance wins
    (ties: the smaller ratio). If none keeps the floor, the smallest ratio is returned, and
    ``tuning_`` shows why.

    Args:
        model: the model.
        stats_f, stats_r: as for :meth:`NeuronAdjust.fit` (one or several retain statistics).
        forget: held-back forget examples (a part of the probe data the statistics were NOT
            collected on, never the examples you will score).
        keep: ``{name: held-back examples}`` of the skills to keep.
        ratios: ratios to try.
        floor: the kept skills' relative performance must stay at or above it, in (0, 1).
        batch_size: examples per forward pass.
        **params: other NeuronAdjust hyperparameters (score, mode, seed, adjust_bos).

    Returns:
        The fitted NeuronAdjust with ``tuning_`` (a DataFrame: ratio, n_selected, relative
        performance per skill, ``meets_floor``, ``chosen``).
    """
    floor = check_probability("floor", floor)
    if not ratios:
        raise ValueError("ratios is empty: give the ratios to try.")
    ratios = sorted(check_fraction("ratio", r) for r in ratios)
    forget = as_skill(forget, "forget skill")
    if not keep:
        raise ValueError("keep is empty: give held-back examples of at least one kept skill.")
    taken = sorted({"forget", "ratio", "n_selected", "meets_floor", "chosen"} & set(keep))
    if taken:
        raise ValueError(
            f"keep names a skill {taken[0]!r}, which is a column of the tuning table: rename it."
        )
    keep = {name: as_skill(s, f"kept skill {name!r}") for name, s in keep.items()}
    base = {"forget": teacher_forced(model, forget, batch_size=batch_size).score}
    base.update({n: teacher_forced(model, s, batch_size=batch_size).score for n, s in keep.items()})
    rows, fitted = [], {}
    for ratio in ratios:
        na = NeuronAdjust(ratio=ratio, **params).fit(stats_f, stats_r)
        fitted[ratio] = na
        row: dict[str, Any] = {"ratio": ratio, "n_selected": sum(na.n_selected_)}
        for name, skill in [("forget", forget), *keep.items()]:
            score = teacher_forced(model, skill, na, batch_size=batch_size).score
            row[name] = score / base[name] if base[name] else math.nan
        row["meets_floor"] = all(row[n] >= floor for n in keep)
        rows.append(row)
    table = pd.DataFrame(rows)
    ok = table[table["meets_floor"]]
    chosen = float(ok.sort_values(["forget", "ratio"]).iloc[0]["ratio"]) if len(ok) else ratios[0]
    table["chosen"] = table["ratio"] == chosen
    na = fitted[chosen]
    na.tuning_ = table
    return na
