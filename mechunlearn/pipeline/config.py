"""The run's settings: :class:`RunConfig`, its validation, its resume key, and the conversion of
mechunlearn 0.2's ``config.json`` (flat method settings such as ``na_ratio``).

Example:
    >>> cfg = RunConfig(forget="gsm8k", retain=("mbpp",), general="mmlu", n=32, seed=1)
    >>> RunConfig.from_json(cfg.to_json()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..validation import check_choice, check_int

DEFAULT_METHODS = ("NA", "KSD", "SP")
"""The methods a run fits when none are named: the paper's comparison (a few minutes on 2 CPU
cores). Every registered method can run (:func:`mechunlearn.methods`)."""
DTYPES = ("float32", "bfloat16", "float16", "float64")
_KEY_FORMAT = 4
"""Bumped when the resume key's content changes (4: per-method settings from the registry)."""
#: The flat method settings of mechunlearn 0.2's RunConfig: ``{field: (method, setting)}``.
_LEGACY_SETTINGS = {
    "na_ratio": (("NA",), "ratio"),
    "na_score": (("NA",), "score"),
    "na_mode": (("NA",), "mode"),
    "ksd_fpr": (("KSD", "Ellipsoid"), "fpr"),
    "sp_ratio": (("SP",), "ratio"),
    "lunar_layer": (("LUNAR",), "layer"),
    "lunar_coef": (("LUNAR",), "coef"),
    "simu_threshold": (("SIMU",), "threshold"),
    "simu_gamma": (("SIMU",), "gamma"),
    "simu_max_steps": (("SIMU",), "max_steps"),
}


class PipelineError(Exception):
    """A problem with the run's settings or folder, reported in one line without a traceback."""


def _method_settings(methods: Any) -> dict[str, dict[str, Any]]:
    """``{name: {setting: value}}`` from a mapping, or from a sequence of names (no settings)."""
    if isinstance(methods, Mapping):
        out = {}
        for name, settings in methods.items():
            if settings is None:
                settings = {}
            if not isinstance(settings, Mapping):
                raise PipelineError(
                    f"methods[{name!r}] must be a mapping of settings such as {{'ratio': 0.03}}, "
                    f"got {settings!r}."
                )
            out[name] = dict(settings)
        return out
    if isinstance(methods, str) or not isinstance(methods, Sequence):
        raise PipelineError(
            f"methods must be a list of method names or a mapping {{name: settings}}, got "
            f"{methods!r}."
        )
    return {name: {} for name in methods}


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run: skills, sizes, seed and each method's settings.

    ``methods`` maps each method's registered name (:func:`mechunlearn.methods`) to its
    settings, the estimator's constructor arguments: ``{"NA": {"ratio": 0.03}, "LUNAR":
    {"layer": 8}}``; a list of names takes each method's defaults. A grid of variants uses
    labels that name their method: ``{"NA 1%": {"method": "NA", "ratio": 0.01}, "NA 10%":
    {"method": "NA", "ratio": 0.1}}`` (rows and files then carry the label). The default is the
    paper's comparison, NA, KSD and SP (a few minutes on 2 CPU cores); LUNAR and SIMU train on
    the model and take longer. Where a method's constructor takes a ``seed`` and its settings do
    not, the run's ``seed`` is used. The detectors calibrate on every other probed skill plus
    :func:`mechunlearn.calibration_skill`.

    Saved as ``config.json`` in the output folder. Settings that change results make the
    resume key (:meth:`key`; each method's settings resolved to every constructor argument);
    ``device``, ``data_dir``, ``batch_size`` and ``quiet`` do not. Validated as a whole by
    :meth:`validate` before any work. A ``config.json`` of mechunlearn 0.2 (flat settings such
    as ``na_ratio``) loads with :meth:`from_json`, and its folder resumes.

    Example:
        >>> cfg = RunConfig(forget="gsm8k", retain=("mbpp",), general="mmlu", n=32)
        >>> list(cfg.methods)
        ['NA', 'KSD', 'SP']
        >>> len(cfg.key())                                   # a 16-hex-digit hash
        16
        >>> cfg.key() == dataclasses.replace(cfg, device="cuda").key()   # not result-relevant
        True
        >>> cfg.key() == RunConfig(forget="gsm8k", retain=("mbpp",), general="mmlu", n=32,
        ...                        methods={"NA": {"ratio": 0.05}, "KSD": {}, "SP": {}}).key()
        False
        >>> cfg.setting("NA", "ratio")
        0.03
    """

    model: str | None = None
    forget: str = "humaneval"
    retain: tuple[str, ...] = ("mmlu:math",)
    general: str | None = "mmlu:-math"
    n: int = 32
    seed: int = 0
    dtype: str = "float32"
    mmlu_format: str = "text"
    methods: Mapping[str, Mapping[str, Any]] = field(
        default_factory=lambda: {m: {} for m in DEFAULT_METHODS}
    )
    separation_metric: str = "cohens_d"
    n_boot: int = 2000
    # Not part of the resume key:
    device: str | None = None
    data_dir: str | None = None
    batch_size: int = 16
    quiet: bool = False

    _NOT_KEYED = ("device", "data_dir", "batch_size", "quiet")

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", _method_settings(self.methods))
        if isinstance(self.retain, str):
            object.__setattr__(self, "retain", (self.retain,))
        else:
            object.__setattr__(self, "retain", tuple(self.retain))

    def spec(self, method: str):
        """The registration (:class:`~mechunlearn.interventions.MethodSpec`) of ``method``: a
        registered name, or a label of :attr:`methods` whose settings name one (``"method"``)."""
        from ..interventions import get_method

        name = self.methods.get(method, {}).get("method", method)
        try:
            return get_method(name)
        except ValueError as err:
            raise PipelineError(str(err)) from None

    def own_settings(self, method: str) -> dict[str, Any]:
        """``method``'s constructor settings (its entry of :attr:`methods` less ``"method"``)."""
        return {k: v for k, v in self.methods.get(method, {}).items() if k != "method"}

    def table_name(self, method: str) -> str:
        """The name of ``method``'s rows and file: the registration's ``full_name`` for a
        method listed by its registered name, the label itself for a labelled variant."""
        return method if "method" in self.methods.get(method, {}) else self.spec(method).full_name

    def make(self, method: str):
        """The unfitted estimator of ``method`` with this run's settings and seed."""
        try:
            return self.spec(method).make(self.own_settings(method), seed=self.seed)
        except (TypeError, ValueError) as err:
            raise PipelineError(str(err)) from None

    def setting(self, method: str, name: str) -> Any:
        """One setting of ``method`` as the run uses it (the user's, else the run default)."""
        return {**self.spec(method).settings(), **self.own_settings(method)}[name]

    def settings(self) -> dict[str, Any]:
        """The result-relevant settings (what the resume key hashes); each method's settings
        resolved to every constructor argument."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in self._NOT_KEYED}
        out["model"] = self.model or "HuggingFaceTB/SmolLM2-135M-Instruct"
        out["retain"] = list(self.retain)
        out["methods"] = {
            m: {**({"method": s["method"]} if "method" in s else {}), **self.make(m).get_params()}
            for m, s in self.methods.items()
        }
        return json.loads(json.dumps(out, default=repr))

    def key(self) -> str:
        """The resume key: a hash of :meth:`settings` and the file format."""
        blob = json.dumps({"settings": self.settings(), "format": _KEY_FORMAT}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["retain"] = list(self.retain)
        out["methods"] = {m: dict(s) for m, s in self.methods.items()}
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunConfig:
        """A config from :meth:`to_json`'s dict, or from mechunlearn 0.2's (flat method
        settings such as ``na_ratio`` become ``methods={"NA": {"ratio": ...}}``)."""
        data = dict(data)
        legacy = {k: data.pop(k) for k in list(data) if k in _LEGACY_SETTINGS}
        if legacy or isinstance(data.get("methods"), (list, tuple)):
            methods = _method_settings(data.get("methods", DEFAULT_METHODS))
            for key, value in legacy.items():
                names, setting = _LEGACY_SETTINGS[key]
                for name in names:
                    if name in methods:
                        methods[name][setting] = value
            data["methods"] = methods
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            warnings.warn(f"config: unknown settings {unknown} ignored.", stacklevel=2)
        kw = {k: v for k, v in data.items() if k in names}
        if "retain" in kw:
            kw["retain"] = tuple(kw["retain"])
        return cls(**kw)

    def validate(self) -> RunConfig:
        """Check every setting before any work; raises :class:`PipelineError` in one line."""
        try:
            check_int("n", self.n, min_val=4)
            check_int("seed", self.seed, min_val=0)
            check_int("batch_size", self.batch_size, min_val=1)
            check_int("n_boot", self.n_boot, min_val=1)
            check_choice(self.dtype, DTYPES, "dtype")
            check_choice(self.mmlu_format, ("text", "letter"), "mmlu_format")
            if not self.methods:
                from ..interventions import methods

                names = ", ".join(m.name for m in methods())
                raise ValueError(f"methods is empty: choose among {names}.")
            for m in self.methods:
                self.make(m)  # the name is registered; the constructor checks the settings
            if not self.retain:
                raise ValueError("retain is empty: name at least one skill to keep.")
            names = [self.forget, *self.retain] + ([self.general] if self.general else [])
            if len(set(names)) != len(names):
                raise ValueError(f"a skill appears twice among forget/retain/general: {names}.")
            from ..kernels.separation import METRICS

            check_choice(self.separation_metric, METRICS, "separation_metric")
            from ..models import check_device

            check_device(self.device)
        except (TypeError, ValueError) as err:
            raise PipelineError(str(err)) from None
        return self


def same_run(marker: Mapping[str, Any], config: RunConfig) -> bool:
    """Whether a folder's marker records a run of ``config``: the same resume key, or a marker
    of mechunlearn 0.2 (flat method settings) whose settings convert to this config's."""
    if marker.get("key") == config.key():
        return True
    old = marker.get("settings")
    if not (isinstance(old, Mapping) and set(old) & set(_LEGACY_SETTINGS)):
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return RunConfig.from_json(old).key() == config.key()
    except (PipelineError, TypeError, ValueError):
        return False
