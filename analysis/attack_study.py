"""Attack study: what comes back after unlearning, for every registered method, per task.

The tasks are the unlearning study's (:data:`unlearning_study.TASKS`: ``gsm8k-vs-mbpp``,
``mbpp-vs-gsm8k``, ``xquad-de``). Every registered method (``mu.methods()``) is fitted at its
registered defaults, except where the CPU budget needs settings:

* SIMU: the unlearning study's settings (:func:`unlearning_study.simu_params`: last six layers,
  two integrated-gradient steps, ten updates, texts cut at 512 tokens), trained on the probe
  prompts shorter than 512 tokens (:func:`unlearning_study.simu_skills`);
* the trained baselines (GA, GradDiff, NPO, RMU): their defaults plus ``max_length=512`` and the
  same short prompts, for SIMU's reason (the memory of a step on the longest MBPP texts);
* LUNAR: one fixed layer (:func:`lunar_layer`, 16 of the default model's 30, the benchmarks'
  layer) instead of the default sweep over every third layer (its cost: docs/benchmarks.md).

Each ``--methods`` set is one resumable pipeline run folder ``<out>/<task>/seed<k>-<methods>/`` (a
:class:`mechunlearn.study.Study` of those methods: probe, fit, ``sweep.csv``, and the command's
flags in ``study_settings.json``), so the costly methods run as later commands beside the cheap
ones' finished results, and the bare model is scored once per folder. The attack families
(:mod:`mechunlearn.attacks`, :func:`mechunlearn.pipeline.attack`) then run on the folder one by one,
in ``--attacks`` order; a family whose ``tables/attacks_<family>.csv`` exists is skipped. Each
step's wall time goes to ``<out>/timings.json`` (``{"<task>/<folder>": {"fit + evaluate": s, "attack
<family>": s}}``; a resumed step keeps its first measurement), and as a table to
``<out>/timings.md``.

Per task (every method and seed found under it): ``<out>/<task>/recovery.csv``
(:func:`mechunlearn.attacks.recovery_table`'s rows with ``task``, ``seed`` and ``folder``, after
the forget skill's relative score with no attack from ``sweep.csv``, family ``unlearned``;
methods by their registered names), ``recovery.md`` (per seed, method x attack, 95 %
intervals) and ``recovery.png`` (:func:`mechunlearn.plots.plot_attack_recovery`, first seed).

Usage (docs/attacks.md's tables come from these commands, one after the other, at one thread;
the cheap methods first, the prompt attacks last):

    export OMP_NUM_THREADS=1 MECHUNLEARN_DATA=../shared/data
    A="--tasks gsm8k-vs-mbpp --seeds 0 --n 16 --steps 1 5 20 --out results/attacks"
    python analysis/attack_study.py $A --methods NA KSD Ellipsoid SP LUNAR \\
        --attacks relearning quantization residual
    python analysis/attack_study.py $A --methods SIMU --attacks relearning quantization residual
    python analysis/attack_study.py $A --methods NA KSD Ellipsoid SP LUNAR --attacks prompts
    python analysis/attack_study.py $A --methods GA GradDiff NPO RMU \\
        --attacks relearning quantization residual
    python analysis/attack_study.py --out results/attacks --summarize-only

``--methods`` (default: every registered method, one folder) and ``--attacks`` (default: all
four) choose subsets, ``--steps`` the relearning step counts (default 1 5 20), ``--model``
another model (results in ``results/attacks-<model>/`` unless ``--out``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd

import mechunlearn as mu
from mechunlearn.attacks import STEPS, recovery_markdown, recovery_table
from mechunlearn.io import read_json, write_json, write_text
from mechunlearn.models import n_layers
from mechunlearn.pipeline import ATTACKS, RunConfig, RunFolder, attack, load_model_for
from mechunlearn.study import SWEEP, Study, StudyParser, data_dir_or_exit

from unlearning_study import BASELINE_PARAMS, TASKS, TRAINED, simu_params, trained_skills

#: Every registered method, in the registry's order.
METHODS = tuple(spec.name for spec in mu.methods())
TIMINGS = "timings.json"
#: The recovery table's families in order: the score with no attack, then the attacks'.
FAMILIES = ("unlearned", *ATTACKS)


def lunar_layer(layers: int) -> int:
    """LUNAR's fixed layer for a model of ``layers`` layers: ``layers // 2 + 1``.

    Example:
        >>> lunar_layer(30)   # the default model; the benchmarks' LUNAR layer
        16
    """
    return layers // 2 + 1


def method_settings(method: str, layers: int) -> dict[str, Any]:
    """The study's settings of one registered method (module docstring) for a model of
    ``layers`` layers; ``{}`` for the registered defaults.

    Example:
        >>> method_settings("LUNAR", 30), method_settings("NA", 30)
        ({'layer': 16}, {})
        >>> method_settings("GA", 30)
        {'max_length': 512}
    """
    if method == "SIMU":
        return simu_params(layers)
    if method == "LUNAR":
        return {"layer": lunar_layer(layers)}
    if method in TRAINED:
        return dict(BASELINE_PARAMS)
    return {}


def cell_name(seed: int, methods: list[str]) -> str:
    """The run folder of a set of methods under its task: ``seed<k>-<methods>`` (registry
    order), so two subsets run as separate commands never clash.

    Example:
        >>> cell_name(0, ["SP", "NA"])
        'seed0-NA-SP'
    """
    return f"seed{seed}-" + "-".join(m for m in METHODS if m in methods)


def study(args, layers: int) -> Study:
    """The study of ``args.methods``: every task and seed, one run folder each."""
    return Study(
        tasks=TASKS, methods={m: method_settings(m, layers) for m in args.methods},
        seeds=args.seeds, n=args.n, out=args.out, model=args.model,
        folder_name=lambda seed: cell_name(seed, args.methods), data_dir=args.data_dir,
        batch_size=args.batch_size, quiet=args.quiet, device=args.device, force=args.force,
    )  # fmt: skip


def record_time(out: Path, cell: str, step: str, seconds: float) -> None:
    """Add one step's wall time to ``<out>/timings.json`` (a step already there is kept)."""
    path = out / TIMINGS
    timings = read_json(path, "timings") if path.exists() else {}
    timings.setdefault(cell, {}).setdefault(step, round(seconds, 1))
    write_json(path, timings)


def drop_times(out: Path, cell: str) -> None:
    """Remove one cell's wall times from ``<out>/timings.json`` (a cell started over)."""
    path = out / TIMINGS
    if path.exists():
        timings = read_json(path, "timings")
        timings.pop(cell, None)
        write_json(path, timings)


def run_cell(task: str, seed: int, args, model) -> Path:
    """Fit and score ``args.methods`` on one task and seed (resumable), then run every family
    of ``args.attacks`` whose table is missing, in that order; returns the run folder."""
    declared = study(args, n_layers(model))
    folder = declared.folder(task, seed)
    cell = f"{task}/{folder.name}"
    out = Path(args.out)
    finished = (folder / SWEEP).exists()
    checked = RunFolder(folder, declared.config(task, seed), force=args.force)
    try:  # a folder of other settings is refused here (with --force: emptied)
        checked.prepare()
    finally:
        checked.unlock()
    if finished and not (folder / SWEEP).exists():  # started over: its old times go too
        drop_times(out, cell)
    if not (folder / SWEEP).exists():

        def settings(folder: RunFolder, table: pd.DataFrame) -> None:
            folder.write(
                "study_settings.json", lambda p: write_json(p, {**vars(args), "task": task})
            )

        t0 = time.perf_counter()
        declared.run_cell(
            task, seed, model, skills_for=trained_skills(args.methods), finish=settings
        )
        record_time(out, cell, "fit + evaluate", time.perf_counter() - t0)
    for family in args.attacks:
        if (folder / "tables" / f"attacks_{family}.csv").exists():
            continue
        print(f"{time.strftime('%H:%M:%S')} {cell}: attack {family}", flush=True)
        t0 = time.perf_counter()
        attack(folder, [family], steps=args.steps, quiet=args.quiet, model=model)
        record_time(out, cell, f"attack {family}", time.perf_counter() - t0)
    return folder


def task_table(task_dir: Path) -> pd.DataFrame:
    """:func:`~mechunlearn.attacks.recovery_table` of every run folder under a task, with
    ``task``, ``seed`` and ``folder``; families in :data:`FAMILIES` order, methods by their
    registered names, in the registry's order; a method found in two folders of one seed is
    kept once (the first folder's)."""
    short = {spec.full_name: spec.name for spec in mu.methods()}
    parts = []
    for folder in sorted(task_dir.glob("seed*")):
        tables = {
            f: pd.read_csv(p, keep_default_na=False, na_values=[""])
            for f in ATTACKS
            if (p := folder / "tables" / f"attacks_{f}.csv").exists()
        }
        if not (folder / "config.json").exists() or not (tables or (folder / SWEEP).exists()):
            continue
        rows = pd.concat([unlearned_rows(folder), recovery_table(tables)], ignore_index=True)
        rows["method"] = rows["method"].map(short).fillna(rows["method"])
        rows.insert(0, "task", task_dir.name)
        rows.insert(1, "seed", int(read_json(folder / "config.json", "run config")["seed"]))
        rows.insert(2, "folder", folder.name)
        parts.append(rows)
    if not parts:
        return pd.DataFrame()
    table = pd.concat(parts, ignore_index=True)
    first = table.drop_duplicates(["seed", "method"])[["seed", "method", "folder"]]
    table = table.merge(first, on=["seed", "method", "folder"])
    order = {
        "method": {m: i for i, m in enumerate(METHODS)},
        "family": {f: i for i, f in enumerate(FAMILIES)},
    }
    return table.sort_values(
        ["seed", "family", "method"], key=lambda c: c.map(order[c.name]) if c.name in order else c,
        kind="stable",
    ).reset_index(drop=True)  # fmt: skip


def unlearned_rows(folder: Path) -> pd.DataFrame:
    """The forget skill's relative score with no attack (the folder's ``sweep.csv``, with its
    interval) as :func:`~mechunlearn.attacks.recovery_table` rows: family ``unlearned``."""
    columns = list(recovery_table({}).columns)
    if not (folder / SWEEP).exists():
        return pd.DataFrame(columns=columns)
    sweep = pd.read_csv(folder / SWEEP, keep_default_na=False, na_values=[""])
    rows = sweep[(sweep["role"] == "forget") & (sweep["method"] != "base")]
    return pd.DataFrame(
        {
            "method": rows["method"], "kind": rows["kind"], "family": "unlearned",
            "attack": "no attack", "metric": "relative", "value": rows["relative"],
            "low": rows["relative_low"], "high": rows["relative_high"],
        },
        columns=columns,
    )  # fmt: skip


def summarize(out: Path) -> list[Path]:
    """Per task folder under ``out``: ``recovery.csv``, ``recovery.md`` and ``recovery.png``."""
    if not out.is_dir():
        raise SystemExit(f"No attack study results in {out}: it is not a folder.")
    written = []
    for task_dir in sorted(p for p in out.iterdir() if p.is_dir() and p.name in TASKS):
        table = task_table(task_dir)
        if table.empty:
            continue
        write_text(task_dir / "recovery.csv", table.to_csv(index=False))
        parts = []
        for seed, rows in table.groupby("seed"):
            n = cell_n(task_dir, int(seed))
            parts.append(
                f"**{task_dir.name}**, seed {seed}{n}: the forget skill under each attack "
                "(prompts and re-quantization: relative score, method / bare model under the "
                "same attack; relearning: recovery after k steps; residual: best of the layers "
                "the method changes, bare model in brackets), 95 % paired-bootstrap intervals\n"
            )
            methods = list(dict.fromkeys(rows["method"]))
            parts.append(recovery_markdown(rows, methods) + "\n")
            parts.append(recovery_markdown(rows, methods, prompts="all") + "\n")
        write_text(task_dir / "recovery.md", "\n".join(parts))
        first = table[table["seed"] == table["seed"].min()]
        fig = mu.plots.plot_attack_recovery(
            first, title=f"{task_dir.name}: the forget skill under attack"
        )
        mu.plots.save_figure(fig, task_dir / "recovery")
        mu.plots.close(fig)
        written.append(task_dir / "recovery.csv")
    if (out / TIMINGS).exists():
        write_text(out / "timings.md", timings_markdown(out))
    return written


def timings_markdown(out: Path) -> str:
    """``<out>/timings.json`` as a Markdown table: one row per run folder, one column per step
    (wall seconds; ``—`` where the step has not run)."""
    timings = read_json(out / TIMINGS, "timings")
    steps = list(dict.fromkeys(step for cell in timings.values() for step in cell))
    lines = ["| run folder | " + " | ".join(steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for cell, got in timings.items():
        row = [f"{got[s]:.0f} s" if s in got else "—" for s in steps]
        lines.append(f"| {cell} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def cell_n(task_dir: Path, seed: int) -> str:
    """``", n = <k> held-out examples per skill"`` from a cell's ``config.json`` ("" if none)."""
    for config in sorted(task_dir.glob(f"seed{seed}-*/config.json")):
        return f", n = {read_json(config, 'run config')['n']} held-out examples per skill"
    return ""


def main() -> None:
    parser = StudyParser(__doc__.splitlines()[0], out="results/attacks", seed=False, force=True)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None)
    parser.add_argument("--summarize-only", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    if args.summarize_only:
        print(f"attack study: {[str(p) for p in summarize(out)]}")
        return
    data_dir_or_exit(args)
    model = load_model_for(RunConfig(model=args.model, device=args.device, quiet=args.quiet))
    for task in args.tasks:
        for seed in args.seeds:
            run_cell(task, seed, args, model)
            summarize(out)
    print(f"attack study: {out}/<task>/recovery.md, recovery.png and {out / TIMINGS}")


if __name__ == "__main__":
    main()
