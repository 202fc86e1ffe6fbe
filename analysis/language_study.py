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
text, teacher-forced) in one :func:`mechunlearn.evaluate` call: one bare pass per skill (the
detectors' keys come from it) and one pass per NA edit. Cells carry 95 % paired-bootstrap
intervals.

Usage:
    MECHUNLEARN_DATA=../shared/data python analysis/language_study.py [--n 16] [--seed 0]
        [--methods "KSD auto fpr=0.05" "Ellipsoid auto fpr=0.05"]   # the detectors only

Writes ``results/languages/``: ``matrix.csv`` (forget x method x skill), ``summary.md``,
``heatmap_<method>.png`` (drawn by :func:`mechunlearn.plots.plot_language_matrix`), the probes
and fitted methods (resumable).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pandas as pd

import mechunlearn as mu
from mechunlearn.cli import reuse_freed_buffers
from mechunlearn.evaluation import format_interval
from mechunlearn.io import write_text
from mechunlearn.pipeline import RunConfig, load_model_for

LANGS = ("en", "es", "hi", "de", "zh", "vi", "ar")
METHODS = ("KSD auto fpr=0.05", "Ellipsoid auto fpr=0.05", "NA tuned")


def _load_or(path: Path, cls, make):
    if path.exists():
        try:
            return cls.load(path)
        except (ValueError, OSError) as err:
            print(f"{path} is damaged ({err}); computing it again", file=sys.stderr)
    obj = make()
    obj.save(path)
    return obj


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="probe and held-out examples per skill")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--langs", nargs="+", default=list(LANGS), choices=LANGS)
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=METHODS,
        help="which methods to fit and score (the detectors cost one bare pass per skill; NA "
        "one pass per skill per forgotten language, most of the run time)",
    )  # fmt: skip
    parser.add_argument("--na-ratios", type=float, nargs="+", default=[0.01, 0.03, 0.1])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data-dir", default=os.environ.get("MECHUNLEARN_DATA"))
    parser.add_argument("--out", default="results/languages")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if not args.data_dir:
        sys.exit("Set MECHUNLEARN_DATA (or --data-dir) to the benchmark folder (../shared/data).")
    t0 = time.perf_counter()
    out = Path(args.out)
    (out / "probes").mkdir(parents=True, exist_ok=True)
    (out / "methods").mkdir(parents=True, exist_ok=True)
    reuse_freed_buffers()  # large activation buffers reused, not page-faulted in
    model = load_model_for(RunConfig(quiet=args.quiet))
    names = [f"xquad:{lang}" for lang in args.langs] + ["mmlu"]
    halves = {}
    for name in names:
        kw = {"answer_format": "text"} if name == "mmlu" else {}
        skill = mu.load_skill(name, n=2 * args.n, seed=args.seed, data_dir=args.data_dir, **kw)
        halves[name] = skill.split(0.5, seed=args.seed)
    pre, keys, heldback = {}, {}, {}
    for name, (probe_half, _) in halves.items():
        slug = name.replace(":", "_")
        keys[name] = _load_or(
            out / "probes" / f"{slug}.keys.safetensors", mu.KeyVectors,
            lambda p=probe_half: mu.collect_keys(model, p, batch_size=args.batch_size, quiet=True),
        )  # fmt: skip
        if name != "mmlu" and METHODS[2] in args.methods:
            # NA's statistics come from 3/4 of the probe half; the last 1/4 is held back to
            # choose its ratio (never the scored held-out half).
            stats_part, heldback[name] = probe_half.split(0.25, seed=args.seed)
            pre[name] = _load_or(
                out / "probes" / f"{slug}.pre.safetensors", mu.NeuronStats,
                lambda p=stats_part: mu.collect(model, p, batch_size=args.batch_size, quiet=True),
            )  # fmt: skip
    methods, tuning = {}, []
    for lang in args.langs:
        forget = f"xquad:{lang}"
        others = [n for n in names if n not in (forget, "mmlu")]
        negatives = mu.KeyVectors.concat_all([keys[n] for n in names if n != forget])
        for method, cls, slug in zip(
            METHODS[:2], (mu.KeySpaceDetector, mu.EllipsoidDetector), ("ksd", "ellipsoid"),
            strict=True,
        ):  # fmt: skip
            if method not in args.methods:
                continue
            methods[(lang, method)] = _load_or(
                out / "methods" / f"{lang}.{slug}.safetensors", cls,
                lambda cls=cls, f=forget, neg=negatives: cls(
                    layers=-1, fpr=0.05, seed=args.seed
                ).fit(keys[f], neg),
            )  # fmt: skip

        def tuned(f=forget, others=others):
            keep = {n: heldback[n] for n in others}
            return mu.tune_neuron_adjust(
                model, pre[f], {n: pre[n] for n in others}, heldback[f], keep,
                ratios=args.na_ratios, floor=0.9, batch_size=args.batch_size, seed=args.seed,
            )  # fmt: skip

        if METHODS[2] not in args.methods:
            continue
        path = out / "methods" / f"{lang}.na.safetensors"
        na = _load_or(path, mu.NeuronAdjust, tuned)
        methods[(lang, METHODS[2])] = na
        tuning.append({"forget": lang, "ratio": na.ratio, "n_selected": sum(na.n_selected_)})
    held = {name: h for name, (_, h) in halves.items()}
    roles = {name: "general" if name == "mmlu" else "retain" for name in held}
    flat = {f"{lang} | {m}": iv for (lang, m), iv in methods.items()}
    table = mu.evaluate(
        model, held, flat, batch_size=args.batch_size, quiet=args.quiet, roles=roles, seed=args.seed
    )
    rows = table[table["method"] != "base"].copy()
    rows[["forget", "method"]] = rows["method"].str.split(" \\| ", expand=True)
    rows["skill"] = rows["skill"].str.replace("xquad:", "", regex=False)
    rows["forgotten"] = rows["skill"] == rows["forget"]
    write_text(out / "matrix.csv", rows.to_csv(index=False))
    write_text(out / "base.csv", table[table["method"] == "base"].to_csv(index=False))
    if tuning:
        write_text(out / "tuning.csv", pd.DataFrame(tuning).to_csv(index=False))
    for m in args.methods:
        fig = mu.plots.plot_language_matrix(rows, m)
        mu.plots.save_figure(fig, out / f"heatmap_{m.split()[0].lower()}")
        mu.plots.close(fig)
    write_text(out / "summary.md", summary(rows, table, time.perf_counter() - t0))
    print(f"language study: {out / 'summary.md'}, matrix.csv and heatmap_*.png")


def summary(rows: pd.DataFrame, table: pd.DataFrame, seconds: float) -> str:
    """Per method: the forgotten language's relative performance and the worst kept language."""
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
    base = table[table["method"] == "base"]
    scores = ", ".join(f"{r.skill} {r.score:.3f}" for r in base.itertuples())
    return "\n".join(lines) + f"\n\nBase scores: {scores}. Run time: {seconds / 60:.0f} min.\n"


if __name__ == "__main__":
    main()
