"""The paper's language matrix (its Figure 5) on the default model: forget each of seven languages
(XQuAD reading comprehension: en, es, hi, de, zh, vi, ar), keep the other six and MMLU.

For every forgotten language L:

* **KSD** (automatic alpha, false-positive cap 5 %, last layer) and the **ellipsoid** detector,
  fitted on L's probe key vectors with the other languages' and MMLU's probe keys as negatives;
* **NA** fitted on L's ``hook_pre`` statistics against the six other languages (several retain
  skills: each neuron is compared with its closest one), at the ratio
  :func:`mechunlearn.tune_neuron_adjust` picks on held-back *probe* examples (the largest effect on
  L that keeps every other language at >= 90 % of its base score; candidates ``--na-ratios``).

Every method is scored on the held-out halves of all seven languages and MMLU (the correct choice's
text, teacher-forced) by :func:`mechunlearn.evaluate`, in chunks cached under ``chunks/``: one for
the detectors (a bare pass per skill; their keys come from it) and one per language NA forgets (its
own bare pass and one edited pass per skill). A stopped study resumes from the last finished chunk,
and commands with different ``--forget`` run side by side (run the detectors first, e.g. with the
first command alone until NA's tuning starts: commands that start together each collect the
probes and score the detectors' chunk). Cells carry 95 % paired-bootstrap intervals.

Usage:
    MECHUNLEARN_DATA=../shared/data python analysis/language_study.py [--n 16] [--seed 0]
        [--methods "KSD auto fpr=0.05" "Ellipsoid auto fpr=0.05"]   # the detectors only
        [--forget en es]                                           # NA for these languages
        [--model gemma-3-270m]                # another model: results/languages-gemma-3-270m/
    python analysis/language_study.py --summarize-only   # the tables and figures from the chunks

Writes ``results/languages/``: ``matrix.csv`` (forget x method x skill), ``base.csv``,
``tuning.csv`` (NA's chosen ratio per language), ``summary.md`` (with the compute time of each
chunk), ``heatmap_<method>.png`` (drawn by :func:`mechunlearn.plots.plot_language_matrix`; a
method's rows are the languages scored so far), and the probes, fitted methods and chunks it
resumes from. The settings (``--n``, ``--seed``, ``--langs``, ``--na-ratios``) are recorded in
``settings.json``; a folder made with other settings is refused.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd

import mechunlearn as mu
from mechunlearn.cli import reuse_freed_buffers
from mechunlearn.evaluation import format_interval
from mechunlearn.io import read_json, write_json, write_text
from mechunlearn.pipeline import RunConfig, load_model_for
from mechunlearn.study import StudyParser, data_dir_or_exit

from study_cache import cached_evaluate, load_or_make

LANGS = ("en", "es", "hi", "de", "zh", "vi", "ar")
METHODS = ("KSD auto fpr=0.05", "Ellipsoid auto fpr=0.05", "NA tuned")


def main() -> None:
    parser = StudyParser(__doc__.splitlines()[0], out="results/languages")
    parser.add_argument("--n", type=int, default=16, help="probe and held-out examples per skill")
    parser.add_argument("--langs", nargs="+", default=list(LANGS), choices=LANGS)
    parser.add_argument(
        "--forget", nargs="+", default=None, choices=LANGS,
        help="the languages NA forgets in this command (default: all of --langs); each is its own "
        "resumable chunk, so commands with different --forget can run side by side",
    )  # fmt: skip
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=METHODS,
        help="which methods to fit and score (the detectors cost one bare pass per skill; NA "
        "one pass per skill per forgotten language, most of the run time)",
    )  # fmt: skip
    parser.add_argument("--na-ratios", type=float, nargs="+", default=[0.01, 0.03, 0.1])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--summarize-only", action="store_true",
        help="write the matrix, heatmaps and summary from the chunks scored so far; score nothing",
    )  # fmt: skip
    args = parser.parse_args()
    if args.summarize_only:
        recorded = Path(args.out) / "settings.json"
        langs = read_json(recorded)["langs"] if recorded.exists() else args.langs
        assemble(Path(args.out), [x for x in langs if x in args.langs], args.methods)
        return
    args.forget = args.forget or args.langs
    if not set(args.forget) <= set(args.langs):
        sys.exit(f"--forget {args.forget} must be among the scored languages --langs {args.langs}.")
    data_dir_or_exit(args)
    out = Path(args.out)
    (out / "probes").mkdir(parents=True, exist_ok=True)
    (out / "methods").mkdir(parents=True, exist_ok=True)
    # Cached probes, methods and chunks hold only for the settings that made them.
    settings = {"n": args.n, "seed": args.seed, "langs": args.langs, "na_ratios": args.na_ratios}
    if args.model:  # recorded for another model only: a default-model folder resumes as before
        settings["model"] = args.model
    if (out / "settings.json").exists() and read_json(out / "settings.json") != settings:
        sys.exit(
            f"{out} holds a study run with {read_json(out / 'settings.json')}, not {settings}: "
            "pass another --out (or delete the folder) to run these settings."
        )
    write_json(out / "settings.json", settings)
    reuse_freed_buffers()  # large activation buffers reused, not page-faulted in
    model = load_model_for(RunConfig(model=args.model, quiet=args.quiet))
    names = [f"xquad:{lang}" for lang in args.langs] + ["mmlu"]
    halves = {}
    for name in names:
        kw = {"answer_format": "text"} if name == "mmlu" else {}
        skill = mu.load_skill(name, n=2 * args.n, seed=args.seed, data_dir=args.data_dir, **kw)
        halves[name] = skill.split(0.5, seed=args.seed)
    pre, keys, heldback = {}, {}, {}
    for name, (probe_half, _) in halves.items():
        slug = name.replace(":", "_")
        keys[name] = load_or_make(
            out / "probes" / f"{slug}.keys.safetensors", mu.KeyVectors,
            lambda p=probe_half: mu.collect_keys(model, p, batch_size=args.batch_size, quiet=True),
        )  # fmt: skip
        if name != "mmlu" and METHODS[2] in args.methods:
            # NA's statistics come from 3/4 of the probe half; the last 1/4 is held back to
            # choose its ratio (never the scored held-out half).
            stats_part, heldback[name] = probe_half.split(0.25, seed=args.seed)
            pre[name] = load_or_make(
                out / "probes" / f"{slug}.pre.safetensors", mu.NeuronStats,
                lambda p=stats_part: mu.collect(model, p, batch_size=args.batch_size, quiet=True),
            )  # fmt: skip
    held = {name: h for name, (_, h) in halves.items()}
    roles = {name: "general" if name == "mmlu" else "retain" for name in held}
    chunks = out / "chunks"
    chunks.mkdir(exist_ok=True)

    def scored(name: str, interventions: dict) -> None:
        """One evaluate call over every held-out skill, kept as ``chunks/<name>.csv``."""
        cached_evaluate(
            chunks / f"{name}.csv", model, held, lambda: interventions, methods=interventions,
            batch_size=args.batch_size, quiet=args.quiet, roles=roles, seed=args.seed,
        )  # fmt: skip

    detectors = [m for m in METHODS[:2] if m in args.methods]
    if detectors:
        fitted = {}
        for lang in args.langs:
            forget = f"xquad:{lang}"
            negatives = mu.KeyVectors.concat_all([keys[n] for n in names if n != forget])
            for method, cls, slug in zip(
                METHODS[:2], (mu.KeySpaceDetector, mu.EllipsoidDetector), ("ksd", "ellipsoid"),
                strict=True,
            ):  # fmt: skip
                if method in detectors:
                    fitted[f"{lang} | {method}"] = load_or_make(
                        out / "methods" / f"{lang}.{slug}.safetensors", cls,
                        lambda cls=cls, f=forget, neg=negatives: cls(
                            layers=-1, fpr=0.05, seed=args.seed, calibration="rank"
                        ).fit(keys[f], neg),
                    )  # fmt: skip
        # The detectors only read the bare pass's keys: one pass per skill for all of them.
        scored("detectors", fitted)
    for lang in args.forget if METHODS[2] in args.methods else []:
        forget = f"xquad:{lang}"
        others = [n for n in names if n not in (forget, "mmlu")]

        def tuned(f=forget, others=others):
            keep = {n: heldback[n] for n in others}
            return mu.tune_neuron_adjust(
                model, pre[f], {n: pre[n] for n in others}, heldback[f], keep,
                ratios=args.na_ratios, floor=0.9, batch_size=args.batch_size, seed=args.seed,
            )  # fmt: skip

        began, path = time.perf_counter(), out / "methods" / f"{lang}.na.safetensors"
        fresh = not path.exists()
        na = load_or_make(path, mu.NeuronAdjust, tuned)
        if fresh:
            write_json(chunks / f"{lang}.na.tuning.json", {"seconds": time.perf_counter() - began})
        # One chunk per forgotten language (its own bare pass): a stopped study resumes here.
        scored(f"{lang}.na", {f"{lang} | {METHODS[2]}": na})
    # Every method scored so far, by this command or another one side by side.
    assemble(out, args.langs, list(METHODS))


def assemble(out: Path, langs: list[str], methods: list[str]) -> None:
    """``matrix.csv``, ``base.csv``, ``tuning.csv``, the heatmaps and ``summary.md`` from the
    chunks scored so far (by this command or any other with the same ``--out``)."""
    chunks = out / "chunks"
    tables, tuning = [], []
    if set(METHODS[:2]) & set(methods) and (chunks / "detectors.csv").exists():
        tables.append(pd.read_csv(chunks / "detectors.csv"))
    for lang in langs if METHODS[2] in methods else []:
        if (chunks / f"{lang}.na.csv").exists():
            tables.append(pd.read_csv(chunks / f"{lang}.na.csv"))
            path = out / "methods" / f"{lang}.na.safetensors"
            if path.exists():
                na = mu.NeuronAdjust.load(path)
                tuning.append(
                    {"forget": lang, "ratio": na.ratio, "n_selected": sum(na.n_selected_)}
                )
            else:
                print(f"{path} is missing: NA's ratio for {lang} left out of tuning.csv")
    if not tables:
        sys.exit(f"No scored chunks under {chunks} for {methods}: run the study first.")
    table = pd.concat(tables, ignore_index=True)
    rows = table[table["method"] != "base"].copy()
    rows[["forget", "method"]] = rows["method"].str.split(" \\| ", expand=True)
    rows["skill"] = rows["skill"].str.replace("xquad:", "", regex=False)
    rows["forgotten"] = rows["skill"] == rows["forget"]
    rows = rows[rows["method"].isin(methods) & rows["forget"].isin(langs)]
    write_text(out / "matrix.csv", rows.to_csv(index=False))
    base = table[table["method"] == "base"].drop_duplicates("skill")
    write_text(out / "base.csv", base.to_csv(index=False))
    if tuning:
        write_text(out / "tuning.csv", pd.DataFrame(tuning).to_csv(index=False))
    for m in dict.fromkeys(rows["method"]):
        fig = mu.plots.plot_language_matrix(rows, m)
        mu.plots.save_figure(fig, out / f"heatmap_{m.split()[0].lower()}")
        mu.plots.close(fig)
    missing = []
    for m in methods:
        done = set(rows.loc[rows["method"] == m, "forget"])
        if set(langs) - done:
            missing.append(f"{m}: {', '.join(x for x in langs if x not in done)}")
    text = summary(rows, base, chunks)
    if missing:
        text += f"\nNot scored yet (rerun the study to add them): {'; '.join(missing)}.\n"
    write_text(out / "summary.md", text)
    print(f"language study: {out / 'summary.md'}, matrix.csv and heatmap_*.png")


def summary(rows: pd.DataFrame, base: pd.DataFrame, chunks: Path) -> str:
    """Per method: the forgotten language's relative performance and the worst kept language;
    the base scores and the compute time the chunks recorded."""
    lines = ["| method | forgotten language | relative on it | worst other language | mmlu |",
             "|---|---|---|---|---|"]  # fmt: skip
    for m, part in rows.groupby("method", sort=False):
        for lang, r in part.groupby("forget", sort=False):
            own = r[r["forgotten"]].iloc[0]
            langs = r[~r["forgotten"] & (r["skill"] != "mmlu")]
            worst = langs.loc[langs["relative"].idxmin()]
            mmlu = r[r["skill"] == "mmlu"].iloc[0]
            cell = format_interval(own.relative, own.relative_low, own.relative_high)
            lines.append(
                f"| {m} | {lang} | {cell} | {worst.skill}: {worst.relative:.2f} "
                f"| {mmlu.relative:.2f} |"
            )
    scores = ", ".join(f"{r.skill} {r.score:.3f}" for r in base.itertuples())
    times = {p.name.removesuffix(".json"): read_json(p)["seconds"] for p in chunks.glob("*.json")}
    spent = ", ".join(f"{name} {sec / 60:.0f}" for name, sec in sorted(times.items()))
    return "\n".join(lines) + (
        f"\n\nBase scores: {scores}.\n\nCompute time per chunk (minutes, probes not counted): "
        f"{spent or 'not recorded'}.\n"
    )


if __name__ == "__main__":
    main()
