"""LUNAR's layer choice (``layer="auto"``): each candidate layer's edit scored on held-back
examples, and the rule that picks one. See :mod:`mechunlearn.interventions.lunar`, step 4."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import pandas as pd
from torch import Tensor

from ...data import Skill
from ...kernels.ranking import rank_candidates
from ...models import n_layers
from ...scoring import score_pass
from ...sites import hook_name, mlp_output_hook
from ..base import Hook

#: ``layer="auto"`` keeps only layers whose retain accuracy is at least this share of the base.
RETAIN_FLOOR = 0.95


def every_third_layer(model) -> list[int]:
    """A cheap candidate set for ``Lunar(layer="auto")``: layers 2, 5, 8, ... of ``model``.

    Each candidate costs two teacher-forced passes over the held-back examples, so
    ``Lunar(layer="auto")`` sweeps every third layer unless given ``candidates``.

    Example:
        >>> from mechunlearn.interventions.lunar import every_third_layer
        >>> every_third_layer(model), model.cfg.n_layers
        ([2], 3)
    """
    return list(range(2, n_layers(model), 3))


def choose_layer(sweep: Sequence[dict[str, Any]], retain_floor: float = RETAIN_FLOOR) -> int:
    """The layer of a sweep that lowers the forget accuracy most while the retain skill keeps
    ``retain_floor`` of its base accuracy.

    Args:
        sweep: one dict per candidate layer with ``layer``, ``forget`` and ``retain``
            (accuracies with the redirection) and ``retain_base`` (without), as in
            :attr:`Lunar.layer_sweep_`.
        retain_floor: the share of the base retain accuracy a layer must keep.

    Returns:
        Among the layers with ``retain >= retain_floor * retain_base``, the one with the lowest
        forget accuracy (ties: the larger share ``retain / retain_base`` kept, then the earlier
        layer). If no layer qualifies, a warning, and the layer that keeps the largest share
        (ties: lower forget accuracy, then the earlier layer). Each row's ``retain`` is that
        of its own worst kept skill, so layers are compared by shares, not raw scores.

    Example:
        >>> rows = [dict(layer=0, forget=0.1, retain=0.5, retain_base=0.9),
        ...         dict(layer=1, forget=0.3, retain=0.88, retain_base=0.9)]
        >>> choose_layer(rows)
        1
    """
    if not sweep:
        raise ValueError("The sweep is empty: there is no layer to choose.")
    # The package's one choosing rule (rank_candidates, as mechunlearn.tuning.tune): the floor is
    # on retain - retain_floor * retain_base >= 0, which is retain >= retain_floor * retain_base
    # exactly (a float difference is zero only between equal floats, and keeps the sign).
    # Ties and the fallback compare the share of its base a layer keeps (each row's retain is
    # that of its own worst kept skill, so raw scores of different skills are not comparable).
    table = pd.DataFrame(
        {
            "layer": [row["layer"] for row in sweep],
            "forget": [row["forget"] for row in sweep],
            "kept": [kept_share(row["retain"], row["retain_base"]) for row in sweep],
            "margin": [row["retain"] - retain_floor * row["retain_base"] for row in sweep],
        }
    )
    ranked = rank_candidates(table, {"margin": 0.0}, ["forget", ("kept", False), "layer"])
    if ranked["meets_floor"].any():
        return int(sweep[int(ranked["rank"].idxmin())]["layer"])
    ranked = rank_candidates(table, {}, [("kept", False), "forget", "layer"])
    best = sweep[int(ranked["rank"].idxmin())]
    worst = best.get("worst_retain")
    skill = f"its worst kept skill, {worst!r}" if worst else "the kept skill"
    warnings.warn(
        f"No layer keeps {retain_floor:.0%} of every kept skill's accuracy with the edit; "
        f"layer {best['layer']} keeps the most: {best['retain']:.3f} of "
        f"{best['retain_base']:.3f} on {skill}. Consider a smaller coef.",
        stacklevel=3,
    )
    return int(best["layer"])


def kept_share(after: float, before: float) -> float:
    """The share of its base score a kept skill keeps (1 where the base is 0 and nothing fell)."""
    return after / before if before > 0 else (1.0 if after >= before else 0.0)


# ------------------------------------------------------------------------------ the sweep
class _Edit:
    """One candidate layer's edit for the layer sweep, as hooks: ``+ key @ delta`` at
    the MLP's output (every position, as the weight edit)."""

    def __init__(self, layer: int, delta: Tensor):
        self.layer, self.delta = layer, delta

    def hooks(self, model=None) -> list[Hook]:
        slot: dict[str, Tensor] = {}

        def record(activation: Tensor, hook=None) -> Tensor:
            slot["key"] = activation
            return activation

        def add(activation: Tensor, hook=None) -> Tensor:
            delta = self.delta.to(activation.device, activation.dtype)
            return activation + slot.pop("key").to(activation.dtype) @ delta

        return [
            (hook_name("key", self.layer), record),
            (mlp_output_hook(model, self.layer), add),
        ]


def _sweep(
    model, edits: dict[int, Tensor], probe_f: Skill, probe_rs: Sequence[Skill], batch_size: int
):
    """Score each candidate layer's edit on the held-back examples. With several kept skills,
    ``retain``/``retain_base`` are those of the kept skill that keeps the smallest share of its
    base score at that layer (so ``choose_layer``'s floor holds for every kept skill), and each
    kept skill has its own ``retain[<name>]`` and ``retain_base[<name>]``."""

    def scored(skill: Skill, hooks: list[Hook]):
        return score_pass(model, skill, hooks, batch_size, quiet=True)[0]

    base_f = scored(probe_f, [])
    base_rs = [scored(probe_r, []) for probe_r in probe_rs]
    rows = []
    for layer, delta in edits.items():
        hooks = _Edit(layer, delta.float()).hooks()
        sf = scored(probe_f, hooks)
        srs = [scored(probe_r, hooks) for probe_r in probe_rs]
        worst = min(range(len(srs)), key=lambda i: (kept_share(srs[i].score, base_rs[i].score), i))
        row = {
            "layer": layer,
            "forget": sf.score,
            "retain": srs[worst].score,
            "forget_base": base_f.score,
            "retain_base": base_rs[worst].score,
            "forget_nll": sf.mean_nll,
            "retain_nll": srs[worst].mean_nll,
            "delta_norm": float(delta.norm()),
            "n_probe_forget": len(probe_f),
            "n_probe_retain": len(probe_rs[worst]),
        }
        if len(probe_rs) > 1:
            row["worst_retain"] = probe_rs[worst].name
            for probe_r, sr, br in zip(probe_rs, srs, base_rs, strict=True):
                row[f"retain[{probe_r.name}]"] = sr.score
                row[f"retain_base[{probe_r.name}]"] = br.score
        rows.append(row)
    for row in rows:
        row["eligible"] = bool(row["retain"] >= RETAIN_FLOOR * row["retain_base"])
    return rows
