"""Skill or format? Does Key Space Detection, fitted on GSM8K questions, detect GSM8K *problems* or
a text style?

Unseen GSM8K questions and non-maths controls (MBPP tasks, MMLU questions, Wikipedia sentences)
are each wrapped in the formats of :mod:`mechunlearn.data.variants`: bare (``plain``), GSM8K's own
``Question: ... Answer:`` layout, inside a Python docstring or comment, after an unrelated paragraph
of English text, as a four-way multiple-choice question, in the default model's chat template, and
(GSM8K) with its numbers changed. KSD and the ellipsoid detector at their default settings are
fitted on the GSM8K probe questions (GSM8K's own layout) with the package's calibration questions
as negatives (:func:`mechunlearn.calibration_skill`); the detection rate of every variant is
measured with a 95 % Wilson interval. A second fit on several formats (the
probe questions in GSM8K's layout, plain, as a docstring and in the chat template) shows whether
seeing formats fixes what one format misses (the formats it was fitted on are marked).

``--variants`` adds KSD variants that try to survive the format attack (issue #26, item 6), every
combination of: key vectors at the last prompt token or (``pooled``) averaged over the prompt's
tokens (``mu.collect_keys(pool="mean")``); every layer or (``middle``) a band of middle layers
(the middle third, rule "all") or the one middle layer; fitted on GSM8K's layout, on the four
formats, or (``multi-format-negatives``) on the four formats with negatives in the same four
formats: the calibration questions and other MBPP/MMLU/Wikipedia examples than the tested ones
(``--n-neg`` each), calibrated at each false-positive cap of ``--fprs``. ``robust.csv`` and
``robust.md`` then hold, per variant and wrapper, the GSM8K detection rate and the worst
control's, and whether the variant reaches the goal (>= 0.8 of GSM8K in every wrapper, <= 0.05
of every control in the same wrapper).

Usage:
    MECHUNLEARN_DATA=../shared/data python analysis/format_study.py [--n 60] [--model gemma-3-270m]
        [--variants pooled middle multi-format-negatives] [--n-neg 20] [--fprs 0.001 0.01]

Writes ``results/formats/`` (``results/formats-<model>/`` for another ``--model``):
``detection.csv``, ``summary.md`` and ``detection.png``; the key vectors of every wrapped set are
cached under ``keys/`` (``<set>.mean.safetensors``: pooled), so an interrupted run resumes.
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import pandas as pd

import mechunlearn as mu
from mechunlearn.cli import reuse_freed_buffers
from mechunlearn.data import format_variants
from mechunlearn.io import write_text
from mechunlearn.kernels.bootstrap import wilson_interval
from mechunlearn.pipeline import RunConfig, load_model_for
from mechunlearn.study import StudyParser, data_dir_or_exit

from study_cache import load_or_make

VARIANTS = ("plain", "question_prefix", "docstring", "comment", "after_paragraph",
            "multiple_choice", "chat", "numbers_changed")  # fmt: skip
CONTROLS = ("mbpp", "mmlu", "wikipedia")
FIT_FORMATS = ("question_prefix", "plain", "docstring", "chat")
#: Variants a control cannot take: only GSM8K has numbers to change, and a Wikipedia sentence has
#: no answer to offer among choices.
SKIPPED = {
    "mbpp": ("numbers_changed",),
    "mmlu": ("numbers_changed",),
    "wikipedia": ("numbers_changed", "multiple_choice"),
}
NEW_VARIANTS = ("pooled", "middle", "multi-format-negatives")
#: The goal of issue #26 item 6: GSM8K detected at least this often in every wrapper ...
GOAL_DETECT = 0.8
#: ... and no control detected more often than this in the same wrapper.
GOAL_FPR = 0.05


def _wiki(n: int, seed: int, data_dir: str) -> mu.Skill:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from unlearning_study import wiki_skill

    w = wiki_skill(n, seed, data_dir)  # first sentence as the prompt
    return mu.Skill("wikipedia", [mu.Example(ex.prompt, "") for ex in w], source=w.source)


def _others(pool: mu.Skill, avoid: mu.Skill, n: int) -> mu.Skill:
    """The first ``n`` examples of ``pool`` whose prompt is not one of ``avoid``'s."""
    seen = set(avoid.prompts)
    index = [i for i, p in enumerate(pool.prompts) if p not in seen][:n]
    if len(index) < n:
        raise SystemExit(f"Only {len(index)} {pool.name} examples outside the tested ones.")
    return pool[index]


def _spec_name(
    det: str, pool: str, layers: str, fit: str, fpr: float | None, n_formats: int
) -> str:
    """A variant's name: the base detectors keep their old names."""
    parts = [det + (" on mean-pooled keys" if pool == "mean" else "")]
    if layers != "all":
        parts.append(layers)
    if fit == "many":
        parts.append(f"fitted on {n_formats} formats")
    elif fit == "many+neg":
        parts.append(f"fitted on {n_formats} formats with negatives in them")
    if fpr is not None:
        parts.append(f"fpr={fpr:g}")
    return ", ".join(parts)


def main() -> None:
    parser = StudyParser(__doc__.splitlines()[0], out="results/formats")
    parser.add_argument("--n", type=int, default=60, help="held-out examples per skill")
    parser.add_argument("--n-fit", type=int, default=100, help="GSM8K probe questions")
    parser.add_argument(
        "--variants", nargs="*", default=[], choices=NEW_VARIANTS,
        help="detector variants to add (every combination; see the module docstring)",
    )  # fmt: skip
    parser.add_argument(
        "--n-neg", type=int, default=20,
        help="multi-format-negatives: examples of each control, per format, as negatives",
    )  # fmt: skip
    parser.add_argument(
        "--n-cal", type=int, default=None, help="calibration questions (default: all 252)"
    )
    parser.add_argument(
        "--fprs", type=float, nargs="+", default=[None],
        help="multi-format-negatives: the false-positive caps to calibrate at, one variant each "
        "(default: the detectors' default)",
    )  # fmt: skip
    args = parser.parse_args()
    pooled = "pooled" in args.variants
    dd = data_dir_or_exit(args)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reuse_freed_buffers()  # large activation buffers reused, not page-faulted in
    model = load_model_for(RunConfig(model=args.model, quiet=args.quiet))
    gsm = mu.load_skill("gsm8k", n=args.n_fit + args.n, seed=args.seed, data_dir=dd)
    probe, held = gsm.split(args.n, seed=args.seed)
    paragraphs = _wiki(200, args.seed + 1, dd).prompts  # other paragraphs than the controls
    controls = {
        "mbpp": mu.load_skill("mbpp", n=args.n, seed=args.seed, data_dir=dd),
        "mmlu": mu.load_skill("mmlu", n=args.n, seed=args.seed, data_dir=dd, answer_format="text"),
        "wikipedia": _wiki(args.n, args.seed, dd),
    }
    tok = model.tokenizer

    def path(tag: str, pool: str) -> Path:
        return (
            out / "keys" / (f"{tag}.safetensors" if pool == "last" else f"{tag}.{pool}.safetensors")
        )

    def keys(skill, tag: str, pool: str = "last") -> mu.KeyVectors:  # cached: a rerun resumes
        def make() -> mu.KeyVectors:
            if not pooled:
                return mu.collect_keys(model, skill, quiet=True)
            # Both pools from one pass; the other one is kept too.
            probe = mu.collect(model, skill, what=("keys", "mean_keys"), quiet=True)
            both = {"last": probe.keys, "mean": probe.mean_keys}
            for other, k in both.items():
                if other != pool:
                    k.save(path(tag, other))
            return both[pool]

        return load_or_make(path(tag, pool), mu.KeyVectors, make)

    # A base model (Gemma 3 270M) has no chat template: its chat variant cannot be built.
    no_chat = () if getattr(tok, "chat_template", None) else ("chat",)
    if no_chat:
        print(f"{tok.name_or_path}: no chat template, so no chat-template variant.")
    fit_formats = [f for f in FIT_FORMATS if f not in no_chat]
    fit_variants = format_variants(probe, names=fit_formats, paragraphs=paragraphs, tokenizer=tok)
    pools = ["last", "mean"] if pooled else ["last"]
    calibration = mu.calibration_skill(n=args.n_cal)
    # Negatives in the fit formats: the calibration questions in the formats it lacks, and other
    # examples of the controls than the tested ones (another seed, the tested ones left out).
    neg_sets: dict[str, mu.Skill] = {}
    if "multi-format-negatives" in args.variants:
        more = [f for f in fit_formats if f not in ("plain", "question_prefix")]
        neg_sets["calibration.more"] = mu.calibration_skill(
            n=args.n_cal, formats=more, tokenizer=tok
        )
        m, s2 = 2 * (args.n + args.n_neg), args.seed + 2
        pools_of = {
            "mbpp": mu.load_skill("mbpp", n=m, seed=s2, data_dir=dd),
            "mmlu": mu.load_skill("mmlu", n=m, seed=s2, data_dir=dd, answer_format="text"),
            "wikipedia": _wiki(m, s2, dd),
        }
        for name, pool_skill in pools_of.items():
            neg = _others(pool_skill, controls[name], args.n_neg)
            for v, wrapped in format_variants(
                neg, names=fit_formats, paragraphs=paragraphs, tokenizer=tok, seed=args.seed
            ).items():
                neg_sets[f"neg.{name}.{v}"] = wrapped

    fit_data = {}  # (pool, fit) -> (forget keys, negative keys)
    for pool in pools:
        negatives = keys(calibration, "calibration", pool)
        fit_one = keys(probe, "fit.question_prefix", pool)
        fit_many = mu.KeyVectors.concat_all(
            [keys(v, f"fit.{n}", pool) for n, v in fit_variants.items()]
        )
        fit_data[pool, "one"] = fit_one, negatives
        fit_data[pool, "many"] = fit_many, negatives
        if neg_sets:
            fit_data[pool, "many+neg"] = (
                fit_many,
                mu.KeyVectors.concat_all(
                    [negatives] + [keys(v, tag, pool) for tag, v in neg_sets.items()]
                ),
            )
    n_layers = model.cfg.n_layers
    band = list(range(n_layers // 3, 2 * n_layers // 3))
    layer_sets = {"all": None}
    if "middle" in args.variants:
        layer_sets[f"layers {band[0]}-{band[-1]}"] = band
        layer_sets[f"layer {n_layers // 2}"] = [n_layers // 2]
    fits = ["one", "many"] + (["many+neg"] if neg_sets else [])
    specs = [("KSD", "last", "all", "one", None), ("Ellipsoid", "last", "all", "one", None),
             ("KSD", "last", "all", "many", None)]  # fmt: skip
    for pool, layers, fit in itertools.product(pools, layer_sets, fits):
        for fpr in args.fprs if fit == "many+neg" else [None]:
            if ("KSD", pool, layers, fit, fpr) not in specs:
                specs.append(("KSD", pool, layers, fit, fpr))
    if neg_sets:  # the ellipsoid on the most promising fit data
        specs += [("Ellipsoid", p, "all", "many+neg", f) for p in pools for f in args.fprs]
    detectors, spec_of = {}, {}
    for det, pool, layers, fit, fpr in specs:
        name = _spec_name(det, pool, layers, fit, fpr, len(fit_formats))
        cls = mu.KeySpaceDetector if det == "KSD" else mu.EllipsoidDetector
        settings = {} if fpr is None else {"fpr": fpr}
        detectors[name] = cls(layers=layer_sets[layers], **settings).fit(*fit_data[pool, fit])
        spec_of[name] = {"pool": pool, "layers": layers, "fit": fit, "fpr_setting": fpr}
    rows = []
    for skill_name, skill in {"gsm8k": held, **controls}.items():
        names = [v for v in VARIANTS if v not in SKIPPED.get(skill_name, ()) + no_chat]
        for variant, wrapped in format_variants(
            skill, names=names, paragraphs=paragraphs, tokenizer=tok, seed=args.seed
        ).items():
            k = {pool: keys(wrapped, f"{skill_name}.{variant}", pool) for pool in pools}
            for det_name, det in detectors.items():
                spec = spec_of[det_name]
                hits = det.detect_keys(k[spec["pool"]]).detected.cpu().numpy().astype(float)
                low, high = wilson_interval(int(hits.sum()), len(hits))
                seen = variant == "question_prefix" or (
                    spec["fit"] != "one" and variant in fit_formats
                )
                rows.append({
                    "detector": det_name, "skill": skill_name, "variant": variant,
                    "rate": hits.mean(), "low": low, "high": high, "n": len(hits),
                    "fitted_on_this_format": seen, "calibrated_fpr": det.fpr_,
                    **spec,
                })  # fmt: skip
    table = pd.DataFrame(rows)
    write_text(out / "detection.csv", table.to_csv(index=False))
    if args.variants:
        robust = robustness(table)
        write_text(out / "robust.csv", robust.to_csv(index=False))
        write_text(out / "robust.md", robust_summary(robust, table))
    base = list(detectors)[:3]  # the figure: the three detectors of the original study
    fig = mu.plots.plot_detection_by_format(table[table["detector"].isin(base)])
    mu.plots.save_figure(fig, out / "detection")
    mu.plots.close(fig)
    minutes = (time.perf_counter() - t0) / 60
    write_text(out / "summary.md", summary(table) + f"\nRun time: {minutes:.0f} min.\n")
    print(f"format study: {out / 'summary.md'} ({minutes:.0f} min)")


def robustness(table: pd.DataFrame) -> pd.DataFrame:
    """Per detector and wrapper: the GSM8K detection rate and the worst control's (the control
    detected most often in that wrapper), each with its Wilson interval."""
    rows = []
    for (det, variant), part in table.groupby(["detector", "variant"], sort=False):
        gsm = part[part["skill"] == "gsm8k"].iloc[0]
        ctl = part[part["skill"] != "gsm8k"]
        worst = ctl.loc[ctl["rate"].idxmax()] if len(ctl) else None
        rows.append({
            "detector": det, "variant": variant, "pool": gsm["pool"], "layers": gsm["layers"],
            "fit": gsm["fit"], "fpr_setting": gsm["fpr_setting"],
            "fitted_on_this_format": bool(gsm["fitted_on_this_format"]),
            "gsm8k": gsm["rate"], "gsm8k_low": gsm["low"], "gsm8k_high": gsm["high"],
            "gsm8k_n": gsm["n"],
            "worst_control": None if worst is None else worst["skill"],
            "control_rate": None if worst is None else worst["rate"],
            "control_low": None if worst is None else worst["low"],
            "control_high": None if worst is None else worst["high"],
            "control_n": None if worst is None else worst["n"],
        })  # fmt: skip
    return pd.DataFrame(rows)


def robust_summary(robust: pd.DataFrame, table: pd.DataFrame) -> str:
    """Per variant: the worst wrapper's GSM8K detection, the worst control false-positive rate
    over the wrappers, and the goal's verdict; then variant x wrapper, with 95 % intervals."""

    def rate(r, col: str, low: str, high: str) -> str:
        return f"{r[col]:.2f} [{r[low]:.2f}, {r[high]:.2f}]"

    lines = [
        f"Goal: GSM8K detected >= {GOAL_DETECT} in every wrapper, every control <= {GOAL_FPR} in "
        "the same wrapper. n per cell: "
        f"GSM8K {int(robust['gsm8k_n'].max())}, controls {int(robust['control_n'].max())}.\n",
        "| detector | worst wrapper: GSM8K detected [95 % CI] | worst control detected [95 % CI] "
        "| wrappers with GSM8K >= 0.8 | goal |",
        "|---|---|---|---|---|",
    ]
    for det, part in robust.groupby("detector", sort=False):
        g = part.loc[part["gsm8k"].idxmin()]
        c = part.loc[part["control_rate"].astype(float).idxmax()]
        ok = part["gsm8k"].min() >= GOAL_DETECT and part["control_rate"].max() <= GOAL_FPR
        good = int((part["gsm8k"] >= GOAL_DETECT).sum())
        where = f"{c['worst_control']}, {c['variant']}" if c["control_rate"] > 0 else "none"
        lines.append(
            f"| {det} | {rate(g, 'gsm8k', 'gsm8k_low', 'gsm8k_high')} ({g['variant']}) | "
            f"{rate(c, 'control_rate', 'control_low', 'control_high')} ({where}) | "
            f"{good}/{len(part)} | {'**yes**' if ok else 'no'} |"
        )
    variants = list(dict.fromkeys(robust["variant"]))
    lines += [
        "",
        "GSM8K detected [95 % CI] / worst control detected [95 % CI], per wrapper "
        "(* = a fit format):\n",
        "| detector | " + " | ".join(variants) + " |",
        "|---" * (len(variants) + 1) + "|",
    ]
    for det, part in robust.groupby("detector", sort=False):
        cells = []
        for v in variants:
            r = part[part["variant"] == v].iloc[0]
            ctl = (
                "—"
                if r["worst_control"] is None or pd.isna(r["control_rate"])
                else rate(r, "control_rate", "control_low", "control_high")
            )
            mark = "*" if r["fitted_on_this_format"] else ""
            cells.append(f"{rate(r, 'gsm8k', 'gsm8k_low', 'gsm8k_high')}{mark} / {ctl}")
        lines.append(f"| {det} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary(table: pd.DataFrame) -> str:
    """One table per detector: variants as rows, skills as columns, detection rate [95 % CI];
    GSM8K is what should be detected, the others are false positives."""
    parts = []
    for det, part in table.groupby("detector", sort=False):
        skills = list(dict.fromkeys(part["skill"]))
        parts.append(f"**{det}** (detection rate [95 % CI]; gsm8k should be high, the rest low)\n")
        parts.append("| variant | " + " | ".join(skills) + " |")
        parts.append("|---" * (len(skills) + 1) + "|")
        for variant, rows in part.groupby("variant", sort=False):
            cells = []
            for s in skills:
                r = rows[rows["skill"] == s]
                if r.empty:
                    cells.append("")
                    continue
                r = r.iloc[0]
                mark = "*" if r["fitted_on_this_format"] and s == "gsm8k" else ""
                cells.append(f"{r['rate']:.2f} [{r['low']:.2f}, {r['high']:.2f}]{mark}")
            parts.append(f"| {variant} | " + " | ".join(cells) + " |")
        parts.append("\n\\* the format the detector was fitted on.\n")
    return "\n".join(parts)


if __name__ == "__main__":
    main()
