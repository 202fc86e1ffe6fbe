"""What the 2-process test runs, shared by the worker (under torchrun) and the test (alone)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mechunlearn as mu
from tests.tiny_models import make_char_tokenizer, make_tiny_llama

PROMPTS = [f"Q: {i}+{i + 3}=" for i in range(9)] + [f"def f{i}(x):" for i in range(8)]
ANSWERS = [f" {2 * i + 3}" for i in range(9)] + [f"\n  return x*{i}" for i in range(8)]


def tiny_model():
    """float64, so that shards batched differently see the same activations to ~1e-16."""
    import torch

    tok = make_char_tokenizer(Path(tempfile.mkdtemp()))
    return make_tiny_llama(tok, "cpu").to(torch.float64)


def skills():
    forget = mu.Skill.from_texts("arith", PROMPTS[:9], ANSWERS[:9])
    retain = mu.Skill.from_texts("code", PROMPTS[9:], ANSWERS[9:])
    return forget, retain


def probe_all(model):
    forget, _ = skills()
    probe = mu.collect(model, forget, what=("pre", "keys", "importance"), reservoir_size=32,
                       batch_size=2, quiet=True)  # fmt: skip
    keys = mu.collect_keys(model, forget, batch_size=2, quiet=True)
    importance = mu.collect_importance(model, forget, batch_size=2)
    return probe, keys, importance


def evaluate_all(model, probe):
    forget, retain = skills()
    r = mu.collect(model, retain, what=("pre", "keys"), batch_size=2, quiet=True)
    na = mu.NeuronAdjust(ratio=0.1).fit(probe.pre, r.pre)
    ksd = mu.KeySpaceDetector(layers=None, fpr=0.3).fit(probe.keys, r.keys)
    return mu.evaluate(
        model,
        [forget, retain],
        {"NeuronAdjust": na, "KeySpaceDetection": ksd},
        batch_size=2,
        quiet=True,
    )
