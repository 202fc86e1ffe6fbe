"""evaluate(): teacher-forced scores against a brute-force reference, abstention, protocols."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mechunlearn import Skill
from mechunlearn.evaluation import (
    evaluate,
    greedy_generate,
    gsm8k_correct,
    protocol,
    relative_table,
    run_tests,
    teacher_forced,
)
from mechunlearn.sites import hook_name, tokenize_examples

PROMPTS = ["Q: 1+1?\nA:", "def f(x):", "The cat sat on the", "abc"]
ANSWERS = [" 2", "\n    return x", " mat.", "defg"]


@pytest.fixture(scope="module")
def skill():
    return Skill.from_texts("toy", PROMPTS, ANSWERS)


def brute_force(model, fwd_hooks=()):
    hits, tokens, nll = 0, 0, 0.0
    for ids, n_head in tokenize_examples(model, PROMPTS, ANSWERS):
        x = torch.tensor([ids], device=next(model.parameters()).device)
        with torch.inference_mode():
            logits = model.run_with_hooks(x, fwd_hooks=list(fwd_hooks))[0]
        for p in range(n_head, len(ids)):
            pred = logits[p - 1]
            hits += int(pred.argmax() == ids[p])
            nll -= float(torch.log_softmax(pred.double(), -1)[ids[p]])
            tokens += 1
    return hits / tokens, nll / tokens


def test_teacher_forced_equals_brute_force(tiny_model, skill):
    s = teacher_forced(tiny_model, skill, batch_size=3)
    acc, nll = brute_force(tiny_model)
    assert s.score == pytest.approx(acc, abs=1e-12)
    assert s.mean_nll == pytest.approx(nll, rel=1e-5)
    answer_ids = tiny_model.tokenizer(ANSWERS, add_special_tokens=False)["input_ids"]
    assert s.total.sum() == sum(len(t) for t in answer_ids)


class _Zero:
    """A stand-in intervention: zero the key vectors of layer 0."""

    def hooks(self, model=None):
        return [(hook_name("key", 0), lambda a, hook: a * 0.0)]


class _Abstain:
    """Abstains on the prompts whose index is in `which`."""

    def __init__(self, which):
        self.which = which

    def hooks(self, model=None):
        return []

    def detect(self, model, prompts, batch_size=16):
        flags = torch.tensor([i in self.which for i in range(len(prompts))])
        return SimpleNamespace(detected=flags)


def test_hooks_are_applied_and_relative_is_after_over_before(llama_like, skill):
    table = evaluate(llama_like, [skill], {"zero": _Zero()}, quiet=True)
    assert list(table["method"]) == ["base", "zero"]
    base, zero = table.set_index("method").loc[["base", "zero"], "score"]
    acc, _ = brute_force(llama_like, _Zero().hooks())
    assert zero == pytest.approx(acc, abs=1e-12)
    rel = table.set_index("method").loc["zero", "relative"]
    assert rel == pytest.approx(zero / base) if base else math.isnan(rel)
    assert relative_table(table).columns.tolist() == ["base", "zero"]


def test_abstention_scores_zero(llama_like, skill):
    full = teacher_forced(llama_like, skill)
    part = teacher_forced(llama_like, skill, _Abstain({0, 2}))
    assert part.abstained.tolist() == [True, False, True, False]
    expected = (full.correct[1] + full.correct[3]) / full.total.sum()
    assert part.score == pytest.approx(expected)
    everything = teacher_forced(llama_like, skill, _Abstain({0, 1, 2, 3}))
    assert everything.score == 0.0 and math.isnan(everything.mean_nll)
    table = evaluate(llama_like, skill, {"ksd": _Abstain({0, 2})}, quiet=True)
    assert table.set_index("method").loc["ksd", "abstention_rate"] == 0.5


def test_bad_input(llama_like, skill):
    with pytest.raises(ValueError, match="Unknown metric"):
        evaluate(llama_like, skill, metric="bleu", quiet=True)
    with pytest.raises(ValueError, match="names the bare model"):
        evaluate(llama_like, skill, {"base": _Zero()}, quiet=True)
    with pytest.raises(ValueError, match="no answer tokens"):
        teacher_forced(llama_like, Skill.from_texts("q", ["abc"]))
    with pytest.raises(ValueError, match="No generation protocol"):
        protocol(skill)
    with pytest.raises(TypeError, match="Skill objects"):
        evaluate(llama_like, ["text"], quiet=True)


def test_gsm8k_answer_parsing():
    assert gsm8k_correct("so 3 + 4 = 7. The answer is 7.", "7")
    assert gsm8k_correct("The answer is 2,125.", "2125")
    assert gsm8k_correct("The answer is $18", "18")
    assert not gsm8k_correct("The answer is 8.", "7")
    assert not gsm8k_correct("7", "7")


def test_run_tests_pass_fail_timeout():
    assert run_tests("def f(x):\n    return x + 1\nassert f(1) == 2\n")
    assert not run_tests("def f(x):\n    return x\nassert f(1) == 2\n")
    assert not run_tests("while True:\n    pass\n", timeout=1.0)


def test_greedy_generate_matches_single_prompt_generation(llama_like):
    prompts = ["hello", "a much longer prompt here"]
    batched = greedy_generate(llama_like, prompts, max_new_tokens=5, batch_size=2)
    for prompt, text in zip(prompts, batched, strict=True):
        alone = greedy_generate(llama_like, [prompt], max_new_tokens=5)[0]
        assert text == alone
    assert all(isinstance(t, str) for t in batched)


def test_protocol_names():
    for name, kind in [("gsm8k", "gsm8k"), ("mmlu:math", "mmlu"), ("xquad:de", "xquad")]:
        assert protocol(Skill.from_texts(name, ["x"])) == kind
    assert np.isnan(float("nan"))
