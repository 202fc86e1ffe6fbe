"""Tests for mechunlearn.data.skill: the Example / Skill container and the split rule."""

from __future__ import annotations

import math
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from mechunlearn.data import Example, Skill, load_skill, split_sizes


def one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------
# Split, subsample, container (moved from test_data.py)
# ---------------------------------------------------------------------------------------------


def test_split_disjoint_and_deterministic() -> None:
    skill = Skill.from_texts("toy", [f"p{i}" for i in range(101)], [f" a{i}" for i in range(101)])
    fit, held = skill.split(0.3, seed=7)
    assert (len(fit), len(held)) == (70, 31)  # held-out size rounded up
    assert not set(fit.prompts) & set(held.prompts)
    assert sorted(fit.prompts + held.prompts) == sorted(skill.prompts)
    assert fit.prompts == [p for p in skill.prompts if p in set(fit.prompts)]  # order kept
    assert fit.name == held.name == "toy"
    assert "fit 70/101" in fit.source and "held_out 31/101" in held.source
    again = skill.split(0.3, seed=7)
    assert again[0].examples == fit.examples and again[1].examples == held.examples
    assert skill.split(0.3, seed=8)[1].prompts != held.prompts
    assert len(skill.split(10)[1]) == 10
    for bad in (0, 101, 0.0, 1.0):
        with pytest.raises(ValueError):
            skill.split(bad)


def test_skill_container_and_from_texts(tmp_path: Path) -> None:
    skill = Skill.from_texts("toy", ["a", "b", "c"], [" 1", " 2", " 3"])
    assert len(skill) == 3 and isinstance(skill[0], Example)
    assert skill[1:].prompts == ["b", "c"] and skill[1:].name == "toy"
    assert skill[[2, 0]].answers == [" 3", " 1"] and skill[range(2)].prompts == ["a", "b"]
    with pytest.raises(TypeError, match="Skill indices"):
        skill["a"]
    assert [ex.prompt for ex in skill] == skill.prompts
    assert skill.texts == ["a 1", "b 2", "c 3"]
    assert repr(skill) == "Skill(name='toy', n=3, source='texts')"
    assert Skill.from_texts("x", ["q"]).answers == [""]
    assert hash(Example("p", "a", {"k": [1]})) == hash(Example("p", "a", {}))
    assert load_skill(skill, n=2).examples == skill.subsample(2).examples
    with pytest.raises(ValueError, match="empty"):
        Skill.from_texts("x", [])
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        Skill.from_texts("x", ["a", "b"], ["c"])
    with pytest.raises(TypeError):
        Skill.from_texts("x", "abc")
    out = skill.to_jsonl(tmp_path / "toy.jsonl")
    back = load_skill(out)
    assert back.name == "toy" and back.examples == skill.examples


def test_empty_skill_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no examples"):
        load_skill(empty)
    skill = Skill.from_texts("toy", ["a"])
    with pytest.raises(ValueError, match="positive"):
        load_skill(skill, n=0)
    with pytest.raises(ValueError, match="positive"):
        skill.subsample(-1)


# ---------------------------------------------------------------------------------------------
# split_sizes: THE rounding rule
# ---------------------------------------------------------------------------------------------


def test_split_sizes_is_ceil_of_the_decimal_fraction() -> None:
    for n in (2, 3, 7, 10, 99, 100, 101, 1319):
        for frac in (0.01, 0.07, 0.1, 0.2, 0.25, 0.3, 0.5, 0.7, 0.9, 0.99):
            expected = math.ceil(Fraction(str(frac)) * n)  # exact decimal arithmetic
            if expected >= n:
                with pytest.raises(ValueError, match="leaves no fit item"):
                    split_sizes(n, frac)
                continue
            assert split_sizes(n, frac) == (n - expected, expected), (n, frac)
    assert split_sizes(100, 0.07) == (93, 7)  # float 0.07 * 100 = 7.000000000000001: not 8
    assert split_sizes(101, 0.3) == (70, 31)
    assert split_sizes(10, 3) == (7, 3)
    assert split_sizes(np.int64(10), np.int64(3)) == (7, 3)
    assert split_sizes(10, np.float64(0.5)) == (5, 5)
    skill = Skill.from_texts("toy", [f"p{i}" for i in range(100)])
    assert [len(part) for part in skill.split(0.07)] == [93, 7]  # Skill.split uses the rule


@pytest.mark.parametrize(
    ("n", "test_size", "exc", "pattern"),
    [
        (10, True, TypeError, r"not True \(bool\)"),
        (10, "0.5", TypeError, r"fraction in \(0, 1\) or an int count.*not '0.5' \(str\)"),
        (10, None, TypeError, r"not None"),
        (10, 0.0, ValueError, r"test_size=0.0 is a fraction outside \(0, 1\); pass e.g. 0.5"),
        (10, 1.5, ValueError, r"test_size=1.5 is a fraction outside \(0, 1\)"),
        (10, float("nan"), ValueError, r"outside \(0, 1\)"),
        (10, 0, ValueError, r"test_size=0 held-out items is outside \[1, 9\] for 10 items"),
        (10, 10, ValueError, r"test_size=10 held-out items is outside \[1, 9\]"),
        (10, -2, ValueError, r"outside \[1, 9\]"),
        (10, 0.99, ValueError, r"holds out 10 \(rounded up\) and leaves no fit item"),
        (1, 0.5, ValueError, r"cannot split 1 item\(s\) into two non-empty parts"),
        (True, 0.5, TypeError, r"n must be an int number of items"),
        (10.0, 0.5, TypeError, r"n must be an int number of items"),
    ],
)
def test_split_sizes_errors(n, test_size, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern) as err:
        split_sizes(n, test_size)
    one_line(err)


def test_skill_split_errors_name_the_skill() -> None:
    skill = Skill.from_texts("toy", ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"split of skill 'toy': test_size=3 held-out") as err:
        skill.split(3)
    one_line(err)
    with pytest.raises(TypeError, match="not True"):
        skill.split(True)
    with pytest.raises(ValueError, match="seed must be a non-negative int, got -1"):
        skill.split(0.5, seed=-1)


# ---------------------------------------------------------------------------------------------
# No silent conversions: from_texts, Example, surrogates
# ---------------------------------------------------------------------------------------------


def test_from_texts_refuses_non_strings() -> None:
    with pytest.raises(TypeError, match=r"prompts\[0\] is int 1, not a str; pass strings") as e:
        Skill.from_texts("x", [1, None])
    one_line(e)
    with pytest.raises(TypeError, match=r"prompts\[1\] is NoneType None, not a str"):
        Skill.from_texts("x", ["a", None])
    with pytest.raises(TypeError, match=r"answers\[0\] is float 2.5, not a str"):
        Skill.from_texts("x", ["a"], [2.5])
    with pytest.raises(TypeError, match=r"prompts must be an iterable of strings, not one str"):
        Skill.from_texts("x", "abc")
    with pytest.raises(TypeError, match=r"answers must be an iterable of strings, not one str"):
        Skill.from_texts("x", ["a"], "b")
    with pytest.raises(TypeError, match=r"prompts must be an iterable of strings, got int"):
        Skill.from_texts("x", 3)
    with pytest.raises(TypeError, match=r"Example.prompt must be a str, got int"):
        Example(1)
    with pytest.raises(TypeError, match=r"Example.meta must be a mapping, got NoneType"):
        Example("p", "a", None)
    with pytest.raises(TypeError, match=r"skill 'x' example 1 is str, not an Example"):
        Skill("x", [Example("a"), "b"])


def test_from_texts_accepts_any_iterable_once() -> None:
    gen = (f"q{i}" for i in range(4))
    skill = Skill.from_texts("gen", gen, (f" a{i}" for i in range(4)))
    assert skill.prompts == ["q0", "q1", "q2", "q3"]
    assert skill.answers == [" a0", " a1", " a2", " a3"]
    assert Skill.from_texts("t", ("a", "b")).prompts == ["a", "b"]
    with pytest.raises(TypeError, match="not a dict \\(its keys would become the texts\\)"):
        Skill.from_texts("d", {"k1": 1, "k2": 2})  # issue #28: a dict is refused, not its keys
    assert load_skill(iter(["x", "y", "z"]), n=2, name="it").name == "it"


def test_lone_surrogates_are_refused_at_construction() -> None:
    with pytest.raises(
        ValueError,
        match=re.escape(
            "skill 'x' example 1: prompt has a lone surrogate '\\ud800' at character 2, which is "
            "not valid Unicode (tokenizers reject it); fix the text"
        ),
    ) as err:
        Skill.from_texts("x", ["fine", "ab\ud800c"])
    one_line(err)
    with pytest.raises(ValueError, match=r"example 0: answer has a lone surrogate '\\udfff'"):
        Skill("x", [Example("q", "\udfff")])
    ok = Skill.from_texts("x", ["café", "日本語", "emoji \U0001f600"])  # real non-ASCII is fine
    assert len(ok) == 3


def test_seed_and_n_validation_in_subsample() -> None:
    skill = Skill.from_texts("toy", ["a", "b", "c"])
    for bad, exc, pattern in [
        (True, TypeError, r"n must be an int number of examples, got True \(bool\)"),
        (2.5, TypeError, r"got 2.5 \(float\); pass a whole number such as 2"),
        (2.0, TypeError, r"got 2.0 \(float\)"),
        (-1, ValueError, r"n must be a positive number of examples, got -1"),
    ]:
        with pytest.raises(exc, match=pattern) as err:
            skill.subsample(bad)
        one_line(err)
    for bad, exc in [(True, TypeError), (1.5, TypeError), (-3, ValueError), ("0", TypeError)]:
        with pytest.raises(exc, match="seed must be a non-negative int"):
            skill.subsample(2, seed=bad)
    assert skill.subsample(np.int64(2), seed=np.int64(1)).prompts == skill.subsample(2, 1).prompts


def test_with_note() -> None:
    skill = Skill("toy", [Example("a")], "local:x")
    assert skill.with_note(n=3, seed=0) == "local:x [n=3, seed=0]"
    assert Skill("t", [Example("a")]).with_note(fit="1/2") == "[fit 1/2]"
