"""Greedy generation on the real default model: the key-value cache gives the same tokens as
generation without it, bare and under each hook method's hooks (issue: greedy generation was
garbage on the default model with transformers 5.24+, whose renamed cache argument the bridge
does not read; see mechunlearn.generation).
"""

from __future__ import annotations

import pytest
import torch

import mechunlearn as mu
from mechunlearn.batching import tokenize_examples
from mechunlearn.generation import generate_from_tokens, greedy_generate, kv_cache_agrees

pytestmark = pytest.mark.integration

PROMPTS = [
    "Question: What is 17 * 3?\nAnswer:",
    "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:",
    "def fibonacci(n):",
]
NEW = 16


@pytest.fixture(scope="module")
def fitted(default_model, data_dir):
    """NA, SP and LUNAR fitted on 8 GSM8K (forget) and 8 MBPP (retain) examples."""
    forget = mu.load_skill("gsm8k", n=8, seed=1, data_dir=data_dir)
    retain = mu.load_skill("mbpp", n=8, seed=1, data_dir=data_dir)
    probe_f = mu.collect(default_model, forget, what=("pre", "importance"), quiet=True)
    probe_r = mu.collect(default_model, retain, what=("pre", "importance"), quiet=True)
    return {
        "NA": mu.NeuronAdjust(ratio=0.03).fit(probe_f.pre, probe_r.pre),
        "SP": mu.SelectivePruning(ratio=0.015).fit(probe_f.importance, probe_r.importance),
        "LUNAR": mu.Lunar(layer=16).fit(default_model, forget, retain),
    }


def _both(model, hooks) -> tuple[list[str], list[str]]:
    ids = [t for t, _ in tokenize_examples(model, PROMPTS, [""] * len(PROMPTS), None, False)]
    out = {}
    with torch.inference_mode(), model.hooks(fwd_hooks=hooks):
        for cache in (True, False):
            out[cache] = generate_from_tokens(
                model, ids, NEW, use_past_kv_cache=cache, stop_at_eos=False
            )
    return out[True], out[False]


def test_the_installed_cache_agrees_on_the_default_model(default_model):
    assert kv_cache_agrees(default_model)


def test_greedy_answers_the_question(default_model):
    """The question of the bug report: an answer, not ' ---------'."""
    text = greedy_generate(default_model, PROMPTS[:1], 10)[0]
    assert text.strip().startswith("3") or "51" in text, text
    assert "---" not in text


def test_cached_equals_uncached_bare(default_model):
    cached, plain = _both(default_model, [])
    assert cached == plain
    assert all(len(t) > 0 for t in cached)


@pytest.mark.parametrize("method", ["NA", "SP", "LUNAR"])
def test_cached_equals_uncached_under_hooks(default_model, fitted, method):
    hooks = fitted[method].hooks(default_model)
    cached, plain = _both(default_model, hooks)
    assert cached == plain, method
    bare, _ = _both(default_model, [])
    assert cached != bare or method == "NA", f"{method}'s hooks changed nothing"


def test_detector_generation_cached_equals_uncached(default_model, data_dir):
    forget = mu.load_skill("gsm8k", n=16, seed=2, data_dir=data_dir)
    keys_f = mu.collect_keys(default_model, forget, quiet=True)
    keys_r = mu.collect_keys(default_model, mu.calibration_skill(), quiet=True)
    ksd = mu.KeySpaceDetector().fit(keys_f, keys_r)
    outs = {
        cache: ksd.generate(default_model, PROMPTS, max_new_tokens=NEW, use_past_kv_cache=cache)
        for cache in (True, False)
    }
    assert outs[True] == outs[False]
