"""The main job as a pipeline: a :class:`RunConfig`, an output folder, and stages as functions.

``mechunlearn run`` (:mod:`mechunlearn.cli`) and the studies in ``analysis/`` drive the same
public functions, one job per module:

- :mod:`~mechunlearn.pipeline.config`: :class:`RunConfig`, the run's settings (validation,
  resume key, mechunlearn 0.2's ``config.json``).
- :mod:`~mechunlearn.pipeline.folder`: :class:`RunFolder`, the output folder (lock, marker,
  atomic writes) and the paths a run writes (:func:`own_files`).
- :mod:`~mechunlearn.pipeline.stages`: the stages: :func:`load_skills` (probe and held-out
  halves), :func:`probe` (one forward pass per probed skill), :func:`analyze` (the four
  analyses; figure captions from :mod:`mechunlearn.report`), :func:`fit_methods`,
  :func:`evaluate_methods` and :func:`~mechunlearn.pipeline.stages.attack_table`.
- this module: :func:`run` chains the stages up to one and writes ``index.html``
  (:func:`mechunlearn.report.write_report`); :func:`attack` attacks a finished run.

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
import platform
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from .. import distributed
from .._version import __version__
from ..io import DamagedFileError, JsonStore, read_json, write_text
from ..report import write_report
from ..validation import check_choice
from .config import DEFAULT_METHODS, DTYPES, PipelineError, RunConfig
from .folder import (
    ANALYSIS_FILES,
    CALIBRATION,
    CONFIG,
    EVALUATION_FILES,
    LOCK,
    MARKER,
    RunFolder,
    own_files,
)
from .stages import (
    ATTACKS,
    Probes,
    Skills,
    analyze,
    attack_table,
    evaluate_methods,
    fit_estimator,
    fit_method,
    fit_methods,
    load_fitted,
    load_model_for,
    load_skills,
    probe,
)

__all__ = [
    "ANALYSIS_FILES",
    "ATTACKS",
    "CALIBRATION",
    "CONFIG",
    "DEFAULT_METHODS",
    "DTYPES",
    "EVALUATION_FILES",
    "LOCK",
    "MARKER",
    "STAGES",
    "PipelineError",
    "Probes",
    "RunConfig",
    "RunFolder",
    "RunResult",
    "Skills",
    "analyze",
    "attack",
    "attack_table",
    "environment",
    "evaluate_methods",
    "fit_estimator",
    "fit_method",
    "fit_methods",
    "load_fitted",
    "load_model_for",
    "load_skills",
    "own_files",
    "probe",
    "run",
]

# run and attack look up load_model_for in this module: a test or a study may replace it here.
STAGES = ("collect", "analyze", "unlearn", "evaluate")
"""The stages :func:`run` stops after (``"run"`` runs them all)."""


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
        result.index = _write_index(config, folder, result)
        return result
    finally:
        folder.unlock()


def _relearning_store(folder: RunFolder) -> JsonStore:
    """The relearning attack's finished runs, kept in the run folder: a killed attack resumes."""
    rel = "tables/attacks_relearning.parts.json"
    return JsonStore(folder.path(rel), lambda _path, writer: folder.write(rel, writer))


def _write_index(config: RunConfig, folder: RunFolder, result: RunResult) -> Path | None:
    """Write the report's ``index.html`` (main process only) with this run's figures, else
    those an earlier run saved (``tables/figures.json``); returns its path."""
    figures = (result.analysis or {}).get("figures")
    saved = folder.path("tables/figures.json")
    if figures is None and saved.exists():
        try:
            figures = read_json(saved, "figure list")
        except DamagedFileError as err:
            warnings.warn(f"{err}; the report shows no figures.", stacklevel=3)
    if not folder.main:
        return None
    prompts = folder.path(f"tables/{ATTACK_PROMPTS}")
    robustness = _read_table(prompts) if prompts.exists() else None
    folder.write(
        "index.html",
        lambda p: write_report(
            folder.out, config.settings(), result.table, figures or [], environment(),
            folder.timings, {name: repr(iv) for name, iv in result.fitted.items()}, robustness,
        ),
    )  # fmt: skip
    return folder.path("index.html")


#: The prompt attacks' table, shown in the report once ``mechunlearn attack`` has written it.
ATTACK_PROMPTS = "attacks_prompts.csv"


def _read_table(path: Path) -> pd.DataFrame:
    """A table this package wrote ("NA" is a method's name, not a missing value)."""
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


def _finished_config(
    out: Path, device: str | None, data_dir: str | None, quiet: bool | None
) -> RunConfig:
    """The config a finished run saved in ``out``, with the settings results do not depend on
    overridden where given; validated."""
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
    return config.validate()


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
    seed) and writes ``tables/attacks_<family>.csv`` per family (the relearning attack keeps each
    finished fine-tuning run in ``tables/attacks_relearning.parts.json``, so a killed attack
    resumes with the same settings): the held-out halves are scored;
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
    out = Path(out)
    for name in attacks:
        if name not in ATTACKS:
            raise PipelineError(f"Unknown attack {name!r}: choose among {', '.join(ATTACKS)}.")
    config = _finished_config(out, device, data_dir, quiet)
    folder = RunFolder(out, config)
    skills = load_skills(config)
    fitted = load_fitted(config, folder)
    written: dict[str, Path] = {}
    try:
        folder.prepare()
        if model is None:
            model = load_model_for(config, folder)
        for name in attacks:
            store = _relearning_store(folder) if name == "relearning" else None
            with folder.timer(f"attack {name}"):
                table = attack_table(name, config, model, fitted, skills, steps, store)
            rel = f"tables/attacks_{name}.csv"
            folder.write(rel, lambda p, t=table: write_text(p, t.to_csv(index=False)))
            written[name] = folder.path(rel)
        evaluation = folder.path("tables/evaluation.csv")
        if "prompts" in attacks and evaluation.exists() and folder.path("index.html").exists():
            result = RunResult(folder, skills)  # the report again, with its robustness section
            result.fitted, result.table = fitted, _read_table(evaluation)
            result.index = _write_index(config, folder, result)
    finally:
        folder.unlock()
    return written
