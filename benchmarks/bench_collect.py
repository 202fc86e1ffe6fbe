"""Benchmark: streaming collection vs a bare forward pass and vs the authors' naive approach.

On the default model (SmolLM2-135M-Instruct) over >= 20,000 tokens of real GSM8K + MBPP text:

* ``bare``: the batched forward pass on the same batches, nothing attached;
* ``collect``: ``mechunlearn.collect(site="pre")`` on every layer (moments in float64 from the
  first subtraction, min/max, reservoir);
* ``combined``: ``collect(what=("pre", "keys", "importance"))``: everything a run needs, one pass;
* ``separate``: the same three things from three calls (``collect``, ``collect_keys``,
  ``collect_importance``), as the CLI used to do;
* ``naive``: the authors' approach: one text at a time, ``run_with_cache``, every layer's
  ``hook_pre`` activations concatenated, then mean and std.

Speed is the ratio of median wall times measured in one run (runs interleaved). Peak memory is
measured in a fresh subprocess per approach (Linux): the peak RSS (VmHWM, reset after the model
is loaded and warmed up) minus the RSS at that point.

Usage:
    python benchmarks/bench_collect.py [--tokens 20000] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from memory import reset_peak_rss, status_mb

import mechunlearn as mu
from mechunlearn.batching import iter_batches
from mechunlearn.io import write_json
from mechunlearn.sites import hook_name
from mechunlearn.validation import default_device

RESULTS = Path(__file__).parent / "results"


def skill_for_tokens(model, tokens: int, data_dir: str | None):
    """Real GSM8K + MBPP examples until the texts hold at least ``tokens`` tokens."""
    gsm = mu.load_skill("gsm8k", split="train", data_dir=data_dir, seed=0)
    mbpp = mu.load_skill("mbpp", data_dir=data_dir, seed=0)
    examples, total = [], 0
    for pair in zip(gsm, mbpp, strict=False):
        for ex in pair:
            examples.append(ex)
            total += len(model.tokenizer(ex.prompt + ex.answer)["input_ids"])
        if total >= tokens:
            break
    return mu.Skill("gsm8k+mbpp", examples, source="benchmark"), total


def run_bare(model, batches):
    with torch.inference_mode():
        for b in batches:
            model(b.tokens, attention_mask=b.attention_mask)


def run_collect(model, skill, batch_size):
    return mu.collect(model, skill, site="pre", batch_size=batch_size, quiet=True)


def run_combined(model, skill, batch_size):
    what = ("pre", "keys", "importance")
    return mu.collect(model, skill, what=what, batch_size=batch_size, quiet=True)


def run_separate(model, skill, batch_size):
    return (
        mu.collect(model, skill, site="pre", batch_size=batch_size, quiet=True),
        mu.collect_keys(model, skill, batch_size=batch_size, quiet=True),
        mu.collect_importance(model, skill, batch_size=batch_size),
    )


def run_naive(model, skill):
    """The authors' way: one text at a time, a full activation cache, concatenation."""
    names = [hook_name("pre", layer) for layer in range(model.cfg.n_layers)]
    acts = {n: [] for n in names}
    with torch.inference_mode():
        for ex in skill:
            tokens = model.to_tokens(ex.prompt + ex.answer)
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in acts)
            for n in names:
                acts[n].append(cache[n][0, 1:].float())  # drop BOS
    stacked = {n: torch.cat(v) for n, v in acts.items()}
    return {n: (v.mean(0), v.std(0)) for n, v in stacked.items()}


def child(args) -> None:
    """Measure one approach's peak memory in this fresh process."""
    model = mu.load_model(device=args.device, quiet=True)
    skill, _ = skill_for_tokens(model, args.tokens, args.data_dir)
    batches = list(iter_batches(model, skill.prompts, skill.answers, batch_size=args.batch_size))
    run_bare(model, batches[:1])  # warm up allocations shared by all approaches
    reset_peak_rss()
    base = status_mb("VmRSS")
    if args.child == "bare":
        run_bare(model, batches)
    elif args.child == "collect":
        run_collect(model, skill, args.batch_size)
    elif args.child == "combined":
        run_combined(model, skill, args.batch_size)
    elif args.child == "separate":
        run_separate(model, skill, args.batch_size)
    else:
        run_naive(model, skill)
    print(json.dumps({"peak_over_model_mb": status_mb("VmHWM") - base}))


def memory_result(args, names: list[str]) -> dict:
    """Peak memory of each approach, each in a fresh subprocess (CPU, Linux)."""
    memory = {}
    for name in names:
        cmd = [sys.executable, __file__, "--child", name, "--tokens", str(args.tokens),
               "--batch-size", str(args.batch_size), "--device", args.device]  # fmt: skip
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        memory[name] = json.loads(out.strip().splitlines()[-1])["peak_over_model_mb"]
    return {
        "peak_memory_over_model_mb": memory,
        "naive_over_collect_memory": (
            memory["naive"] / max(memory["collect"], 1e-9) if "naive" in memory else None
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--data-dir", default=os.environ.get("MECHUNLEARN_DATA"))
    parser.add_argument(
        "--child", choices=["bare", "collect", "combined", "separate", "naive"],
        help=argparse.SUPPRESS,
    )  # fmt: skip
    parser.add_argument("--skip-naive", action="store_true", help="omit the slow naive approach")
    args = parser.parse_args()
    if args.child:
        return child(args)

    torch.set_grad_enabled(False)
    model = mu.load_model(device=args.device, quiet=True)
    skill, n_tokens = skill_for_tokens(model, args.tokens, args.data_dir)
    batches = list(iter_batches(model, skill.prompts, skill.answers, batch_size=args.batch_size))
    print(f"{len(skill)} examples, {n_tokens} tokens, {len(batches)} batches on {args.device}")

    approaches = {
        "bare": lambda: run_bare(model, batches),
        "collect": lambda: run_collect(model, skill, args.batch_size),
        "combined": lambda: run_combined(model, skill, args.batch_size),
        "separate": lambda: run_separate(model, skill, args.batch_size),
    }
    if not args.skip_naive:
        approaches["naive"] = lambda: run_naive(model, skill)
    run_bare(model, batches[:2])  # warm-up
    times = {k: [] for k in approaches}
    for rep in range(args.repeats):
        for name, fn in approaches.items():  # interleaved: A B C A B C ...
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
            print(f"  repeat {rep + 1}: {name:8s} {times[name][-1]:7.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}

    # Agreement: the naive means/stds equal the streaming ones.
    if "naive" in approaches:
        stats = run_collect(model, skill, args.batch_size)
        naive = run_naive(model, skill)
        worst = max(
            float((stats.mean[i].float() - naive[hook_name("pre", layer)][0]).abs().max())
            for i, layer in enumerate(stats.layers)
        )
        print(f"max |mean difference| streaming vs naive: {worst:.2e}")

    result = {
        "device": args.device,
        "examples": len(skill),
        "tokens": n_tokens,
        "batch_size": args.batch_size,
        "median_seconds": med,
        "collect_over_bare": med["collect"] / med["bare"],
        "combined_over_bare": med["combined"] / med["bare"],
        "combined_over_separate": med["combined"] / med["separate"],
        "naive_over_collect": med["naive"] / med["collect"] if "naive" in med else None,
    }
    if not args.device.startswith("cuda"):
        result.update(memory_result(args, list(approaches)))
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "collect.json", result)
    print(json.dumps(result, indent=2))
    print(f"collect / bare forward: {result['collect_over_bare']:.3f} (goal <= 1.2)")
    print(f"combined / bare forward: {result['combined_over_bare']:.3f} (goal <= 1.1)")
    print(f"combined / three separate calls: {result['combined_over_separate']:.3f} (goal <= 0.4)")
    if result["naive_over_collect"]:
        print(f"naive / collect time: {result['naive_over_collect']:.2f}x")
    if result.get("naive_over_collect_memory"):
        print(f"naive / collect peak memory: {result['naive_over_collect_memory']:.2f}x")


if __name__ == "__main__":
    main()
