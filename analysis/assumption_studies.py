"""The assumption checks on the default model for three pairs of skills: Gaussian fit,
separation, hypercube geometry and convexity, layer by layer (figures + CSV tables).

Studies (each is ``mechunlearn analyze`` with its skills; statistics are reused on a rerun):

* ``gsm8k-vs-mbpp``: math word problems vs Python coding, general MMLU;
* ``mmlu-subjects``: MMLU mathematics vs the other MMLU subjects (general: XQuAD en);
* ``xquad-languages``: XQuAD German vs English, Spanish and Chinese (general: MMLU).

Usage:
    MECHUNLEARN_DATA=../shared/data python analysis/assumption_studies.py [--n 64] \\
        [--studies ...] [--model gemma-3-270m]

Writes ``results/assumptions/<study>/`` (``results/assumptions-<model>/`` for another
``--model``) (figures/*.png, tables/*.csv), and
``results/assumptions/claims.md``: the paper's claims beside what the first study measures on the
default model (and, for KSD's headline, what ``analysis/unlearning_study.py`` measured, if run).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

import mechunlearn as mu
from mechunlearn import cli
from mechunlearn.io import write_text
from mechunlearn.study import StudyParser, data_dir_or_exit

STUDIES = {
    "gsm8k-vs-mbpp": ["--forget", "gsm8k", "--retain", "mbpp", "--general", "mmlu"],
    "mmlu-subjects": ["--forget", "mmlu:math", "--retain", "mmlu:-math", "--general", "xquad:en"],
    "xquad-languages": [
        "--forget",
        "xquad:de",
        "--retain",
        "xquad:en",
        "xquad:es",
        "xquad:zh",
        "--general",
        "mmlu",
    ],  # fmt: skip
}


def main() -> None:
    parser = StudyParser(__doc__.splitlines()[0], out="results/assumptions", quiet=False)
    parser.add_argument("--studies", nargs="+", default=list(STUDIES), choices=list(STUDIES))
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--from-run", metavar="FOLDER",
        help="only write the claims table from an existing run folder (e.g. `make run`'s report/)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.from_run:
        text = claims(Path(args.from_run), f"mechunlearn run --out {args.from_run}")
        write_text(Path(args.out) / "claims_from_run.md", text)
        print(text)
        return
    data_dir = data_dir_or_exit(args)
    for name in args.studies:
        argv = ["analyze", *STUDIES[name], "--n", str(args.n), "--seed", str(args.seed),
                "--data-dir", data_dir, "--out", f"{args.out}/{name}"]  # fmt: skip
        if args.device:
            argv += ["--device", args.device]
        if args.model:
            argv += ["--model", args.model]
        code = cli.main(argv)
        if code:
            sys.exit(f"study {name} failed (exit {code})")
        print(f"{name}: figures in {args.out}/{name}/figures, tables in {args.out}/{name}/tables")
    first = args.studies[0]
    text = claims(Path(args.out) / first, first)
    write_text(Path(args.out) / "claims.md", text)
    print(text)


def claims(folder: Path, study: str) -> str:
    """The paper's claims (Llama-3-8B) beside the verdicts measured in ``folder``."""
    tables = folder / "tables"
    cmd = (
        f"`{study}`"
        if study.startswith("mechunlearn")
        else f"`python analysis/assumption_studies.py --studies {study}`"
    )
    gauss = pd.read_csv(tables / "gaussian_by_layer.csv")
    share = gauss["share_gaussian"].mean()
    sep = pd.read_csv(tables / "separation_by_layer.csv")
    trends = pd.read_csv(tables / "hypercube_trends.csv").set_index("metric")
    side = trends.loc["log_rel_side"]
    side = side.iloc[0] if isinstance(side, pd.DataFrame) else side
    keys_f = mu.KeyVectors.load(folder / "stats" / "forget.keys.safetensors")
    others = {
        k.meta["skill"]: k
        for p in sorted((folder / "stats").glob("*.keys.safetensors"))
        if p.name not in ("forget.keys.safetensors", "calibration.keys.safetensors")
        and (k := mu.KeyVectors.load(p))
    }
    cube = mu.analysis.hypercube(keys_f, others)
    at15 = cube.inclusion([15.0])
    last = at15[at15["layer"] == cube.layers[-1]]
    held = last[(last["role"] == "forget") & (last["part"] == "held-out")]["inclusion"].iloc[0]
    other = last[last["role"] != "forget"].groupby("skill")["inclusion"].first()
    other_text = ", ".join(f"{k} {v:.0%}" for k, v in other.items())
    rows = [
        (
            "MLP pre-activations are Gaussian per neuron (the premise of Neuron Adjust)",
            f"{share:.0%} of {keys_f.meta['skill']} neurons pass Anderson-Darling and Jarque-Bera "
            "at 5 % (raw; at most ~90 % for truly Gaussian neurons)",
            "mostly not" if share < 0.5 else "largely",
            cmd,
        ),
        (
            "Some neurons separate two skills",
            f"largest Cohen's d per layer {sep['max'].min():.2f}-{sep['max'].max():.2f}; "
            f"90th percentile {sep['q90'].median():.2f} (median over layers)",
            "yes" if sep["max"].max() > 0.8 else "weakly",
            cmd,
        ),
        (
            "At alpha = 15 the cube holds ~100 % of GSM8K and 0 % of MBPP queries",
            f"last layer: held-out {keys_f.meta['skill']} {held:.0%}; others {other_text}",
            "yes" if held > 0.9 and other.max() < 0.1 else "no",
            cmd,
        ),
        (
            "Cubes shrink and separate in deeper layers",
            f"normalised cube side vs depth: Spearman rho = {side['rho']:+.2f} "
            f"(p = {side['p_value']:.1g})",
            "supported" if bool(side["supports_claim"]) else "not supported",
            cmd,
        ),
    ]
    summary = Path(folder).parents[1] / "unlearning" / "summary.csv"
    if summary.exists():
        t = pd.read_csv(summary, keep_default_na=False, na_values=[""])
        ksd = t[t["method"] == "KSD default"]  # the library's defaults
        per = ksd.groupby(["task", "role"])["relative"].agg(["mean", "min", "max"])
        forget = per.xs("forget", level="role")
        kept = ksd[ksd["role"] != "forget"]["relative"]
        seeds = ksd["seed"].nunique() if "seed" in ksd else 1
        rows.append((
            "KSD: > 80 % forgetting with < 10 % loss elsewhere",
            "KSD with the library's defaults, forget skill left (mean over "
            f"{seeds} seed{'s' if seeds > 1 else ''}, range): "
            + "; ".join(
                f"{task} {r['mean']:.2f} ({r['min']:.2f}-{r['max']:.2f})"
                for task, r in forget.iterrows()
            )
            + f"; kept skills {kept.min():.2f}-{kept.max():.2f}",
            _ksd_verdict(ksd),
            "`python analysis/unlearning_study.py`",
        ))  # fmt: skip
    model = json.loads((folder / "config.json").read_text()).get("model") or "the default model"
    out = [f"| the paper's claim (Llama-3-8B) | measured on {model} | verdict | command |",
           "|---|---|---|---|"]  # fmt: skip
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(out) + "\n"


def _ksd_verdict(ksd: pd.DataFrame) -> str:
    """Whether each task and seed meets the claim (forget skill < 0.2 left, every kept skill
    > 0.9): "yes" (all), "no" (none) or "partly" with the count per task."""
    ksd = ksd.assign(seed=ksd["seed"] if "seed" in ksd else 0)
    forget = ksd[ksd["role"] == "forget"].groupby(["task", "seed"], sort=False)["relative"].max()
    kept = ksd[ksd["role"] != "forget"].groupby(["task", "seed"], sort=False)["relative"].min()
    met = (forget < 0.2) & (kept.reindex(forget.index) > 0.9)
    if met.all() or not met.any():
        return "yes" if met.all() else "no"
    per_task = met.groupby(level="task", sort=False).agg(["sum", "size"])
    return "partly: " + ", ".join(
        f"{task} on {r['sum']} of {r['size']} seeds" for task, r in per_task.iterrows()
    )


if __name__ == "__main__":
    main()
