"""Benchmark: scoring a detector's candidates in a search (:func:`mechunlearn.tune`).

Forget GSM8K, keep MBPP and MMLU (``--n`` held-back examples each, real text, the default
model). The Key Space Detector and the ellipsoid on the last layer at the matched study's four
false-positive caps (``fpr`` 0.001, 0.01, 0.05, 0.1; rank calibration), fitted on ``--n`` probe
examples of GSM8K with the shipped calibration questions as negatives. The same eight candidates
scored two ways, in one run:

* ``shared``: :func:`mechunlearn.tuning.relative_scorer`, the default score of ``tune``: the
  bare results once per skill, each skill's key vectors once per set of layers, then each
  candidate is a threshold on them (no forward pass of its own);
* ``per_candidate``: each candidate scored by ``teacher_forced(model, skill, detector)`` on
  every skill, a detection pass and a bare scoring pass each (the default score before it
  shared them).

Both give the same relative scores (checked, to 1e-9); wall time of each and the ratio go to
``benchmarks/results/tune.json``.

Usage:
    MECHUNLEARN_DATA=../shared/data python benchmarks/bench_tune.py [--n 32]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import mechunlearn as mu
from mechunlearn.evaluation import teacher_forced
from mechunlearn.io import write_json
from mechunlearn.tuning import relative_scorer

RESULTS = Path(__file__).parent / "results"
FPRS = (0.001, 0.01, 0.05, 0.1)


def per_candidate_scorer(model, skills: dict[str, mu.Skill], batch_size: int):
    """The default score as it was: every skill scored with the candidate applied."""
    base = {n: teacher_forced(model, s, batch_size=batch_size).score for n, s in skills.items()}

    def score(detector) -> dict[str, float]:
        return {
            n: teacher_forced(model, s, detector, batch_size=batch_size).score / base[n]
            for n, s in skills.items()
        }

    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--output", default="tune.json")
    args = parser.parse_args()
    model = mu.load_model(quiet=True)

    def skill(name: str, offset: int) -> mu.Skill:
        s = mu.load_skill(name, n=2 * args.n, seed=0, data_dir=args.data_dir)
        return s[offset : offset + args.n]

    probe = skill("gsm8k", 0)
    held = {"forget": skill("gsm8k", args.n), "mbpp": skill("mbpp", args.n),
            "mmlu": skill("mmlu", args.n)}  # fmt: skip
    keys_f = mu.collect_keys(model, probe, layers=[-1], quiet=True)
    negatives = mu.collect_keys(model, mu.calibration_skill(), layers=[-1], quiet=True)
    candidates = [
        cls(fpr=fpr, layers=-1, calibration="rank").fit(keys_f, negatives)
        for cls in (mu.KeySpaceDetector, mu.EllipsoidDetector)
        for fpr in FPRS
    ]
    keep = {n: s for n, s in held.items() if n != "forget"}
    scorers = {
        "shared": lambda: relative_scorer(model, held["forget"], keep, args.batch_size),
        "per_candidate": lambda: per_candidate_scorer(model, held, args.batch_size),
    }
    seconds, scores = {}, {}
    for name, make in scorers.items():
        t0 = time.perf_counter()
        score = make()
        scores[name] = [score(det) for det in candidates]
        seconds[name] = time.perf_counter() - t0
    for a, b in zip(scores["shared"], scores["per_candidate"], strict=True):
        for column in a:
            if not math.isclose(a[column], b[column], rel_tol=1e-9, abs_tol=1e-12):
                raise SystemExit(f"the two scorers disagree on {column}: {a} vs {b}")
    result = {
        "n_per_skill": args.n,
        "candidates": len(candidates),
        "skills": list(held),
        "seconds": seconds,
        "ratio_shared_to_per_candidate": seconds["shared"] / seconds["per_candidate"],
        "forget_left": [round(s["forget"], 4) for s in scores["shared"]],
    }
    path = write_json(RESULTS / args.output, result)
    print(f"shared {seconds['shared']:.1f} s, per candidate {seconds['per_candidate']:.1f} s, "
          f"ratio {result['ratio_shared_to_per_candidate']:.3f} -> {path}")  # fmt: skip


if __name__ == "__main__":
    main()
