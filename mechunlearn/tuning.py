"""Fits that need the model in the loop: the tuning rule, iterative pruning, NA's ratio.

Estimators fit on collected statistics only (:mod:`mechunlearn.interventions`); the helpers here
drive collection and scoring around them:

* :func:`tune`: **the** rule for choosing a hyperparameter on held-back probe data under a floor
  (NA's or SP's ratio, a detector's ``fpr``, LUNAR's layer, a study's detector): every
  candidate setting is fitted and scored, and the strongest effect on the forget skill whose
  kept skills all stay at or above a floor of their base score wins (a :class:`Search` with
  ``best_`` and the table of candidates). :func:`rank_candidates`
  (:mod:`mechunlearn.kernels.ranking`, re-exported here) is its choosing step alone, for a table
  scored elsewhere: LUNAR's layer choice uses it.
* :func:`prune_iteratively`: Selective Pruning ``step`` at a time, the importances measured
  again on the pruned model between steps (the SP paper's iterative schedule).
* :func:`tune_neuron_adjust`: :func:`tune` over Neuron Adjust's ratio on held-back **probe**
  examples (never the scored ones), the chosen NeuronAdjust returned with its ``tuning_`` table
  (the paper's open question 1).

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import product
from typing import Any

import pandas as pd

from .collect import as_skill, collect_importance, collect_keys
from .evaluation import teacher_forced, watched_scores
from .interventions import Detector, NeuronAdjust, SelectivePruning, get_method
from .kernels.ranking import rank_candidates
from .models import d_mlp
from .scoring import ExampleScores
from .stats import KeyVectors
from .validation import check_choice, check_fraction, check_probability, resolve_layers

#: Ratios :func:`tune_neuron_adjust` tries by default (0.5 % to 20 %).
NA_RATIOS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2)


#: Columns :func:`tune` adds to a search table (a score or setting may not take these names).
SEARCH_COLUMNS = ("meets_floor", "rank", "chosen")
#: What :func:`tune` does when no candidate keeps the floor.
FALLBACKS = ("first", "best", "raise")


@dataclass
class Search:
    """What :func:`tune` found (sklearn's ``*SearchCV`` naming).

    Attributes:
        best_: the chosen candidate, fitted.
        best_params_: its settings.
        best_index_: its position among the candidates (the table's row).
        table_: one row per candidate, in the candidates' order: the settings, the scores,
            ``meets_floor``, ``rank`` (1 = best: candidates that keep the floor first, then by
            ``order``, ties by position) and ``chosen``.
        fitted_: every candidate's estimator, fitted (aligned with the table's rows).
    """

    best_: Any
    best_params_: dict[str, Any]
    best_index_: int
    table_: pd.DataFrame
    fitted_: list[Any]

    def __repr__(self) -> str:
        return (
            f"Search(best_params_={self.best_params_}, best_index_={self.best_index_}, "
            f"{len(self.table_)} candidates, {int(self.table_['meets_floor'].sum())} keep the "
            "floor)"
        )


def candidate_settings(candidates: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]):
    """The list of settings a search tries: a grid ``{setting: values}`` expanded in order (the
    last setting varies fastest), or a list of settings dicts as given.

    Example:
        >>> candidate_settings({"ratio": [0.01, 0.1], "mode": ["reflect", "map"]})[:2]
        [{'ratio': 0.01, 'mode': 'reflect'}, {'ratio': 0.01, 'mode': 'map'}]
        >>> candidate_settings([{"layer": 2}, {"layer": 5}])
        [{'layer': 2}, {'layer': 5}]

    Raises:
        ValueError: no candidate, or a setting with no values.
    """
    if isinstance(candidates, Mapping):
        empty = [name for name, values in candidates.items() if not list(values)]
        if not candidates or empty:
            raise ValueError(
                f"candidates has no values for {empty[0]!r}: give at least one value per setting."
                if empty
                else "candidates is empty: give the settings to try, e.g. {'ratio': [0.01, 0.1]}."
            )
        names = list(candidates)
        out = [dict(zip(names, combo, strict=True)) for combo in product(*candidates.values())]
    else:
        out = [dict(c) for c in candidates]
        if not out:
            raise ValueError("candidates is empty: give the settings to try.")
    return out


def relative_scorer(
    model, forget, keep: Mapping[str, Any], batch_size: int = 16
) -> Callable[[Any], dict[str, float]]:
    """The default score of :func:`tune`: teacher-forced relative performance (score with the
    intervention / bare score) on ``forget`` and on each kept skill.

    The bare scores are computed once, at the first call (a caller that ends up scoring
    nothing, such as a resumed search, never pays for them). A detector that reads key vectors
    (:meth:`~mechunlearn.interventions.Detector.key_layers`) only watches, so it is scored as
    :func:`mechunlearn.evaluate` scores it: the bare per-example results with its abstentions
    zeroed, its abstentions read from key vectors collected once per set of layers and shared
    by every later candidate (a detector's candidates differ in their thresholds; no forward
    pass of their own).

    Args:
        model: the model.
        forget: held-back forget examples (never the ones you will report).
        keep: ``{name: held-back examples}`` of the skills to keep (not named ``forget``).
        batch_size: examples per forward pass.

    Returns:
        ``score(intervention) -> {"forget": ..., name: ...}`` (NaN where a bare score is 0).

    Raises:
        ValueError: no kept skill, or one named ``forget``.
    """
    forget = as_skill(forget, "forget skill")
    if not keep:
        raise ValueError("keep is empty: give held-back examples of at least one kept skill.")
    if "forget" in keep:
        raise ValueError("keep names a skill 'forget', the forget skill's column: rename it.")
    skills = {"forget": forget}
    skills.update({name: as_skill(s, f"kept skill {name!r}") for name, s in keep.items()})
    base: dict[str, ExampleScores] = {}
    keys: dict[tuple[int, ...], dict[str, KeyVectors]] = {}  # per set of layers, per skill

    def scores(intervention, name: str) -> ExampleScores:
        layers = intervention.key_layers() if isinstance(intervention, Detector) else None
        if layers is None:
            return teacher_forced(model, skills[name], intervention, batch_size=batch_size)
        read = keys.setdefault(tuple(layers), {})
        if name not in read:
            read[name] = collect_keys(
                model, skills[name], layers=layers, batch_size=batch_size, quiet=True
            )
        return watched_scores(model, skills[name], intervention, base[name], read[name])

    def score(intervention) -> dict[str, float]:
        if not base:
            base.update({n: teacher_forced(model, s, batch_size=batch_size)
                         for n, s in skills.items()})  # fmt: skip
        out = {}
        for name in skills:
            value = scores(intervention, name).score
            out[name] = value / base[name].score if base[name].score else math.nan
        return out

    return score


def tune(
    method: str | Callable[..., Any],
    candidates: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
    fit: Callable[[Any], Any],
    score: Callable[[Any], Mapping[str, float]] | None = None,
    *,
    model=None,
    forget=None,
    keep: Mapping[str, Any] | None = None,
    floor: float | Mapping[str, float] = 0.9,
    order: Sequence[str | tuple[str, bool]] = ("forget",),
    fallback: str = "first",
    batch_size: int = 16,
    seed: int | None = None,
    **params: Any,
) -> Search:
    """Choose a hyperparameter on held-back probe data under a floor: the one tuning rule of
    the package and the studies.

    Every candidate setting is made (``method``), fitted (``fit``) and scored (``score``);
    among the candidates whose floor columns all stay at or above their floor, the first by
    ``order`` wins (ties: the earlier candidate). By default the score is the relative
    performance on held-back ``forget`` and ``keep`` examples (:func:`relative_scorer`), the
    floor applies to every kept skill and the lowest forget score wins: the largest effect on
    the forget skill that keeps every kept skill at ``floor`` of its base score. Score the
    candidates on examples you will not report (a part of the probe data).

    Args:
        method: a registered method name (:func:`mechunlearn.methods`; its run defaults and
            ``seed`` apply) or a factory called as ``method(**settings, **params)`` (a class).
        candidates: the settings to try: ``{"ratio": [0.01, 0.1]}`` (a grid) or
            ``[{"layer": 2}, {"layer": 5}]`` (:func:`candidate_settings`).
        fit: fits one made estimator and returns it, e.g. ``lambda na: na.fit(stats_f,
            stats_r)``, ``lambda det: det.fit(keys_f, negatives)``.
        score: ``fitted -> {column: number}``; None: :func:`relative_scorer` on ``model``,
            ``forget`` and ``keep``.
        model, forget, keep: the model and the held-back examples of the default score.
        floor: a number (every kept skill's column, default score only) or ``{column:
            floor}``.
        order: the columns that rank the candidates keeping the floor (ascending; ``(column,
            False)`` descending).
        fallback: when no candidate keeps the floor: ``"first"`` the first candidate (the
            mildest when they go from mild to strong), ``"best"`` the first by ``order``, or
            ``"raise"`` a ValueError. The table shows why either way.
        batch_size: examples per forward pass of the default score.
        seed: passed to a registered method that takes one, and to a factory (unless a
            candidate sets it).
        **params: settings every candidate shares.

    Returns:
        A :class:`Search`: ``best_`` (fitted), ``best_params_``, ``table_``.

    Raises:
        ValueError: no candidate, a score column named like a setting or one of
            :data:`SEARCH_COLUMNS`, a floor or order column no score gives, a bad ``fallback``,
            the default score without ``model``/``forget``/``keep``, or (``fallback="raise"``)
            no candidate keeping the floor.

    Example:
        >>> search = tune("NA", {"ratio": [0.01, 0.2]}, lambda na: na.fit(stats_f, stats_r),
        ...               model=model, forget=forget[20:], keep={"copy": retain[20:]})
        >>> list(search.table_.columns)
        ['ratio', 'forget', 'copy', 'meets_floor', 'rank', 'chosen']
        >>> search.best_.ratio == search.best_params_["ratio"]
        True
    """
    check_choice(fallback, FALLBACKS, "fallback")
    settings = candidate_settings(candidates)
    if score is None:
        if model is None or forget is None or keep is None:
            raise ValueError(
                "give model, forget and keep (held-back examples) for the default score, or "
                "your own score=."
            )
        score = relative_scorer(model, forget, keep, batch_size=batch_size)
        if not isinstance(floor, Mapping):
            floor = {name: check_probability("floor", floor) for name in keep}
    elif not isinstance(floor, Mapping):
        raise ValueError(
            "with your own score=, give floor as {column: value} (which columns must keep it)."
        )
    if isinstance(method, str):
        spec = get_method(method)

        def make(s: Mapping[str, Any]) -> Any:
            return spec.make({**params, **s}, seed=seed)
    elif callable(method):

        def make(s: Mapping[str, Any]) -> Any:
            kwargs = {**params, **s}
            if seed is not None:
                kwargs.setdefault("seed", seed)
            return method(**kwargs)
    else:
        raise ValueError(f"method must be a registered name or a factory, got {method!r}.")
    rows, fitted = [], []
    setting_names = list(dict.fromkeys(k for s in settings for k in s))
    for s in settings:
        estimator = fit(make(s))
        scores = dict(score(estimator))
        clash = sorted((set(scores) & set(setting_names)) | (set(scores) & set(SEARCH_COLUMNS)))
        if clash:
            raise ValueError(
                f"a score is named {clash[0]!r}, which is a setting or a column of the search "
                "table: rename it."
            )
        rows.append({**s, **scores})
        fitted.append(estimator)
    table = rank_candidates(pd.DataFrame(rows), floor, order)
    best = int(table["rank"].idxmin())
    if not table["meets_floor"].any():
        if fallback == "raise":
            raise ValueError(
                f"no candidate keeps the floor {dict(floor)}:\n{table.to_string(index=False)}"
            )
        if fallback == "first":
            best = 0
    table["chosen"] = table.index == best
    return Search(fitted[best], dict(settings[best]), best, table, fitted)


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

    :func:`tune` over ``ratios``: every ratio is fitted on the same statistics and scored
    (teacher-forced, :func:`relative_scorer`) on ``forget`` and each kept skill relative to the
    bare model. Among the ratios whose every kept skill has relative performance ``>= floor``,
    the one with the lowest forget relative performance wins (ties: the smaller ratio). If none
    keeps the floor, the smallest ratio is returned (``fallback="first"``), and ``tuning_``
    shows why.

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
    if not keep:
        raise ValueError("keep is empty: give held-back examples of at least one kept skill.")
    taken = sorted({"forget", "ratio", "n_selected", *SEARCH_COLUMNS} & set(keep))
    if taken:
        raise ValueError(
            f"keep names a skill {taken[0]!r}, which is a column of the tuning table: rename it."
        )
    relative = relative_scorer(model, forget, keep, batch_size=batch_size)
    search = tune(
        NeuronAdjust,
        {"ratio": ratios},
        lambda na: na.fit(stats_f, stats_r),
        lambda na: {"n_selected": sum(na.n_selected_), **relative(na)},
        floor={name: floor for name in keep},
        order=("forget",),
        fallback="first",
        **params,
    )
    na = search.best_
    na.tuning_ = search.table_.drop(columns="rank")
    return na
