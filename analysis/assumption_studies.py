"""The assumption checks on the default model for three pairs of skills: Gaussian fit,
separation, hypercube geometry and convexity, layer by layer (figures + CSV tables).

Studies (each is ``mechunlearn analyze`` with its skills; statistics are reused on a rerun):

* ``gsm8k-vs-mbpp``: math word problems vs Python coding, general MMLU;
* ``mmlu-subjects``: MMLU mathematics vs the other MMLU subjects (general: XQuAD en);
* ``xquad-languages``: XQuAD German vs English, Spanish and Chinese (general: MMLU).

Usage:
    MECHUNLEARN_DATA=../shared/data python analysis/assumption_studies.py [--n 64] [--studies ...]

Writes ``results/assumptions/<study>/`` (figures/*.png, tables/*.csv) and prints where.
"""

from __future__ import annotations

import argparse
import os
import sys

from mechunlearn import cli

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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", nargs="+", default=list(STUDIES), choices=list(STUDIES))
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--data-dir", default=os.environ.get("MECHUNLEARN_DATA"))
    parser.add_argument("--out", default="results/assumptions")
    args = parser.parse_args()
    if not args.data_dir:
        sys.exit("Set MECHUNLEARN_DATA (or --data-dir) to the benchmark folder (../shared/data).")
    for name in args.studies:
        argv = ["analyze", *STUDIES[name], "--n", str(args.n), "--seed", str(args.seed),
                "--data-dir", args.data_dir, "--out", f"{args.out}/{name}"]  # fmt: skip
        if args.device:
            argv += ["--device", args.device]
        code = cli.main(argv)
        if code:
            sys.exit(f"study {name} failed (exit {code})")
        print(f"{name}: figures in {args.out}/{name}/figures, tables in {args.out}/{name}/tables")


if __name__ == "__main__":
    main()
