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


def _both(model, make_hooks, new: int = NEW) -> tuple[list[str], list[str]]:
    """Greedy continuations with and without the key-value cache, each under fresh hooks."""
    ids = [t for t, _ in tokenize_examples(model, PROMPTS, [""] * len(PROMPTS), None, False)]
    out = {}
    for cache in (True, False):
        with torch.inference_mode(), model.hooks(fwd_hooks=make_hooks()):
            out[cache] = generate_from_tokens(
                model, ids, new, use_past_kv_cache=cache, stop_at_eos=False
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
    cached, plain = _both(default_model, list)
    assert cached == plain
    assert all(len(t) > 0 for t in cached)


@pytest.mark.parametrize("method", ["SP", "LUNAR"])
def test_cached_equals_uncached_under_hooks(default_model, fitted, method):
    cached, plain = _both(default_model, lambda: fitted[method].hooks(default_model))
    assert cached == plain, method
    bare, _ = _both(default_model, list)
    assert cached != bare, f"{method}'s hooks changed nothing"


def test_neuron_adjust_first_step_cached_equals_uncached(default_model, fitted):
    """NA draws one uniform per element on every forward pass (fresh generators per hooks()
    call): cached generation (the prompt once, then one token a pass) and uncached generation
    (every position again each pass) consume different draws after the first step, so only the
    first step, the same prompt pass under the same draws, must agree token for token."""
    na = fitted["NA"]
    cached, plain = _both(default_model, lambda: na.hooks(default_model), new=1)
    assert cached == plain
    again, _ = _both(default_model, lambda: na.hooks(default_model), new=NEW)
    twice, _ = _both(default_model, lambda: na.hooks(default_model), new=NEW)
    assert again == twice  # seeded: the cached path repeats itself exactly


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
