"""Fluency: greedy continuations under a method, scored by the bare model and for repetition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mechunlearn import Skill, collect_keys
from mechunlearn.evaluation import teacher_forced
from mechunlearn.fluency import fluency, fluency_table, repeated_ngram_share
from mechunlearn.generation import greedy_generate
from mechunlearn.interventions import KeySpaceDetector
from mechunlearn.sites import hook_name

PROMPTS = ["The sun is", "copy a:", "Q: 2+3="]


class _Constant:
    """Sets the last residual stream to one constant vector: the model then repeats one token."""

    def hooks(self, model=None):
        return [(hook_name("resid_post", 2), lambda a, hook: torch.ones_like(a))]


def test_repeated_ngram_share_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.integers(0, 4, size=int(rng.integers(0, 12))).tolist()
        grams = [tuple(ids[i : i + 3]) for i in range(len(ids) - 2)]
        want = 1 - len(set(grams)) / len(grams) if grams else math.nan
        got = repeated_ngram_share(ids, 3)
        assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want)
    with pytest.raises(ValueError, match="n must lie in"):
        repeated_ngram_share([1, 2], 0)


def test_bare_fluency_is_the_base_models_own_perplexity(llama_like):
    model = llama_like
    f = fluency(model, PROMPTS, max_new_tokens=6)
    assert f.texts == greedy_generate(model, PROMPTS, 6)
    kept = [j for j, t in enumerate(f.texts) if t]
    skill = Skill.from_texts("own", [PROMPTS[j] for j in kept], [f.texts[j] for j in kept])
    brute = teacher_forced(model, skill)
    assert f.perplexity == pytest.approx(math.exp(brute.nll.sum() / brute.total.sum()))
    ids = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in f.texts]
    assert f.repeated.tolist() == pytest.approx([repeated_ngram_share(i) for i in ids], nan_ok=True)


def test_a_method_that_breaks_the_model_is_less_fluent_and_the_model_is_unchanged(llama_like):
    model = llama_like
    tokens = model.to_tokens(PROMPTS[:1])
    with torch.no_grad():
        before = model(tokens)
    table = fluency_table(model, PROMPTS, {"zero": _Constant()}, max_new_tokens=12)
    assert list(table.index) == ["base", "zero"]
    assert table.loc["base", "perplexity_ratio"] == 1.0
    assert table.loc["zero", "repeated_ngrams"] >= table.loc["base", "repeated_ngrams"]
    assert table.loc["zero", "repeated_ngrams"] > 0.8
    with torch.no_grad():
        assert torch.equal(model(tokens), before)
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


def test_a_detector_answers_or_refuses(llama_like):
    model = llama_like
    fit_on = Skill.from_texts("fit", ["The sun is", "The moon is"], [" hot", " cold"])
    ksd = KeySpaceDetector(h=50.0, layers=[0, 2], rule="all").fit(collect_keys(model, fit_on))
    f = fluency(model, PROMPTS, ksd, max_new_tokens=5)
    detected = ksd.detect(model, PROMPTS).detected.tolist()
    bare = greedy_generate(model, PROMPTS, 5)
    for text, hit, plain in zip(f.texts, detected, bare, strict=True):
        assert text == ("Sorry, your query is not valid" if hit else plain)


def test_bad_input(llama_like):
    with pytest.raises(TypeError, match="not a str"):
        fluency(llama_like, [None])
    with pytest.raises(ValueError, match="names the bare model"):
        fluency_table(llama_like, PROMPTS, {"base": None})
