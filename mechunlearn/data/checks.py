"""Argument checks shared by the data modules (counts, seeds, did-you-mean suggestions).

The data package is the bottom layer of mechunlearn and imports nothing else from it, so these
few checks live here rather than in :mod:`mechunlearn.validation`.

Example:
    >>> check_count(3, "n")
    3
    >>> did_you_mean("gsm8", ["gsm8k", "mbpp", "gsm8k"])
    " Did you mean 'gsm8k'?"
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["check_count", "check_seed", "did_you_mean"]


def _is_int(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, numbers.Integral)


def check_count(n: Any, what: str = "n", allow_zero: bool = False) -> int:
    """``n`` as a positive int (or non-negative with ``allow_zero``), or a one-line error.

    Args:
        n: The value to check: an int (numpy ints too), not a bool or a float.
        what: The argument's name, for the message.
        allow_zero: Accept 0 (e.g. a number of few-shot exemplars).

    Returns:
        ``int(n)``.

    Raises:
        TypeError: A bool, a float (even ``2.0``) or a non-number.
        ValueError: ``n <= 0``.

    Example:
        >>> check_count(2, "n")
        2
    """
    if not _is_int(n):
        hint = f"; pass a whole number such as {int(n)}" if isinstance(n, float) and n >= 1 else ""
        raise TypeError(
            f"{what} must be an int number of examples, got {n!r} ({type(n).__name__}){hint}"
        )
    n = int(n)
    if allow_zero and n < 0:
        raise ValueError(f"{what} must be a non-negative int, got {n}")
    if not allow_zero and n <= 0:
        raise ValueError(
            f"{what} must be a positive number of examples, got {n} (an empty skill); "
            f"pass {what}>=1, or {what}=None for all examples"
        )
    return n


def check_seed(seed: Any, what: str = "seed") -> int:
    """``seed`` as a non-negative int, or a one-line error.

    Raises:
        TypeError: A bool, a float or a non-number.
        ValueError: A negative int.

    Example:
        >>> check_seed(0)
        0
    """
    if not _is_int(seed):
        raise TypeError(f"{what} must be a non-negative int, got {seed!r} ({type(seed).__name__})")
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"{what} must be a non-negative int, got {seed}; use e.g. {what}=0")
    return seed


def did_you_mean(value: str, candidates: Iterable[str] | Mapping[str, str], n: int = 3) -> str:
    """``" Did you mean 'x' or 'y'?"`` for the closest candidates, or ``""``.

    The comparison ignores case. Each suggestion appears once, even if several candidates lead to
    it (``candidates`` may map spellings, e.g. aliases, to the name to suggest).

    Example:
        >>> did_you_mean("Human_Evl", {"humaneval": "humaneval", "human_eval": "humaneval"})
        " Did you mean 'humaneval'?"
        >>> did_you_mean("zzz", ["gsm8k"])
        ''
    """
    mapping = dict(candidates) if isinstance(candidates, Mapping) else {c: c for c in candidates}
    lower: dict[str, str] = {}
    for spelling, target in mapping.items():
        lower.setdefault(spelling.lower(), target)
    close = difflib.get_close_matches(value.strip().lower(), list(lower), n=len(lower), cutoff=0.6)
    out: list[str] = []
    for c in close:
        if lower[c] not in out:
            out.append(lower[c])
    out = out[:n]
    return f" Did you mean {' or '.join(repr(c) for c in out)}?" if out else ""
