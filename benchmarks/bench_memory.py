"""Benchmark: predicted memory (``mu.predict_memory``) against what is measured on real models.

For each model (the offline default SmolLM2-135M-Instruct and Gemma 3 270M, float32 on the CPU),
one fresh subprocess loads it, takes ``--n`` examples of GSM8K (forget) and MBPP (retain), and
measures, in order:

* ``collect``: ``collect(what=("pre", "keys", "importance"))`` of the forget skill (the run's
  one pass): the ``nbytes`` of each result tensor (moments, reservoir, keys, importance) against
  the exact rows, and the call's peak against the sum of the collect rows;
* ``scoring``: one teacher-forced pass over the forget skill (``evaluation.teacher_forced``);
* for NA, KSD, SP (from the collected inputs of both skills), LUNAR at one fixed layer (the
  middle one, closed form) and GA (the last two blocks, ``--steps`` AdamW steps, batches of 2):
  the fitted state (the ``nbytes`` of the saved tensors) against the exact ``state`` row, and
  the fit's peak against the ``fit`` row.

A peak is ``VmHWM - VmRSS`` around the call, with the kernel's peak mark reset before it
(``/proc/self/clear_refs``; Linux only) and glibc returning every freed block over 128 KiB to
the system (``MALLOC_MMAP_THRESHOLD_=131072``), so that memory kept from an earlier step does
not hide a later step's peak. The predictions are made for the measured setting: the
examples' longest tokenised text as ``seq_len`` and the batch sizes used.

``--paper-models`` prints the predictions for Llama-3-8B and Llama-3-70B in bfloat16 (no model
is loaded) as Markdown tables, with what one device must hold under the defaults and under the
settings ``docs/scale.md`` recommends, as pasted there.

Usage:
    MECHUNLEARN_DATA=../shared/data python benchmarks/bench_memory.py [--n 8] [--steps 2]
    python benchmarks/bench_memory.py --paper-models
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

from memory import reset_peak_rss, status_mb

import mechunlearn as mu
from mechunlearn.batching import tokenize_examples
from mechunlearn.evaluation import teacher_forced
from mechunlearn.io import write_json

RESULTS = Path(__file__).parent / "results"
MODELS = ("default", "gemma-3-270m")
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}
MB = 2**20


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def state_bytes(est) -> int:
    return nbytes(*est._state()[0].values())


def peak(fn):
    """``fn()``'s result and the peak RSS it added (bytes)."""
    reset_peak_rss()
    base = status_mb("VmRSS")
    out = fn()
    return out, (status_mb("VmHWM") - base) * MB


def child(args) -> None:
    warnings.simplefilter("ignore")
    name = None if args.child == "default" else args.child
    model = mu.load_model(name, device="cpu", quiet=True)
    forget = mu.load_skill("gsm8k", n=args.n, seed=0, data_dir=args.data_dir)
    retain = mu.load_skill("mbpp", n=args.n, seed=0, data_dir=args.data_dir)
    items = tokenize_examples(model, forget.prompts + retain.prompts,
                              forget.answers + retain.answers)  # fmt: skip
    seq = max(len(ids) for ids, _ in items)
    n_layers = model.cfg.n_layers
    lunar_layer, ga_layers = n_layers // 2, [n_layers - 2, n_layers - 1]
    pred = mu.predict_memory(
        model, n_examples=args.n, batch_size=min(16, args.n), seq_len=seq,
        methods={"NA": {}, "KSD": {"fpr": 0.25}, "SP": {}, "LUNAR": {"layer": lunar_layer},
                 "GA": {"layers": ga_layers, "batch_size": 2}},
    )  # fmt: skip
    rows = []

    def add(stage, item, predicted, measured, exact):
        rows.append({"stage": stage, "item": item, "predicted": predicted,
                     "measured": measured, "exact": exact})  # fmt: skip

    what = ("pre", "keys", "importance")
    probe_f, used = peak(lambda: mu.collect(model, forget, what=what, quiet=True))
    probe_r = mu.collect(model, retain, what=what, quiet=True)
    s = probe_f.pre
    measured = {
        "moments": nbytes(s.count, s.mean, s.m2, s.min, s.max, s.n_nonfinite),
        "reservoir": nbytes(s.samples, s.sample_keys),
        "keys": nbytes(probe_f.keys.values),
        "importance": nbytes(probe_f.importance.values),
    }
    for item, value in measured.items():
        add("collect", item, pred.bytes("collect", item), value, True)
    collect_rows = ("moments", "reservoir", "keys", "importance", "batch")
    add("collect", "peak of the call", sum(pred.bytes("collect", i) for i in collect_rows),
        used, False)  # fmt: skip
    _, used = peak(lambda: teacher_forced(model, forget, batch_size=min(16, args.n)))
    add("scoring", "peak of the pass", pred.bytes("scoring", "batch"), used, False)

    fits = {
        "NA": lambda: mu.NeuronAdjust().fit(probe_f.pre, probe_r.pre),
        "KSD": lambda: mu.KeySpaceDetector(fpr=0.25).fit(probe_f.keys, probe_r.keys),
        "SP": lambda: mu.SelectivePruning().fit(probe_f.importance, probe_r.importance),
        "LUNAR": lambda: mu.Lunar(layer=lunar_layer).fit(model, forget, retain),
        "GA": lambda: mu.GradAscent(
            layers=ga_layers, max_steps=args.steps, batch_size=2, forget_loss_factor=None
        ).fit(model, forget, retain, quiet=True),
    }
    for method, fit in fits.items():
        est, used = peak(fit)
        add("state", method, pred.bytes("state", method), state_bytes(est), True)
        add("fit", method, pred.bytes("fit", method), used, False)
        del est
    print(json.dumps({"model": model.cfg.model_name, "seq_len": seq, "rows": rows}))


def table(result: dict) -> str:
    lines = [
        f"{result['model']} (n={result['n']}, longest text {result['seq_len']} tokens)",
        f"{'stage':8s} {'item':18s} {'predicted MB':>13s} {'measured MB':>12s} {'ratio':>6s}",
    ]
    for r in result["rows"]:
        ratio = r["measured"] / r["predicted"] if r["predicted"] else float("nan")
        tag = "  exact" if r["exact"] else ""
        lines.append(f"{r['stage']:8s} {r['item']:18s} {r['predicted'] / MB:13.2f} "
                     f"{r['measured'] / MB:12.2f} {ratio:6.2f}{tag}")  # fmt: skip
    return "\n".join(lines)


PAPER_MODELS = {
    "Llama-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32),
    "Llama-3-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64),
}  # fmt: skip
COLLECTED = ("moments", "reservoir", "keys", "importance", "batch")


def scenarios(n_layers: int) -> list[tuple[str, str, dict]]:
    """(setting, method or "collect", predict_memory arguments): the settings docs/scale.md
    recommends when a default does not fit, next to the defaults."""
    last = lambda k: list(range(n_layers - k, n_layers))  # noqa: E731
    mid = round(n_layers * 0.7)  # 22 of 32: the authors' LUNAR layer for Llama-3-8B
    return [
        ("collect, defaults (every layer, reservoir 1024)", "collect", {}),
        ("collect, reservoir_size=256", "collect", {"reservoir_size": 256}),
        ("collect, reservoir_size=0, every 4th layer", "collect",
         {"reservoir_size": 0, "layers": list(range(0, n_layers, 4))}),
        ("LUNAR, layer='auto' (every third layer)", "LUNAR", {}),
        ("LUNAR, layer='auto', 3 candidates", "LUNAR",
         {"methods": {"LUNAR": {"candidates": [mid - 4, mid, mid + 4]}}}),
        (f"LUNAR, layer={mid}", "LUNAR", {"methods": {"LUNAR": {"layer": mid}}}),
        ("SIMU, every layer", "SIMU", {}),
        ("SIMU, layers = last 8", "SIMU", {"methods": {"SIMU": {"layers": last(8)}}}),
        ("GA/GradDiff/NPO, every parameter", "GradDiff", {}),
        ("GradDiff, layers = last 4", "GradDiff", {"methods": {"GradDiff": {"layers": last(4)}}}),
        ("RMU, defaults (layer 7, W_out of 5-7)", "RMU", {}),
    ]  # fmt: skip


def paper_models() -> None:
    from transformers import LlamaConfig

    for title, sizes in PAPER_MODELS.items():
        config = LlamaConfig(vocab_size=128256, num_key_value_heads=8, tie_word_embeddings=False,
                             **sizes)  # fmt: skip
        pred = mu.predict_memory(config, dtype="bfloat16")
        print(f"### {title} (bfloat16, defaults of predict_memory)\n")
        print(pred.to_markdown())
        print(f"\n#### {title}: what one device must hold\n")
        print("| setting | GiB | of which the weights |\n|---|---:|---:|")
        weights = pred.bytes("model", "weights")
        for label, what, kwargs in scenarios(config.num_hidden_layers):
            methods = kwargs.pop("methods", {what: {}} if what != "collect" else [])
            p = mu.predict_memory(config, dtype="bfloat16", methods=methods, **kwargs)
            if what == "collect":
                need = weights + sum(p.bytes("collect", item) for item in COLLECTED)
            else:
                need = p.peak(what)
            print(f"| {label} | {need / 2**30:.1f} | {weights / 2**30:.1f} |")
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="examples per skill")
    parser.add_argument("--steps", type=int, default=2, help="GA's training steps")
    parser.add_argument("--data-dir", default=os.environ.get("MECHUNLEARN_DATA"))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument(
        "--paper-models",
        action="store_true",
        help="print the predictions for Llama-3-8B and -70B and stop",
    )
    parser.add_argument("--child", choices=MODELS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.paper_models:
        return paper_models()
    if not args.data_dir:
        sys.exit("Set MECHUNLEARN_DATA (or --data-dir) to the benchmark folder (../shared/data).")
    if args.child:
        return child(args)
    results = []
    for name in args.models:
        cmd = [sys.executable, __file__, "--child", name, "--n", str(args.n),
               "--steps", str(args.steps), "--data-dir", args.data_dir]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                             env={**os.environ, **MALLOC}).stdout  # fmt: skip
        result = {**json.loads(out.strip().splitlines()[-1]), "n": args.n}
        results.append(result)
        print(table(result) + "\n", flush=True)
    write_json(RESULTS / "memory.json", {"n_per_skill": args.n, "ga_steps": args.steps,
                                         "device": "cpu", "models": results})  # fmt: skip


if __name__ == "__main__":
    main()
