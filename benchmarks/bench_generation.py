"""Benchmark: greedy generation with and without the key-value cache on the default model.

Where the cache cannot be trusted (transformer-lens 4.3 with transformers >= 5.24, see
:mod:`mechunlearn.generation`), mechunlearn generates without it: one full forward per new
token. This measures what that costs: ``uncached / cached`` for a batch of GSM8K prompts at
several continuation lengths, both through :func:`mechunlearn.generation.generate_from_tokens`
(left-padded batch, attention mask), interleaved repeat by repeat, medians of CPU time at
``--threads`` threads (wall time on a GPU). Both runs must give the same tokens (checked).
Results go to ``benchmarks/results/generation.json``.

Usage:
    python benchmarks/bench_generation.py [--device cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

import mechunlearn as mu
from mechunlearn.batching import tokenize_examples
from mechunlearn.generation import generate_from_tokens
from mechunlearn.io import write_json
from mechunlearn.validation import default_device

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    parser.add_argument(
        "--data-dir", default=os.environ.get("MECHUNLEARN_DATA", "/work/shared/data")
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = mu.load_model(device=args.device, quiet=True)
    prompts = mu.load_skill("gsm8k", n=args.prompts, data_dir=args.data_dir, seed=0).prompts
    ids = [t for t, _ in tokenize_examples(model, prompts, [""] * len(prompts), None, False)]
    clock = time.perf_counter if args.device.startswith("cuda") else time.process_time
    rows = {}
    for length in args.lengths:
        times: dict[bool, list[float]] = {True: [], False: []}
        outs: dict[bool, list[str]] = {}
        for rep in range(args.repeats):
            for cache in (True, False) if rep % 2 == 0 else (False, True):
                t0 = clock()
                with torch.inference_mode():
                    outs[cache] = generate_from_tokens(
                        model, ids, length, use_past_kv_cache=cache, stop_at_eos=False
                    )
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[cache].append(clock() - t0)
        same = outs[True] == outs[False]
        cached, plain = statistics.median(times[True]), statistics.median(times[False])
        rows[str(length)] = {
            "cached_s": cached,
            "uncached_s": plain,
            "ratio_uncached_over_cached": plain / cached,
            "same_tokens": same,
        }
        print(
            f"{args.prompts} prompts x {length} new tokens: cached {cached:.2f} s, uncached "
            f"{plain:.2f} s, ratio {plain / cached:.2f}, same tokens: {same}"
        )
    import transformers

    write_json(
        RESULTS / "generation.json",
        {
            "device": args.device,
            "threads": args.threads,
            "clock": "wall" if args.device.startswith("cuda") else "process CPU time",
            "prompts": args.prompts,
            "repeats": args.repeats,
            "transformers": transformers.__version__,
            "lengths": rows,
        },
    )


if __name__ == "__main__":
    main()
