"""The shipped calibration set (mu.calibration_skill) and what a detector reports about it."""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib import resources

import pytest
import torch

import mechunlearn as mu
from mechunlearn import KeyVectors
from mechunlearn.data import calibration_skill
from mechunlearn.interventions import EllipsoidDetector, KeySpaceDetector

# A calculation: two numbers joined by an operator or an operator word, or a number with a
# unit of money, time or quantity that word problems use.
ARITHMETIC = re.compile(
    r"\d[\d,.]*\s*(?:[-+*/x×÷=^%]|plus|minus|times|divided|percent)\s*\d"
    r"|\$\s*\d|\d+\s*(?:dollars|cents|hours|minutes|apples|miles|km|kg)\b",
    re.IGNORECASE,
)
PROGRAMMING = re.compile(
    r"\b(?:python|def |function|program|code|script|javascript|algorithm|return)\b",
    re.IGNORECASE,
)


@pytest.fixture(scope="module")
def plain():
    return calibration_skill(formats=["plain"])


def test_size_domains_and_uniqueness(plain):
    prompts = plain.prompts
    assert len(prompts) >= 200 and len(set(prompts)) == len(prompts)
    domains = Counter(ex.meta["domain"] for ex in plain)
    assert len(domains) >= 10 and min(domains.values()) >= 10
    assert all(p.strip() == p and len(p) >= 10 for p in prompts)


def test_no_arithmetic_and_no_programming(plain):
    assert ARITHMETIC.search("Tom has 3 apples and buys 4 more: 3 + 4?")  # the pattern works
    assert PROGRAMMING.search("Write a Python function to sort a list.")
    assert [p for p in plain.prompts if ARITHMETIC.search(p)] == []
    assert [p for p in plain.prompts if PROGRAMMING.search(p)] == []
    # almost no digits at all: at most one number in the whole set
    assert sum(len(re.findall(r"\d+", p)) for p in plain.prompts) <= 1


def test_file_is_one_object_per_line_with_prompt_and_domain():
    text = resources.files("mechunlearn").joinpath("resources/general_questions.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    assert all(set(r) == {"prompt", "domain"} for r in rows)
    assert [r["prompt"] for r in rows] == calibration_skill(formats=["plain"]).prompts


def test_formats_and_subsample():
    both = calibration_skill()  # plain and "Question: ...\nAnswer:"
    n = len(both) // 2
    assert both.name == "general-questions" and len(both) == 2 * n
    assert [ex.meta["variant"] for ex in both] == ["plain"] * n + ["question_prefix"] * n
    assert both[n].prompt == f"Question: {both[0].prompt}\nAnswer:"
    assert both[0].meta["domain"] == both[n].meta["domain"]
    small = calibration_skill(n=7, seed=3, formats="plain")
    assert len(small) == 7 and small.prompts == calibration_skill(n=9, seed=3).prompts[:7]
    assert set(small.prompts) <= set(both.prompts)
    with pytest.raises(ValueError, match="needs tokenizer"):
        calibration_skill(formats=["chat"])
    with pytest.raises(ValueError, match="unknown format variant 'plian'"):
        calibration_skill(formats=["plian"])
    with pytest.raises(ValueError, match="cannot subsample n=1000"):
        calibration_skill(n=1000)
    assert mu.calibration_skill is calibration_skill


class _ChatTokenizer:
    """The two things the chat variant reads from a tokenizer."""

    chat_template = "<user>{content}</user><assistant>"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        return f"<user>{messages[0]['content']}</user><assistant>"


def test_chat_format_with_a_tokenizer():
    s = calibration_skill(n=4, tokenizer=_ChatTokenizer())
    variants = [ex.meta["variant"] for ex in s]
    assert variants == ["plain"] * 4 + ["question_prefix"] * 4 + ["chat"] * 4
    assert s[8].prompt == f"<user>{s[0].prompt}</user><assistant>"


def _keys(n: int, shift: float, seed: int) -> KeyVectors:
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(n, 2, 8, generator=gen) + shift
    return KeyVectors(values, [0, 1], {"n_layers": 2, "d_mlp": 8, "skill": f"s{seed}"})


@pytest.mark.parametrize("cls", [KeySpaceDetector, EllipsoidDetector])
def test_detection_shows_the_calibrated_rate(cls):
    keys_f, keys_r = _keys(40, 0.0, 0), _keys(240, 4.0, 1)  # 199 negatives needed at 0.005
    det = cls().fit(keys_f, keys_r)
    fpr = cls().fpr  # the defaults: 0.01 for the cube, 0.005 for the ellipsoid
    assert det.fpr_ == fpr and det.layers_ == [0, 1] and det.calibration == "conformal"
    d = det.detect_keys(keys_r)
    assert d.fpr == fpr and f"calibrated fpr={fpr:g})" in repr(d)
    assert d.to("cpu").fpr == fpr
    bound = det.calibration_["bound"]
    assert bound <= fpr and f"calibrated at {fpr:g} (conformal bound {bound:.3g} over 240" in repr(
        det
    )
    rank = cls(fpr=0.001, calibration="rank").fit(keys_f, keys_r)
    assert "false positives calibrated at 0.001 (0 on held-out negatives)" in repr(rank)
    assert list(d.to_frame().columns) == [
        "detected", "score", "fired_layers", "margin_L0", "margin_L1"
    ]  # fmt: skip
    fixed = cls(h=2.0).fit(keys_f).detect_keys(keys_r)
    assert fixed.fpr is None and "calibrated fpr=unmeasured)" in repr(fixed)


def test_fit_accepts_a_list_of_negatives():
    keys_f, a, b = _keys(40, 0.0, 0), _keys(20, 4.0, 1), _keys(20, -4.0, 2)
    one = KeySpaceDetector(fpr=0.1).fit(keys_f, KeyVectors.concat_all([a, b]))
    two = KeySpaceDetector(fpr=0.1).fit(keys_f, [a, b])
    torch.testing.assert_close(one.alpha_, two.alpha_)
    assert two.calibration_["retain"] == "s1+s2"
    with pytest.raises(ValueError, match="keys_r is an empty list"):
        KeySpaceDetector().fit(keys_f, [])
    with pytest.raises(TypeError, match=r"keys_r\[1\]"):
        KeySpaceDetector().fit(keys_f, [a, "b"])
