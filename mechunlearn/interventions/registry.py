"""The method registry: every unlearning method declared once, next to its class.

A method is a class that follows the estimator contract of :mod:`.base` (one of the kinds
:class:`~.base.HookIntervention`, :class:`~.base.WeightIntervention` or :class:`~.base.Detector`)
plus one registration line, written above the class::

    @register_method("NA", fits_on="pre")
    class NeuronAdjust(HookIntervention): ...

Everything else reads the registry: :class:`~mechunlearn.pipeline.RunConfig` (its ``methods``
mapping ``{"NA": {"ratio": 0.03}}``), the command line (``--method NA ratio=0.03``), the run's
fit stage, evaluation (by kind), the report, the plots' short names, the studies and the common
contract tests. A user's own class takes part in all of them after one call of
:func:`register_method` (``docs/contributing.md`` shows a worked example).

**What a method fits on** (``fits_on``) says what the run hands to ``fit``:

=============== ==========================================================================
``"pre"``        ``fit(stats_forget, stats_retain)``: :class:`~mechunlearn.stats.NeuronStats`
                 of ``hook_pre`` on the probe halves (the first retain skill's).
``"importance"`` ``fit(importance_forget, importance_retain)``: Selective Pruning's
                 :class:`~mechunlearn.stats.Importance`.
``"keys"``       ``fit(keys_forget, negatives)``: :class:`~mechunlearn.stats.KeyVectors` of the
                 forget skill, and of every other probed skill plus the shipped calibration
                 questions as negatives.
``"model"``      ``fit(model, forget, retain)``: the model and the probe halves as
                 :class:`~mechunlearn.data.Skill` objects (``retain`` a list when the class
                 takes several kept skills, ``multi_retain=True``).
=============== ==========================================================================

Example:
    >>> [m.name for m in methods()][:6]
    ['NA', 'KSD', 'Ellipsoid', 'SP', 'LUNAR', 'SIMU']
    >>> spec = get_method("NA")
    >>> spec.full_name, spec.fits_on, spec.kind
    ('NeuronAdjust', 'pre', 'hooks')
    >>> spec.settings()["ratio"]
    0.03
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .base import Detector, HookIntervention, Intervention, WeightIntervention

__all__ = [
    "FITS_ON",
    "MethodSpec",
    "get_method",
    "kind_of",
    "methods",
    "register_method",
    "spec_of",
    "unregister_method",
]

FITS_ON = ("pre", "importance", "keys", "model")
"""What a method can fit on (the table above)."""

_REGISTRY: dict[str, MethodSpec] = {}


@dataclass(frozen=True)
class MethodSpec:
    """One registered method.

    Attributes:
        name: the short name used in configs, on the command line and in figures ("NA").
        cls: the estimator class.
        fits_on: what ``fit`` takes (:data:`FITS_ON`).
        full_name: the name in tables and file names (default: the class name). Not a short
            word a CSV reader takes for "missing" ("NA").
        defaults: settings a run uses where the class's own default does not suit a run's
            budget (SIMU's ``max_steps``); the user's settings override them.
        multi_retain: ``fit`` takes a list of kept skills (``fits_on="model"`` only).
        summary: one line for :func:`methods` and the docs.
    """

    name: str
    cls: type
    fits_on: str
    full_name: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    multi_retain: bool = False
    summary: str = ""

    @property
    def kind(self) -> str:
        """``"hooks"``, ``"weights"`` or ``"detector"``: how the method acts (from its base)."""
        return kind_of(self.cls)

    def settings(self) -> dict[str, Any]:
        """Every setting a run passes to the constructor, with the run's default values."""
        sig = inspect.signature(self.cls.__init__)
        out = {
            p.name: p.default
            for p in sig.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }
        out.update(self.defaults)
        return out

    def make(self, settings: Mapping[str, Any] | None = None, seed: int | None = None):
        """The unfitted estimator with ``settings`` over the run's defaults.

        ``seed`` is passed where the constructor takes one and ``settings`` do not set it.

        Raises:
            ValueError: a setting the constructor does not take (the message lists them), or
                a value the constructor refuses.
        """
        known = self.settings()
        settings = dict(settings or {})
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise ValueError(
                f"{self.name} has no setting {', '.join(map(repr, unknown))}: choose among "
                f"{', '.join(known)}."
            )
        kwargs = {**self.defaults, **settings}
        if seed is not None and "seed" in known and "seed" not in settings:
            kwargs["seed"] = seed
        try:
            return self.cls(**kwargs)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{self.name}: {err}") from None


def kind_of(cls: type) -> str:
    """The kind of an estimator class: ``"detector"``, ``"weights"`` or ``"hooks"``.

    Raises:
        TypeError: a class that derives from none of the three kinds.
    """
    for base, name in ((Detector, "detector"), (WeightIntervention, "weights")):
        if issubclass(cls, base):
            return name
    if issubclass(cls, HookIntervention):
        return "hooks"
    raise TypeError(
        f"{cls.__name__} must derive from HookIntervention, WeightIntervention or Detector "
        "(mechunlearn.interventions.base)."
    )


def register_method(
    name: str,
    *,
    fits_on: str,
    full_name: str | None = None,
    defaults: Mapping[str, Any] | None = None,
    multi_retain: bool = False,
    summary: str = "",
    replace: bool = False,
) -> Callable[[type], type]:
    """Class decorator (or plain call) that registers an estimator class as a method.

    Args:
        name: the short name ("NA"): letters, digits, ``-`` and ``_``.
        fits_on: what ``fit`` takes: ``"pre"``, ``"importance"``, ``"keys"`` or ``"model"``.
        full_name: the name in tables and file names (default: the class name).
        defaults: run defaults that differ from the constructor's.
        multi_retain: with ``fits_on="model"``, ``fit`` takes a list of kept skills.
        summary: one line describing the method (default: the docstring's first line).
        replace: allow replacing a method of the same name (a notebook re-running a cell).

    Returns:
        The decorator, which returns the class unchanged.

    Raises:
        ValueError: a bad name, ``fits_on``, or a name taken by another class.
        TypeError: a class that is not an :class:`~.base.Intervention` of one of the kinds.

    Example:
        >>> from mechunlearn.interventions import NeuronAdjust
        >>> @register_method("NA-map", fits_on="pre", defaults={"mode": "map"})
        ... class NeuronMap(NeuronAdjust):
        ...     '''Neuron Adjust that maps instead of reflecting.'''
        >>> get_method("NA-map").settings()["mode"]
        'map'
        >>> unregister_method("NA-map")
    """
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ValueError(f"A method name is letters, digits, '-' and '_', got {name!r}.")
    if fits_on not in FITS_ON:
        raise ValueError(f"fits_on must be one of {FITS_ON}, got {fits_on!r}.")
    if multi_retain and fits_on != "model":
        raise ValueError("multi_retain applies to fits_on='model' only.")

    def register(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, Intervention)):
            raise TypeError(
                f"register_method takes an Intervention subclass, got {cls!r}: derive from "
                "HookIntervention, WeightIntervention or Detector."
            )
        kind_of(cls)
        old = _REGISTRY.get(name)
        if old is not None and old.cls is not cls and not replace:
            raise ValueError(
                f"The method name {name!r} is taken by {old.cls.__name__}: choose another name, "
                "or pass replace=True."
            )
        doc = (cls.__doc__ or "").strip().splitlines()
        spec = MethodSpec(
            name=name,
            cls=cls,
            fits_on=fits_on,
            full_name=full_name or cls.__name__,
            defaults=dict(defaults or {}),
            multi_retain=multi_retain,
            summary=summary or (doc[0] if doc else ""),
        )
        _REGISTRY[name] = spec
        return cls

    return register


def unregister_method(name: str) -> None:
    """Remove a registered method (a test or a notebook cleaning up)."""
    _REGISTRY.pop(name, None)


def methods() -> list[MethodSpec]:
    """Every registered method, in registration order (the package's first)."""
    return list(_REGISTRY.values())


def get_method(name: str) -> MethodSpec:
    """The method registered as ``name``.

    Raises:
        ValueError: no such method; the message lists the registered ones.
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown method {name!r}: choose among {', '.join(_REGISTRY)} (or register yours "
            "with mu.register_method)."
        ) from None


def spec_of(estimator_or_class: Any) -> MethodSpec | None:
    """The registration of an estimator (or its class), or None for an unregistered one."""
    cls = estimator_or_class if isinstance(estimator_or_class, type) else type(estimator_or_class)
    for spec in _REGISTRY.values():
        if spec.cls is cls:
            return spec
    return None
