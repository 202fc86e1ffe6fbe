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

__all__ = ["MAX_SEED", "check_count", "check_seed", "check_texts", "did_you_mean"]

#: The largest seed: torch's generators take at most an unsigned 64-bit integer.
MAX_SEED = 2**64 - 1


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
    """``seed`` as an int in ``[0, MAX_SEED]`` (what torch's generators take), or a one-line
    error.

    Raises:
        TypeError: A bool, a float or a non-number.
        ValueError: A negative int, or one above :data:`MAX_SEED` (``2**64 - 1``).

    Example:
        >>> check_seed(0)
        0
    """
    if not _is_int(seed):
        raise TypeError(f"{what} must be a non-negative int, got {seed!r} ({type(seed).__name__})")
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"{what} must be a non-negative int, got {seed}; use e.g. {what}=0")
    if seed > MAX_SEED:
        raise ValueError(
            f"{what}={seed} is larger than 2**64 - 1, the largest seed torch takes; use a "
            f"smaller one, e.g. {what} % 2**64"
        )
    return seed


def check_texts(values: Any, what: str) -> list[str]:
    """An iterable of strings, read once into a list; nothing is converted.

    Refused: one string (``"abc"`` is not three texts), a dict (its keys would silently become
    the texts), and any item that is not a ``str`` (``None``, ``123``, ``b"x"``), with its
    index.

    Raises:
        TypeError: naming ``what`` and, for an item, its index.

    Example:
        >>> check_texts((t for t in ["a", "b"]), "prompts")
        ['a', 'b']
    """
    if isinstance(values, (str, bytes)):
        raise TypeError(
            f"{what} must be an iterable of strings, not one {type(values).__name__}; "
            f"wrap it in a list: [{values!r:.40}]"
        )
    if isinstance(values, Mapping):
        raise TypeError(
            f"{what} must be an iterable of strings, not a {type(values).__name__} (its keys "
            "would become the texts); pass list(d) for the keys, or prompts and answers as two "
            "lists: Skill.from_texts(name, list(d), list(d.values()))"
        )
    if not isinstance(values, Iterable):
        raise TypeError(f"{what} must be an iterable of strings, got {type(values).__name__}")
    out = list(values)
    for i, v in enumerate(out):
        if not isinstance(v, str):
            raise TypeError(
                f"{what}[{i}] is {type(v).__name__} {v!r:.60}, not a str; pass strings "
                "(convert them with str() yourself if that is really meant)"
            )
    return out


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
