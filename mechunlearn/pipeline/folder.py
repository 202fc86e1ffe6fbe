"""The run's output folder: :class:`RunFolder` (lock, marker, atomic writes, resume checks) and
its layout, the paths a run of a config writes (:func:`own_files`).

**The marker** (``.mechunlearn-report.json``) lists every file the run wrote; the folder is
locked (``fcntl.flock``) while a run writes to it; ``--force`` deletes exactly the listed files
(see :class:`RunFolder`).

Example:
    >>> cfg = RunConfig(forget="gsm8k", retain=("mbpp",), general="mmlu", n=32)
    >>> sorted(f for f in own_files(cfg) if f.startswith("interventions/N"))
    ['interventions/NeuronAdjust.safetensors']
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .. import distributed
from .._version import __version__
from ..io import DamagedFileError, is_temporary, load_or_make, read_json, write_error, write_json
from .config import PipelineError, RunConfig, same_run

MARKER = ".mechunlearn-report.json"
LOCK = ".mechunlearn.lock"
CONFIG = "config.json"
CALIBRATION = "calibration"
"""The probe role of :func:`mechunlearn.calibration_skill`'s keys (the detectors' negatives)."""


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
        elif not same_run(marker, self.config) and listed:
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
        elif same_run(marker, self.config):
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


def _few(names: Sequence[str], k: int = 3) -> str:
    shown = ", ".join(names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


# ------------------------------------------------------------------------------------ layout
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
"""What :func:`~mechunlearn.pipeline.stages.analyze` writes (tables and figures)."""
EVALUATION_FILES = (
    "tables/evaluation.csv",
    "tables/evaluation.json",
    "tables/relative_performance.csv",
    "index.html",
)
"""What :func:`~mechunlearn.pipeline.stages.evaluate_methods` and the report write."""


def probe_jobs(config: RunConfig, analyses: bool = True) -> dict[str, tuple[str, ...]]:
    """``{probed role: what the probe stage collects for it}`` (the keys of
    :meth:`~mechunlearn.pipeline.stages.Skills.probed`, and ``calibration`` when a detector
    runs).

    With ``analyses`` (the main job), every probed skill's ``pre``, ``keys`` and
    ``importance``, which the analyses need; without (a study cell that only fits and scores),
    only what the methods fit on: ``pre`` for NA-like methods, ``importance`` for SP-like ones,
    ``keys`` for detectors, nothing for methods that fit on the model.
    """
    fits_on = {config.spec(m).fits_on for m in config.methods}
    detectors = "keys" in fits_on
    kinds = ("pre", "keys", "importance")
    wanted = kinds if analyses else tuple(w for w in kinds if w in fits_on)
    roles = ["forget", *(f"retain:{name}" for name in config.retain)]
    jobs = {role: wanted for role in roles} if wanted else {}
    if config.general and (analyses or detectors):
        jobs["general"] = ("keys",)
    if detectors:  # the detectors' negatives
        jobs[CALIBRATION] = ("keys",)
    return jobs


def method_file(full_name: str) -> str:
    """The saved fitted method of table name ``full_name``, relative to the folder."""
    return f"interventions/{_slug(full_name)}.safetensors"


def stats_file(role: str, what: str) -> str:
    """The saved statistics ``what`` (``pre``, ``keys``, ``importance``) of a probed role."""
    return f"stats/{_slug(role)}.{what}.safetensors"


def own_files(config: RunConfig) -> set[str]:
    """Every path (relative to the output folder) that a run of ``config`` writes, besides
    ``config.json`` and the marker: what a rebuilt marker may list."""
    stats = {stats_file(role, w) for role, wanted in probe_jobs(config).items() for w in wanted}
    methods = {method_file(config.table_name(m)) for m in config.methods}
    return stats | methods | set(ANALYSIS_FILES) | set(EVALUATION_FILES)
