"""The recovery table: one row per method and attack, the forget skill's number under it.

:func:`recovery_table` reads the four families' tables (``tables/attacks_<family>.csv`` of
``mechunlearn attack``) and keeps, for the **forget skill** only, one number per method and
attack with its interval where the family gives one:

==============  ==========================  ====================================================
family          ``attack``                  ``metric`` (``value [low, high]``)
==============  ==========================  ====================================================
prompts         the wrapper (``none`` ...)  ``relative``: method / bare model, same wrapper
relearning      ``forget k``, ``control k`` ``recovery`` after ``k`` steps: (attacked -
                                            unlearned) / (base - unlearned)
quantization    ``Q8``, ``Q4``              ``relative_quantized``: quantized method / bare
                                            model quantized the same way (``reference``: the
                                            method's relative score unquantized)
residual        ``probe``, ``lens``         the linear-probe accuracy (forget vs kept) and the
                                            logit-lens top-1 rate with the method in place, at
                                            the best of the layers whose states the method
                                            changes (every layer for a detector; ``reference``:
                                            the bare model on the same layers); no interval
==============  ==========================  ====================================================

:func:`recovery_markdown` pivots it to a method x attack Markdown table.

Example (the tables ``mechunlearn attack`` writes, ``<run>/tables/attacks_<family>.csv``):
    >>> prompts = pd.DataFrame(dict(
    ...     attack=["none", "comment"], skill="gsm8k", role="forget", method="NA",
    ...     kind="NeuronAdjust", relative=[0.9, 0.95], relative_low=[0.8, 0.9],
    ...     relative_high=[1.0, 1.0]))
    >>> recovery_table({"prompts": prompts})[["method", "attack", "metric"]].values.tolist()
    [['NA', 'none', 'relative'], ['NA', 'comment', 'relative']]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd

__all__ = ["COLUMNS", "recovery_markdown", "recovery_table"]

COLUMNS = ("method", "kind", "family", "attack", "metric", "value", "low", "high", "reference")
"""The columns of :func:`recovery_table`."""


def _forget(table: pd.DataFrame) -> pd.DataFrame:
    if "role" not in table.columns:
        raise ValueError("An attack table without a 'role' column: its forget rows are unknown.")
    return table[table["role"] == "forget"]


def _prompts(table: pd.DataFrame) -> list[dict]:
    return [
        dict(
            method=r.method,
            kind=r.kind,
            family="prompts",
            attack=r.attack,
            metric="relative",
            value=r.relative,
            low=r.relative_low,
            high=r.relative_high,
        )  # fmt: skip
        for r in _forget(table).itertuples()
    ]


def _relearning(table: pd.DataFrame) -> list[dict]:
    rows = _forget(table).sort_values(["train_on", "steps"], key=_forget_first, kind="stable")
    return [
        dict(method=r.method, kind=r.kind, family="relearning", attack=f"{r.train_on} {r.steps}",
             metric="recovery", value=r.recovery, low=r.recovery_low, high=r.recovery_high)
        for r in rows.itertuples()
    ]  # fmt: skip


def _forget_first(column: pd.Series) -> pd.Series:
    """Sort key: the forget fine-tuning before the control, step counts ascending."""
    return column != "forget" if column.name == "train_on" else column


def _quantization(table: pd.DataFrame) -> list[dict]:
    return [
        dict(method=r.method, kind=r.kind, family="quantization", attack=f"Q{r.bits}",
             metric="relative_quantized", value=r.relative_quantized,
             low=r.relative_quantized_low, high=r.relative_quantized_high, reference=r.relative)
        for r in _forget(table).sort_values("bits", ascending=False, kind="stable").itertuples()
    ]  # fmt: skip


def _residual(table: pd.DataFrame) -> list[dict]:
    rows = []
    for method, group in table.groupby("method", sort=False):
        kind = group["kind"].iloc[0]
        changed = group[group["states_changed"].astype(bool)]
        layers = changed if len(changed) else group  # a detector changes no layer
        for attack, after, before, metric in (
            ("probe", "probe_after", "probe_before", "probe accuracy (best changed layer)"),
            ("lens", "lens_top1_after", "lens_top1_before", "lens top-1 (best changed layer)"),
        ):
            rows.append(
                dict(method=method, kind=kind, family="residual", attack=attack, metric=metric,
                     value=layers[after].max(), reference=layers[before].max())
            )  # fmt: skip
    return rows


_FAMILIES = {
    "prompts": _prompts,
    "relearning": _relearning,
    "quantization": _quantization,
    "residual": _residual,
}


def recovery_table(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The forget skill's number per method and attack, from the families' tables.

    Args:
        tables: ``{family: its table}`` for any of ``prompts``, ``relearning``,
            ``quantization``, ``residual`` (:mod:`mechunlearn.attacks`; the CSVs of
            ``mechunlearn attack``).

    Returns:
        :data:`COLUMNS`, families in the order above, methods in their tables' order.

    Raises:
        ValueError: an unknown family, or a table without the columns its family writes.

    Example:
        >>> prompts = pd.DataFrame(dict(
        ...     attack=["none", "comment"], skill="gsm8k", role="forget", method="SP",
        ...     kind="SelectivePruning", relative=[0.2, 0.5], relative_low=[0.1, 0.3],
        ...     relative_high=[0.3, 0.7]))
        >>> recovery_table({"prompts": prompts})[["attack", "value", "low"]].values.tolist()
        [['none', 0.2, 0.1], ['comment', 0.5, 0.3]]
    """
    unknown = [f for f in tables if f not in _FAMILIES]
    if unknown:
        raise ValueError(f"Unknown attack family {unknown[0]!r}: choose among {list(_FAMILIES)}.")
    rows: list[dict] = []
    for family, make in _FAMILIES.items():
        if family in tables:
            try:
                rows += make(tables[family])
            except AttributeError as err:
                raise ValueError(f"The {family} table lacks a column: {err}.") from None
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _cell(row: pd.Series) -> str:
    value = row["value"]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    text = f"{value:.2f}"
    if pd.notna(row["low"]) and pd.notna(row["high"]):
        text += f" [{row['low']:.2f}, {row['high']:.2f}]"
    if row["family"] == "residual" and pd.notna(row["reference"]):
        text += f" (bare {row['reference']:.2f})"
    return text


def recovery_markdown(
    table: pd.DataFrame, methods: Sequence[str] | None = None, prompts: str = "max"
) -> str:
    """A method x attack Markdown table of :func:`recovery_table`'s rows.

    Args:
        table: :func:`recovery_table`'s rows (other columns, e.g. ``task``, are ignored; rows
            of another family, e.g. a study's score with no attack, come first).
        methods: the rows' order (None: the table's).
        prompts: ``"max"``: the prompt attacks as two columns, ``none`` and the wrapper with
            the highest relative score (named in the cell), and the relearning control at its
            largest step count only; ``"all"``: one column per wrapper and step count.

    Returns:
        The table (a header, a rule and one line per method); ``—`` where a method has no row
        (e.g. re-quantization of a detector).

    Raises:
        ValueError: a bad ``prompts``.
    """
    if prompts not in ("max", "all"):
        raise ValueError(f"prompts must be 'max' or 'all', got {prompts!r}.")
    rows = table.copy()
    if prompts == "max":
        wrapped = rows[(rows["family"] == "prompts") & (rows["attack"] != "none")]
        best = wrapped.loc[wrapped.groupby("method", sort=False)["value"].idxmax().dropna()]
        best = best.assign(
            label=[f"{_cell(r)} ({r['attack']})" for _, r in best.iterrows()],
            attack="best wrapper",
        )
        control = rows[(rows["family"] == "relearning") & rows["attack"].str.startswith("control")]
        last = control["attack"].str.split().str[-1].astype(int)
        hidden = control.index[last < last.max()] if len(control) else control.index
        rows = pd.concat(
            [rows[(rows["family"] != "prompts") | (rows["attack"] == "none")].drop(hidden), best],
            ignore_index=True,
        )
    rows["label"] = [
        r["label"] if isinstance(r.get("label"), str) else _cell(r) for _, r in rows.iterrows()
    ]
    order = {f: i for i, f in enumerate(_FAMILIES)}
    columns = sorted(
        dict.fromkeys(zip(rows["family"], rows["attack"], strict=True)),
        key=lambda fa: order.get(fa[0], -1),
    )
    names = list(methods) if methods is not None else list(dict.fromkeys(rows["method"]))
    cells = rows.set_index(["method", "family", "attack"])["label"]
    header = "| method | " + " | ".join(f"{f}: {a}" for f, a in columns) + " |"
    lines = [header, "|---" * (len(columns) + 1) + "|"]
    for m in names:
        got = [cells.get((m, f, a), "—") for f, a in columns]
        lines.append(f"| {m} | " + " | ".join(got) + " |")
    return "\n".join(lines)
