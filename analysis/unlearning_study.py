"""Unlearning results on the default model: NA, KSD and SP on held-out examples, with the
trade-off over NA's ratio, KSD's alpha and SP's ratio.

Tasks (each probes the first half of every skill and scores the other half):

* ``gsm8k-vs-mbpp``: forget GSM8K, retain MBPP, general MMLU and English Wikipedia text
  (XQuAD en contexts);
* ``mbpp-vs-gsm8k``: the reverse;
* ``xquad-de``: forget German reading comprehension (XQuAD de), retain the other six XQuAD
  languages, general MMLU.

Usage:
    MECHUNLEARN_DATA=../shared/data python analysis/unlearning_study.py [--n 48] [--tasks ...]
        [--na-ratios 0.005 0.015 0.03 0.1] [--sp-ratios ...] [--xquad-keep en es ...]

Every score is a full forward pass over the held-out halves per skill and per NA or SP setting
(detectors share one key pass), so on 2 CPU cores the grid and ``--n`` set the run time.

Writes ``results/unlearning/<task>/`` (the probes, analysis figures and tables of
``mechunlearn analyze``, plus ``sweep.csv``, ``tradeoff.png`` and ``study_settings.json``) and
``results/unlearning/summary.csv`` (every task folder's sweep); prints where they went. The
sweep includes the main job's defaults: NA ratio 0.03, KSD auto fpr=0.05 and SP ratio 0.015.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pandas as pd

import mechunlearn as mu
from mechunlearn import cli
from mechunlearn.plots import plot_tradeoff, save_figure

TASKS = {
    "gsm8k-vs-mbpp": dict(forget="gsm8k", retain=["mbpp"], general="mmlu", wiki=True),
    "mbpp-vs-gsm8k": dict(forget="mbpp", retain=["gsm8k"], general="mmlu", wiki=True),
    "xquad-de": dict(
        forget="xquad:de",
        retain=["xquad:en", "xquad:es", "xquad:hi", "xquad:zh", "xquad:vi", "xquad:ar"],
        general="mmlu",
        wiki=False,
    ),
}
NA_RATIOS = (0.005, 0.015, 0.03, 0.1)
KSD_H = (0.5, 1.0, 1.5, 2.0)
KSD_FPR = (0.01, 0.05, 0.1)
SP_RATIOS = (0.005, 0.015, 0.05)


def wiki_skill(n: int, seed: int, data_dir: str | None) -> mu.Skill:
    """English Wikipedia paragraphs (the XQuAD en contexts) as a language-modelling skill:
    the first sentence is the prompt, the rest of the paragraph the answer."""
    qa = mu.load_skill("xquad:en", data_dir=data_dir)
    seen, examples = set(), []
    for ex in qa:
        context = ex.prompt.split("\nQuestion:")[0].removeprefix("Context: ")
        if context in seen:
            continue
        seen.add(context)
        head, _, rest = context.partition(". ")
        if rest:
            examples.append(mu.Example(head + ".", " " + rest))
    return mu.Skill("wikipedia-en", examples, source="xquad en contexts").subsample(n, seed)


def run_task(name: str, spec: dict, args) -> pd.DataFrame:
    """Probe and analyse (``mechunlearn analyze``, resumable), fit the sweep, score held-out."""
    out = Path(args.out) / name
    keep = spec["retain"]
    if name.startswith("xquad") and args.xquad_keep:
        keep = [f"xquad:{lang}" for lang in args.xquad_keep]
    argv = ["analyze", "--forget", spec["forget"], "--retain", *keep]
    argv += ["--general", spec["general"], "--n", str(args.n), "--out", str(out)]
    argv += ["--seed", str(args.seed), "--batch-size", str(args.batch_size)]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    if args.device:
        argv += ["--device", args.device]
    if args.quiet:
        argv.append("--quiet")
    code = cli.main(argv)
    if code:
        raise SystemExit(f"the probes of {name} failed (exit {code})")

    # The saved probe statistics, re-used for every hyperparameter of the sweep.
    run = cli.Run(cli._parser().parse_args(argv))
    probed = cli.stage_collect(run)
    stats, keys, imp = probed["stats"], probed["keys"], probed["importance"]
    retain = cli._first_retain(run)
    keys_r = cli._concat([keys[role] for role in keys if role != "forget"])
    ivs: dict[str, object] = {}
    for r in args.na_ratios:
        ivs[f"NA ratio={r}"] = mu.NeuronAdjust(ratio=r, seed=args.seed).fit(
            stats["forget"], stats[retain]
        )
    for h in KSD_H:
        ivs[f"KSD h={h}"] = mu.KeySpaceDetector(h=h, layers=-1).fit(keys["forget"])
    for fpr in KSD_FPR:
        ivs[f"KSD auto fpr={fpr}"] = mu.KeySpaceDetector(layers=-1).fit(
            keys["forget"], keys_r, fpr=fpr, seed=args.seed
        )
    ivs["Ellipsoid auto fpr=0.05"] = mu.EllipsoidDetector(layers=-1).fit(
        keys["forget"], keys_r, fpr=0.05, seed=args.seed
    )
    for r in args.sp_ratios:
        ivs[f"SP ratio={r}"] = mu.SelectivePruning(ratio=r).fit(imp["forget"], imp[retain])

    held = run.held_out()
    if spec["wiki"]:
        held["wikipedia-en (general)"] = wiki_skill(args.n, args.seed, args.data_dir)
    with run.timer("evaluate sweep"):
        table = mu.evaluate(run.model, held, ivs, batch_size=args.batch_size, quiet=args.quiet)
    table.insert(0, "task", name)
    table.to_csv(out / "sweep.csv", index=False)
    fig = plot_tradeoff(table, title=f"{name}: forget vs keep (held-out, relative)")
    save_figure(fig, out / "tradeoff")
    return table


def summary_markdown(summary: pd.DataFrame) -> str:
    """One Markdown table per task: methods as rows, held-out skills as columns (forget
    first), relative performance, plus the abstention rate on the forget skill."""
    parts = []
    for task, table in summary.groupby("task", sort=False):
        rel = table.pivot(index="method", columns="skill", values="relative")
        methods = [m for m in dict.fromkeys(table["method"]) if m != "base"]
        skills = sorted(rel.columns, key=lambda c: (0 if "(forget)" in c else 1, c))
        n = int(table["n"].iloc[0])
        parts.append(f"**{task}** ({n} held-out examples per skill)\n")
        parts.append("| method | " + " | ".join(skills) + " |")
        parts.append("|---" * (len(skills) + 1) + "|")
        for m in methods:
            cells = [f"{rel.loc[m, c]:.2f}" for c in skills]
            parts.append(f"| {m} | " + " | ".join(cells) + " |")
        parts.append("")
    return "\n".join(parts)


def summarize(out: Path) -> Path:
    """``summary.csv`` and ``summary.md`` from every task folder's ``sweep.csv``."""
    sweeps = sorted(out.glob("*/sweep.csv"))
    if not sweeps:
        raise SystemExit(f"no task results under {out} (no */sweep.csv)")
    order = {name: i for i, name in enumerate(TASKS)}
    tables = sorted((pd.read_csv(p) for p in sweeps), key=lambda t: order.get(t["task"][0], 99))
    summary = pd.concat(tables, ignore_index=True)
    summary.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(summary_markdown(summary))
    return out / "summary.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None)
    parser.add_argument("--data-dir", default=os.environ.get("MECHUNLEARN_DATA"))
    parser.add_argument("--out", default="results/unlearning")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--na-ratios", type=float, nargs="+", default=list(NA_RATIOS))
    parser.add_argument("--sp-ratios", type=float, nargs="+", default=list(SP_RATIOS))
    parser.add_argument(
        "--xquad-keep",
        nargs="+",
        default=None,
        help="languages kept in the XQuAD task (default: all six others)",
    )
    parser.add_argument(
        "--summarize-only",
        action="store_true",
        help="only rebuild summary.csv and summary.md from the task folders under --out",
    )
    args = parser.parse_args()
    if args.summarize_only:
        print(f"unlearning study: {summarize(Path(args.out))} and summary.md")
        return
    if not args.data_dir:
        sys.exit("Set MECHUNLEARN_DATA (or --data-dir) to the benchmark folder (../shared/data).")
    for name in args.tasks:
        run_task(name, TASKS[name], args)
        settings = Path(args.out) / name / "study_settings.json"
        settings.write_text(json.dumps({**vars(args), "tasks": [name]}, indent=2))
    # Every task finished so far (tasks may be run by separate, even parallel, commands).
    path = summarize(Path(args.out))
    print(f"unlearning study: {path}, summary.md and {Path(args.out)}/<task>/tradeoff.png")


if __name__ == "__main__":
    main()
