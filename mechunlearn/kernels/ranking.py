"""The choosing step of every hyperparameter search: rank scored candidates, those that keep a
floor first. :func:`mechunlearn.tuning.tune` fits and scores the candidates and calls it; an
estimator that scores its own candidates (LUNAR's ``layer="auto"``) calls it directly, so that one
rule chooses everywhere. Nothing here runs a model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

__all__ = ["rank_candidates"]


def rank_candidates(
    table: pd.DataFrame,
    floor: Mapping[str, float],
    order: Sequence[str | tuple[str, bool]],
) -> pd.DataFrame:
    """``table`` with ``meets_floor`` (every column of ``floor`` at or above its value; a NaN
    fails) and ``rank`` (1 = best): candidates that keep the floor first, then by ``order``
    (a column name sorts ascending, ``(name, False)`` descending; NaN last), ties by row.

    The choosing rule of :func:`mechunlearn.tuning.tune`, for a table scored elsewhere (LUNAR's
    layer choice, :func:`mechunlearn.interventions.lunar.choose_layer`, ranks its sweep with it).

    Example:
        >>> table = pd.DataFrame({"ratio": [0.01, 0.05, 0.2], "forget": [0.9, 0.4, 0.1],
        ...                       "keep": [1.0, 0.95, 0.5]})
        >>> rank_candidates(table, {"keep": 0.9}, ["forget"])["rank"].tolist()
        [2, 1, 3]

    Raises:
        ValueError: a column of ``floor`` or ``order`` the table lacks.
    """
    keys = [(o, True) if isinstance(o, str) else (o[0], bool(o[1])) for o in order]
    missing = [c for c in [*floor, *(k for k, _ in keys)] if c not in table.columns]
    if missing:
        raise ValueError(
            f"the search table has no column {missing[0]!r} to keep a floor on or to rank by: "
            f"its columns are {', '.join(map(str, table.columns))}."
        )
    table = table.copy()
    meets = pd.Series(True, index=table.index)
    for column, value in floor.items():
        meets &= table[column] >= value
    table["meets_floor"] = meets
    ranked = table.sort_values(
        ["meets_floor", *(k for k, _ in keys)],
        ascending=[False, *(a for _, a in keys)],
        kind="stable",
    )
    table["rank"] = 0
    table.loc[ranked.index, "rank"] = range(1, len(ranked) + 1)
    return table
