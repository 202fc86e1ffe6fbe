"""What makes Neuron Adjust forget? Its trade-off frontier on the default model, BOS left alone.

Around a baseline (selection by the signed mean difference, retain statistics from the retain skill
alone, the authors' reflected map, statistics over prompt and answer tokens), one factor at a time,
each over the ratios ``--ratios`` (0.5 % to 20 % of all neurons):

* selection by ``cohens_d``, ``kl`` or ``bhattacharyya`` instead of ``mean_diff``;
* retain statistics pooled with general text (the Wikipedia paragraphs' statistics merged into the
  retain skill's: one Gaussian), or **several retain skills** (retain and Wikipedia kept apart: each
  neuron compared with its closest one, ``NeuronAdjust.fit(stats_f, [stats_r, stats_wiki])``);
* the unreflected map ``mode="map"``;
* statistics over answer tokens only (``positions="answer"``) instead of prompt + answer.

Plus **NA auto**: the ratio :func:`mechunlearn.tune_neuron_adjust` chooses on held-back probe
examples (a quarter of the probe half; the statistics come from the other three quarters), the
largest effect on the forget skill that keeps every kept skill at >= 90 % of its base.

Every setting is scored on the held-out halves (forget, retain, MMLU, Wikipedia) with 95 %
paired-bootstrap intervals; the frontier is forget vs the worst kept skill.

Usage:
    MECHUNLEARN_DATA=../shared/data python analysis/na_frontier.py --tasks gsm8k-vs-mbpp \\
        [--model gemma-3-270m]                # another model: results/na_frontier-gemma-3-270m/

Writes ``results/na_frontier/<task>/``: ``frontier.csv`` (every setting x skill), ``frontier.png``
and ``summary.md`` (the best setting of each variant, and whether any meets forget <= 0.5 with every
kept skill >= 0.9); ``chunks/`` holds each ratio's scores as soon as they are measured, with
their compute time (a rerun reads them instead of scoring again), ``stats/`` the statistics and
``auto_tuning.csv`` NA auto's choice.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd

import mechunlearn as mu
from mechunlearn.cli import reuse_freed_buffers
from mechunlearn.io import write_text
from mechunlearn.pipeline import RunConfig, load_model_for
from mechunlearn.study import StudyParser, data_dir_or_exit

from study_cache import cached_evaluate, load_or_make

TASKS = {
    "gsm8k-vs-mbpp": ("gsm8k", "mbpp"),
    "mbpp-vs-gsm8k": ("mbpp", "gsm8k"),
}
RATIOS = (0.005, 0.01, 0.03, 0.1, 0.2)
SCORES = ("cohens_d", "kl", "bhattacharyya")


def _wiki(n: int, seed: int, data_dir: str) -> mu.Skill:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from unlearning_study import wiki_skill

    return wiki_skill(2 * n, seed, data_dir)


def _stats(model, skill, path: Path, positions: str = "all", batch_size: int = 16):
    return load_or_make(
        path, mu.NeuronStats,
        lambda: mu.collect(model, skill, positions=positions, batch_size=batch_size, quiet=True),
    )  # fmt: skip


def run(task: str, args, model) -> pd.DataFrame:
    forget_name, retain_name = TASKS[task]
    out = Path(args.out) / task
    (out / "stats").mkdir(parents=True, exist_ok=True)
    load = dict(n=2 * args.n, seed=args.seed, data_dir=args.data_dir)
    halves = {
        forget_name: mu.load_skill(forget_name, **load).split(0.5, seed=args.seed),
        retain_name: mu.load_skill(retain_name, **load).split(0.5, seed=args.seed),
        "mmlu": mu.load_skill("mmlu", answer_format="text", **load).split(0.5, seed=args.seed),
        "wikipedia-en": _wiki(args.n, args.seed, args.data_dir).split(0.5, seed=args.seed),
    }
    s = {}
    for name in (forget_name, retain_name, "wikipedia-en"):
        probe = halves[name][0]
        s[name] = _stats(model, probe, out / "stats" / f"{name}.all.safetensors")
    for name in (forget_name, retain_name):
        probe = halves[name][0]
        s[name + "/answer"] = _stats(
            model, probe, out / "stats" / f"{name}.answer.safetensors", "answer"
        )
    pooled = s[retain_name].merge(s["wikipedia-en"])
    f, r = s[forget_name], s[retain_name]

    def variants(ratio: float) -> dict[str, mu.NeuronAdjust]:
        base = dict(ratio=ratio, seed=args.seed)
        return {
            f"mean_diff ratio={ratio}": mu.NeuronAdjust(**base).fit(f, r),
            **{
                f"{score} ratio={ratio}": mu.NeuronAdjust(score=score, **base).fit(f, r)
                for score in SCORES
            },
            f"pooled ratio={ratio}": mu.NeuronAdjust(**base).fit(f, pooled),
            f"multi-retain ratio={ratio}": mu.NeuronAdjust(**base).fit(
                f, {retain_name: r, "wikipedia-en": s["wikipedia-en"]}
            ),
            f"map ratio={ratio}": mu.NeuronAdjust(mode="map", **base).fit(f, r),
            f"answer-only ratio={ratio}": mu.NeuronAdjust(**base).fit(
                s[forget_name + "/answer"], s[retain_name + "/answer"]
            ),
        }

    held = {name: h for name, (_, h) in halves.items()}
    roles = {
        forget_name: "forget",
        retain_name: "retain",
        "mmlu": "general",
        "wikipedia-en": "general",
    }
    # Scored one ratio at a time (the bare pass is repeated per chunk: ~1/9 more passes), each
    # chunk written at once, so an interrupted run resumes where it stopped.
    chunks = out / "chunks"
    chunks.mkdir(exist_ok=True)

    def scored(name: str, grid) -> pd.DataFrame:
        return cached_evaluate(
            chunks / f"n{args.n}-seed{args.seed}-{name}.csv", model, held, grid,
            batch_size=args.batch_size, quiet=args.quiet, roles=roles, seed=args.seed,
        )  # fmt: skip

    parts = [scored(f"ratio={ratio}", lambda ratio=ratio: variants(ratio)) for ratio in args.ratios]

    # NA auto: statistics on 3/4 of the probe halves, the ratio chosen on the last quarter.
    def auto_grid() -> dict[str, mu.NeuronAdjust]:
        quarters = {n: halves[n][0].split(0.25, seed=args.seed) for n in (forget_name, retain_name)}
        f3 = _stats(
            model, quarters[forget_name][0], out / "stats" / f"{forget_name}.3q.safetensors"
        )
        r3 = _stats(
            model, quarters[retain_name][0], out / "stats" / f"{retain_name}.3q.safetensors"
        )
        keep = {
            retain_name: quarters[retain_name][1],
            "wikipedia-en": halves["wikipedia-en"][0][:8],
        }
        auto = mu.tune_neuron_adjust(
            model, f3, r3, quarters[forget_name][1], keep, ratios=args.auto_ratios, floor=0.9,
            batch_size=args.batch_size, seed=args.seed,
        )  # fmt: skip
        write_text(out / "auto_tuning.csv", auto.tuning_.to_csv(index=False))
        return {f"auto (chose {auto.ratio})": auto}

    if not args.no_auto:
        parts.append(scored("auto-" + "-".join(map(str, sorted(args.auto_ratios))), auto_grid))
    # The bare model's rows once (every chunk scored it, identically).
    table = pd.concat([parts[0], *(p[p["method"] != "base"] for p in parts[1:])], ignore_index=True)
    order = {name: i for i, name in enumerate(held)}
    table = table.sort_values("skill", key=lambda c: c.map(order), kind="stable")
    table = table.reset_index(drop=True)
    table.insert(0, "task", task)
    write_text(out / "frontier.csv", table.to_csv(index=False))
    fig = mu.plots.plot_tradeoff(  # one line per variant (the method name's first word)
        table.drop(columns="kind"), title=f"{task}: Neuron Adjust, forget vs worst kept skill",
        keep="worst",
    )  # fmt: skip
    mu.plots.save_figure(fig, out / "frontier")
    mu.plots.close(fig)
    return table


def summarize(table: pd.DataFrame) -> str:
    """Per variant: its best setting (lowest forget whose worst kept skill is >= 0.9, else the
    highest worst-kept), and whether any setting meets the goal."""
    points = mu.plots.tradeoff_points(table.drop(columns="kind"), keep="worst")
    points["variant"] = [m.split(" ratio=")[0] for m in points.index]
    lines = ["| variant | best setting | forget [95 % CI] | worst kept [95 % CI] | meets goal |",
             "|---|---|---|---|---|"]  # fmt: skip
    for variant, group in points.groupby("variant", sort=False):
        ok = group[group["keep"] >= 0.9]
        best = ok.sort_values("forget").iloc[0] if len(ok) else group.sort_values("keep").iloc[-1]
        goal = bool(best["forget"] <= 0.5 and best["keep"] >= 0.9)
        lines.append(
            f"| {variant} | {best.name} | {best.forget:.2f} [{best.forget_low:.2f}, "
            f"{best.forget_high:.2f}] | {best.keep:.2f} [{best.keep_low:.2f}, "
            f"{best.keep_high:.2f}] | {'yes' if goal else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = StudyParser(__doc__.splitlines()[0], out="results/na_frontier")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    parser.add_argument(
        "--auto-ratios", type=float, nargs="+", default=list(RATIOS),
        help="the ratios NA auto chooses from (on held-back probe examples; cheap)",
    )  # fmt: skip
    parser.add_argument("--no-auto", action="store_true", help="leave NA auto out")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    data_dir_or_exit(args)
    reuse_freed_buffers()  # large activation buffers reused, not page-faulted in
    model = load_model_for(RunConfig(model=args.model, quiet=args.quiet))
    for task in args.tasks:
        t0 = time.perf_counter()
        table = run(task, args, model)
        minutes = (time.perf_counter() - t0) / 60
        text = summarize(table) + (
            f"\n{task}: this command took {minutes:.0f} min on this machine (chunks an earlier "
            "command scored are read back from chunks/, not timed here; each chunk's compute time "
            "is in chunks/<chunk>.json when it was recorded).\n"
        )
        write_text(Path(args.out) / task / "summary.md", text)
        print(text)


if __name__ == "__main__":
    main()
