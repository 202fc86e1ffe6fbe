"""Detector calibration study (issue 25, item 5): which calibration rule lets the key-region
detectors (:class:`mechunlearn.KeySpaceDetector`, :class:`mechunlearn.EllipsoidDetector`)
catch held-out GSM8K questions while leaving kept skills and *unseen* general questions alone.

Setup, as the unlearning study's GSM8K-vs-MBPP task (``analysis/unlearning_study.py``), per seed
0, 1, 2: GSM8K (forget), MBPP (kept) and MMLU (general, text format) loaded with ``2 n``
examples and split in a probe and a held-out half as the pipeline does
(:func:`mechunlearn.pipeline.stages.load_skills`); the detector (its ``seed`` the seed, as the
pipeline passes it) is fitted on the GSM8K probe half with the pipeline's negatives: the MBPP and
MMLU probe halves and :func:`mechunlearn.calibration_skill` (568 prompts at ``n = 32``). Measured:
the share detected of the held-out GSM8K, MBPP and MMLU halves, and of two sets no seed's
calibration sees: ``--n-unseen`` MMLU questions outside every seed's halves (also reported
without MMLU's maths subjects, the ``mmlu:math`` group, whose word problems look like GSM8K's)
and ``--n-unseen`` XQuAD en reading-comprehension prompts (``load_skill("xquad:en")``), with
95 % Wilson intervals.

Candidates (:data:`CANDIDATES`): the calibration (``"rank"``, the default before issue 25, or
``"conformal"``), the rule (every layer, two thirds or half of the layers) and the cap ``fpr``.
Goal (issue 25): held-out GSM8K detected >= 0.90 on every seed, every other set <= 0.05.

Only key vectors are needed (no scoring pass): every set's keys at every layer are collected
once and kept under ``<out>/keys/`` (:func:`study_cache.load_or_make`, named by the prompts'
hash), so a rerun only refits (about a minute).

Usage:
    MECHUNLEARN_DATA=../shared/data PYTHONPATH=. python analysis/detector_calibration.py \\
        [--n 32] [--n-unseen 150] [--seeds 0 1 2] [--out results/detector-calibration] \\
        [--model gemma-3-270m]

Writes ``<out>/table.csv`` (shape x candidate x seed x set: detected, n, rate, interval, the
conformal bound), ``<out>/goal.csv`` (per candidate: the worst seed per set, whether the goal
holds) and ``<out>/summary.md``; prints where they went and the run time.
"""

from __future__ import annotations

import hashlib
import time
from fractions import Fraction
from pathlib import Path

import pandas as pd

import mechunlearn as mu
from mechunlearn.data import MMLU_GROUPS
from mechunlearn.io import write_text
from mechunlearn.kernels.bootstrap import wilson_interval
from mechunlearn.study import StudyParser, data_dir_or_exit

from study_cache import load_or_make

SEEDS = (0, 1, 2)
SHAPES = {"KSD": mu.KeySpaceDetector, "Ellipsoid": mu.EllipsoidDetector}
#: Candidate calibrations: name -> (calibration, rule as a share of the layers, fpr). ``rank`` is
#: the calibration before issue 25 (its default: rule all, fpr 0.001, i.e. no negative inside).
CANDIDATES = {
    "rank all 0.001 (old default)": ("rank", 1.0, 0.001),
    "rank all 0.01": ("rank", 1.0, 0.01),
    "rank 2/3 0.001": ("rank", 2 / 3, 0.001),
    "conformal all 0.005": ("conformal", 1.0, 0.005),
    "conformal all 0.01": ("conformal", 1.0, 0.01),
    "conformal 2/3 0.005": ("conformal", 2 / 3, 0.005),
    "conformal 2/3 0.01": ("conformal", 2 / 3, 0.01),
    "conformal half 0.005": ("conformal", 0.5, 0.005),
    "conformal half 0.01": ("conformal", 0.5, 0.01),
}
#: Where the detector is fitted: setting -> (its GSM8K sets, its negatives). ``pipeline``: as
#: the unlearning study (``--n`` probe questions; the MBPP and MMLU probe halves and the calibration
#: questions). ``calibration only``: ``--n-large`` probe questions, the calibration questions
#: alone (as ``mu.KeySpaceDetector().fit(keys_f, keys_cal)`` in the docstrings); MBPP's and
#: MMLU's held-out halves are then never seen either.
SETTINGS = {
    "pipeline": ("gsm8k", ("mbpp_probe", "mmlu_probe", "calibration")),
    "calibration only": ("gsm8k_large", ("calibration",)),
}
#: The measured sets: name -> (what it is, goal as (">=" or "<=", rate), or None: reported only).
MEASURED = {
    "gsm8k_heldout": ("held-out GSM8K (forget)", (">=", 0.90)),
    "mbpp_heldout": ("held-out MBPP (kept)", ("<=", 0.05)),
    "mmlu_heldout": ("held-out MMLU (general, kept)", ("<=", 0.05)),
    "mmlu_unseen": ("unseen MMLU", ("<=", 0.05)),
    "mmlu_unseen_nonmaths": ("unseen MMLU, no maths subject", None),
    "xquad_unseen": ("unseen XQuAD en", ("<=", 0.05)),
}
#: MMLU's maths subjects (the ``mmlu:math`` group; the column without them is reported only).
MATHS = frozenset(MMLU_GROUPS["math"])


def _sha(skill: mu.Skill) -> str:
    return hashlib.sha256("\0".join(skill.prompts).encode()).hexdigest()[:12]


def seed_sets(n: int, seed: int, data_dir: str) -> dict[str, mu.Skill]:
    """The unlearning pipeline's probe and held-out halves of one seed
    (:func:`mechunlearn.pipeline.stages.load_skills`: ``load_skill(name, n=2n, seed=seed)`` split
    in halves with the same seed): GSM8K (forget), MBPP (kept), MMLU non-maths questions in text
    format (the general skill)."""
    out = {}
    for key, name, kwargs in (
        ("gsm8k", "gsm8k", {}),
        ("mbpp", "mbpp", {}),
        ("mmlu", "mmlu", {"answer_format": "text"}),
    ):
        skill = mu.load_skill(name, n=2 * n, seed=seed, data_dir=data_dir, **kwargs)
        out[f"{key}_probe"], out[f"{key}_heldout"] = skill.split(0.5, seed=seed)
    return out


def unseen_sets(n: int, n_unseen: int, seeds, data_dir: str) -> dict[str, mu.Skill]:
    """General questions no seed's calibration sees: MMLU non-maths questions (text format)
    outside every seed's probe and held-out halves, and XQuAD en reading-comprehension prompts
    (``load_skill("xquad:en")``: context, question, ``Answer:``)."""
    used = set()
    for seed in seeds:
        used |= set(mu.load_skill("mmlu", n=2 * n, seed=seed, data_dir=data_dir,
                                  answer_format="text").prompts)  # fmt: skip
    mmlu = mu.load_skill("mmlu", answer_format="text", data_dir=data_dir)
    fresh = [i for i, ex in enumerate(mmlu) if ex.prompt not in used]
    xquad = mu.load_skill("xquad:en", data_dir=data_dir)
    return {
        "mmlu_unseen": mmlu[fresh].subsample(n_unseen, seed=1000),
        "xquad_unseen": xquad.subsample(n_unseen, seed=1000),
    }


def cached_keys(model, skill: mu.Skill, out: Path, name: str) -> mu.KeyVectors:
    """Key vectors at every layer, kept as ``<out>/keys/<name>-<prompts hash>.safetensors``."""
    path = out / "keys" / f"{name}-{_sha(skill)}.safetensors"
    return load_or_make(
        path, mu.KeyVectors, lambda: mu.collect_keys(model, skill, quiet=True).to("cpu")
    )


def evaluate(keys: dict[str, mu.KeyVectors], seeds) -> pd.DataFrame:
    """Every setting x shape x candidate x seed: fit on the setting's GSM8K probe half with its
    negatives (:data:`SETTINGS`), then the detected share of each measured set (the setting's
    held-out GSM8K), with its 95 % Wilson interval."""
    rows = []
    for setting, (forget, negative_sets) in SETTINGS.items():
        for shape, cls in SHAPES.items():
            for name, (calibration, share, fpr) in CANDIDATES.items():
                rule = "all" if share == 1.0 else share  # a float: that share of the layers
                for seed in seeds:
                    negatives = [keys[_key(r, seed)] for r in negative_sets]
                    det = cls(calibration=calibration, rule=rule, fpr=fpr, seed=seed)
                    t = time.perf_counter()
                    det.fit(keys[f"{forget}_probe.s{seed}"], negatives)
                    fit_s = time.perf_counter() - t
                    for key in MEASURED:
                        got = keys[_key(key.replace("gsm8k", forget), seed)]
                        detected = int(det.detect_keys(got).detected.sum())
                        lo, hi = wilson_interval(detected, len(got))
                        rows.append({
                            "setting": setting, "shape": shape, "candidate": name,
                            "calibration": calibration, "rule": rule, "fpr": fpr, "seed": seed,
                            "set": key, "detected": detected, "n": len(got),
                            "rate": detected / len(got), "lo": lo, "hi": hi, "fit_s": fit_s,
                            "n_negatives": sum(len(x) for x in negatives),
                            "bound": (det.calibration_ or {}).get("bound"),
                        })  # fmt: skip
    return pd.DataFrame(rows)


def _key(name: str, seed: int) -> str:
    """The cached keys' name: per seed, except the sets every seed shares."""
    return name if name == "calibration" or "unseen" in name else f"{name}.s{seed}"


def meets_goal(table: pd.DataFrame) -> pd.DataFrame:
    """Per shape and candidate: whether every seed meets every set's goal (point estimates),
    and the worst rate per set over the seeds."""
    out = []
    keys = ["setting", "shape", "candidate"]
    for (setting, shape, name), part in table.groupby(keys, sort=False):
        row = {"setting": setting, "shape": shape, "candidate": name}
        ok = True
        for key, (_, goal) in MEASURED.items():
            rates = part.loc[part["set"] == key, "rate"]
            if goal is None:
                continue
            op, goal = goal
            worst = rates.min() if op == ">=" else rates.max()
            row[f"worst {key}"] = worst
            ok &= bool(worst >= goal) if op == ">=" else bool(worst <= goal)
        row["meets goal"] = ok
        out.append(row)
    return pd.DataFrame(out)


def summary(table: pd.DataFrame, goal: pd.DataFrame, seconds: float) -> str:
    """The markdown summary: per shape, candidate x seed with each set's rate and interval."""
    lines = ["# Detector calibration (issue 25, item 5)", ""]
    lines.append("Rate detected [95 % Wilson interval] (k/n); goal: GSM8K >= 0.90, others <= 0.05.")
    for setting in SETTINGS:
        for shape in SHAPES:
            lines += ["", f"## {shape}, {setting}", ""]
            head = ["candidate", "seed"] + [MEASURED[k][0] for k in MEASURED]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            part = table[(table["shape"] == shape) & (table["setting"] == setting)]
            for (name, seed), cell in part.groupby(["candidate", "seed"], sort=False):
                vals = []
                for key in MEASURED:
                    r = cell[cell["set"] == key].iloc[0]
                    vals.append(f"{r.rate:.2f} [{r.lo:.2f}, {r.hi:.2f}] ({r.detected}/{r.n})")
                lines.append(f"| {name} | {seed} | " + " | ".join(vals) + " |")
    lines += ["", "## Goal met on every seed (worst seed per set)", ""]
    lines += ["| " + " | ".join(goal.columns) + " |", "|" + "---|" * len(goal.columns)]
    for row in goal.itertuples(index=False):
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "The library's defaults now:"]
    for shape, cls in SHAPES.items():
        p = cls().get_params()
        rule = (
            p["rule"] if isinstance(p["rule"], str) else Fraction(p["rule"]).limit_denominator(12)
        )
        lines.append(f"{shape}: calibration {p['calibration']}, rule {rule}, fpr {p['fpr']}.")
    lines += ["", f"Wall time: {seconds:.0f} s.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = StudyParser(__doc__.splitlines()[0], out="results/detector-calibration", seed=False)
    parser.add_argument("--n", type=int, default=32, help="examples per probe half (as the study)")
    parser.add_argument(
        "--n-large", type=int, default=100, help="probe questions, calibration only"
    )
    parser.add_argument("--n-unseen", type=int, default=150, help="unseen general questions each")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    args = parser.parse_args()
    data_dir = data_dir_or_exit(args)
    out = Path(args.out)
    began = time.perf_counter()
    model = mu.load_model(args.model, quiet=True)
    sets = {"calibration": mu.calibration_skill()}
    sets.update(unseen_sets(args.n, args.n_unseen, args.seeds, data_dir))
    for seed in args.seeds:
        sets.update({f"{k}.s{seed}": v for k, v in seed_sets(args.n, seed, data_dir).items()})
        large = mu.load_skill("gsm8k", n=2 * args.n_large, seed=seed, data_dir=data_dir)
        sets[f"gsm8k_large_probe.s{seed}"], sets[f"gsm8k_large_heldout.s{seed}"] = large.split(
            0.5, seed=seed
        )
    keys = {}
    for name, skill in sets.items():
        t = time.perf_counter()
        keys[name] = cached_keys(model, skill, out, name)
        print(f"{name}: {len(keys[name])} keys, {time.perf_counter() - t:.0f} s", flush=True)
    maths = [i for i, ex in enumerate(sets["mmlu_unseen"]) if ex.meta["subject"] in MATHS]
    keep = sorted(set(range(len(sets["mmlu_unseen"]))) - set(maths))
    keys["mmlu_unseen_nonmaths"] = keys["mmlu_unseen"].subset(keep)
    t = time.perf_counter()
    table = evaluate(keys, args.seeds)
    print(f"evaluated {len(CANDIDATES)} candidates x {len(SHAPES)} shapes x {len(SETTINGS)} "
          f"settings x {len(args.seeds)} seeds in {time.perf_counter() - t:.0f} s")  # fmt: skip
    goal = meets_goal(table)
    seconds = time.perf_counter() - began
    write_text(out / "table.csv", table.to_csv(index=False))
    write_text(out / "goal.csv", goal.to_csv(index=False))
    write_text(out / "summary.md", summary(table, goal, seconds))
    print(goal.to_string(index=False))
    print(f"wrote {out}/table.csv, goal.csv, summary.md; took {seconds:.0f} s")


if __name__ == "__main__":
    main()
