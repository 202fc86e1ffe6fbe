"""Every method at matched collateral: each method's main knob chosen by :func:`mechunlearn.tune`
on held-back probe examples so that every kept skill keeps ``--floor`` (0.9) of its base score,
then scored on the held-out examples, with intervals.

The unlearning study (:mod:`unlearning_study`) scores each method at fixed settings, so "NA
forgets less than X" mixes the method with the collateral its setting happens to cost. Here each
cell (task, seed) splits every skill's probe half again in two (seeded): the methods fit on the
first quarter-set ("fit"), :func:`mechunlearn.tune` scores every candidate setting on the second
("tune": teacher-forced relative performance of the forget skill and of every kept skill, the
general one included) and keeps the candidate that forgets most with every kept skill at or above
the floor (none keeps it: the mildest, marked ``meets_floor`` False in the tuning table); the
chosen estimators are then scored on the held-out halves (never used to fit or choose) with the
paired-bootstrap intervals of :func:`mechunlearn.evaluate`, the unlearning study's extra skills
(English Wikipedia) included.

Knobs (:data:`KNOBS`): NA's ratio, SP's ratio, the false-positive cap ``fpr`` of KSD and the
ellipsoid on the last layer (the calibration questions among their negatives, as the pipeline
fits them) — the default ``--methods``; and, on request (each candidate a fit of minutes), LUNAR's
coefficient ``c`` (0.25–2, each candidate's layer chosen by its own sweep), SIMU's learning
rate (the unlearning study's other settings), the number of steps of GA, GradDiff and NPO (their
early stop kept) and RMU's learning rate. The trained methods fit on the fit quarter-sets cut to
512 tokens, as in the unlearning study.

Usage:

    MECHUNLEARN_DATA=../shared/data python analysis/matched_study.py \\
        --tasks gsm8k-vs-mbpp mbpp-vs-gsm8k --seeds 0 --n 32
    python analysis/matched_study.py --tasks gsm8k-vs-mbpp --seeds 0 --n 32 \
        --methods LUNAR SIMU GA GradDiff NPO RMU --out results/matched-trained
    python analysis/matched_study.py --summarize-only --also results/matched-trained

Per cell (``<out>/<task>/seed<k>-floor<f>/``, resumable: the fit quarter's statistics, each
finished method's search table ``tuning/<method>.csv`` and its chosen estimator are kept, so a
killed run searches only the unfinished methods again; a cell whose ``matched.csv`` exists is
skipped): ``matched.csv`` (the chosen settings'
held-out rows, :func:`mechunlearn.evaluate`'s columns), ``tuning.csv`` (every candidate's
tune-quarter scores, the floor and the choice), ``fluency.csv`` (:func:`mechunlearn.fluency_table`
of the chosen methods: greedy 32-token continuations of 16 first sentences of English Wikipedia
paragraphs, their perplexity under the bare model and their repeated 3-grams) and
``frontier.png`` (:func:`mechunlearn.plots.plot_matched_frontier`: each method's candidates on
the tune quarter and its chosen setting held out). Over every cell of ``--out`` and of the folders
of ``--also`` (runs with other ``--methods``, merged per cell): ``summary.md`` (a table per
cell, and for a task with several seeds one table over them: each seed's choice, forget score and
worst kept skill, and the forget score's mean and sd) and
``<task>-seed<k>-floor<f>-frontier.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

import mechunlearn as mu
from mechunlearn.cli import reuse_freed_buffers
from mechunlearn.io import write_text
from mechunlearn.models import n_layers
from mechunlearn.pipeline import (
    RunConfig,
    RunFolder,
    Skills,
    fit_estimator,
    load_model_for,
    load_skills,
    probe,
)
from mechunlearn.pipeline.folder import method_file
from mechunlearn.study import StudyParser, data_dir_or_exit

from unlearning_study import (
    BASELINE_PARAMS,
    SIMU_PARAMS,
    TASKS,
    TRAINED,
    family,
    fluency_prompts,
    simu_params,
    trained_skills,
)

#: Each tuned method's knob and candidates (mild to strong, so that "none keeps the floor"
#: falls back to the mildest), and the settings every candidate shares; a value may be a
#: function of the model (:func:`knob_settings`).
KNOBS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "NA": ({"ratio": [0.005, 0.01, 0.02, 0.03, 0.05, 0.1]}, {}),
    "SP": ({"ratio": [0.005, 0.01, 0.015, 0.02, 0.03, 0.05]}, {}),
    # the rank calibration (the default before issue 25), whose cap may be 0.001 with a few
    # hundred negatives (a conformal cap needs 1 / fpr - 1 of them)
    "KSD": ({"fpr": [0.001, 0.01, 0.05, 0.1]}, {"layers": -1, "calibration": "rank"}),
    "Ellipsoid": ({"fpr": [0.001, 0.01, 0.05, 0.1]}, {"layers": -1, "calibration": "rank"}),
    # the redirection's size, mild to strong, each candidate's layer by its own sweep (a layer
    # knob has no mild end: tried on GSM8K, its fallback "first candidate" was no mildest)
    "LUNAR": ({"coef": [0.25, 0.5, 1.0, 2.0]}, {"layer": "auto"}),
    "SIMU": (
        {"lr": [0.02, 0.05, 0.1, 0.2, 1.0]},
        {**SIMU_PARAMS, "layers": lambda model: simu_params(n_layers(model))["layers"]},
    ),
    **{b: ({"max_steps": [1, 2, 4, 8]}, dict(BASELINE_PARAMS)) for b in ("GA", "GradDiff", "NPO")},
    # first run with [5e-5, 5e-4, 5e-3]: the floor fell between the first two (GSM8K task)
    "RMU": ({"lr": [5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3]}, dict(BASELINE_PARAMS)),
}
#: The default ``--methods``: the ones whose candidates are cheap to fit.
CHEAP = ("NA", "SP", "KSD", "Ellipsoid")


def knob_settings(method: str, model) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """:data:`KNOBS`' entry of ``method`` for ``model``: its candidates and shared settings, the
    functions of the model among them evaluated."""
    candidates, shared = KNOBS[method]

    def value(v):
        return v(model) if callable(v) else v

    return {k: value(v) for k, v in candidates.items()}, {k: value(v) for k, v in shared.items()}


MATCHED = "matched.csv"
#: The cell's fluency table (:func:`mechunlearn.fluency_table`, methods as the index).
FLUENCY = "fluency.csv"
TUNING = "tuning.csv"


def split_probes(skills: Skills, seed: int) -> tuple[Skills, dict[str, mu.Skill]]:
    """The fit quarter-sets as a :class:`Skills` (probe = the first half of each probe half,
    held-out halves unchanged) and ``{column: tune quarter}`` (``forget`` and each kept skill's
    name)."""

    def halves(pair):
        fit, tune = pair[0].split(0.5, seed=seed)
        return (fit, pair[1]), tune

    forget, tune_f = halves(skills.forget)
    retain, tune = {}, {"forget": tune_f}
    for name, pair in skills.retain.items():
        retain[name], tune[pair[0].name] = halves(pair)
    general = None
    if skills.general is not None:
        general, tune[skills.general[0].name] = halves(skills.general)
    return Skills(forget=forget, retain=retain, general=general), tune


def tune_cell(
    config: RunConfig, model, fit_skills: Skills, probes, tune_skills, floor: float, folder
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Every tuned method's chosen estimator (``{label: estimator}``, e.g. ``"NA ratio=0.01"``)
    and the tuning table. Resumable per method: each method's search table
    (``tuning/<method>.csv``) and chosen estimator (``interventions/``) are kept, and a rerun
    searches only the methods that have not finished."""
    keep = {name: skill for name, skill in tune_skills.items() if name != "forget"}
    score = mu.tuning.relative_scorer(
        model, tune_skills["forget"], keep, batch_size=config.batch_size
    )
    trained = trained_skills(list(config.methods))(model, fit_skills)  # cut to 512 tokens
    chosen, tables = {}, []
    for method in config.methods:
        candidates, shared = knob_settings(method, model)
        knob = next(iter(candidates))
        spec = mu.interventions.get_method(method)
        skills = trained.get(method, fit_skills)
        table_file = f"tuning/{method}.csv"

        def search(method=method, candidates=candidates, shared=shared, spec=spec, skills=skills,
                   knob=knob, table_file=table_file):  # fmt: skip
            found = mu.tune(
                method, candidates,
                lambda est: fit_estimator(est, spec, model, skills, probes, config.batch_size),
                score, floor={name: floor for name in keep}, seed=config.seed,
                **shared,
            )  # fmt: skip
            table = found.table_.copy()
            table.insert(0, "method", method)
            table.insert(1, "knob", knob)
            table.insert(2, "value", table.pop(knob))
            folder.write(table_file, lambda p: write_text(p, table.to_csv(index=False)))
            return found.best_

        saved = folder.path(table_file)
        if not saved.exists() or not same_grid(read_table(saved), knob, candidates[knob]):
            # a search killed before its table, or one of another grid: search again
            saved.unlink(missing_ok=True)
            folder.path(method_file(method)).unlink(missing_ok=True)
        best = folder.load_or_make(
            method_file(method), spec.cls.load, search, lambda obj, p: obj.save(p),
            timer=f"tune {method}",
        )  # fmt: skip
        table = read_table(saved)
        value = table.loc[table["chosen"].astype(bool), "value"].iloc[0]
        chosen[f"{method} {knob}={value}"] = best
        tables.append(table.astype({"value": object}))  # 1, not 1.0, beside 0.02
    return chosen, pd.concat(tables, ignore_index=True)


def read_table(path: Path) -> pd.DataFrame:
    """A table this script wrote (``"NA"`` a method, not a missing value; an empty cell NaN)."""
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


def same_grid(table: pd.DataFrame, knob: str, values: list[Any]) -> bool:
    """Whether a saved search table tried exactly ``values`` of ``knob``, in order."""
    if set(table["knob"]) != {knob} or len(table) != len(values):
        return False
    try:
        return all(float(a) == float(b) for a, b in zip(table["value"], values, strict=True))
    except (TypeError, ValueError):
        return [str(a) for a in table["value"]] == [str(b) for b in values]


def run_cell(task: str, seed: int, args, model) -> pd.DataFrame:
    """One cell: probe the fit quarter-sets, tune every method, score the chosen ones held out."""
    spec = TASKS[task]
    config = RunConfig(
        model=args.model, forget=spec.forget, retain=spec.retain, general=spec.general, n=args.n,
        seed=seed, methods={m: {} for m in args.methods}, data_dir=args.data_dir,
        batch_size=args.batch_size, quiet=args.quiet, device=args.device,
    )  # fmt: skip
    folder = RunFolder(
        Path(args.out) / task / f"seed{seed}-floor{args.floor:g}", config, force=args.force
    )
    try:
        # a folder of other settings is refused here (with --force: emptied), finished or not
        folder.prepare()
        if folder.path(MATCHED).exists():  # a finished cell of these settings
            return read_table(folder.path(MATCHED))
        fit_skills, tune_skills = split_probes(load_skills(config), seed)
        probes = probe(config, model, fit_skills, folder, analyses=False)
        chosen, tuning = tune_cell(
            config, model, fit_skills, probes, tune_skills, args.floor, folder
        )
        folder.write(TUNING, lambda p: write_text(p, tuning.to_csv(index=False)))
        held, roles = fit_skills.held_out()
        for name, (role, make) in spec.extra.items():
            held[name], roles[name] = make(args.n, seed, args.data_dir), role
        with folder.timer("evaluate"):
            table = mu.evaluate(
                model, held, chosen, batch_size=args.batch_size, quiet=args.quiet, roles=roles,
                seed=seed,
            )  # fmt: skip
        table.insert(0, "task", task)
        table.insert(1, "seed", seed)
        prompts = fluency_prompts(seed, args.data_dir)
        with folder.timer("fluency"):
            fluent = mu.fluency_table(model, prompts, chosen, batch_size=args.batch_size)
        folder.write(FLUENCY, lambda p: write_text(p, fluent.to_csv(index_label="method")))
        folder.write(MATCHED, lambda p: write_text(p, table.to_csv(index=False)))
        fig = frontier_figure(task, seed, args.floor, tuning, table)
        folder.write("frontier.png", lambda p: mu.plots.save_figure(fig, p))
        mu.plots.close(fig)
    finally:
        folder.unlock()
    return table


def frontier_figure(task: str, seed: int, floor: float, tuning: pd.DataFrame, table):
    """:func:`mechunlearn.plots.plot_matched_frontier` of one cell."""
    title = f"{task} (seed {seed}): at matched collateral (floor {floor:g})"
    return mu.plots.plot_matched_frontier(tuning, table, floor=floor, title=title)


def read_cells(roots: list[Path]) -> dict[tuple[str, str], tuple[pd.DataFrame, ...]]:
    """Every finished cell under ``roots`` (runs of this script with other ``--methods``),
    ``{(task, cell folder name): (matched, tuning, fluency)}``, a cell's tables from every root
    concatenated: the base rows once, and a method found under several roots from the first
    (list a rerun first)."""
    found: dict[tuple[str, str], list[Path]] = {}
    for root in roots:
        for path in sorted(Path(root).glob("*/seed*/" + MATCHED)):
            found.setdefault((path.parent.parent.name, path.parent.name), []).append(path.parent)
    cells = {}
    for key, dirs in sorted(found.items()):
        tables, tunings, fluents = [], [], []
        for d in dirs:
            tuning = read_table(d / TUNING)
            tuning = tuning[~tuning["method"].isin({m for t in tunings for m in t["method"]})]
            table = read_table(d / MATCHED)
            fluent = pd.read_csv(d / FLUENCY, keep_default_na=False, index_col="method")
            first = not tables
            methods = set(tuning["method"]) | ({"base"} if first else set())
            tables.append(table[table["method"].str.split().str[0].isin(methods)])
            fluents.append(fluent[fluent.index.str.split().str[0].isin(methods)])
            tunings.append(tuning)
        cells[key] = tuple(pd.concat(t, ignore_index=True) for t in (tables, tunings)) + (
            pd.concat(fluents),
        )
    return cells


def summary_markdown(roots: list[Path]) -> str:
    """Per task: the chosen setting of each method and seed, its tune-quarter scores, and its
    held-out relative performance with the interval (every cell under ``roots``)."""
    parts = []
    for table, tuning, fluent in read_cells(roots).values():
        task, seed = table["task"].iloc[0], int(table["seed"].iloc[0])
        rows = table[table["method"] != "base"]
        role = rows.drop_duplicates("skill").set_index("skill")["role"]
        order = {"forget": 0, "retain": 1, "general": 2}
        skills = sorted(role.index, key=lambda s: (order.get(role[s], 3), s))
        parts.append(f"**{task}**, seed {seed} ({int(table['n'].iloc[0])} held-out examples "
                     "per skill; relative performance [95 % interval])\n")  # fmt: skip
        parts.append("| method (chosen) | meets floor on tune quarter | "
                     + " | ".join(f"{s} ({role[s]})" for s in skills)
                     + " | fluency: perplexity ratio | repeated 3-grams |")  # fmt: skip
        parts.append("|---" * (len(skills) + 4) + "|")
        base = fluent.loc["base"]
        bare = f"1.00 (perplexity {base.perplexity:.1f}) | {base.repeated_ngrams:.2f}"
        parts.append("| base | | " + " | ".join("1.00" for _ in skills) + f" | {bare} |")
        for method in sorted(dict.fromkeys(rows["method"]), key=family):
            chosen = tuning[(tuning["method"] == method.split()[0]) & tuning["chosen"]]
            meets = "yes" if bool(chosen["meets_floor"].iloc[0]) else "**no** (mildest)"
            cells = []
            for s in skills:
                r = rows[(rows["method"] == method) & (rows["skill"] == s)].iloc[0]
                cells.append(f"{r.relative:.2f} [{r.relative_low:.2f}, {r.relative_high:.2f}]")
            f = fluent.loc[method]
            cells += [f"{f.perplexity_ratio:.2f}", f"{f.repeated_ngrams:.2f}"]
            parts.append(f"| {method} | {meets} | " + " | ".join(cells) + " |")
        parts.append("")
    return "\n".join(parts)


def seeds_markdown(roots: list[Path]) -> str:
    """Per task and floor with finished cells of two or more seeds: each method family's chosen
    setting per seed, its held-out forget score [95 % interval] and worst kept skill (the lowest
    relative score of the retain and general skills), then the forget score's mean and sd over
    the seeds it ran on, and its worst kept skill over them."""
    by_task: dict[tuple[str, str], list[pd.DataFrame]] = {}
    for (task, cell), (table, _, _) in read_cells(roots).items():
        by_task.setdefault((task, cell.rsplit("-floor", 1)[1]), []).append(table)
    parts = []
    for (task, floor), tables in by_task.items():
        if len(tables) < 2:
            continue
        # per seed: each method's forget score and worst kept skill, as the frontier draws them
        points = {int(t["seed"].iloc[0]): mu.plots.tradeoff_points(t, keep="worst")
                  for t in tables}  # fmt: skip
        seeds = sorted(points)
        n = int(tables[0]["n"].iloc[0])
        parts.append(f"**{task}**, floor {floor}, seeds {', '.join(map(str, seeds))} ({n} held-out "
                     "examples per skill and seed): the chosen setting, forget left [95 % "
                     "interval], worst kept skill\n")  # fmt: skip
        parts.append("| method | " + " | ".join(f"seed {s}" for s in seeds)
                     + " | forget left: mean (sd) | worst kept, all seeds |")  # fmt: skip
        parts.append("|---" * (len(seeds) + 3) + "|")
        families = {m.split()[0] for p in points.values() for m in p.index}
        for fam in sorted(families, key=family):
            cells, left, kept = [], [], []
            for seed in seeds:
                chosen = [m for m in points[seed].index if m.split()[0] == fam]
                if not chosen:
                    cells.append("—")
                    continue
                p = points[seed].loc[chosen[0]]
                cells.append(f"{chosen[0].split(' ', 1)[-1]}: {p.forget:.2f} [{p.forget_low:.2f}, "
                             f"{p.forget_high:.2f}], {p.keep:.2f}")  # fmt: skip
                left.append(float(p.forget))
                kept.append(float(p.keep))
            sd = f"{pd.Series(left).std():.2f}" if len(left) > 1 else "—"
            mean = f"{sum(left) / len(left):.2f} ({sd}; {len(left)} seeds)"
            parts.append(f"| {fam} | " + " | ".join(cells) + f" | {mean} | {min(kept):.2f} |")
        parts.append("")
    return "\n".join(parts)


def write_summary(out: Path, roots: list[Path]) -> Path:
    """``summary.md`` and one frontier figure per cell (``<task>-<cell>-frontier.png``, the
    floor read from the cell's name ``seed<k>-floor<f>``) over the cells of every root, in
    ``out``."""
    for (task, cell), (table, tuning, _) in read_cells(roots).items():
        floor = float(cell.rsplit("-floor", 1)[1])
        fig = frontier_figure(task, int(table["seed"].iloc[0]), floor, tuning, table)
        mu.plots.save_figure(fig, out / f"{task}-{cell}-frontier.png")
        mu.plots.close(fig)
    seeds = seeds_markdown(roots)
    text = summary_markdown(roots) + (f"\n## Over seeds\n\n{seeds}" if seeds else "")
    return write_text(out / "summary.md", text)


def main() -> None:
    parser = StudyParser(__doc__.splitlines()[0], out="results/matched", seed=False, force=True)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--floor", type=float, default=0.9)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None)
    parser.add_argument("--methods", nargs="+", default=list(CHEAP), choices=list(KNOBS))
    parser.add_argument("--summarize-only", action="store_true")
    parser.add_argument(
        "--also", nargs="+", type=Path, default=[], metavar="DIR",
        help="the --out folders of other runs of this script (other --methods) whose cells join "
        "the summary and the frontier figures",
    )  # fmt: skip
    args = parser.parse_args()
    out = Path(args.out)
    roots = [out, *args.also]
    if not args.summarize_only:
        data_dir_or_exit(args)
        if not set(args.methods) & set(TRAINED):
            # not with a trained method, whose training peak would stay with the process
            reuse_freed_buffers()
        model = load_model_for(RunConfig(model=args.model, device=args.device, quiet=args.quiet))
        for task in args.tasks:
            for seed in args.seeds:
                run_cell(task, seed, args, model)
                write_summary(out, roots)
    print(f"matched study: {write_summary(out, roots)}")


if __name__ == "__main__":
    main()
