"""Validation helpers shared by the analysis modules.

Small and generic: they work on anything with ``meta`` and ``layers`` attributes
(:class:`~mechunlearn.collect.NeuronStats`, :class:`~mechunlearn.collect.KeyVectors`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

from ..collect import NeuronStats

_META_KEYS = ("model", "n_layers", "d_mlp", "d_model")


def check_stats(stats: Any, name: str = "stats") -> NeuronStats:
    """Return ``stats`` if it is a :class:`NeuronStats`, else raise a TypeError.

    Example:
        >>> check_stats(mu.collect(model, ["some text"]), "stats_f")
    """
    if not isinstance(stats, NeuronStats):
        raise TypeError(
            f"{name} must be NeuronStats (from mechunlearn.collect), got {type(stats).__name__}."
        )
    return stats


def check_same_source(a: Any, b: Any, names: Sequence[str] = ("first", "second")) -> None:
    """Raise a ValueError unless ``a`` and ``b`` come from the same model, site and layers.

    Compares the recorded model name and shape (``meta``: model, n_layers, d_mlp, d_model; a key
    missing from either side is not compared), the layers, the number of neurons per layer
    and, where both have one, the hook site. Different token positions only warn.

    Args:
        a, b: NeuronStats or KeyVectors (anything with ``meta`` and ``layers``).
        names: how to call them in the message, e.g. ``("stats_f", "stats_r")``.

    Example:
        >>> check_same_source(stats_f, stats_r, ("stats_f", "stats_r"))
    """
    na, nb = names
    for key in _META_KEYS:
        va, vb = a.meta.get(key), b.meta.get(key)
        if va is not None and vb is not None and va != vb:
            raise ValueError(
                f"{na} and {nb} come from different models: {key} is {va!r} vs {vb!r}. "
                "Collect both on the same model."
            )
    sa, sb = getattr(a, "site", None), getattr(b, "site", None)
    if sa is not None and sb is not None and sa != sb:
        raise ValueError(
            f"{na} has site={sa!r} but {nb} has site={sb!r}: collect both at the same site."
        )
    pa, pb = getattr(a, "positions", None), getattr(b, "positions", None)
    if pa is not None and pb is not None and pa != pb:
        warnings.warn(
            f"{na} counts positions={pa!r} but {nb} positions={pb!r}: the comparison mixes "
            "different token positions.",
            stacklevel=3,
        )
    if list(a.layers) != list(b.layers):
        raise ValueError(
            f"{na} holds layers {list(a.layers)} but {nb} holds {list(b.layers)}: use the same "
            "layers (e.g. NeuronStats.select_layers)."
        )
    da, db = getattr(a, "d_mlp", None), getattr(b, "d_mlp", None)
    if da is not None and db is not None and da != db:
        raise ValueError(f"{na} has {da} neurons per layer but {nb} has {db}.")


def check_alpha(alpha: float) -> float:
    """Return ``alpha`` as a float if ``0 < alpha < 1``, else raise a ValueError."""
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0 or math.isnan(alpha):
        raise ValueError(f"alpha (a significance level) must be in (0, 1), got {alpha}.")
    return alpha


def check_choice(value: str, choices: Sequence[str], what: str) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a ValueError naming them."""
    if value not in choices:
        raise ValueError(f"Unknown {what} {value!r}. Choose one of {list(choices)}.")
    return value
