"""Argument checks shared by every module: one validator per kind of value, one message style.

Every check returns the validated (and, where stated, converted) value or raises with a one-line
message that says what was wrong and what to do. Nothing here converts silently: a bool is not
an int, a string is not a number, ``2.5`` is not a count, ``[1.7]`` is not a layer.

* :func:`check_scalar`: a number of a given type within bounds (scikit-learn's ``check_scalar``).
* :func:`check_fraction`, :func:`check_positive`, :func:`check_int`, :func:`check_probability`:
  the common special cases.
* :func:`check_choice`, :func:`check_type`, :func:`check_bool`.
* :func:`check_texts`: an iterable of strings (not one string, not a dict, no non-strings);
  :func:`check_seed`: a seed torch and NumPy accept (from :mod:`mechunlearn.data.checks`).
* :func:`check_test_size`: a held-out fraction in (0, 1) or count >= 1;
  :func:`check_layers`: a layer selection before it meets a model (None, an int, or distinct
  ints).
* :func:`resolve_layers`: a layer selection (negative indices count from the end) against a
  number of layers.
* :func:`check_compatible`, :func:`check_same_source`: that two collected objects come from
  the same model, site and layers, so that combining them means something.
* :func:`check_forget_retain`: that a fit's retain data is not its forget data, and comes from
  the same model; :func:`check_has_values`: that collected data is not on the ``meta`` device.

Example:
    >>> check_fraction("ratio", 0.03)
    0.03
    >>> resolve_layers(30, [-1, 0])
    [0, 29]
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

# The data package is the bottom layer (it imports nothing else from mechunlearn): its checks of
# texts and seeds live there and are the ones every module uses.
from .data.checks import MAX_SEED, check_seed, check_texts

__all__ = [
    "MAX_SEED",
    "MODEL_KEYS",
    "check_alpha",
    "check_bool",
    "check_choice",
    "check_device",
    "check_compatible",
    "check_forget_retain",
    "check_fraction",
    "check_has_values",
    "check_int",
    "check_layers",
    "check_positive",
    "check_probability",
    "check_same_source",
    "check_scalar",
    "check_seed",
    "check_test_size",
    "check_texts",
    "check_type",
    "default_device",
    "model_keys",
    "resolve_layers",
]

#: Metadata keys that describe a model's shape (what makes statistics of two models comparable).
MODEL_KEYS: tuple[str, ...] = ("model", "n_layers", "d_mlp", "d_model")


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_scalar(
    value: Any,
    name: str,
    target_type: type | tuple[type, ...] = numbers.Real,
    *,
    min_val: float | None = None,
    max_val: float | None = None,
    include_boundaries: str = "both",
) -> Any:
    """Check that ``value`` is a number of ``target_type`` within ``[min_val, max_val]``.

    ``numbers.Integral`` accepts Python and NumPy integers (not bools, not ``2.0``);
    ``numbers.Real`` accepts integers and floats (not bools, not strings, not NaN). An Integral
    value is returned as ``int``, a Real one as ``float``.

    Args:
        value: the value to check.
        name: its name in the message.
        target_type: ``numbers.Integral``, ``numbers.Real`` (default) or a tuple of types.
        min_val, max_val: bounds (None: unbounded).
        include_boundaries: ``"both"``, ``"left"``, ``"right"`` or ``"neither"``.

    Raises:
        TypeError: not of the type. ValueError: NaN or out of bounds.

    Example:
        >>> check_scalar(16, "batch_size", numbers.Integral, min_val=1)
        16
    """
    if isinstance(value, bool) or not isinstance(value, target_type):
        kind = {numbers.Integral: "an integer", numbers.Real: "a number"}.get(
            target_type, " or ".join(t.__name__ for t in _as_tuple(target_type))
        )
        raise TypeError(f"{name} must be {kind}, got {_describe(value)}.")
    if isinstance(value, numbers.Real) and math.isnan(float(value)):
        raise ValueError(f"{name} must be a number, got NaN.")
    left = include_boundaries in ("both", "left")
    right = include_boundaries in ("both", "right")
    low_bad = min_val is not None and (value < min_val if left else value <= min_val)
    high_bad = max_val is not None and (value > max_val if right else value >= max_val)
    if low_bad or high_bad:
        lo = "-inf" if min_val is None else min_val
        hi = "inf" if max_val is None else max_val
        interval = f"{'[' if left else '('}{lo}, {hi}{']' if right else ')'}"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}.")
    if target_type is numbers.Integral:
        return int(value)
    if target_type is numbers.Real:
        return value if isinstance(value, numbers.Integral) else float(value)
    return value


def _as_tuple(t: type | tuple[type, ...]) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


def check_fraction(name: str, value: Any) -> float:
    """A number in (0, 1] (e.g. the share of neurons to select), as a float."""
    return float(
        check_scalar(value, name, numbers.Real, min_val=0, max_val=1, include_boundaries="right")
    )


def check_probability(name: str, value: Any) -> float:
    """A number strictly between 0 and 1 (a rate cap, a significance level), as a float."""
    return float(
        check_scalar(value, name, numbers.Real, min_val=0, max_val=1, include_boundaries="neither")
    )


def check_positive(name: str, value: Any) -> float:
    """A finite number > 0, as a float."""
    out = float(check_scalar(value, name, numbers.Real, min_val=0, include_boundaries="neither"))
    if math.isinf(out):
        raise ValueError(f"{name} must be finite, got {value!r}.")
    return out


def check_int(name: str, value: Any, min_val: int | None = 0, max_val: int | None = None) -> int:
    """An integer (not a bool, not ``2.0``) within ``[min_val, max_val]`` (default >= 0)."""
    return check_scalar(value, name, numbers.Integral, min_val=min_val, max_val=max_val)


def check_bool(name: str, value: Any) -> bool:
    """``True`` or ``False`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_describe(value)}.")
    return value


def check_choice(value: Any, choices: Sequence[Any], what: str) -> Any:
    """``value`` if it is one of ``choices``, else a ValueError naming them."""
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"Unknown {what} {value!r}. Choose one of {list(choices)}.")
    return value


def check_type(value: Any, types: type | tuple[type, ...], name: str, hint: str = "") -> Any:
    """``value`` if it is an instance of ``types``, else a TypeError (with ``hint`` appended)."""
    if not isinstance(value, types):
        names = " or ".join(t.__name__ for t in _as_tuple(types))
        msg = f"{name} must be {names}, got {type(value).__name__}."
        raise TypeError(f"{msg} {hint}".rstrip())
    return value


def check_alpha(alpha: Any) -> float:
    """A significance level in (0, 1)."""
    return check_probability("alpha (a significance level)", alpha)


def check_test_size(name: str, value: Any) -> float | int:
    """A held-out share: a fraction in (0, 1), or a count (an int >= 1).

    The number of items is not known yet; :func:`mechunlearn.data.split_sizes` checks the
    count against it when the split is made.

    Example:
        >>> check_test_size("test_size", 0.5), check_test_size("test_size", 3)
        (0.5, 3)
    """
    hint = "a fraction in (0, 1), e.g. 0.5, or a count >= 1 of held-out items"
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"{name} must be {hint}, got {value!r}.")
        return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {hint}, got {_describe(value)}.")
    if not 0.0 < float(value) < 1.0:  # also NaN and inf
        raise ValueError(f"{name} must be {hint}, got {value!r}.")
    return float(value)


def check_layers(layers: Any, name: str = "layers") -> int | list[int] | None:
    """A layer selection before it meets a model: None (every layer), an int, or a non-empty
    sequence of distinct ints (negative counts from the end; :func:`resolve_layers` checks the
    range, and repeats such as ``[-1, 29]``, against the model).

    Raises:
        TypeError: a bool, a float, a string, or a sequence holding one.
        ValueError: an empty sequence, or a layer given twice.

    Example:
        >>> check_layers([0, -1]), check_layers(None), check_layers(2)
        ([0, -1], None, 2)
    """
    if layers is None:
        return None
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        return int(layers)
    shape = f"{name} must be None, an int or a list of ints"
    if isinstance(layers, (bool, str, bytes, Mapping)) or not isinstance(layers, Sequence | range):
        raise TypeError(f"{shape}, got {_describe(layers)}.")
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise TypeError(f"Layers must be integers, got {_describe(layer)} in {list(layers)!r}.")
        out.append(int(layer))
    if not out:
        raise ValueError(f"{name} is empty: pass None for every layer, or a list of indices.")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} {out} repeat a layer: give each layer once.")
    return out


def resolve_layers(n_layers: Any, layers: int | Sequence[int] | None) -> list[int]:
    """Normalise a layer selection to a sorted list of distinct non-negative indices.

    Args:
        n_layers: the number of layers, or a model (its ``cfg.n_layers``).
        layers: ``None`` for every layer, an int, or a sequence of ints; negative indices count
            from the end, as in Python.

    Raises:
        TypeError: a layer is not an integer (``1.7``, ``"1"``, ``True``).
        ValueError: a layer is out of range or repeated, or the selection is empty.

    Example:
        >>> resolve_layers(30, -1)
        [29]
    """
    total = int(n_layers.cfg.n_layers) if hasattr(n_layers, "cfg") else int(n_layers)
    if layers is None:
        return list(range(total))
    given = [layers] if isinstance(layers, numbers.Integral) or isinstance(layers, bool) else layers
    if isinstance(given, (str, bytes)) or not isinstance(given, Sequence | range):
        try:
            given = list(given)
        except TypeError:
            raise TypeError(
                f"layers must be None, an int or a list of ints, got {_describe(layers)}."
            ) from None
    out = []
    for layer in given:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise TypeError(f"Layers must be integers, got {_describe(layer)} in {layers!r}.")
        index = int(layer) + total if layer < 0 else int(layer)
        if not 0 <= index < total:
            raise ValueError(
                f"Layer {layer} is out of range: the model has {total} layers (0..{total - 1}, or "
                f"-{total}..-1 from the end)."
            )
        out.append(index)
    if not out:
        raise ValueError("No layers selected: pass None for every layer, or a list of indices.")
    if len(set(out)) != len(out):
        raise ValueError(f"Layers repeat in {list(given)}: give each layer once.")
    return sorted(out)


def check_compatible(
    a: Mapping[str, Any], b: Mapping[str, Any], keys: Sequence[str], what: str
) -> None:
    """Raise a ValueError if the metadata ``a`` and ``b`` differ at any of ``keys``.

    Example:
        >>> check_compatible(stats_f.meta, stats_r.meta, ("n_layers", "d_mlp"), "statistics")
        >>> check_compatible(stats_f.meta, {**stats_r.meta, "d_mlp": 64}, ("d_mlp",), "statistics")
        Traceback (most recent call last):
        ...
        ValueError: Cannot combine statistics with different d_mlp: 48 vs 64.
    """
    for key in keys:
        if a.get(key) != b.get(key):
            raise ValueError(
                f"Cannot combine {what} with different {key}: {a.get(key)!r} vs {b.get(key)!r}."
            )


def check_same_source(a: Any, b: Any, names: Sequence[str] = ("first", "second")) -> None:
    """Raise a ValueError unless ``a`` and ``b`` come from the same model, site and layers.

    Compares the recorded model name and shape (``meta``: model, n_layers, d_mlp, d_model; a key
    missing from either side is not compared), the layers, the number of neurons per layer and,
    where both have one, the hook site. Different token positions only warn.

    Args:
        a, b: NeuronStats, KeyVectors or Importance (anything with ``meta`` and ``layers``).
        names: how to call them in the message, e.g. ``("stats_f", "stats_r")``.
    """
    na, nb = names
    for key in MODEL_KEYS:
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
            "layers (select_layers)."
        )
    da, db = getattr(a, "d_mlp", None), getattr(b, "d_mlp", None)
    if da is not None and db is not None and da != db:
        raise ValueError(f"{na} has {da} neurons per layer but {nb} has {db}.")


def _content(obj: Any) -> Any:
    """What makes two collected objects (or skills) the same data: a skill's texts, or the
    tensors of statistics (counts, means, squared deviations), key vectors or importances."""
    examples = getattr(obj, "examples", None)
    if examples is not None:
        return [(ex.prompt, ex.answer) for ex in examples]
    names = ("mean", "m2", "count") if hasattr(obj, "mean") else ("values",)
    tensors = tuple(getattr(obj, name, None) for name in names)
    return None if any(t is None for t in tensors) else tensors


def check_has_values(obj: Any, name: str) -> None:
    """Raise a ValueError if collected data (NeuronStats, KeyVectors, Importance) sits on the
    ``meta`` device: shapes without values, which no fit can use.

    Example:
        >>> check_has_values(stats_f.to("meta"), "stats_f")
        Traceback (most recent call last):
        ...
        ValueError: stats_f is on the 'meta' device (shapes, no values): ...
    """
    value = _content(obj)
    first = value[0] if isinstance(value, tuple) else None
    if getattr(getattr(first, "device", None), "type", None) == "meta":
        raise ValueError(
            f"{name} is on the 'meta' device (shapes, no values): collect it again, or load "
            "it from its file (.load(path)), onto 'cpu' or a GPU."
        )


def check_forget_retain(
    forget: Any, retain: Any, names: Sequence[str] = ("forget", "retain"), what: str = "data"
) -> None:
    """Refuse a retain set that is the forget set; warn when the two come from two models.

    A fit against itself selects nothing meaningful (every separation is zero) and says
    nothing; two collections from different models of the same shape combine without an error
    but compare different networks.

    Args:
        forget, retain: two skills, or two NeuronStats / KeyVectors / Importance.
        names: how to call them in the messages, e.g. ``("stats_f", "stats_r")``.
        what: what they are, for the message (``"statistics"``, ``"skill"``).

    Raises:
        ValueError: ``retain`` is ``forget``, or holds identical data, or either is on the
            ``meta`` device (:func:`check_has_values`).

    Example:
        >>> check_forget_retain(stats_f, stats_f, ("stats_f", "stats_r"), "statistics")
        Traceback (most recent call last):
        ...
        ValueError: stats_r is the same object as stats_f: ...
    """
    import torch

    na, nb = names
    check_has_values(forget, na)
    check_has_values(retain, nb)
    hint = f"pass the {what} of a skill to keep as {nb}, not those of the skill to forget."
    if forget is retain:
        raise ValueError(f"{nb} is the same object as {na}: {hint}")
    a, b = _content(forget), _content(retain)
    if isinstance(a, tuple) and isinstance(b, tuple):
        same = all(
            x.shape == y.shape and x.device == y.device and bool(torch.equal(x, y))
            for x, y in zip(a, b, strict=True)
        )
    else:
        same = a is not None and a == b
    if same:
        raise ValueError(f"{nb} holds exactly the same {what} as {na}: {hint}")
    ma = (getattr(forget, "meta", None) or {}).get("model")
    mb = (getattr(retain, "meta", None) or {}).get("model")
    if ma is not None and mb is not None and ma != mb:
        warnings.warn(
            f"{na} come from model {ma!r} but {nb} from {mb!r} (same shape): the fit compares "
            "two different networks; collect both on the same model.",
            stacklevel=3,
        )


def model_keys(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The model-shape part of a metadata dict (:data:`MODEL_KEYS` that are present)."""
    return {k: meta[k] for k in MODEL_KEYS if k in meta}


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: Any) -> str | None:
    """A device the machine has: ``None``/``"auto"`` (-> :func:`default_device`), ``"cpu"``,
    ``"cuda"``, ``"cuda:1"``, ``"mps"``.

    Raises:
        ValueError: an unknown device, or one this machine does not have (never a silent CPU
            fallback).
    """
    if device is None or device == "auto":
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"Unknown device {device!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'."
        ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"device={device!r} but this machine has no CUDA GPU visible to torch: use "
                "'cpu' (or 'auto')."
            )
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device={device!r} but only {count} CUDA GPU(s) are visible.")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"device={device!r} but MPS is not available here: use 'cpu'.")
    elif dev.type != "cpu":
        raise ValueError(f"Unsupported device {device!r}: use 'auto', 'cpu', 'cuda' or 'mps'.")
    return str(dev)
