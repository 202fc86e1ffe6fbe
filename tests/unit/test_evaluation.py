"""evaluate(): teacher-forced scores against a brute-force reference, abstention, protocols."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mechunlearn import Detector, KeySpaceDetector, Skill, collect_keys
from mechunlearn.batching import tokenize_examples
from mechunlearn.evaluation import (
    choice_tokens,
    evaluate,
    gsm8k_correct,
    protocol,
    relative_table,
    run_tests,
    teacher_forced,
)
from mechunlearn.generation import greedy_generate
from mechunlearn.sites import hook_name

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


class _Abstain(Detector):
    """Abstains on the prompts whose index is in `which` (a Detector: evaluation dispatches on
    the kind)."""

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


def test_a_detector_scores_as_the_bare_model_with_its_abstentions_zeroed(llama_like, skill):
    fit_on = Skill.from_texts("fit", PROMPTS[:2], ANSWERS[:2])
    ksd = KeySpaceDetector(h=1.5, layers=None, rule=1).fit(collect_keys(llama_like, fit_on))
    detected = ksd.detect(llama_like, skill.prompts).detected.numpy()
    assert detected.any() and not detected.all()
    wider = KeySpaceDetector(h=50.0, layers=[0, 2], rule="all").fit(
        collect_keys(llama_like, fit_on)
    )
    table = evaluate(llama_like, skill, {"ksd": ksd}, quiet=True).set_index("method")
    both = evaluate(llama_like, skill, {"ksd": ksd, "wider": wider}, quiet=True)
    both = both.set_index("method")  # two detectors share one key-collection pass
    for name, iv in (("ksd", ksd), ("wider", wider)):
        alone = evaluate(llama_like, skill, {name: iv}, quiet=True).set_index("method")
        assert both.loc[name, "score"] == alone.loc[name, "score"]
        assert both.loc[name, "abstention_rate"] == alone.loc[name, "abstention_rate"]
    row = table.loc["ksd"]
    # The long way: a forward with the detector's hooks attached, abstentions zeroed.
    with llama_like.hooks(fwd_hooks=ksd.hooks(llama_like)):
        watched = teacher_forced(llama_like, skill)
    correct = np.where(detected, 0, watched.correct)
    assert row["score"] == pytest.approx(correct.sum() / watched.total.sum(), abs=1e-12)
    assert row["abstention_rate"] == detected.mean()


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


def test_multiple_choice_is_scored_on_the_letter_among_the_choices(llama_like):
    from mechunlearn.data import mmlu_example as _mmlu_example

    rows = [("2 + 2 = ?", ["3", "4", "5", "6"], 1), ("Sky colour?", ["red", "blue", "x", "y"], 0)]
    rows += [("Pick one.", ["a", "b", "c", "d"], k) for k in (2, 3)]
    mc = Skill("mc", [_mmlu_example("toy", q, c, k) for q, c, k in rows])
    offset, letters = choice_tokens(llama_like, mc)
    assert offset == 1  # the character tokenizer: " " then the letter
    scores = teacher_forced(llama_like, mc)
    assert scores.total.tolist() == [1, 1, 1, 1]
    for i, (ids, n_head) in enumerate(tokenize_examples(llama_like, mc.prompts, mc.answers)):
        x = torch.tensor([ids], device=next(llama_like.parameters()).device)
        with torch.inference_mode():
            logits = llama_like(x)[0, n_head + offset - 1].double()
        assert ids[n_head + offset] == letters[rows[i][2]]
        assert scores.correct[i] == float(int(logits[letters].argmax()) == rows[i][2])
        nll = -float(logits.log_softmax(-1)[ids[n_head + offset]])
        assert scores.nll[i] == pytest.approx(nll, abs=1e-6)
    assert choice_tokens(llama_like, Skill.from_texts("plain", ["Q"], [" A"])) is None
