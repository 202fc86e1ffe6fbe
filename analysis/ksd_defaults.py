"""KSD defaults study (issue 16): which layers, rule and region give a detector that, fitted on
the forget skill and the shipped calibration questions alone, detects unseen forget questions
and lets ordinary questions of other domains through, whatever their format.

Setup (default model, GSM8K forget skill):

* GSM8K: ``--n-probe`` + ``--n-heldout`` questions (``load_skill("gsm8k", n=...)``), split
  into a probe half (fitting, choosing) and a held-out half (testing), disjoint and seeded.
* Negatives for fitting: :func:`mechunlearn.calibration_skill` (the shipped general questions).
* Test sets, never used for fitting, alpha or choosing: the held-out GSM8K questions, and
  ordinary questions of other domains (``--n-other`` each): MMLU non-maths questions (text
  format), MBPP task descriptions, Wikipedia sentences (first sentence of each XQuAD en
  context), XQuAD en questions alone, HumanEval prompts. Every set in three formats
  (:mod:`mechunlearn.data.variants`): ``plain`` (the bare text), ``question_prefix``
  (``"Question: {q}\\nAnswer:"``, GSM8K's own prompt format) and ``chat`` (the model's chat
  template).
* Key vectors at every layer, once per text set, cached under ``<out>/keys/``.

Choosing (probe data only): the GSM8K probe half is split again (``fit`` / ``held``) and so
is the calibration set (``cal`` for alpha / ``held``). Every candidate (cube or ellipsoid; a
single layer, or several layers with rule any / all / k-of-n; alpha automatic at fpr 0.01 or
0.05 against ``cal``) is fitted on the probe ``fit`` keys of one fit format with ``cal`` in
the formats given, then scored on the held-back probe questions (detection) and the held-back
calibration questions (false positives), in the three formats. The rule: among candidates
whose detection of the held-back probe questions is >= 0.9 in the fit format, the one with the
lowest false-positive rate on the held-back calibration questions (worst format), ties broken
by higher detection, then fewer layers.

Testing: every candidate, fitted as a user would (``fit(probe keys, calibration keys)`` with
the whole calibration set), is scored on every test set and format. Intervals: Wilson score
intervals (95 %) of a proportion.

Usage:
    MECHUNLEARN_DATA=/work/shared/data python analysis/ksd_defaults.py [--out results/ksd_defaults]

Writes ``<out>/table.csv`` (candidate x fit format x test set x format: rate, interval, n),
``<out>/selection.csv`` (the choosing stage), ``<out>/summary.md`` and ``<out>/figure.png``;
prints where they went and the run time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import pandas as pd
import torch

import mechunlearn as mu
from mechunlearn.data import make_variant

FORMATS = ("plain", "question_prefix", "chat")
FIT_FORMATS = ("plain", "question_prefix")  # the selection must hold for both
CAL_FORMATS = ("plain", "question_prefix")  # what mu.calibration_skill() returns by default
OTHER = ("mmlu", "mbpp", "wikipedia", "xquad_questions", "humaneval")
FPRS = (0.01, 0.05)
MIN_DETECTION = 0.9
N_LAYERS = 30


# ---------------------------------------------------------------------------------- texts
def other_skills(n: int, seed: int) -> dict[str, mu.Skill]:
    """The ordinary questions of other domains, ``n`` each, as bare texts."""
    mmlu = mu.load_skill("mmlu:-math", answer_format="text")
    short = [i for i, ex in enumerate(mmlu) if len(ex.prompt) <= 300]  # questions, not passages
    mbpp = mu.load_skill("mbpp")
    desc = [ex.prompt.split("\nYour code should pass these tests:")[0].strip() for ex in mbpp]
    xq = mu.load_skill("xquad:en")
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
        "humaneval": mu.load_skill("humaneval").subsample(n, seed),
    }


def text_sets(args, tokenizer) -> dict[tuple[str, str], mu.Skill]:
    """``{(set, format): Skill}`` for every set the study runs."""
    gsm8k = mu.load_skill("gsm8k", n=args.n_probe + args.n_heldout, seed=args.seed)
    probe, heldout = gsm8k.split(args.n_heldout, seed=args.seed)
    bases = {"gsm8k_probe": probe, "gsm8k_heldout": heldout}
    bases["calibration"] = mu.calibration_skill(formats=["plain"])
    bases.update(other_skills(args.n_other, args.seed))
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
def spread(k: int, n: int = N_LAYERS) -> list[int]:
    """``k`` layers every ``n // k`` layers, ending at the last (KeySpaceDetector's
    ``layers="spread"`` rule)."""
    return sorted(n - 1 - j * (n // k) for j in range(k))


def candidates() -> list[dict]:
    """Every (region, layers, rule) the study tries."""
    singles = [*range(0, N_LAYERS - 1, 2), N_LAYERS - 1]  # every other layer, and the last
    sets = {f"L{layer}": [layer] for layer in singles}
    sets.update({f"spread{k}": spread(k) for k in (3, 6, 10)})
    sets["all30"] = list(range(N_LAYERS))
    out = []
    for kind in ("cube", "ellipsoid"):
        for name, layers in sets.items():
            k = len(layers)
            rules = ["any"] if k == 1 else ["any", "all", (k + 1) // 2]
            for rule in rules:
                out.append({"kind": kind, "layers_name": name, "layers": layers, "rule": rule})
    return out


def make(cand: dict, fpr: float):
    cls = mu.KeySpaceDetector if cand["kind"] == "cube" else mu.EllipsoidDetector
    return cls(layers=cand["layers"], rule=cand["rule"], fpr=fpr)


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


def select(keys, calibration, args) -> tuple[pd.DataFrame, list[str]]:
    fit, back, cal, cal_back, held = selection_split(keys, calibration, args)
    rows = []
    for cand in candidates():
        for fpr in FPRS:
            row = {"candidate": label(cand, fpr), **_cand_cols(cand), "fpr": fpr}
            dets, fps, seps = [], [], []
            for ff in FIT_FORMATS:
                det = make(cand, fpr).fit(fit[ff], cal)
                d = det.detect_keys(back[ff])
                negs = {f: det.detect_keys(cal_back[f]) for f in FORMATS}
                row[f"detect[{ff}]"] = d.rate
                for f, n in negs.items():
                    row[f"fp[{ff}->{f}]"] = n.rate
                dets.append(d.rate)
                fps.append(max(n.rate for n in negs.values()))
                seps.append(separation(d.score, torch.cat([n.score for n in negs.values()])))
            row.update(detect_min=min(dets), fp_max=max(fps), separation_min=min(seps))
            rows.append(row)
    table = pd.DataFrame(rows)
    table["eligible"] = table["detect_min"] >= MIN_DETECTION
    order = table.sort_values(
        ["eligible", "fp_max", "separation_min", "detect_min", "n_layers"],
        ascending=[False, True, False, False, True],
        kind="stable",
    )
    table["rank"] = 0
    table.loc[order.index, "rank"] = range(1, len(order) + 1)
    return table.sort_values("rank"), held


def _cand_cols(cand: dict) -> dict:
    return {
        "kind": cand["kind"],
        "layers": cand["layers_name"],
        "layer_list": " ".join(map(str, cand["layers"])),
        "n_layers": len(cand["layers"]),
        "rule": str(cand["rule"]),
    }


# ---------------------------------------------------------------------------------- tests
def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (95 % by default)."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def test_rows(name: str, det, keys, fit_format: str) -> list[dict]:
    rows = []
    for test in ("gsm8k_heldout", *OTHER):
        for fmt in FORMATS:
            d = det.detect_keys(keys[test, fmt])
            k, n = int(d.detected.sum()), len(d)
            low, high = wilson(k, n)
            rows.append(
                {
                    "detector": name,
                    "fit_format": fit_format,
                    "test_set": test,
                    "format": fmt,
                    "kind": "detection" if test.startswith("gsm8k") else "false_positive",
                    "rate": k / n,
                    "low": low,
                    "high": high,
                    "n": n,
                }
            )
    return rows


def test_all(keys, args) -> pd.DataFrame:
    """Every candidate as a user fits it: the probe half and the whole calibration set."""
    cal = mu.KeyVectors.concat_all([keys["calibration", f] for f in CAL_FORMATS])
    fit_keys = {f: keys["gsm8k_probe", f] for f in FORMATS}
    fit_keys["all_formats"] = mu.KeyVectors.concat_all([fit_keys[f] for f in FORMATS])
    rows = []
    for ff in ("plain", "question_prefix", "all_formats"):
        base = mu.KeySpaceDetector(h=2.0, layers=-1).fit(fit_keys[ff])
        rows += test_rows("issue 16: cube L29 h=2, no negatives", base, keys, ff)
        for cand in candidates():
            for fpr in FPRS:
                det = make(cand, fpr).fit(fit_keys[ff], cal)
                rows += test_rows(label(cand, fpr), det, keys, ff)
        for cls in (mu.KeySpaceDetector, mu.EllipsoidDetector):
            det = cls().fit(fit_keys[ff], cal)
            rows += test_rows(f"{cls.__name__}() defaults", det, keys, ff)
    return pd.DataFrame(rows)


# -------------------------------------------------------------------------------- outputs
SHOWN = (
    "KeySpaceDetector() defaults",
    "EllipsoidDetector() defaults",
    "cube L29 any fpr=0.01",
    "cube L29 any fpr=0.05",
    "issue 16: cube L29 h=2, no negatives",
)


def _cell(row) -> str:
    return f"{row.rate:.2f} [{row.low:.2f}, {row.high:.2f}]"


def result_tables(table: pd.DataFrame, detector: str) -> str:
    lines = []
    for ff in ("plain", "question_prefix", "all_formats"):
        sub = table[(table.detector == detector) & (table.fit_format == ff)]
        if sub.empty:
            continue
        lines += [f"*Fitted on GSM8K probe questions, format `{ff}`:*", ""]
        lines += ["| test set | " + " | ".join(FORMATS) + " |", "|---" * (len(FORMATS) + 1) + "|"]
        for test in ("gsm8k_heldout", *OTHER):
            cells = [_cell(sub[(sub.test_set == test) & (sub.format == f)].iloc[0]) for f in FORMATS]
            lines.append(f"| {test} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def misses(table: pd.DataFrame, detector: str, fit_formats=FIT_FORMATS) -> list[str]:
    """Where a detector misses the targets (>= 0.9 detection in the fit format, <= 0.05
    false positives everywhere)."""
    out = []
    sub = table[(table.detector == detector) & table.fit_format.isin(fit_formats)]
    for row in sub.itertuples():
        if row.kind == "detection" and row.format == row.fit_format and row.rate < MIN_DETECTION:
            out.append(f"detects {row.rate:.2f} of {row.test_set} [{row.format}] (fit {row.fit_format})")
        if row.kind == "false_positive" and row.rate > 0.05:
            out.append(f"{row.rate:.2f} false positives on {row.test_set} [{row.format}] (fit {row.fit_format})")
    return out


def write_summary(out: Path, sel: pd.DataFrame, held, table: pd.DataFrame, args, took) -> Path:
    cols = ["rank", "candidate", "detect_min", "fp_max", "separation_min"]
    top = sel[cols].head(12)
    best = {k: sel[sel.kind == k].iloc[0] for k in ("cube", "ellipsoid")}
    md = [
        "# KSD defaults (issue 16)",
        "",
        f"Default model, forget skill GSM8K ({args.n_probe} probe + {args.n_heldout} held-out "
        f"questions), negatives: `mu.calibration_skill()` ({', '.join(CAL_FORMATS)}), "
        f"{args.n_other} questions per other domain. Run time {took / 60:.1f} min "
        "(key vectors cached under `keys/`).",
        "",
        "## Choosing (probe data only)",
        "",
        f"The probe half is split into fit / {args.probe_holdout} held-back questions; the "
        f"calibration set into {18 - len(held)} domains for alpha and {len(held)} held-back "
        f"domains ({', '.join(held)}). Each candidate is fitted on the fit part (formats "
        f"{', '.join(FIT_FORMATS)} in turn) with the calibration domains as negatives. Rule: "
        f"detection of the held-back probe questions >= {MIN_DETECTION} in both fit formats; "
        "then the lowest false-positive rate on the held-back domains (worst of fit format x "
        "test format, including chat); ties (most candidates have none) broken by the larger "
        "separation (Cohen's d between the log scores of held-back probe and held-back "
        "calibration questions, worst fit format; scale-free, so boxes and ellipsoids compare), "
        "then higher detection, fewer layers, lower fpr cap.",
        "",
        top.round(3).to_markdown(index=False),
        "",
        f"Chosen: **{sel.iloc[0].candidate}**; best cube: **{best['cube'].candidate}**; best "
        f"ellipsoid: **{best['ellipsoid'].candidate}**. The last-layer cube (the paper's) ranks "
        f"{int(sel[sel.candidate == 'cube L29 any fpr=0.01'].iloc[0]['rank'])} "
        f"(detection {sel[sel.candidate == 'cube L29 any fpr=0.01'].iloc[0].detect_min:.2f} "
        "at fpr 0.01).",
        "",
        "## Test sets (held out; never used for fitting, alpha or choosing)",
        "",
        "Fitted as a user would: `Detector().fit(collect_keys(model, probe), "
        "collect_keys(model, mu.calibration_skill()))`. Rates with 95 % Wilson intervals; "
        "gsm8k_heldout is detection (want >= 0.9 in the fit format), every other row is "
        "false positives (want <= 0.05).",
        "",
    ]
    for det in SHOWN:
        md += [f"### {det}", "", result_tables(table, det)]
        miss = misses(table, det)
        md += ["Misses (fit formats plain / question_prefix): " + ("; ".join(miss) if miss else "none."), ""]
    path = out / "summary.md"
    path.write_text("\n".join(md))
    return path


def write_figure(out: Path, table: pd.DataFrame) -> Path:
    import matplotlib.pyplot as plt

    dets = SHOWN[:2] + SHOWN[4:]
    fig, axes = plt.subplots(len(FIT_FORMATS), len(dets), figsize=(4.2 * len(dets), 7.5))
    tests = ("gsm8k_heldout", *OTHER)
    for i, ff in enumerate(FIT_FORMATS):
        for j, det in enumerate(dets):
            ax = axes[i, j]
            sub = table[(table.detector == det) & (table.fit_format == ff)]
            grid = [[sub[(sub.test_set == t) & (sub.format == f)].rate.iloc[0] for f in FORMATS]
                    for t in tests]
            ax.imshow(grid, vmin=0, vmax=1, cmap="Reds")
            for a, row in enumerate(grid):
                for b, v in enumerate(row):
                    ax.text(b, a, f"{v:.2f}", ha="center", va="center",
                            color="white" if v > 0.6 else "black", fontsize=8)
            ax.set_xticks(range(len(FORMATS)), ["plain", "Question:", "chat"], fontsize=8)
            ax.set_yticks(range(len(tests)), tests if j == 0 else [""] * len(tests), fontsize=8)
            ax.set_title(f"{det}\nfit: {ff}", fontsize=9)
    fig.suptitle("Share detected (row 1: GSM8K held out, want high; others: want 0)", fontsize=10)
    fig.tight_layout()
    path = out / "figure.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/ksd_defaults")
    parser.add_argument("--n-probe", type=int, default=100)
    parser.add_argument("--n-heldout", type=int, default=100)
    parser.add_argument("--n-other", type=int, default=60)
    parser.add_argument("--probe-holdout", type=int, default=30)
    parser.add_argument("--held-domains", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = mu.load_model(quiet=True)
    sets = text_sets(args, model.tokenizer)
    print(f"collecting key vectors at every layer ({len(sets)} text sets)", flush=True)
    keys = all_keys(model, sets, out, args.batch_size)
    t = time.perf_counter()
    sel, held = select(keys, sets["calibration", "plain"], args)
    sel.to_csv(out / "selection.csv", index=False)
    print(f"choosing on probe data: {time.perf_counter() - t:.0f} s; chosen {sel.iloc[0].candidate}")
    t = time.perf_counter()
    table = test_all(keys, args)
    table.to_csv(out / "table.csv", index=False)
    print(f"test sets: {time.perf_counter() - t:.0f} s")
    took = time.perf_counter() - start
    summary = write_summary(out, sel, held, table, args, took)
    figure = write_figure(out, table)
    (out / "settings.json").write_text(json.dumps({**vars(args), "seconds": round(took)}, indent=1))
    print(f"wrote {out / 'table.csv'}, {out / 'selection.csv'}, {summary}, {figure}")
    print(f"run time {took / 60:.1f} min")


if __name__ == "__main__":
    main()
