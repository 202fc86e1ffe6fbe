"""KSD defaults study (issue 16): which layers, rule and region give a detector that, fitted on
the forget skill and the shipped calibration questions alone, detects unseen forget questions
and lets ordinary questions of other domains through, whatever their format.

Setup (default model, GSM8K forget skill):

* GSM8K: ``--n-probe`` + ``--n-heldout`` questions (``load_skill("gsm8k", n=...)``), split
  into a probe half (fitting, choosing) and a held-out half (testing), disjoint and seeded.
* Negatives for fitting: :func:`mechunlearn.calibration_skill` (the shipped general questions).
* Other sets: the held-out GSM8K questions (testing only), and ordinary questions of other
  domains (``--n-other`` each): MMLU non-maths questions (text
  format), MBPP task descriptions, Wikipedia sentences (first sentence of each XQuAD en
  context), XQuAD en questions alone, HumanEval prompts. Every set in three formats
  (:mod:`mechunlearn.data.variants`): ``plain`` (the bare text), ``question_prefix``
  (``"Question: {q}\\nAnswer:"``, GSM8K's own prompt format) and ``chat`` (the model's chat
  template).
* Key vectors at every layer, once per text set, cached under ``<out>/keys/`` (reused when
  the prompts' hash matches).
* Each other-domain set is split into a **probe half** (choosing) and a **test half**
  (reporting): disjoint, seeded per domain, the same items in every format.

Choosing (probe data only): the GSM8K probe questions are split again (``fit`` / 30 held
back) and so is the calibration set (12 domains for alpha / 6 held-back domains). Every
candidate (cube or ellipsoid; a single layer, or several layers with rule any / all / k-of-n;
alpha automatic at an fpr cap of 0.001, 0.01 or 0.05) is fitted on the probe ``fit`` keys of
one fit format (plain, then question_prefix) with the 12 alpha domains (both formats) as
negatives, and scored on the held-back probe questions (detection, in the fit format) and
on the false-positive cells: fit format x {held-back calibration domains, each other
domain's probe half} x {plain, question_prefix, chat}. The rule: among candidates detecting
>= 0.9 of the held-back probe questions in both fit formats, the lowest worst cell, then the
lowest mean cell, then the larger separation (Cohen's d of log scores), higher detection,
fewer layers, lower fpr. The class defaults are chosen by the same rule among the
candidates that use every layer with rule any or all (a fixed layer number or k-of-n would
not carry to a model of another depth); the best candidate overall is reported too.

Testing: the reported detectors, fitted as a user would (``fit(probe keys, calibration
keys)`` with the whole probe half and the whole calibration set), are scored on the 100
held-out GSM8K questions and the other domains' test halves, in the three formats. Intervals:
Wilson score intervals (95 %) of a proportion.

Usage:
    MECHUNLEARN_DATA=/work/shared/data PYTHONPATH=. python analysis/ksd_defaults.py \\
        [--out results/ksd_defaults] [--model gemma-3-270m]

The candidates' layers come from the model (every other layer and the last, spread sets, every
layer: ``all30`` on the default model's 30); another model's results go to
``results/ksd_defaults-<model>`` unless ``--out`` is given.

Writes ``<out>/table.csv`` (reported detector x fit format x test set x format: rate,
interval, k, n),
``<out>/selection.csv`` (the choosing stage), ``<out>/summary.md`` and ``<out>/figure.png``;
prints where they went and the run time.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch

import mechunlearn as mu
from mechunlearn.data import make_variant
from mechunlearn.kernels.bootstrap import wilson_interval
from mechunlearn.study import StudyParser, data_dir_or_exit

FORMATS = ("plain", "question_prefix", "chat")
FIT_FORMATS = ("plain", "question_prefix")  # the selection must hold for both
CAL_FORMATS = ("plain", "question_prefix")  # what mu.calibration_skill() returns by default
OTHER = ("mmlu", "mbpp", "wikipedia", "xquad_questions", "humaneval")
FPRS = (0.001, 0.01, 0.05)  # 0.001: no calibration question inside
MIN_DETECTION = 0.9
#: The selection's ranking after the detection floor (:func:`mechunlearn.tuning.tune`'s order).
RANKING = (
    ("fp_max", True), ("fp_mean", True), ("separation_min", False), ("detect_min", False),
    ("n_layers", True), ("fpr", True),
)  # fmt: skip


# ---------------------------------------------------------------------------------- texts
def other_skills(n: int, seed: int, data_dir: str | None = None) -> dict[str, mu.Skill]:
    """The ordinary questions of other domains, ``n`` each, as bare texts (from the benchmark
    folder ``data_dir``, default ``$MECHUNLEARN_DATA``)."""
    mmlu = mu.load_skill("mmlu:-math", answer_format="text", data_dir=data_dir)
    short = [i for i, ex in enumerate(mmlu) if len(ex.prompt) <= 300]  # questions, not passages
    mbpp = mu.load_skill("mbpp", data_dir=data_dir)
    desc = [ex.prompt.split("\nYour code should pass these tests:")[0].strip() for ex in mbpp]
    xq = mu.load_skill("xquad:en", data_dir=data_dir)
    contexts = list(dict.fromkeys(ex.prompt.split("\nQuestion:")[0] for ex in xq))
    first = [c.removeprefix("Context: ").partition(". ")[0].strip() + "." for c in contexts]
    questions = [ex.prompt.split("\nQuestion: ")[-1].removesuffix("\nAnswer:") for ex in xq]

    def texts(name: str, items: list[str]) -> mu.Skill:
        return mu.Skill.from_texts(name, list(dict.fromkeys(items))).subsample(n, seed)

    return {
        "mmlu": mmlu[short].subsample(n, seed),
        "mbpp": texts("mbpp-descriptions", desc),
        "wikipedia": texts("wikipedia-en-sentences", first),
        "xquad_questions": texts("xquad-en-questions", questions),
        "humaneval": mu.load_skill("humaneval", data_dir=data_dir).subsample(n, seed),
    }


def text_sets(args, tokenizer) -> dict[tuple[str, str], mu.Skill]:
    """``{(set, format): Skill}`` for every set the study runs."""
    n = args.n_probe + args.n_heldout
    gsm8k = mu.load_skill("gsm8k", n=n, seed=args.seed, data_dir=args.data_dir)
    probe, heldout = gsm8k.split(args.n_heldout, seed=args.seed)
    bases = {"gsm8k_probe": probe, "gsm8k_heldout": heldout}
    bases["calibration"] = mu.calibration_skill(formats=["plain"])
    bases.update(other_skills(args.n_other, args.seed, args.data_dir))
    return {
        (name, fmt): make_variant(skill, fmt, tokenizer=tokenizer)
        for name, skill in bases.items()
        for fmt in FORMATS
    }


# ----------------------------------------------------------------------------------- keys
def _sha(prompts: list[str]) -> str:
    return hashlib.sha256("\0".join(prompts).encode()).hexdigest()


def cached_keys(model, skill: mu.Skill, path: Path, batch_size: int) -> mu.KeyVectors:
    """Key vectors at every layer, read from ``path`` when it holds these prompts' keys."""
    sha = _sha(skill.prompts)
    if path.is_file():
        keys = mu.KeyVectors.load(path)
        if keys.meta.get("prompts_sha256") == sha:
            return keys
    keys = mu.collect_keys(model, skill, layers=None, batch_size=batch_size, quiet=True)
    keys = keys.to("cpu")
    keys.meta["prompts_sha256"] = sha
    path.parent.mkdir(parents=True, exist_ok=True)
    keys.save(path)
    return keys


def all_keys(model, sets, out: Path, batch_size: int) -> dict[tuple[str, str], mu.KeyVectors]:
    keys = {}
    for (name, fmt), skill in sets.items():
        t = time.perf_counter()
        path = out / "keys" / f"{name}.{fmt}.safetensors"
        keys[name, fmt] = cached_keys(model, skill, path, batch_size)
        took = time.perf_counter() - t
        print(f"  keys {name:16s} {fmt:16s} n={len(skill):4d}  {took:6.1f} s", flush=True)
    return keys


# ----------------------------------------------------------------------------- candidates
def spread(k: int, n: int) -> list[int]:
    """``k`` layers every ``n // k`` layers, ending at the last (KeySpaceDetector's
    ``layers="spread"`` rule)."""
    return sorted(n - 1 - j * (n // k) for j in range(k))


def every_layer(n_layers: int) -> str:
    """The name of the every-layer set (``all30`` on the default model)."""
    return f"all{n_layers}"


def candidates(n_layers: int) -> list[dict]:
    """Every (region, layers, rule) the study tries on a model of ``n_layers`` layers."""
    singles = [*range(0, n_layers - 1, 2), n_layers - 1]  # every other layer, and the last
    sets = {f"L{layer}": [layer] for layer in singles}
    sets.update({f"spread{k}": spread(k, n_layers) for k in (3, 6, 10) if k <= n_layers})
    sets[every_layer(n_layers)] = list(range(n_layers))
    out = []
    for kind in ("cube", "ellipsoid"):
        for name, layers in sets.items():
            k = len(layers)
            rules = ["any"] if k == 1 else ["any", "all", (k + 1) // 2]
            for rule in rules:
                out.append({"kind": kind, "layers_name": name, "layers": layers, "rule": rule})
    return out


def make(cand: dict, fpr: float):
    """The candidate, with the calibration this study chose among (``"rank"``, the default
    before issue 25; ``analysis/detector_calibration.py`` chose the conformal one since)."""
    cls = mu.KeySpaceDetector if cand["kind"] == "cube" else mu.EllipsoidDetector
    return cls(layers=cand["layers"], rule=cand["rule"], fpr=fpr, calibration="rank")


def label(cand: dict, fpr: float | None = None) -> str:
    rule = cand["rule"] if isinstance(cand["rule"], str) else f"{cand['rule']}-of-n"
    tail = "" if fpr is None else f" fpr={fpr:g}"
    return f"{cand['kind']} {cand['layers_name']} {rule}{tail}"


def separation(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """Cohen's d between the log scores of forget (``inside``) and other (``outside``)
    queries: scale-free, so boxes and ellipsoids compare."""
    a = torch.log(inside.double().clamp(min=1e-300))
    b = torch.log(outside.double().clamp(min=1e-300))
    a, b = a[torch.isfinite(a)], b[torch.isfinite(b)]
    return float((b.mean() - a.mean()) / torch.sqrt((a.var() + b.var()) / 2))


# ------------------------------------------------------------------------------- halves
def split_other(keys, args) -> tuple[dict, dict]:
    """Each other-domain set split into a probe half (choosing) and a test half (reporting):
    disjoint, seeded per domain, the same items in every format."""
    probe, test = {}, {}
    for i, name in enumerate(OTHER):
        n = len(keys[name, "plain"])
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 1000 + i))
        p_idx, t_idx = perm[n // 2 :].sort().values, perm[: n // 2].sort().values
        for fmt in FORMATS:
            assert len(keys[name, fmt]) == n, (name, fmt)
            probe[name, fmt] = keys[name, fmt].subset(p_idx)
            test[name, fmt] = keys[name, fmt].subset(t_idx)
    return probe, test


# ------------------------------------------------------------------------------ selection
def selection_split(keys, calibration: mu.Skill, args):
    """Probe data for choosing: GSM8K probe fit / held, calibration domains cal / held."""
    domains = sorted({ex.meta["domain"] for ex in calibration})
    held = sorted(domains, key=lambda d: hashlib.sha256(f"{args.seed}:{d}".encode()).digest())
    held = set(held[: args.held_domains])
    hi = [i for i, ex in enumerate(calibration) if ex.meta["domain"] in held]
    ci = [i for i, ex in enumerate(calibration) if ex.meta["domain"] not in held]
    fit, back = {}, {}
    for fmt in FORMATS:
        fit[fmt], back[fmt] = keys["gsm8k_probe", fmt].split(args.probe_holdout, seed=args.seed)
    cal = mu.KeyVectors.concat_all([keys["calibration", f].subset(ci) for f in CAL_FORMATS])
    cal_back = {f: keys["calibration", f].subset(hi) for f in FORMATS}
    return fit, back, cal, cal_back, sorted(held)


def select(keys, calibration, probe_other, args) -> tuple[pd.DataFrame, list[str]]:
    """Every candidate scored on probe data only, ranked by :func:`mechunlearn.tune` (floor:
    held-back detection >= :data:`MIN_DETECTION`; then :data:`RANKING`; see the module
    docstring)."""
    fit, back, cal, cal_back, held = selection_split(keys, calibration, args)
    negatives = {("calibration_held", f): cal_back[f] for f in FORMATS} | probe_other
    names = list(negatives)
    sizes = [len(negatives[k]) for k in names]
    pooled = mu.KeyVectors.concat_all([negatives[k] for k in names])

    def score(settings: dict) -> dict:
        cand, fpr = cand_of(SimpleNamespace(**settings)), settings["fpr"]
        row, dets, cells, seps = {}, [], [], []
        for ff in FIT_FORMATS:
            det = make(cand, fpr).fit(fit[ff], cal)
            d = det.detect_keys(back[ff])
            neg = det.detect_keys(pooled)
            row[f"detect[{ff}]"] = d.rate
            dets.append(d.rate)
            for (name, f), part in zip(names, neg.detected.split(sizes), strict=True):
                rate = float(part.float().mean())
                row[f"fp[{ff}->{name}:{f}]"] = rate
                cells.append(rate)
            seps.append(separation(d.score, neg.score))
        row.update(
            detect_min=min(dets),
            fp_max=max(cells),
            fp_mean=sum(cells) / len(cells),
            separation_min=min(seps),
        )
        return row

    settings = [
        {"candidate": label(cand, fpr), **_cand_cols(cand), "fpr": fpr}
        for cand in candidates(n_layers_of(keys))
        for fpr in FPRS
    ]
    # A candidate is its settings (the detectors are fitted per fit format inside the score).
    search = mu.tune(
        lambda **candidate: candidate, settings, lambda candidate: candidate, score,
        floor={"detect_min": MIN_DETECTION}, order=RANKING, fallback="best",
    )  # fmt: skip
    table = search.table_.drop(columns="chosen").rename(columns={"meets_floor": "eligible"})
    return table.sort_values("rank"), held


def n_layers_of(keys) -> int:
    """The model's layer count: the key vectors hold every layer."""
    return len(next(iter(keys.values())).layers)


def _cand_cols(cand: dict) -> dict:
    return {
        "kind": cand["kind"],
        "layers": cand["layers_name"],
        "layer_list": " ".join(map(str, cand["layers"])),
        "n_layers": len(cand["layers"]),
        "rule": str(cand["rule"]),
    }


def cand_of(row) -> dict:
    """The candidate dict of a selection-table row."""
    rule = row.rule if row.rule in ("any", "all") else int(row.rule)
    layers = [int(x) for x in str(row.layer_list).split()]
    return {"kind": row.kind, "layers_name": row.layers, "layers": layers, "rule": rule}


# ---------------------------------------------------------------------------------- tests
def _row(name, ff, test, fmt, k, n) -> dict:
    low, high = wilson_interval(k, n)
    kind = "detection" if test.startswith("gsm8k") else "false_positive"
    return {"detector": name, "fit_format": ff, "test_set": test, "format": fmt, "kind": kind,
            "rate": k / n, "low": low, "high": high, "k": k, "n": n}  # fmt: skip


def test_rows(name: str, det, test_keys, fit_format: str) -> list[dict]:
    """Rates on the test sets: GSM8K held out, each other domain's test half, and the other
    domains pooled (``other_pooled``), in every format."""
    rows = []
    for fmt in FORMATS:
        pooled_k = pooled_n = 0
        for test in ("gsm8k_heldout", *OTHER):
            d = det.detect_keys(test_keys[test, fmt])
            k, n = int(d.detected.sum()), len(d)
            rows.append(_row(name, fit_format, test, fmt, k, n))
            if test != "gsm8k_heldout":
                pooled_k, pooled_n = pooled_k + k, pooled_n + n
        rows.append(_row(name, fit_format, "other_pooled", fmt, pooled_k, pooled_n))
    return rows


def test_all(keys, test_other, detectors: dict, args) -> pd.DataFrame:
    """The reported detectors fitted as a user would (the whole probe half and the whole
    calibration set), on the test sets only."""
    cal = mu.KeyVectors.concat_all([keys["calibration", f] for f in CAL_FORMATS])
    test_keys = {("gsm8k_heldout", f): keys["gsm8k_heldout", f] for f in FORMATS} | test_other
    rows = []
    for ff in FIT_FORMATS:
        for name, build in detectors.items():
            det = build()
            det = (
                det.fit(keys["gsm8k_probe", ff])
                if det.h is not None
                else det.fit(keys["gsm8k_probe", ff], cal)
            )
            rows += test_rows(name, det, test_keys, ff)
    return pd.DataFrame(rows)


# -------------------------------------------------------------------------------- outputs
TESTS = ("gsm8k_heldout", *OTHER, "other_pooled")


def markdown(frame: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table (no tabulate dependency)."""
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|---" * frame.shape[1] + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _cell(row) -> str:
    return f"{row.rate:.2f} [{row.low:.2f}, {row.high:.2f}]"


def result_tables(table: pd.DataFrame, detector: str) -> str:
    lines = []
    for ff in FIT_FORMATS:
        sub = table[(table.detector == detector) & (table.fit_format == ff)]
        lines += [f"*Fitted on GSM8K probe questions, format `{ff}`:*", ""]
        lines += [
            "| test set (n) | " + " | ".join(FORMATS) + " |",
            "|---" * (len(FORMATS) + 1) + "|",
        ]
        for test in TESTS:
            rows = [sub[(sub.test_set == test) & (sub.format == f)].iloc[0] for f in FORMATS]
            lines.append(f"| {test} ({rows[0].n}) | " + " | ".join(_cell(r) for r in rows) + " |")
        lines.append("")
    return "\n".join(lines)


def misses(table: pd.DataFrame, detector: str) -> list[str]:
    """Where a detector misses the targets (>= 0.9 detection in the fit format, <= 0.05
    false positives on each other domain in every format)."""
    out = []
    sub = table[(table.detector == detector) & (table.test_set != "other_pooled")]
    for row in sub.itertuples():
        if row.kind == "detection" and row.format == row.fit_format and row.rate < MIN_DETECTION:
            out.append(
                f"detects {row.rate:.2f} of {row.test_set} [{row.format}] (fit {row.fit_format})"
            )
        if row.kind == "false_positive" and row.rate > 0.05:
            out.append(
                f"{row.rate:.2f} [{row.low:.2f}, {row.high:.2f}] false positives on "
                f"{row.test_set} [{row.format}] (fit {row.fit_format})"
            )
    return out


def headline(table: pd.DataFrame, detectors) -> str:
    """One line per detector: detection in the fit format, worst and pooled false positives
    (plain and question_prefix test formats, the formats it was fitted on)."""
    lines = [
        "| detector | fit format | GSM8K held out detected | worst other domain (plain / "
        "Question: / chat) | other domains pooled, plain | pooled, Question: | pooled, chat |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in detectors:
        for ff in FIT_FORMATS:
            sub = table[(table.detector == name) & (table.fit_format == ff)]
            det = sub[(sub.test_set == "gsm8k_heldout") & (sub.format == ff)].iloc[0]
            others = sub[(sub.kind == "false_positive") & (sub.test_set != "other_pooled")]
            worst = others.sort_values("rate", ascending=False).iloc[0]
            pooled = [sub[(sub.test_set == "other_pooled") & (sub.format == f)].iloc[0]
                      for f in FORMATS]  # fmt: skip
            lines.append(
                f"| {name} | {ff} | {_cell(det)} | {_cell(worst)} ({worst.test_set}, "
                f"{worst.format}) | " + " | ".join(_cell(p) for p in pooled) + " |"
            )
    return "\n".join(lines)


def write_summary(out: Path, sel, held, table, detectors, chosen, args, took) -> Path:
    cols = ["rank", "candidate", "detect_min", "fp_max", "fp_mean", "separation_min"]
    n_other = args.halves
    n_layers = args.n_layers
    model_line = (
        f"Default model ({mu.DEFAULT_MODEL}),"
        if args.model is None
        else f"Model {args.model} ({n_layers} layers),"
    )
    last = sel[sel.candidate == f"cube L{n_layers - 1} any fpr=0.01"].iloc[0]
    md = [
        "# KSD defaults (issue 16)",
        "",
        model_line
        + f" forget skill GSM8K ({args.n_probe} probe + {args.n_heldout} held-out questions), "
        f"negatives `mu.calibration_skill()` ({', '.join(CAL_FORMATS)}, {len(held)} of 18 "
        f"domains held back for choosing). Other domains ({args.n_other} questions each, split "
        f"into a probe half for choosing and a test half for reporting, disjoint and seeded): "
        f"{', '.join(f'{k} {v}' for k, v in n_other.items())}. Run time {took / 60:.1f} min "
        "(key vectors cached under `keys/`). Reproduce: `MECHUNLEARN_DATA=/work/shared/data "
        "PYTHONPATH=. python analysis/ksd_defaults.py`.",
        "",
        "## Choosing (probe data only)",
        "",
        f"The GSM8K probe half is split into fit / {args.probe_holdout} held-back questions; the "
        f"calibration set into {18 - len(held)} domains for alpha and {len(held)} held-back "
        f"domains ({', '.join(held)}). Each candidate (cube or ellipsoid; one layer, or "
        f"several with rule any / all / k-of-n; fpr cap {', '.join(map(str, FPRS))}) is fitted "
        "on the fit part (formats plain and question_prefix in turn) with the alpha domains "
        "as negatives. Eligible: detection of the held-back probe questions >= "
        f"{MIN_DETECTION} in both fit formats. Then ranked by the worst false-positive rate "
        "over the cells (fit format x negative set x test format: held-back calibration "
        "domains and each other domain's probe half; plain, Question: and chat), then by the "
        "mean over the cells, then separation (Cohen's d of log scores), detection, fewer "
        "layers, lower fpr.",
        "",
        markdown(sel[cols].head(15).round(3)),
        "",
        "The class defaults must work for a model of any depth, so they are chosen among the "
        "every-layer candidates (rule any or all) by the same ranking: cube "
        f"**{chosen['cube default']}** (rank "
        f"{int(sel[sel.candidate == chosen['cube default']].iloc[0]['rank'])}), ellipsoid "
        f"**{chosen['ellipsoid default']}** (rank "
        f"{int(sel[sel.candidate == chosen['ellipsoid default']].iloc[0]['rank'])}). Best "
        f"overall: cube **{chosen['cube']}** (rank "
        f"{int(sel[sel.candidate == chosen['cube']].iloc[0]['rank'])}), ellipsoid "
        f"**{chosen['ellipsoid']}** (rank "
        f"{int(sel[sel.candidate == chosen['ellipsoid']].iloc[0]['rank'])}). The last-layer "
        f"cube (the paper's) ranks {int(last['rank'])} (held-back detection "
        f"{last.detect_min:.2f}, worst cell {last.fp_max:.2f}, at fpr 0.01). Eligible "
        f"candidates: {int(sel.eligible.sum())} of {len(sel)}; eligible with worst probe cell "
        f"<= 0.05: {int((sel.eligible & (sel.fp_max <= 0.05)).sum())}.",
        "",
        "## Test data (never used for fitting, alpha or choosing)",
        "",
        "Fitted as a user would: `Detector().fit(collect_keys(model, probe), "
        "collect_keys(model, mu.calibration_skill()))` on the whole probe half (100 questions) "
        "and the whole calibration set; the issue's detector is fitted on the probe half alone "
        "with h=2. Rates with 95 % Wilson intervals. gsm8k_heldout is detection (goal >= 0.9 in "
        "the fit format); every other row is false positives (goal <= 0.05); `other_pooled` "
        "pools the five other domains' test halves.",
        "",
        headline(table, detectors),
        "",
    ]
    md += [
        "**Read with care.** The probe cells hold 30 questions each, so the ranking's first key "
        "moves in steps of 1/30 and several candidates sit one question apart; the chosen "
        "ellipsoid is also the candidate with the smallest separation, and the same ellipsoid "
        "at fpr 0.01 had a worst probe cell of 0.13. A test half of 30 questions with 0 or 1 "
        "false positive only bounds a domain's rate below 11-17 % (Wilson upper ends). "
        "Detection is tied to the prompt format: fitted on one format, no detector here "
        "detects GSM8K questions in the chat template, and the chosen defaults detect none "
        "in the other plain/Question: format; the chat column's zero false positives "
        "follow from the same fact.",
        "",
    ]
    for name in detectors:
        md += [f"### {name}", "", result_tables(table, name)]
        miss = misses(table, name)
        md += ["Misses of the goal: " + ("; ".join(miss) if miss else "none."), ""]
    path = out / "summary.md"
    path.write_text("\n".join(md))
    return path


def write_figure(out: Path, table: pd.DataFrame, detectors) -> Path:
    import matplotlib.pyplot as plt

    dets = list(detectors)
    fig, axes = plt.subplots(len(FIT_FORMATS), len(dets), figsize=(3.6 * len(dets), 7.5))
    for i, ff in enumerate(FIT_FORMATS):
        for j, det in enumerate(dets):
            ax = axes[i, j]
            sub = table[(table.detector == det) & (table.fit_format == ff)]
            grid = [[sub[(sub.test_set == t) & (sub.format == f)].rate.iloc[0] for f in FORMATS]
                    for t in TESTS]  # fmt: skip
            ax.imshow(grid, vmin=0, vmax=1, cmap="Reds")
            for a, row in enumerate(grid):
                for b, v in enumerate(row):
                    ax.text(b, a, f"{v:.2f}", ha="center", va="center",
                            color="white" if v > 0.6 else "black", fontsize=8)  # fmt: skip
            ax.set_xticks(range(len(FORMATS)), ["plain", "Question:", "chat"], fontsize=8)
            ax.set_yticks(range(len(TESTS)), TESTS if j == 0 else [""] * len(TESTS), fontsize=8)
            ax.set_title(f"{det}\nfit: {ff}", fontsize=8)
    fig.suptitle("Share detected on test data (GSM8K held out: want >= 0.9; others: want <= 0.05)",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    path = out / "figure.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = StudyParser(__doc__.splitlines()[0], out="results/ksd_defaults", quiet=False)
    parser.add_argument("--n-probe", type=int, default=100)
    parser.add_argument("--n-heldout", type=int, default=100)
    parser.add_argument("--n-other", type=int, default=60)
    parser.add_argument("--probe-holdout", type=int, default=30)
    parser.add_argument("--held-domains", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    data_dir_or_exit(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = mu.load_model(args.model, quiet=True)
    sets = text_sets(args, model.tokenizer)
    print(f"key vectors at every layer ({len(sets)} text sets, cached)", flush=True)
    keys = all_keys(model, sets, out, args.batch_size)
    del model
    probe_other, test_other = split_other(keys, args)
    args.halves = {name: len(test_other[name, "plain"]) for name in OTHER}
    args.n_layers = n_layers_of(keys)
    t = time.perf_counter()
    sel, held = select(keys, sets["calibration", "plain"], probe_other, args)
    sel.to_csv(out / "selection.csv", index=False)
    # A class default must work for a model of any depth: only "every layer" (rule any or
    # all) qualifies; a fixed layer number or k-of-n is tied to the model's depth.
    agnostic = sel[(sel.layers == every_layer(args.n_layers)) & sel.rule.isin(["any", "all"])]
    chosen = {k: sel[sel.kind == k].iloc[0].candidate for k in ("cube", "ellipsoid")}
    chosen |= {f"{k} default": agnostic[agnostic.kind == k].iloc[0].candidate
               for k in ("cube", "ellipsoid")}  # fmt: skip
    print(f"choosing on probe data: {time.perf_counter() - t:.0f} s; chosen {chosen}", flush=True)
    rows = {k: sel[sel.candidate == c].iloc[0] for k, c in chosen.items()}
    last = args.n_layers - 1

    def chosen_detector(key: str):
        return lambda: make(cand_of(rows[key]), rows[key].fpr)

    detectors = {
        f"chosen cube (every layer): {chosen['cube default']}": chosen_detector("cube default"),
        f"chosen ellipsoid (every layer): {chosen['ellipsoid default']}": chosen_detector(
            "ellipsoid default"
        ),
        f"best cube, any layers: {chosen['cube']}": chosen_detector("cube"),
        f"authors' last layer: cube L{last}, fpr=0.01": lambda: mu.KeySpaceDetector(
            layers=-1, fpr=0.01, calibration="rank"
        ),
        f"issue 16: cube L{last} h=2, no negatives": lambda: mu.KeySpaceDetector(h=2.0, layers=-1),
        "KeySpaceDetector() defaults": mu.KeySpaceDetector,
        "EllipsoidDetector() defaults": mu.EllipsoidDetector,
    }
    t = time.perf_counter()
    table = test_all(keys, test_other, detectors, args)
    table.to_csv(out / "table.csv", index=False)
    print(f"test sets: {time.perf_counter() - t:.0f} s")
    took = time.perf_counter() - start
    summary = write_summary(out, sel, held, table, detectors, chosen, args, took)
    figure = write_figure(out, table, [d for i, d in enumerate(detectors) if i in (0, 1, 3, 4)])
    settings = {k: v for k, v in vars(args).items()}
    (out / "settings.json").write_text(json.dumps({**settings, "seconds": round(took)}, indent=1))
    print(f"wrote {out / 'table.csv'}, {out / 'selection.csv'}, {summary}, {figure}")
    print(f"run time {took / 60:.1f} min")


if __name__ == "__main__":
    main()
