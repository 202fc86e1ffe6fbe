"""What the study scripts compute once and reread on a rerun (so a stopped study resumes).

* :func:`load_or_make`: a fitted method, statistics or key vectors, kept as a ``.safetensors``
  file (computed again when the file does not read back);
* :func:`cached_evaluate`: one :func:`mechunlearn.evaluate` call, kept as a CSV with its compute
  time beside it (scored again when the cached table lacks a method asked for).

The scripts import it from their own folder (``python analysis/<study>.py`` puts ``analysis/`` on
the path).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd

import mechunlearn as mu
from mechunlearn import io
from mechunlearn.io import write_json, write_text

T = TypeVar("T")


def load_or_make(path: Path, cls: Any, make: Callable[[], T]) -> T:
    """``cls.load(path)`` when ``path`` exists and reads back, else ``make()`` saved to ``path``
    (:func:`mechunlearn.io.load_or_make` with the class's own ``load`` and ``save``).

    Args:
        path: where the object is kept.
        cls: its class (has ``load``; the object has ``save``), e.g. ``mu.NeuronStats``.
        make: computes the object.

    Returns:
        The loaded or the new object.
    """
    return io.load_or_make(path, cls.load, make, lambda obj, p: obj.save(p))


def cached_evaluate(
    path: Path,
    model: Any,
    skills: Mapping[str, mu.Skill],
    interventions: Callable[[], Mapping[str, Any]],
    methods: Iterable[str] | None = None,
    **evaluate_kwargs: Any,
) -> pd.DataFrame:
    """``mu.evaluate(model, skills, interventions(), **evaluate_kwargs)``, kept as ``path``.

    The table is read back from ``path`` on a rerun, unless ``methods`` names one it lacks or the
    file does not read back; then ``interventions()`` is scored again and replaces the file (a
    method only the old file held is dropped). The compute time goes to ``path`` with suffix
    ``.json`` (``{"seconds": ...}``).

    Args:
        path: the CSV.
        model: the model.
        skills: the held-out skills, ``{name: Skill}``.
        interventions: builds ``{method name: intervention}`` (called only when scoring, so a
            cached chunk costs no fitting).
        methods: the method names the cached table must hold (default: any cached table does);
            a dict's keys count.
        **evaluate_kwargs: passed to :func:`mechunlearn.evaluate` (``roles``, ``seed``, ...).

    Returns:
        The table (:func:`mechunlearn.evaluate`'s columns).
    """
    wanted = {methods} if isinstance(methods, str) else set(methods or ())
    if path.exists():
        try:
            table = pd.read_csv(path, keep_default_na=False, na_values=[""])
            if not wanted - set(table["method"]):
                return table
        except (pd.errors.ParserError, pd.errors.EmptyDataError, KeyError) as err:
            print(f"{path} is damaged ({err!r}); scoring it again", file=sys.stderr)
    began = time.perf_counter()
    table = mu.evaluate(model, skills, interventions(), **evaluate_kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, table.to_csv(index=False))
    write_json(path.with_suffix(".json"), {"seconds": time.perf_counter() - began})
    return table
