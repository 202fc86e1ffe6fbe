"""Benchmark: the cost of intervention hooks on the default model (SmolLM2-135M-Instruct).

Fitted on real data (GSM8K as the forget skill, MBPP as the retain skill, ``--n-fit`` examples
each), timed on other GSM8K + MBPP examples (prompt + answer, every token):

* ``bare``: the batched forward pass, nothing attached;
* ``identity``: one do-nothing hook at every layer's ``hook_pre`` (TransformerLens' own cost);
* ``na``: NeuronAdjust, ratio 3 %, every layer (goal: ``na / bare <= 1.05``);
* ``ksd``: KeySpaceDetector hooks at the last layer, the authors' setting
  (goal: ``ksd / bare <= 1.02``);
* ``ksd_all``: KeySpaceDetector hooks at every layer, rule "any";
* ``sp``: SelectivePruning, 1.5 %, every layer;
* ``lunar``: Lunar's hooks at one layer (16), ``key @ dW`` added to the MLP output;
* generation: ``KeySpaceDetector.generate`` on a mixed batch (half GSM8K, half MBPP prompts)
  vs bare greedy generation of the whole batch (same ``model.generate`` path, no detection).

Forward passes are interleaved batch by batch (A B C ... on every batch, the order rotating),
generations run by run; the ratios are of medians over repeats measured in one run: of wall
times on a GPU, of this process's CPU times on a CPU (with ``--threads 1`` that is steady on a
machine shared with other jobs, where wall times are not; both are written). Results go to
``benchmarks/results/hooks.json``.

Usage:
    python benchmarks/bench_hooks.py [--device cuda] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import mechunlearn as mu
from mechunlearn.batching import iter_batches, tokenize_examples
from mechunlearn.generation import generate_from_tokens
from mechunlearn.interventions import KeySpaceDetector, NeuronAdjust
from mechunlearn.io import write_json
from mechunlearn.models import DEFAULT_MODEL
from mechunlearn.sites import hook_name
from mechunlearn.validation import default_device

RESULTS = Path(__file__).parent / "results"


def timed(fn, device: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--n-fit", type=int, default=20, help="examples per skill to fit on")
    parser.add_argument("--n-eval", type=int, default=32, help="examples per skill to time on")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--gen-prompts", type=int, default=8, help="prompts per skill")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument(
        "--data-dir", default=os.environ.get("MECHUNLEARN_DATA", "/work/shared/data")
    )
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = mu.load_model(device=args.device, quiet=True)
    print(f"model loaded in {time.perf_counter() - t0:.1f} s on {args.device}")
    gsm = mu.load_skill("gsm8k", split="train", data_dir=args.data_dir, seed=0)
    mbpp = mu.load_skill("mbpp", data_dir=args.data_dir, seed=0)
    n, m = args.n_fit, args.n_eval
    forget, retain = gsm[:n], mbpp[:n]
    held = mu.Skill("gsm8k+mbpp", list(gsm[n : n + m]) + list(mbpp[n : n + m]), "benchmark")

    what = ("pre", "keys", "importance")
    probe_f = mu.collect(model, forget, what=what, quiet=True)
    probe_r = mu.collect(model, retain, what=what, quiet=True)
    stats_f, stats_r, keys_f = probe_f.pre, probe_r.pre, probe_f.keys
    na = NeuronAdjust(ratio=0.03).fit(stats_f, stats_r)
    sp = mu.SelectivePruning(ratio=0.015).fit(probe_f.importance, probe_r.importance)
    lunar = mu.Lunar(layer=16).fit(model, forget, retain)
    ksd = KeySpaceDetector(h=2.0, layers=-1).fit(keys_f)  # the authors' last layer
    ksd_all = KeySpaceDetector(h=2.0, layers=None, rule="any").fit(keys_f)
    print(na)
    print(ksd)

    batches = list(iter_batches(model, held.prompts, held.answers, batch_size=args.batch_size))
    n_tokens = sum(int(b.attention_mask.sum()) for b in batches)
    identity = [
        (hook_name("pre", layer), lambda act, hook: act) for layer in range(model.cfg.n_layers)
    ]

    def forward(hooks_fn):
        def run(b):
            model.run_with_hooks(b.tokens, fwd_hooks=hooks_fn(), attention_mask=b.attention_mask)

        return run

    def ksd_run(detector):
        def run(b):
            hooks = detector.hooks(positions=b.last_prompt)
            model.run_with_hooks(b.tokens, fwd_hooks=hooks, attention_mask=b.attention_mask)
            detector.record.detected  # noqa: B018 - combined on the device, not read

        return run

    def bare(b):
        model(b.tokens, attention_mask=b.attention_mask)

    forwards = {
        "bare": bare,
        "identity": forward(lambda: identity),
        "na": forward(lambda: na.hooks(model)),
        "ksd": ksd_run(ksd),
        "ksd_all": ksd_run(ksd_all),
        "sp": forward(lambda: sp.hooks(model)),
        "lunar": forward(lambda: lunar.hooks(model)),
    }

    # generation: a mixed batch, KSD vs bare greedy generation of the whole batch
    k = args.gen_prompts
    pairs = zip(gsm.prompts[n : n + k], mbpp.prompts[n : n + k], strict=True)
    gen_prompts = [p for pair in pairs for p in pair]
    gen_ids = [ids for ids, _ in tokenize_examples(model, gen_prompts, [""] * len(gen_prompts))]
    gen_kw = {"do_sample": False, "verbose": False}
    detected = ksd.detect(model, gen_prompts).detected
    generations = {
        "generate_bare": lambda: generate_from_tokens(
            model, gen_ids, args.max_new_tokens, **gen_kw
        ),
        "generate_ksd": lambda: ksd.generate(
            model, gen_prompts, max_new_tokens=args.max_new_tokens
        ),
    }

    for fn in forwards.values():  # warm-up
        fn(batches[0])
    for fn in generations.values():
        fn()

    names = list(forwards) + list(generations)
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for rep in range(args.repeats):
        # Forward passes are interleaved batch by batch (A B C ... on each batch, the order
        # rotating), so that every approach sees the same load on a shared machine.
        total = {name: [0.0, 0.0] for name in forwards}
        for i, b in enumerate(batches):
            order = list(forwards)
            shift = (i + rep) % len(order)
            for name in order[shift:] + order[:shift]:
                w, c = timed(lambda name=name, b=b: forwards[name](b), args.device)
                total[name][0] += w
                total[name][1] += c
        for name, (w, c) in total.items():
            wall[name].append(w)
            cpu[name].append(c)
        gen_order = list(generations) if rep % 2 == 0 else list(generations)[::-1]
        for name in gen_order:
            w, c = timed(generations[name], args.device)
            wall[name].append(w)
            cpu[name].append(c)
        line = "  ".join(f"{name} {wall[name][-1]:.3f}/{cpu[name][-1]:.3f}" for name in names)
        print(f"repeat {rep + 1} (wall/cpu s): {line}", flush=True)
    # On a GPU the wall time is what counts. On a CPU shared with other jobs, the CPU time
    # of this process (with --threads 1) is far steadier than the wall time.
    on_cpu = not args.device.startswith("cuda")
    basis = "cpu_time" if on_cpu else "wall_time"
    med = {name: statistics.median((cpu if on_cpu else wall)[name]) for name in names}
    med_wall = {name: statistics.median(wall[name]) for name in names}
    ratios = {
        "na_over_bare": med["na"] / med["bare"],
        "ksd_over_bare": med["ksd"] / med["bare"],
        "ksd_all_over_bare": med["ksd_all"] / med["bare"],
        "sp_over_bare": med["sp"] / med["bare"],
        "lunar_over_bare": med["lunar"] / med["bare"],
        "identity_over_bare": med["identity"] / med["bare"],
        "na_over_identity": med["na"] / med["identity"],
        "generate_ksd_over_bare": med["generate_ksd"] / med["generate_bare"],
    }
    result = {
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "model": DEFAULT_MODEL,
        "n_fit_per_skill": n,
        "eval_examples": len(held),
        "eval_tokens": n_tokens,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "na_selected": sum(na.n_selected_),
        "generation": {
            "prompts": len(gen_prompts),
            "detected": int(detected.sum()),
            "max_new_tokens": args.max_new_tokens,
        },
        "ratio_basis": basis,
        "median_seconds": med,
        "median_wall_seconds": med_wall,
        "ratios": ratios,
        "wall_ratios": {
            "na_over_bare": med_wall["na"] / med_wall["bare"],
            "ksd_over_bare": med_wall["ksd"] / med_wall["bare"],
            "generate_ksd_over_bare": med_wall["generate_ksd"] / med_wall["generate_bare"],
        },
        "goals": {"na_over_bare": 1.05, "ksd_over_bare": 1.02},
    }
    name = "hooks.json" if on_cpu else "hooks_cuda.json"
    write_json(RESULTS / name, result)
    print(json.dumps(result, indent=2))
    print(f"ratios of median {basis}:")
    print(f"NA / bare forward:  {ratios['na_over_bare']:.3f} (goal <= 1.05)")
    print(f"KSD / bare forward: {ratios['ksd_over_bare']:.3f} (goal <= 1.02)")
    print(f"SP / bare forward: {ratios['sp_over_bare']:.3f}")
    print(f"LUNAR / bare forward: {ratios['lunar_over_bare']:.3f}")
    print(
        f"KSD.generate / bare generation: {ratios['generate_ksd_over_bare']:.3f} "
        f"({int(detected.sum())} of {len(gen_prompts)} prompts detected)"
    )


if __name__ == "__main__":
    main()
