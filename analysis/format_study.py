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

Usage:
    MECHUNLEARN_DATA=../shared/data python analysis/format_study.py [--n 60] [--model gemma-3-270m]

Writes ``results/formats/`` (``results/formats-<model>/`` for another ``--model``):
``detection.csv``, ``summary.md`` and ``detection.png``; the key vectors of every wrapped set are
cached under ``keys/``, so an interrupted run resumes.
"""

from __future__ import annotations

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


def _wiki(n: int, seed: int, data_dir: str) -> mu.Skill:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from unlearning_study import wiki_skill

    w = wiki_skill(n, seed, data_dir)  # first sentence as the prompt
    return mu.Skill("wikipedia", [mu.Example(ex.prompt, "") for ex in w], source=w.source)


def main() -> None:
    parser = StudyParser(__doc__.splitlines()[0], out="results/formats")
    parser.add_argument("--n", type=int, default=60, help="held-out examples per skill")
    parser.add_argument("--n-fit", type=int, default=100, help="GSM8K probe questions")
    args = parser.parse_args()
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

    def keys(skill, tag: str) -> mu.KeyVectors:  # cached: a rerun resumes
        return load_or_make(
            out / "keys" / f"{tag}.safetensors", mu.KeyVectors,
            lambda: mu.collect_keys(model, skill, quiet=True),
        )  # fmt: skip

    # A base model (Gemma 3 270M) has no chat template: its chat variant cannot be built.
    no_chat = () if getattr(tok, "chat_template", None) else ("chat",)
    if no_chat:
        print(f"{tok.name_or_path}: no chat template, so no chat-template variant.")
    negatives = keys(mu.calibration_skill(), "calibration")
    fit_one = keys(probe, "fit.question_prefix")
    fit_formats = [f for f in FIT_FORMATS if f not in no_chat]
    fit_variants = format_variants(probe, names=fit_formats, paragraphs=paragraphs, tokenizer=tok)
    fit_many = mu.KeyVectors.concat_all([keys(v, f"fit.{n}") for n, v in fit_variants.items()])
    detectors = {
        "KSD": mu.KeySpaceDetector().fit(fit_one, negatives),
        "Ellipsoid": mu.EllipsoidDetector().fit(fit_one, negatives),
        f"KSD, fitted on {len(fit_formats)} formats": mu.KeySpaceDetector().fit(
            fit_many, negatives
        ),
    }
    rows = []
    for skill_name, skill in {"gsm8k": held, **controls}.items():
        names = [v for v in VARIANTS if v not in SKIPPED.get(skill_name, ()) + no_chat]
        for variant, wrapped in format_variants(
            skill, names=names, paragraphs=paragraphs, tokenizer=tok, seed=args.seed
        ).items():
            k = keys(wrapped, f"{skill_name}.{variant}")
            for det_name, det in detectors.items():
                hits = det.detect_keys(k).detected.cpu().numpy().astype(float)
                low, high = wilson_interval(int(hits.sum()), len(hits))
                rows.append({
                    "detector": det_name, "skill": skill_name, "variant": variant,
                    "rate": hits.mean(), "low": low, "high": high, "n": len(hits),
                    "fitted_on_this_format": variant == "question_prefix"
                    or (det_name.endswith(" formats") and variant in fit_formats),
                    "calibrated_fpr": det.fpr_,
                })  # fmt: skip
    table = pd.DataFrame(rows)
    write_text(out / "detection.csv", table.to_csv(index=False))
    fig = mu.plots.plot_detection_by_format(table)
    mu.plots.save_figure(fig, out / "detection")
    mu.plots.close(fig)
    minutes = (time.perf_counter() - t0) / 60
    write_text(out / "summary.md", summary(table) + f"\nRun time: {minutes:.0f} min.\n")
    print(f"format study: {out / 'summary.md'} ({minutes:.0f} min)")


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
