"""Benchmark: what fitting each method costs on the default model, from the same texts.

Forget GSM8K, retain MBPP (``--n`` examples each, real text), every fit starting from the skills:

* ``na``: Neuron Adjust, 3 %: ``collect`` of both skills' ``hook_pre`` statistics, then ``fit``;
* ``lunar``: LUNAR at a fixed layer (16), closed form: direction and the normal equations;
* ``lunar_auto``: LUNAR with ``layer="auto"`` over five candidate layers (each scored), without
  the default general floor (``general=None``);
* ``simu``: SIMU as the unlearning study runs it (last six layers, two integrated-gradient steps,
  ten masked SophiaH updates);
* ``ga``, ``graddiff``, ``npo``: the first-order baselines with their defaults (every parameter
  trained by AdamW) for ``--steps`` steps (default 10, SIMU's run budget), early stop off;
* ``rmu``: RMU with its defaults (layer 7, ``W_out`` of layers 5-7) for ``--steps`` steps;
* ``graddiff_joint``: GradDiff with its loss handed to the loop as one scalar, so that a step
  holds the forget and the retain batch's graphs at once (the loop before it took the loss in
  parts): beside ``graddiff``, what differentiating the parts one at a time saves.

``--batch-size`` sets the trained baselines' batches (default: each one's own; GA, GradDiff
and NPO take 8).

Each fit runs in a fresh subprocess (Linux): its wall time, and its peak memory above the RSS after
the model is loaded (VmHWM reset there). The ratios to NA's fit, all measured in one run, go to
``benchmarks/results/fit.json`` (``--output``: another file, for a subset of ``--methods``).

Usage:
    MECHUNLEARN_DATA=../shared/data python benchmarks/bench_fit.py [--n 16] [--steps 10]
    MECHUNLEARN_DATA=../shared/data python benchmarks/bench_fit.py \
        --methods na ga graddiff npo rmu --output fit_baselines.json
    MECHUNLEARN_DATA=../shared/data python benchmarks/bench_fit.py \
        --methods na graddiff graddiff_joint --steps 2 --batch-size 4 --output fit_parts.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from memory import reset_peak_rss, status_mb

import mechunlearn as mu
from mechunlearn.interventions.training import sum_parts
from mechunlearn.io import write_json

RESULTS = Path(__file__).parent / "results"
METHODS = ("na", "lunar", "lunar_auto", "simu", "ga", "graddiff", "npo", "rmu", "graddiff_joint")


class JointGradDiff(mu.GradDiff):
    """GradDiff whose loss reaches the loop as one scalar (both graphs held at once)."""

    def _objective(self, model, items_f, items_r):
        parts, early = super()._objective(model, items_f, items_r)
        return (lambda batch_f, batch_r: sum_parts(parts(batch_f, batch_r))), early


BASELINES = {"ga": mu.GradAscent, "graddiff": mu.GradDiff, "npo": mu.NPO,
             "graddiff_joint": JointGradDiff}  # fmt: skip


def child(args) -> None:
    model = mu.load_model(device="cpu", quiet=True)
    forget = mu.load_skill("gsm8k", n=args.n, seed=0, data_dir=args.data_dir)
    retain = mu.load_skill("mbpp", n=args.n, seed=0, data_dir=args.data_dir)
    batch = {} if args.batch_size is None else {"batch_size": args.batch_size}
    reset_peak_rss()
    base = status_mb("VmRSS")
    t0 = time.perf_counter()
    if args.child == "na":
        f = mu.collect(model, forget, quiet=True)
        r = mu.collect(model, retain, quiet=True)
        mu.NeuronAdjust(ratio=0.03).fit(f, r)
    elif args.child == "lunar":
        mu.Lunar(layer=16).fit(model, forget, retain)
    elif args.child == "lunar_auto":
        # general=None: the sweep as measured before LUNAR's default general floor (its 32
        # greedy continuations and one more skill scored per candidate are not in this row)
        mu.Lunar(layer="auto", candidates=[6, 11, 16, 21, 26]).fit(
            model, forget, retain, general=None
        )
    elif args.child == "simu":
        mu.Simu(layers=list(range(24, 30)), steps=2, max_steps=10, batch_size=8).fit(
            model, forget, retain, quiet=True
        )
    elif args.child == "rmu":
        mu.RMU(max_steps=args.steps, **batch).fit(model, forget, retain, quiet=True)
    else:
        est = BASELINES[args.child](max_steps=args.steps, forget_loss_factor=None, **batch)
        est.fit(model, forget, retain, quiet=True)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_over_model_mb": status_mb("VmHWM") - base}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="examples per skill")
    parser.add_argument("--steps", type=int, default=10, help="baselines' training steps")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="baselines' batches (default: each one's own)"
    )
    parser.add_argument("--data-dir", default=os.environ.get("MECHUNLEARN_DATA"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--output", default="fit.json", help="file under benchmarks/results/ (a subset: another)"
    )
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.data_dir:
        sys.exit("Set MECHUNLEARN_DATA (or --data-dir) to the benchmark folder (../shared/data).")
    if args.child:
        return child(args)
    measured = {}
    for method in args.methods:
        cmd = [sys.executable, __file__, "--child", method, "--n", str(args.n),
               "--steps", str(args.steps), "--data-dir", args.data_dir]  # fmt: skip
        if args.batch_size is not None:
            cmd += ["--batch-size", str(args.batch_size)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        measured[method] = json.loads(out.strip().splitlines()[-1])
        print(f"{method:11s} {measured[method]['seconds']:8.1f} s  "
              f"{measured[method]['peak_over_model_mb']:8.0f} MB", flush=True)  # fmt: skip
    result = {"n_per_skill": args.n, "baseline_steps": args.steps, "device": "cpu",
              "baseline_batch_size": args.batch_size, "fits": measured}  # fmt: skip
    if "na" in measured:
        na = measured["na"]
        result["ratios_to_na"] = {
            m: {
                "time": v["seconds"] / na["seconds"],
                "peak_memory": v["peak_over_model_mb"] / max(na["peak_over_model_mb"], 1e-9),
            }
            for m, v in measured.items()
            if m != "na"
        }
    write_json(RESULTS / args.output, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
