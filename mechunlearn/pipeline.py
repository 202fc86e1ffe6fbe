"""The main job as a pipeline: a :class:`RunConfig`, an output folder, and stages as functions.

``mechunlearn run`` (:mod:`mechunlearn.cli`) and the studies in ``analysis/`` drive the same
public functions:

1. :func:`load_skills`: the forget, retain and general skills, each split into a probe half
   (for fitting) and a held-out half (for scoring), by the config's seed.
2. :func:`probe`: **one** forward pass per probed skill collecting everything the run needs
   (``hook_pre`` statistics, last-prompt key vectors, Selective Pruning importances;
   :func:`mechunlearn.collect` with ``what=``).
3. :func:`analyze`: the four analyses, their tables and figures.
4. :func:`fit_methods`: every method of ``config.methods`` on the probe halves.
5. :func:`evaluate_methods`: scores on the held-out halves, with intervals.
6. :func:`mechunlearn.report.write_report`: ``index.html``.

**The output folder** (:class:`RunFolder`) holds ``config.json``, a marker that lists every file
the run wrote, and the artefacts. Stages reuse what earlier runs of the *same* config saved (the
resume key is the hash of the config's result-relevant fields), so an interrupted run resumes. A
folder is locked while a run writes to it (``fcntl.flock``: freed on exit and after a crash); a
second run fails with one line naming the holder. ``force=True`` (``--force``) starts a folder
of other settings over by deleting exactly the files the marker lists; it refuses a folder that
holds files mechunlearn did not write, and a marker that lists a path outside the folder (``..``,
an absolute path, a symlink leading out: each entry is resolved and must lie inside the resolved
folder). Every file is written atomically (:mod:`mechunlearn.io`) and listed in the marker
before it appears, so a killed run leaves nothing unlisted; its temporaries are removed by the
next run. A damaged artefact (or statistics of another skill) is named in a warning and computed
again; a missing or damaged marker is rebuilt from ``config.json``.

Example:
    >>> cfg = RunConfig(forget="gsm8k", retain=("mbpp",), general="mmlu", n=32)
    >>> result = run(cfg, "report")  # every stage, resumable (minutes)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import inspect
import json
import os
import platform
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import distributed
from ._version import __version__
from .io import (
    DamagedFileError,
    is_temporary,
    load_or_make,
    read_json,
    write_error,
    write_json,
    write_text,
)
from .validation import check_choice, check_int

MARKER = ".mechunlearn-report.json"
LOCK = ".mechunlearn.lock"
CONFIG = "config.json"
STAGES = ("collect", "analyze", "unlearn", "evaluate")
DEFAULT_METHODS = ("NA", "KSD", "SP")
"""The methods a run fits when none are named: the paper's comparison (a few minutes on 2 CPU
cores). Every registered method can run (:func:`mechunlearn.methods`)."""
DTYPES = ("float32", "bfloat16", "float16", "float64")
CALIBRATION = "calibration"
"""The probe role of :func:`mechunlearn.calibration_skill`'s keys (the detectors' negatives)."""
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


# ------------------------------------------------------------------------------------ config
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
        from .interventions import get_method

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
                from .interventions import methods

                names = ", ".join(m.name for m in methods())
                raise ValueError(f"methods is empty: choose among {names}.")
            for m in self.methods:
                self.make(m)  # the name is registered; the constructor checks the settings
            if not self.retain:
                raise ValueError("retain is empty: name at least one skill to keep.")
            names = [self.forget, *self.retain] + ([self.general] if self.general else [])
            if len(set(names)) != len(names):
                raise ValueError(f"a skill appears twice among forget/retain/general: {names}.")
            from .kernels.separation import METRICS

            check_choice(self.separation_metric, METRICS, "separation_metric")
            from .models import check_device

            check_device(self.device)
        except (TypeError, ValueError) as err:
            raise PipelineError(str(err)) from None
        return self


# ------------------------------------------------------------------------------------ folder
class RunFolder:
    """The output folder of one run: lock, marker (settings + files written), atomic writes.

    Only the main process (rank 0 under torchrun) locks and writes; the others read.

    **The marker** (``.mechunlearn-report.json``) lists every file the run wrote, relative to
    the folder. A file is listed *before* it appears (the marker is rewritten, then the file is
    moved into place), so a run killed at any point leaves no file of its own unlisted: at most
    a listed file that is missing and a temporary of :func:`mechunlearn.io.atomic_write`, which
    the next run removes when it takes the lock. ``--force`` deletes exactly the listed files,
    and only after checking each of them: an entry that does not resolve inside the folder
    (``..``, an absolute path, or a symlink leading out, resolved like the folder itself) is
    refused with one line naming it, and nothing is deleted. A missing or damaged marker is
    rebuilt from ``config.json`` and the files present at the paths the pipeline writes for
    that config (:func:`own_files`), so such a folder still resumes or starts over.
    """

    def __init__(self, out: str | Path, config: RunConfig, force: bool = False):
        self.out = Path(out)
        self.config = config
        self.force = force
        self.main = distributed.is_main()
        self.files: list[str] = []
        self.timings: dict[str, float] = {}
        self._lock_fd: int | None = None

    # -- lock
    def lock(self) -> None:
        """Take the folder's exclusive lock or fail naming the holder."""
        if not self.main:
            return
        if self.out.exists() and not self.out.is_dir():
            raise PipelineError(f"--out {self.out} is a file: choose a folder.")
        path = self.out / LOCK
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise write_error(path, err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text(errors="replace").strip() or "another process"
            os.close(fd)
            raise PipelineError(
                f"{self.out} is in use by another mechunlearn run ({holder}): wait for it, or "
                "choose another --out."
            ) from None
        os.ftruncate(fd, 0)
        info = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%H:%M:%S')}"
        os.write(fd, info.encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _temporaries(self) -> list[Path]:
        """Temporaries of :func:`mechunlearn.io.atomic_write` left by a killed run (only in a
        folder a mechunlearn run has locked before)."""
        if not (self.out / LOCK).exists():
            return []
        return [p for p in self.out.rglob("*") if p.is_file() and is_temporary(p)]

    # -- marker
    def _marker(self) -> dict[str, Any] | None:
        """The marker, checked; rebuilt from ``config.json`` when it is damaged."""
        path = self.out / MARKER
        if not path.exists():
            return None
        try:
            data = read_json(path, "report marker")
            files = data.get("files", []) if isinstance(data, dict) else None
            if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
                raise DamagedFileError("it is not a dict with a list of file names")
        except DamagedFileError:
            rebuilt = self._rebuilt()
            if rebuilt is None:
                raise PipelineError(
                    f"The report marker {path} is damaged and {CONFIG} is missing or damaged, "
                    "so the folder's settings are unknown: move the files you want to keep out "
                    f"of {self.out}, or choose another --out."
                ) from None
            warnings.warn(
                f"The report marker {path} is damaged; rebuilt it from {CONFIG} and the "
                f"{len(rebuilt['files'])} files present at the paths mechunlearn writes.",
                stacklevel=3,
            )
            return rebuilt
        self._check_inside(files)
        return data

    def _check_inside(self, files: Sequence[str]) -> None:
        """Refuse a marker entry that does not resolve inside the folder (symlinks followed)."""
        root = self.out.resolve()
        for rel in files:
            target = (self.out / rel).resolve()
            if target == root or not target.is_relative_to(root):
                raise PipelineError(
                    f"The report marker {self.out / MARKER} lists {rel!r}, which lies outside "
                    f"{self.out}: mechunlearn never writes there, so nothing was deleted; remove "
                    f"that entry (or delete the marker: it is rebuilt from {CONFIG})."
                )

    def _rebuilt(self) -> dict[str, Any] | None:
        """A marker rebuilt from ``config.json``: its settings, and the files present at the
        paths the pipeline writes for them. None when ``config.json`` is missing, damaged or not
        a run's settings."""
        path = self.out / CONFIG
        if not path.is_file():
            return None
        try:
            data = read_json(path, "run config")
            names = {f.name for f in dataclasses.fields(RunConfig)}
            if not isinstance(data, dict) or "forget" not in data or set(data) - names:
                return None
            config = RunConfig.from_json(data)
            files = [f for f in sorted(own_files(config)) if (self.out / f).is_file()]
            return {"key": config.key(), "settings": config.settings(), "files": files}
        except (DamagedFileError, OSError, TypeError, ValueError):
            return None

    def _foreign(self, listed: set[str]) -> list[str]:
        ours = listed | {MARKER, LOCK, CONFIG}
        temporaries = set(self._temporaries())
        found = []
        for p in sorted(self.out.rglob("*")):
            rel = p.relative_to(self.out).as_posix()
            if p.is_file() and rel not in ours and p not in temporaries:
                found.append(rel)
        return found

    def prepare(self) -> None:
        """Lock, check the folder against the config, clear it on ``force``, write the marker.

        Temporaries a killed run left are removed once the lock is held; a missing or damaged
        marker is rebuilt from ``config.json``.

        Raises:
            PipelineError: the folder holds another run's results (without ``force``), files
                mechunlearn did not write, or a marker listing a path outside the folder.
        """
        if not self.main:
            return
        if self.out.is_dir() and not (self.out / MARKER).exists():
            rebuilt = self._rebuilt()
            foreign = self._foreign(set(rebuilt["files"]) if rebuilt else set())
            if foreign:  # checked before the lock file is created: nothing is added there
                raise PipelineError(
                    f"{self.out} is not a mechunlearn report (it holds {_few(foreign)}, which "
                    "mechunlearn did not write): choose another --out."
                )
        self.lock()
        for tmp in self._temporaries():
            tmp.unlink(missing_ok=True)
        for rel in sorted(own_files(self.config)):  # before any work: not after an hour's probe
            self._check_not_folder(rel)
        marker = self._marker()
        if marker is None:
            marker = self._rebuilt()
        listed = set(marker.get("files", [])) if marker else set()
        if marker is None:
            foreign = self._foreign(set())
            if foreign:
                raise PipelineError(
                    f"{self.out} is not a mechunlearn report (it holds {_few(foreign)}, which "
                    "mechunlearn did not write): choose another --out."
                )
        elif not _same_run(marker, self.config) and listed:
            if not self.force:
                old = marker.get("settings", {})
                new = self.config.settings()
                diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
                raise PipelineError(
                    f"{self.out} holds a report made with other settings {diff}: choose another "
                    "--out, or pass --force to start it over."
                )
            foreign = self._foreign(listed)
            if foreign:
                raise PipelineError(
                    f"--force would start {self.out} over, but it holds {_few(foreign)}, which "
                    "mechunlearn did not write: move them away or choose another --out."
                )
            for rel in sorted(listed):
                if not (self.out / rel).is_dir() or (self.out / rel).is_symlink():
                    (self.out / rel).unlink(missing_ok=True)
            for sub in sorted(self.out.rglob("*"), reverse=True):
                if sub.is_dir() and not sub.is_symlink() and not any(sub.iterdir()):
                    sub.rmdir()
            listed = set()
        elif _same_run(marker, self.config):
            self.files = [f for f in marker.get("files", []) if (self.out / f).exists()]
            self.timings = dict(marker.get("timings", {}))
        write_json(self.out / CONFIG, self.config.to_json())
        self._write_marker()

    def _write_marker(self) -> None:
        data = {
            "key": self.config.key(),
            "settings": self.config.settings(),
            "version": __version__,
            "files": sorted(set(self.files)),
            "timings": {k: round(v, 2) for k, v in self.timings.items()},
        }
        write_json(self.out / MARKER, data)

    # -- files
    def path(self, rel: str) -> Path:
        return self.out / rel

    def _check_not_folder(self, rel: str) -> None:
        if (self.out / rel).is_dir():
            raise PipelineError(
                f"{self.out / rel} is a folder where mechunlearn writes a file: move it away, "
                "then run the same command again."
            )

    def record(self, *rels: str | Path) -> None:
        """Note in the marker that the run writes (or wrote) ``rels`` (paths in the folder)."""
        if not self.main:
            return
        new = []
        for rel in rels:
            rel = Path(rel).relative_to(self.out).as_posix() if Path(rel).is_absolute() else rel
            if str(rel) not in self.files and str(rel) not in new:
                new.append(str(rel))
        if new:
            self.files.extend(new)
            self._write_marker()

    def write(self, rel: str, writer: Callable[[Path], Any], also: Sequence[str] = ()) -> None:
        """Run ``writer(path)`` on the main process; the file is recorded in the marker first.

        Args:
            rel: the file, relative to the folder.
            writer: writes it (atomically: :mod:`mechunlearn.io`).
            also: companions the writer makes beside it (e.g. a figure's SVG), recorded first
                too; any other path the writer returns is recorded after it.
        """
        if not self.main:
            return
        for name in (rel, *also):
            self._check_not_folder(name)
        self.record(rel, *also)  # listed before it becomes visible: a kill leaves nothing unlisted
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        result = writer(path)
        written = result if isinstance(result, list | tuple) else [result or path]
        self.record(*(Path(p).resolve().relative_to(self.out.resolve()) for p in written))

    @contextmanager
    def timer(self, name: str) -> Iterator[None]:
        """Time a stage; the total per name goes into the marker and the report."""
        if not self.config.quiet and self.main:
            print(f"[mechunlearn] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0
            if self.main:
                self._write_marker()

    def load_or_make(
        self,
        rel: str,
        load: Callable[[Path], Any],
        make: Callable[[], Any],
        save: Callable[[Any, Path], Any],
        timer: str | None = None,
    ) -> Any:
        """``load(path)`` if a saved artefact exists and reads back; else ``make()`` and save it.

        A damaged artefact is named in a warning and made again
        (:func:`mechunlearn.io.load_or_make`); one that loads is recorded in the marker (a run
        killed by an older mechunlearn may have left it unlisted).
        """

        def made() -> Any:
            if not timer:
                return make()
            with self.timer(timer):
                return make()

        def loaded(path: Path) -> Any:
            obj = load(path)
            self.record(rel)
            return obj

        return load_or_make(
            self.out / rel, loaded, made, lambda obj, _: self.write(rel, lambda p: save(obj, p))
        )


def _same_run(marker: Mapping[str, Any], config: RunConfig) -> bool:
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


def _few(names: Sequence[str], k: int = 3) -> str:
    shown = ", ".join(names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


# ------------------------------------------------------------------------------------ skills
@dataclass
class Skills:
    """The run's skills by role, each split into ``(probe, held_out)``.

    Attributes:
        forget: the forget skill's halves.
        retain: ``{name: halves}`` of the skills to keep.
        general: the general-knowledge skill's halves, or None.
    """

    forget: tuple[Any, Any]
    retain: dict[str, tuple[Any, Any]]
    general: tuple[Any, Any] | None = None

    def probed(self) -> dict[str, Any]:
        """``{role key: probe half}``: ``forget``, ``retain:<name>``..., ``general``."""
        out = {"forget": self.forget[0]}
        out.update({f"retain:{n}": s[0] for n, s in self.retain.items()})
        if self.general is not None:
            out["general"] = self.general[0]
        return out

    def held_out(self) -> tuple[dict[str, Any], dict[str, str]]:
        """``({skill name: held-out half}, {skill name: role})``, the skills to score."""
        skills = {self.forget[1].name: self.forget[1]}
        roles = {self.forget[1].name: "forget"}
        for s in self.retain.values():
            skills[s[1].name], roles[s[1].name] = s[1], "retain"
        if self.general is not None:
            skills[self.general[1].name], roles[self.general[1].name] = self.general[1], "general"
        return skills, roles

    @property
    def first_retain(self) -> str:
        return next(iter(self.retain))


def load_skills(config: RunConfig) -> Skills:
    """Load each skill with ``2 n`` examples and split it in halves (seeded).

    Raises:
        PipelineError: an unknown skill, or too few examples for ``n`` (the message says the
            largest ``n`` that fits).
    """
    from .data import load_skill

    def halves(name: str):
        kwargs = {"n": 2 * config.n, "seed": config.seed, "data_dir": config.data_dir}
        if name.split(":")[0].strip().lower() == "mmlu":
            kwargs["answer_format"] = config.mmlu_format
        try:
            skill = load_skill(name, **kwargs)
        except ValueError as err:
            if "larger than" in str(err) or "only" in str(err):
                try:
                    whole = load_skill(name, data_dir=config.data_dir)
                    fits = len(whole) // 2
                except Exception:  # noqa: BLE001 - the first message is the useful one
                    raise PipelineError(_one_line(err)) from None
                raise PipelineError(
                    f"--n {config.n} needs {2 * config.n} examples of {name!r}, which has only "
                    f"{len(whole)}: use --n {fits} or less."
                ) from None
            raise PipelineError(_one_line(err)) from None
        except LookupError as err:
            raise PipelineError(_one_line(err)) from None
        return skill.split(0.5, seed=config.seed)

    retain = {name: halves(name) for name in config.retain}
    general = halves(config.general) if config.general else None
    return Skills(forget=halves(config.forget), retain=retain, general=general)


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return " ".join(lines[:6]) or type(err).__name__


# ------------------------------------------------------------------------------------ stages
@dataclass
class Probes:
    """What :func:`probe` collected per probed role (``forget``, ``retain:<name>``, ``general``,
    and ``calibration``: the keys of :func:`mechunlearn.calibration_skill` when a detector runs).

    Attributes:
        pre: NeuronStats of ``hook_pre`` (forget and retain skills).
        keys: KeyVectors (every role).
        importance: Importance (forget and retain skills).
    """

    pre: dict[str, Any] = field(default_factory=dict)
    keys: dict[str, Any] = field(default_factory=dict)
    importance: dict[str, Any] = field(default_factory=dict)

    def negatives(self):
        """The detectors' negatives: key vectors of every probed role but the forget skill
        (retain and general skills, and the shipped calibration questions when collected)."""
        from .stats import KeyVectors

        return KeyVectors.concat_all([k for r, k in self.keys.items() if r != "forget"])


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


ANALYSIS_FILES = (
    *(f"tables/{name}.csv" for name in (
        "gaussian_by_layer", "separation_top200", "separation_by_layer", "hypercube_by_layer",
        "hypercube_centres", "hypercube_trends", "convexity_by_layer", "linear_separability",
    )),
    "tables/analysis_summary.json",
    "tables/figures.json",
    *(f"figures/{name}.{ext}" for name in (
        "gaussian_summary", "separation_histograms", "separation_by_layer",
        "hypercube_inclusion", "hypercube_geometry", "convexity",
    ) for ext in ("png", "svg")),
)  # fmt: skip
"""What :func:`analyze` writes (tables and figures)."""
EVALUATION_FILES = (
    "tables/evaluation.csv",
    "tables/evaluation.json",
    "tables/relative_performance.csv",
    "index.html",
)
"""What :func:`evaluate_methods` and the report write."""


def _probe_jobs(config: RunConfig) -> dict[str, tuple[str, ...]]:
    """``{probed role: what probe collects for it}`` (the keys of :meth:`Skills.probed`, and
    ``calibration`` when a detector runs)."""
    roles = ["forget", *(f"retain:{name}" for name in config.retain)]
    jobs = {role: ("pre", "keys", "importance") for role in roles}
    if config.general:
        jobs["general"] = ("keys",)
    if any(config.spec(m).fits_on == "keys" for m in config.methods):  # detectors' negatives
        jobs[CALIBRATION] = ("keys",)
    return jobs


def _method_file(full_name: str) -> str:
    return f"interventions/{_slug(full_name)}.safetensors"


def _stats_file(role: str, what: str) -> str:
    return f"stats/{_slug(role)}.{what}.safetensors"


def own_files(config: RunConfig) -> set[str]:
    """Every path (relative to the output folder) that a run of ``config`` writes, besides
    ``config.json`` and the marker: what a rebuilt marker may list."""
    stats = {_stats_file(role, w) for role, wanted in _probe_jobs(config).items() for w in wanted}
    methods = {_method_file(config.table_name(m)) for m in config.methods}
    return stats | methods | set(ANALYSIS_FILES) | set(EVALUATION_FILES)


def probe(config: RunConfig, model, skills: Skills, folder: RunFolder) -> Probes:
    """One forward pass per probed skill: statistics, key vectors and importances (resumable)."""
    from .collect import collect
    from .stats import Importance, KeyVectors, NeuronStats

    kinds = {"pre": NeuronStats, "keys": KeyVectors, "importance": Importance}
    out = Probes()
    skill_of = dict(skills.probed())
    if CALIBRATION in _probe_jobs(config):
        from .data import calibration_skill

        skill_of[CALIBRATION] = calibration_skill()
    for role, wanted in _probe_jobs(config).items():
        skill = skill_of[role]
        paths = {w: _stats_file(role, w) for w in wanted}
        loaded: dict[str, Any] = {}
        for w, rel in paths.items():
            path = folder.path(rel)
            if path.exists():
                try:
                    got = kinds[w].load(path)
                except (DamagedFileError, ValueError) as err:
                    warnings.warn(f"{path} is damaged ({err}); collecting it again.", stacklevel=2)
                    continue
                found = got.meta.get("skill")
                if found is not None and found != skill.name:  # e.g. another role's file copied
                    warnings.warn(
                        f"{path} holds statistics of the skill {found!r}, not {skill.name!r} "
                        f"({role}): it is damaged; collecting it again.",
                        stacklevel=2,
                    )
                    continue
                loaded[w] = got
                folder.record(rel)  # listed if a run of an older mechunlearn left it unlisted
        missing = tuple(w for w in wanted if w not in loaded)
        if missing:
            with folder.timer(f"collect {role}"):
                got = collect(
                    model, skill, what=missing, batch_size=config.batch_size, seed=config.seed,
                    quiet=config.quiet,
                )  # fmt: skip
            for w in missing:
                loaded[w] = got[w]
                folder.write(paths[w], lambda p, obj=got[w]: obj.save(p))
        for w, value in loaded.items():
            getattr(out, w)[role] = value
    return out


def analyze(config: RunConfig, probes: Probes, skills: Skills, folder: RunFolder) -> dict:
    """The four analyses: tables (CSV/JSON) and figures (PNG + SVG) with captions."""
    from . import plots
    from .analysis import convexity, gaussian_fit, hypercube, separation

    retain = f"retain:{skills.first_retain}"
    forget_name = skills.forget[0].name
    others = {
        skills.probed()[r].name: k
        for r, k in probes.keys.items()
        if r not in ("forget", CALIBRATION)
    }
    figures: list[tuple[str, str]] = []

    def figure(fig, name: str, caption: str) -> None:
        folder.write(
            f"figures/{name}.png",
            lambda p: plots.save_figure(fig, p.with_suffix("")),
            also=(f"figures/{name}.svg",),
        )
        figures.append((f"figures/{name}.png", caption))
        plots.close(fig)

    def table(frame, name: str, index: bool = True) -> None:
        folder.write(f"tables/{name}.csv", lambda p: write_text(p, frame.to_csv(index=index)))

    with folder.timer("analyze gaussian"):
        fit = gaussian_fit(probes.pre["forget"], other=probes.pre[retain])
        table(fit.by_layer, "gaussian_by_layer")
        figure(
            plots.plot_gaussian_summary(fit),
            "gaussian_summary",
            f"Share of {forget_name} neurons whose hook_pre values pass the normality tests, by "
            "layer, and how often the Gaussian rule p_F >= p_R picks the right skill. The tests "
            "treat the reservoir's tokens as independent although tokens of one text are "
            "correlated, so they reject more often than for independent draws.",
        )
    with folder.timer("analyze separation"):
        na_ratio = config.setting("NA", "ratio")
        sep = separation(probes.pre["forget"], probes.pre[retain], metric=config.separation_metric)
        table(sep.top(k=200), "separation_top200", index=False)
        table(sep.layer_summary(), "separation_by_layer")
        figure(
            plots.plot_separation_histograms(sep, k=6),
            "separation_histograms",
            f"Forget vs retain hook_pre values of the most separated neurons "
            f"({config.separation_metric}), with the fitted Gaussians (the paper's Figure 3).",
        )
        figure(
            plots.plot_separation_by_layer(sep, ratio=na_ratio),
            "separation_by_layer",
            f"Where the separating neurons are: the separation metric by layer, and how many "
            f"of the top {na_ratio:.1%} neurons each layer holds.",
        )
    with folder.timer("analyze hypercube"):
        cube = hypercube(probes.keys["forget"], others, seed=config.seed)
        table(cube.per_layer, "hypercube_by_layer")
        table(cube.per_other, "hypercube_centres")
        table(cube.trends, "hypercube_trends")
        n = len(cube.layers)
        chosen = sorted({cube.layers[0], cube.layers[n // 2], cube.layers[-1]})
        figure(
            plots.plot_inclusion_curves(cube, layers=chosen),
            "hypercube_inclusion",
            "Share of queries inside the forget skill's hypercube mu_F +- alpha*sigma_F as "
            "alpha grows: fit queries, held-out forget queries, and other skills (Figure 5).",
        )
        figure(
            plots.plot_hypercube_layers(cube),
            "hypercube_geometry",
            "Normalised log-volume of the forget cube and distance between skill centres "
            "(in sigma units) across layers (Figure 6).",
        )
    with folder.timer("analyze convexity"):
        conv = convexity(probes.keys["forget"], others, seed=config.seed)
        table(conv.per_layer, "convexity_by_layer")
        table(conv.separability, "linear_separability", index=False)
        figure(
            plots.plot_convexity(conv),
            "convexity",
            "Is the forget region convex? Segment points nearest a forget key, held-out "
            "accuracy of a linear classifier, and false positives of one box vs k boxes.",
        )
    summary = {"share_gaussian": float(fit.share_gaussian), "hypercube": cube.summary()}
    folder.write("tables/analysis_summary.json", lambda p: write_json(p, summary))
    folder.write("tables/figures.json", lambda p: write_json(p, figures))
    return {"figures": figures, "summary": summary}


def fit_method(config: RunConfig, method: str, model, skills: Skills, probes: Probes) -> Any:
    """Fit one registered method on the probe halves, as its registration says (``fits_on``).

    ``"pre"`` and ``"importance"`` methods fit on the forget skill's and the first retain
    skill's statistics; ``"keys"`` methods on the forget skill's key vectors with every other
    probed skill's (and the calibration questions') as negatives, or alone for a detector whose
    settings fix its region (``takes_negatives`` False); ``"model"`` methods on the
    model and the probe halves (every retain skill and the general skill where the method takes
    several kept skills, else the first retain skill), with the run's ``batch_size`` where
    ``fit`` takes one.

    Returns:
        The fitted estimator.
    """
    from .interventions import Detector

    spec = config.spec(method)
    estimator = config.make(method)
    retain = f"retain:{skills.first_retain}"
    fixed_region = isinstance(estimator, Detector) and not estimator.takes_negatives
    if spec.fits_on == "keys" and fixed_region:
        return estimator.fit(probes.keys["forget"])
    if spec.fits_on == "pre":
        return estimator.fit(probes.pre["forget"], probes.pre[retain])
    if spec.fits_on == "importance":
        return estimator.fit(probes.importance["forget"], probes.importance[retain])
    if spec.fits_on == "keys":
        return estimator.fit(probes.keys["forget"], probes.negatives())
    kept = [halves[0] for halves in skills.retain.values()]
    if spec.multi_retain and skills.general is not None:
        kept.append(skills.general[0])  # general text as one more floor
    kwargs = {}
    if "batch_size" in inspect.signature(estimator.fit).parameters:
        kwargs["batch_size"] = config.batch_size
    return estimator.fit(model, skills.forget[0], kept if spec.multi_retain else kept[0], **kwargs)


def fit_methods(
    config: RunConfig,
    model,
    skills: Skills,
    probes: Probes,
    folder: RunFolder,
    skills_for: Mapping[str, Skills] | None = None,
) -> dict[str, Any]:
    """Fit every method of ``config.methods`` on the probe halves (resumable).

    Args:
        config, model, skills, probes, folder: the run's.
        skills_for: ``{registered method name: Skills}`` for methods that train on other
            halves than the run's (a study that drops prompts too long for SIMU).

    Returns:
        ``{table name: fitted intervention}`` (the registration's ``full_name``, e.g.
        ``"NeuronAdjust"``).
    """
    fitted = {}
    for method in config.methods:
        spec = config.spec(method)
        name = config.table_name(method)
        fitted[name] = folder.load_or_make(
            _method_file(name),
            spec.cls.load,
            lambda method=method, spec=spec: fit_method(
                config, method, model, (skills_for or {}).get(spec.name, skills), probes
            ),
            lambda obj, p: obj.save(p),
            timer=f"fit {name}",
        )
    return fitted


def evaluate_methods(
    config: RunConfig, model, skills: Skills, fitted: Mapping[str, Any], folder: RunFolder
):
    """Score the held-out halves with each method; ``tables/evaluation.csv`` and
    ``relative_performance.csv`` (with intervals)."""
    from .evaluation import evaluate, relative_table

    held, roles = skills.held_out()
    with folder.timer("evaluate"):
        table = evaluate(
            model, held, fitted, batch_size=config.batch_size, quiet=config.quiet, roles=roles,
            n_boot=config.n_boot, seed=config.seed,
        )  # fmt: skip
    folder.write("tables/evaluation.csv", lambda p: write_text(p, table.to_csv(index=False)))
    folder.write(
        "tables/evaluation.json",
        lambda p: write_text(p, table.to_json(orient="records", indent=2)),
    )
    rel = relative_table(table)
    cells = relative_table(table, interval=True)
    both = rel.join(cells.add_suffix(" [95% CI]"))
    folder.write("tables/relative_performance.csv", lambda p: write_text(p, both.to_csv()))
    return table


def environment() -> dict[str, str]:
    """Package versions and machine, for the report."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "?"

    return {
        "mechunlearn": __version__,
        "torch": torch.__version__,
        "transformer-lens": v("transformer-lens"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processes": str(distributed.world()[1]),
    }


def load_model_for(config: RunConfig, folder: RunFolder | None = None):
    """The config's model, on its device and dtype (under torchrun: this rank's GPU)."""
    from .models import load_model

    device = config.device or distributed.rank_device()

    def make():
        return load_model(config.model, device=device, dtype=config.dtype, quiet=config.quiet)

    if folder is None:
        return make()
    with folder.timer("load model"):
        return make()


@dataclass
class RunResult:
    """What :func:`run` produced (the parts that ran)."""

    folder: RunFolder
    skills: Skills | None = None
    probes: Probes | None = None
    analysis: dict | None = None
    fitted: dict[str, Any] | None = None
    table: Any = None
    index: Path | None = None


def run(
    config: RunConfig, out: str | Path, stage: str = "run", force: bool = False, model=None
) -> RunResult:
    """Run the pipeline up to ``stage`` (``"collect"``, ``"analyze"``, ``"unlearn"``,
    ``"evaluate"`` or ``"run"`` = everything), resuming from what ``out`` holds.

    ``"evaluate"`` skips the analyses (their figures are reused if saved); ``"run"`` does all.
    Under torchrun every rank calls this; rank 0 locks the folder and writes.

    Raises:
        PipelineError: bad settings or folder (one line).
    """
    check_choice(stage, ("run", *STAGES), "stage")
    config.validate()
    distributed.init_from_env()
    folder = RunFolder(out, config, force)
    skills = load_skills(config)  # fast: unknown names and sizes fail before anything is written
    try:
        folder.prepare()
        distributed.barrier()  # the other ranks wait until rank 0 has prepared the folder
        result = RunResult(folder, skills)
        if model is None:
            model = load_model_for(config, folder)
        result.probes = probe(config, model, skills, folder)
        if stage == "collect":
            return result
        if stage in ("run", "analyze"):
            result.analysis = analyze(config, result.probes, skills, folder)
            if stage == "analyze":
                return result
        result.fitted = fit_methods(config, model, skills, result.probes, folder)
        if stage == "unlearn":
            return result
        result.table = evaluate_methods(config, model, skills, result.fitted, folder)
        figures = (result.analysis or {}).get("figures")
        saved = folder.path("tables/figures.json")
        if figures is None and saved.exists():
            try:
                figures = read_json(saved, "figure list")
            except DamagedFileError as err:
                warnings.warn(f"{err}; the report shows no figures.", stacklevel=2)
        if folder.main:
            from .report import write_report

            folder.write(
                "index.html",
                lambda p: write_report(
                    folder.out, config.settings(), result.table, figures or [], environment(),
                    folder.timings, {name: repr(iv) for name, iv in result.fitted.items()},
                ),
            )  # fmt: skip
            result.index = folder.path("index.html")
        return result
    finally:
        folder.unlock()


# ----------------------------------------------------------------------------------- attacks
ATTACKS = ("prompts", "relearning", "quantization", "residual")
"""The attack families of ``mechunlearn attack`` (:mod:`mechunlearn.attacks`)."""


def attack(
    out: str | Path,
    attacks: Sequence[str] = ("prompts",),
    steps: Sequence[int] | None = None,
    device: str | None = None,
    data_dir: str | None = None,
    quiet: bool | None = None,
    model=None,
) -> dict[str, Path]:
    """Run attacks (:mod:`mechunlearn.attacks`) on a finished run folder.

    Reads ``config.json`` and the fitted methods the run saved (``interventions/*.safetensors``;
    nothing is fitted again), loads the same skills (probe and held-out halves, by the run's
    seed) and writes ``tables/attacks_<family>.csv`` per family: the held-out halves are scored;
    the probe halves are the few-shot examples, the relearning attack's training set (the
    control fine-tunes on the general skill's probe half, else the first kept skill's) and the
    linear probes' training set.

    Args:
        out: the run folder.
        attacks: families from :data:`ATTACKS` (default: the cheap prompt attacks).
        steps: the relearning attack's step counts (default 1, 5, 20).
        device, data_dir, quiet: override the run's settings (results do not depend on them).
        model: the model, if already loaded.

    Returns:
        ``{family: path of its table}``.

    Raises:
        PipelineError: no finished run in ``out``, an unknown family, or a method the run
            did not save.

    Example:
        >>> attack("report", ["prompts", "quantization"])  # doctest: +SKIP
        {'prompts': PosixPath('report/tables/attacks_prompts.csv'), ...}
    """
    from . import attacks as atk

    out = Path(out)
    for name in attacks:
        if name not in ATTACKS:
            raise PipelineError(f"Unknown attack {name!r}: choose among {', '.join(ATTACKS)}.")
    if not (out / CONFIG).is_file():
        raise PipelineError(
            f"{out} holds no {CONFIG}: attack a finished run folder (mechunlearn run --out {out})."
        )
    try:
        data = read_json(out / CONFIG, "run config")
    except DamagedFileError as err:
        raise PipelineError(str(err)) from None
    config = RunConfig.from_json(data)
    changes = {"device": device, "data_dir": data_dir, "quiet": quiet}
    config = dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not None})
    config.validate()
    folder = RunFolder(out, config)
    skills = load_skills(config)
    fitted, missing = {}, []
    for method in config.methods:
        spec = config.spec(method)
        path = folder.path(_method_file(spec.full_name))
        if path.is_file():
            fitted[spec.full_name] = spec.cls.load(path)
        else:
            missing.append(spec.name)
    if missing:
        raise PipelineError(
            f"{out} holds no fitted {', '.join(missing)}: finish the run first (mechunlearn "
            f"unlearn --out {out} with the run's settings)."
        )
    held, roles = skills.held_out()
    forget_probe, forget_held = skills.forget
    first = skills.retain[skills.first_retain]
    kept = {name: s for name, s in held.items() if roles[name] != "forget"}
    control = skills.general[0] if skills.general is not None else first[0]
    common = {"quiet": config.quiet}
    boot = {"n_boot": config.n_boot, "seed": config.seed}
    written: dict[str, Path] = {}
    try:
        folder.prepare()
        if model is None:
            model = load_model_for(config, folder)
        for name in attacks:
            with folder.timer(f"attack {name}"):
                if name == "prompts":
                    table = atk.prompt_attacks(
                        model, fitted, forget_held, kept, shots=forget_probe, roles=roles,
                        batch_size=config.batch_size, **common, **boot,
                    )  # fmt: skip
                elif name == "relearning":
                    table = atk.relearning(
                        model, fitted, forget_probe, held, roles, control=control,
                        steps=steps or atk.STEPS, **common, **boot,
                    )  # fmt: skip
                elif name == "quantization":
                    table = atk.requantization(
                        model, fitted, held, roles, batch_size=config.batch_size, **common, **boot
                    )
                else:
                    table = atk.residual_knowledge(
                        model, fitted, forget_probe, first[0], forget_held, first[1],
                        batch_size=config.batch_size, **common,
                    )  # fmt: skip
            rel = f"tables/attacks_{name}.csv"
            folder.write(rel, lambda p, t=table: write_text(p, t.to_csv(index=False)))
            written[name] = folder.path(rel)
    finally:
        folder.unlock()
    return written
