"""A study as a configuration: tasks x seeds x a grid of methods, each cell a resumable run.

A study declares its **tasks** (:class:`Task`: the forget, retain and general skills, plus extra
held-out skills that are scored but never probed), its **grid** (a
:class:`~mechunlearn.pipeline.RunConfig` ``methods`` mapping, ``{row label: {"method":
registered name, **settings}}``) and its **seeds**. :meth:`Study.run` runs every task and seed
as one pipeline run folder ``<out>/<task>/seed<k>/`` (:func:`~mechunlearn.pipeline.probe`,
:func:`~mechunlearn.pipeline.fit_methods`, then :func:`mechunlearn.evaluate` on the held-out
halves and the extra skills; with ``fluency_prompts``, :func:`mechunlearn.fluency_table` of
general prompts in ``fluency.csv``): probes, fitted methods and ``sweep.csv`` are kept, so a stopped
study resumes, cells can run as parallel commands, and a cell of other settings is refused by
its folder. A script under ``analysis/`` is then its declaration plus its own tables and
figures (``analysis/unlearning_study.py``).

Hyperparameters chosen on held-back probe data go through :func:`mechunlearn.tuning.tune`.

Example:
    >>> study = Study(
    ...     tasks={"gsm8k-vs-mbpp": Task("gsm8k", ("mbpp",), general="mmlu")},
    ...     methods={"NA 1%": {"method": "NA", "ratio": 0.01}, "SP": {"method": "SP"}},
    ...     seeds=(0, 1), n=32, out="results/my_study",
    ... )
    >>> [str(study.folder(task, seed)) for task, seed in study.cells()]
    ['results/my_study/gsm8k-vs-mbpp/seed0', 'results/my_study/gsm8k-vs-mbpp/seed1']
    >>> study.config("gsm8k-vs-mbpp", 1).seed
    1
    >>> results_folder("results/my_study", "gemma-3-270m")
    PosixPath('results/my_study-gemma-3-270m')
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .data import Skill
from .evaluation import evaluate
from .fluency import fluency_table
from .io import write_text
from .models import DEFAULT_MODEL
from .pipeline import (
    RunConfig,
    RunFolder,
    Skills,
    fit_methods,
    load_fitted,
    load_model_for,
    load_skills,
    probe,
)

__all__ = ["FLUENCY", "SWEEP", "Study", "StudyParser", "Task", "data_dir_or_exit", "results_folder"]

SWEEP = "sweep.csv"
"""The table every cell writes: each method x held-out skill, with ``task`` and ``seed``."""
FLUENCY = "fluency.csv"
"""A cell's :func:`~mechunlearn.fluency_table` (with ``Study.fluency_prompts``), with ``task``
and ``seed``."""


def results_folder(base: str | Path, model: str | None) -> Path:
    """A study's default output folder for ``model``: ``base`` for the default model,
    ``base-<model>`` for another (``/`` becomes ``--``), so results of two models never mix.

    Example:
        >>> results_folder("results/unlearning", None)
        PosixPath('results/unlearning')
        >>> results_folder("results/unlearning", "HuggingFaceTB/SmolLM2-360M")
        PosixPath('results/unlearning-HuggingFaceTB--SmolLM2-360M')
    """
    if model is None or model == DEFAULT_MODEL:
        return Path(base)
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in model.replace("/", "--"))
    return Path(f"{base}-{slug}")


class StudyParser(argparse.ArgumentParser):
    """The command line of a study script under ``analysis/``: the arguments every study
    takes, and ``--out`` resolved by :func:`results_folder` once ``--model`` is known.

    The arguments it adds: ``--data-dir`` (the benchmark folder, default ``$MECHUNLEARN_DATA``;
    see :func:`data_dir_or_exit`), ``--model`` (default: the default model), ``--out`` (default
    :func:`results_folder` of ``out`` and the model), unless turned off ``--quiet`` and
    ``--seed`` (an int, default 0), and where asked for ``--force`` (start a cell whose run
    folder holds a run of other settings over, as ``mechunlearn run --force`` does; a study of
    run folders, :class:`Study`). The script adds its own arguments as to any
    ``argparse.ArgumentParser``.

    Args:
        description: the script's one-line description (``--help``).
        out: the results folder for the default model (``"results/<study>"``).
        quiet: add ``--quiet`` (hide progress bars).
        seed: add ``--seed`` (a script with ``--seeds`` of its own says False).
        force: add ``--force``.

    Example:
        >>> parser = StudyParser("My study.", out="results/my_study")
        >>> _ = parser.add_argument("--n", type=int, default=32)
        >>> args = parser.parse_args(["--model", "gemma-3-270m", "--data-dir", "data"])
        >>> args.out, args.data_dir, args.seed, args.quiet, args.n
        ('results/my_study-gemma-3-270m', 'data', 0, False, 32)
    """

    def __init__(
        self, description: str, out: str, *, quiet: bool = True, seed: bool = True,
        force: bool = False,
    ):  # fmt: skip
        super().__init__(description=description)
        self.out = out
        self.add_argument(
            "--data-dir", default=os.environ.get("MECHUNLEARN_DATA"),
            help="the benchmark folder (default: $MECHUNLEARN_DATA)",
        )  # fmt: skip
        self.add_argument("--model", default=None, help="model name (default: the default model)")
        self.add_argument(
            "--out", default=None,
            help=f"results folder (default: {out}, -<model> added for another model)",
        )  # fmt: skip
        if quiet:
            self.add_argument("--quiet", action="store_true", help="hide progress bars")
        if seed:
            self.add_argument("--seed", type=int, default=0)
        if force:
            self.add_argument(
                "--force", action="store_true",
                help="start a cell whose folder holds a run of other settings over (its "
                "files are deleted)",
            )  # fmt: skip

    def parse_known_args(self, args=None, namespace=None):
        """``argparse``'s, with ``out`` set to :func:`results_folder` (as a string) where
        ``--out`` is not given."""
        parsed, rest = super().parse_known_args(args, namespace)
        parsed.out = str(parsed.out or results_folder(self.out, parsed.model))
        return parsed, rest


def data_dir_or_exit(args: argparse.Namespace) -> str:
    """The benchmark folder of a study's command line (:class:`StudyParser`'s
    ``--data-dir``), or exit with a message that says how to give it.

    Example:
        >>> data_dir_or_exit(argparse.Namespace(data_dir="../shared/data"))
        '../shared/data'

    Raises:
        SystemExit: neither ``--data-dir`` nor ``$MECHUNLEARN_DATA`` is set.
    """
    if not args.data_dir:
        sys.exit("Set MECHUNLEARN_DATA (or --data-dir) to the benchmark folder (../shared/data).")
    return args.data_dir


@dataclass(frozen=True)
class Task:
    """One task of a study: what to forget, what to keep, and what else to score.

    Attributes:
        forget: the forget skill (a :func:`mechunlearn.load_skill` name).
        retain: the skills to keep (probed and scored).
        general: the general skill (probed for the detectors' negatives and scored), or None.
        extra: held-out skills scored but never probed or fitted on: ``{name: (role, make)}``
            with ``make(n, seed, data_dir) -> Skill`` (``n`` examples, the cell's seed).
    """

    forget: str
    retain: tuple[str, ...]
    general: str | None = "mmlu"
    extra: Mapping[str, tuple[str, Callable[[int, int, str | None], Skill]]] = field(
        default_factory=dict
    )

    def __post_init__(self) -> None:
        retain = (self.retain,) if isinstance(self.retain, str) else tuple(self.retain)
        object.__setattr__(self, "retain", retain)


@dataclass
class Study:
    """Tasks x seeds, each a pipeline run of the same grid of methods.

    Attributes:
        tasks: ``{task name: Task}``.
        methods: the grid, as :class:`~mechunlearn.pipeline.RunConfig`'s ``methods``.
        seeds: the seeds of the probe/held-out split (and of every method that takes one).
        n: held-out (and probe) examples per skill.
        out: the study's folder; a cell is ``<out>/<task>/<folder_name(seed)>``.
        model: the model name (None: the default model).
        folder_name: a cell's folder under its task (default ``seed<k>``).
        data_dir, batch_size, quiet, device: as for :class:`~mechunlearn.pipeline.RunConfig`.
        fluency_prompts: ``(seed, data_dir) -> general prompts`` whose greedy continuations
            every cell scores with each method (:func:`~mechunlearn.fluency_table`, the
            cell's ``fluency.csv``); None for none.
        force: a cell whose folder holds a run of other settings is started over (its files
            deleted) rather than refused.
    """

    tasks: Mapping[str, Task]
    methods: Mapping[str, Mapping[str, Any]]
    seeds: Sequence[int] = (0,)
    n: int = 32
    out: str | Path = "results/study"
    model: str | None = None
    folder_name: Callable[[int], str] = field(default=lambda seed: f"seed{seed}")
    data_dir: str | None = None
    batch_size: int = 16
    quiet: bool = False
    device: str | None = None
    fluency_prompts: Callable[[int, str | None], Sequence[str]] | None = None
    force: bool = False

    def cells(self, tasks: Sequence[str] | None = None) -> Iterator[tuple[str, int]]:
        """``(task, seed)`` of every cell, task by task (``tasks``: a subset, in its order).

        Raises:
            ValueError: a task the study does not declare.
        """
        names = list(self.tasks) if tasks is None else list(tasks)
        unknown = [t for t in names if t not in self.tasks]
        if unknown:
            raise ValueError(
                f"Unknown task {unknown[0]!r}: this study has {', '.join(self.tasks)}."
            )
        for task in names:
            for seed in self.seeds:
                yield task, seed

    def config(self, task: str, seed: int) -> RunConfig:
        """The run config of one cell."""
        spec = self.tasks[task]
        return RunConfig(
            model=self.model, forget=spec.forget, retain=spec.retain, general=spec.general,
            n=self.n, seed=seed, methods=self.methods, data_dir=self.data_dir,
            batch_size=self.batch_size, quiet=self.quiet, device=self.device,
        )  # fmt: skip

    def folder(self, task: str, seed: int) -> Path:
        """The run folder of one cell."""
        return Path(self.out) / task / self.folder_name(seed)

    def load_model(self):
        """The study's model (on its device)."""
        return load_model_for(RunConfig(model=self.model, device=self.device, quiet=self.quiet))

    def run_cell(
        self,
        task: str,
        seed: int,
        model,
        skills_for: Callable[[Any, Skills], Mapping[str, Skills]] | None = None,
        finish: Callable[[RunFolder, pd.DataFrame], None] | None = None,
    ) -> pd.DataFrame:
        """Probe (one pass per skill), fit the grid, score the held-out halves and the extra
        skills; resumable. Writes ``sweep.csv`` in the cell's folder.

        Args:
            task, seed: the cell.
            model: the loaded model.
            skills_for: ``(model, skills) -> {registered method: Skills}`` for methods that
                train on other halves than the run's (:func:`~mechunlearn.pipeline.fit_methods`).
            finish: called with the folder and the table before the folder is unlocked (the
                study's own per-cell figures; write through ``folder.write``).

        Returns:
            The cell's table (:func:`mechunlearn.evaluate`'s columns after ``task`` and
            ``seed``).
        """
        config = self.config(task, seed)
        folder = RunFolder(self.folder(task, seed), config, force=self.force)
        skills = load_skills(config)
        try:
            folder.prepare()
            probes = probe(config, model, skills, folder, analyses=False)
            trained = skills_for(model, skills) if skills_for is not None else None
            fitted = fit_methods(config, model, skills, probes, folder, skills_for=trained)
            held, roles = skills.held_out()
            for name, (role, make) in self.tasks[task].extra.items():
                held[name], roles[name] = make(self.n, seed, self.data_dir), role
            with folder.timer("evaluate sweep"):
                table = evaluate(
                    model, held, fitted, batch_size=self.batch_size, quiet=self.quiet,
                    roles=roles, seed=seed,
                )  # fmt: skip
            table.insert(0, "task", task)
            table.insert(1, "seed", seed)
            folder.write(SWEEP, lambda p: write_text(p, table.to_csv(index=False)))
            self._write_fluency(task, seed, model, fitted, folder)
            if finish is not None:
                finish(folder, table)
        finally:
            folder.unlock()
        return table

    def fluency_cell(self, task: str, seed: int, model) -> pd.DataFrame | None:
        """``fluency.csv`` of a finished cell from the methods it saved (nothing is fitted or
        scored again): for cells run before ``fluency_prompts`` was set. None without
        ``fluency_prompts``.

        Raises:
            PipelineError: the cell has not saved every method of the grid.
        """
        if self.fluency_prompts is None:
            return None
        config = self.config(task, seed)
        folder = RunFolder(self.folder(task, seed), config)
        fitted = load_fitted(config, folder)
        try:
            folder.prepare()
            return self._write_fluency(task, seed, model, fitted, folder, again=True)
        finally:
            folder.unlock()

    def _write_fluency(
        self,
        task: str,
        seed: int,
        model,
        fitted: Mapping[str, Any],
        folder: RunFolder,
        again: bool = False,
    ) -> pd.DataFrame | None:
        """Score and write the cell's fluency table (kept from an earlier run unless ``again``:
        the folder's settings, hence its methods, are fixed)."""
        if self.fluency_prompts is None:
            return None
        if folder.path(FLUENCY).exists() and not again:
            return pd.read_csv(folder.path(FLUENCY))
        prompts = list(self.fluency_prompts(seed, self.data_dir))
        with folder.timer("fluency"):
            table = fluency_table(model, prompts, fitted, batch_size=self.batch_size)
        table = table.rename_axis("method").reset_index()
        table.insert(0, "task", task)
        table.insert(1, "seed", seed)
        folder.write(FLUENCY, lambda p: write_text(p, table.to_csv(index=False)))
        return table

    def run(
        self,
        model=None,
        tasks: Sequence[str] | None = None,
        skills_for: Callable[[Any, Skills], Mapping[str, Skills]] | None = None,
        finish: Callable[[RunFolder, pd.DataFrame], None] | None = None,
        after_cell: Callable[[], None] | None = None,
    ) -> list[pd.DataFrame]:
        """Every cell (:meth:`cells`), one after the other (:meth:`run_cell`).

        Args:
            model: the loaded model (None: :meth:`load_model`).
            tasks: a subset of the tasks.
            skills_for, finish: as for :meth:`run_cell`.
            after_cell: called after each cell (e.g. the study's summary so far).

        Returns:
            The cells' tables, in order.
        """
        model = self.load_model() if model is None else model
        tables = []
        for task, seed in self.cells(tasks):
            tables.append(self.run_cell(task, seed, model, skills_for=skills_for, finish=finish))
            if after_cell is not None:
                after_cell()
        return tables
