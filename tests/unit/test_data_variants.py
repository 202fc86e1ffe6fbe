"""Tests for mechunlearn.data.variants: format variants of a skill's prompts."""

from __future__ import annotations

import ast
import copy
import inspect
import re
from pathlib import Path

import pytest

from mechunlearn.data import Example, Skill, load_skill
from mechunlearn.data import variants as V

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PARAGRAPHS = [
    "The river bends twice before it reaches the old mill, where the water slows.",
    "Autumn came early that year, and the orchards were bare by October.",
    "A lighthouse keeper keeps a log of every ship that passes in the night.",
    "The library reopened after the renovation with a new reading room.",
]


@pytest.fixture(scope="module")
def gsm(data_dir: Path) -> Skill:
    return load_skill("gsm8k", n=60, seed=0, data_dir=data_dir)


@pytest.fixture
def chat_tokenizer(char_tokenizer):
    tok = copy.deepcopy(char_tokenizer)
    tok.chat_template = CHATML
    return tok


def _questions(skill: Skill) -> list[str]:
    return [V.question_text(ex) for ex in skill]


def _check_common(out: Skill, skill: Skill, variant: str, answers_kept: bool = True) -> None:
    assert out.name == f"{skill.name}[{variant}]"
    assert len(out) == len(skill)
    assert f"variant {variant}" in out.source and out.source.startswith(skill.source)
    for new, old in zip(out, skill, strict=True):
        assert new.meta["variant"] == variant
        assert new.meta["original_prompt"] == old.prompt
        assert new.meta["answer_valid"] is answers_kept
        if answers_kept:
            assert new.answer == old.answer
        for k, v in old.meta.items():
            if k not in ("choices", "label"):
                assert new.meta[k] == v


def test_question_text() -> None:
    assert V.question_text(Example("Question: 2+2?\nAnswer:", " 4")) == "2+2?"
    mmlu = Example(
        "Which?\nA. x\nB. y\nC. z\nD. w\nAnswer:", " B", {"choices": list("xyzw"), "label": 1}
    )
    assert V.question_text(mmlu) == "Which?"
    assert V.question_text(Example("  plain text  ")) == "plain text"
    qa = Example("Context: C.\nQuestion: Q?\nAnswer:", " C")
    assert V.question_text(qa) == "Context: C.\nQuestion: Q?"


def test_plain_and_question_prefix(gsm: Skill) -> None:
    plain = V.as_plain(gsm)
    prefixed = V.as_question_prefix(gsm)
    _check_common(plain, gsm, "plain")
    _check_common(prefixed, gsm, "question_prefix")
    assert prefixed.prompts == gsm.prompts  # GSM8K prompts already have the prefix
    for p, ex in zip(plain.prompts, gsm, strict=True):
        assert ex.prompt == f"Question: {p}\nAnswer:"
        assert not p.startswith("Question:") and not p.endswith("Answer:")
    assert V.as_question_prefix(plain).prompts == gsm.prompts  # the two are inverse


def test_docstring_parses_and_holds_the_question(gsm: Skill) -> None:
    out = V.as_docstring(gsm)
    _check_common(out, gsm, "docstring")
    for prompt, q in zip(out.prompts, _questions(gsm), strict=True):
        assert prompt.startswith('def solve():\n    """') and prompt.endswith('"""\n')
        tree = ast.parse(prompt)
        (fn,) = tree.body
        assert isinstance(fn, ast.FunctionDef) and fn.name == "solve" and not fn.args.args
        assert ast.get_docstring(fn) == inspect.cleandoc(q)
    tricky = [
        'He said """stop""" and left\\nhome',
        'ends with a quote"',
        "a\\b\\\\c",
        "line one\nline two\n  indented",
        "nul\x00 and bell\x07 and \r carriage",
        "",
    ]
    for q, prompt in zip(
        tricky, V.as_docstring(Skill.from_texts("t", tricky)).prompts, strict=True
    ):
        fn = ast.parse(prompt).body[0]
        assert ast.get_docstring(fn, clean=False).replace("\n    ", "\n") == q.strip()


def test_comment_lines(gsm: Skill) -> None:
    out = V.as_comment(gsm)
    _check_common(out, gsm, "comment")
    for prompt, q in zip(out.prompts, _questions(gsm), strict=True):
        assert prompt.endswith("\n")
        lines = prompt.splitlines()
        assert lines and all(line.startswith("#") for line in lines)
        assert "\n".join(line[2:] for line in lines) == "\n".join(q.splitlines())
    odd = V.as_comment(Skill.from_texts("t", ["a\r\nb\rc\u2028d\n\ne"]))[0].prompt
    assert odd == "# a\n# b\n# c\n# d\n#\n# e\n"
    assert all(line.startswith("#") for line in odd.splitlines())


def test_after_paragraph(gsm: Skill, data_dir: Path) -> None:
    out = V.as_after_paragraph(gsm, PARAGRAPHS, seed=0)
    _check_common(out, gsm, "after_paragraph")
    for new, old in zip(out, gsm, strict=True):
        j = new.meta["paragraph_index"]
        assert new.prompt == f"{PARAGRAPHS[j]}\n\n{old.prompt}"
    assert len({ex.meta["paragraph_index"] for ex in out}) == len(PARAGRAPHS)  # all are used
    assert V.as_after_paragraph(gsm, PARAGRAPHS, seed=0).prompts == out.prompts  # deterministic
    assert V.as_after_paragraph(gsm, PARAGRAPHS, seed=1).prompts != out.prompts
    # the choice depends on the example, not its position: a subsample gets the same ones
    part = V.as_after_paragraph(gsm[10:20], PARAGRAPHS, seed=0)
    assert part.prompts == out.prompts[10:20]
    # paragraphs from a Skill (its prompts); duplicates and blanks are dropped
    xq = load_skill("xquad:en", data_dir=data_dir)
    contexts = [p.split("\nQuestion: ")[0].removeprefix("Context: ") for p in xq.prompts]
    from_skill = V.as_after_paragraph(gsm, Skill.from_texts("ctx", contexts), seed=3)
    unique = list(dict.fromkeys(c.strip() for c in contexts))
    assert len(unique) == 240
    for new, old in zip(from_skill, gsm, strict=True):
        assert new.prompt == unique[new.meta["paragraph_index"]] + "\n\n" + old.prompt
    with pytest.raises(ValueError, match="the 'after_paragraph' variant needs paragraphs="):
        V.as_after_paragraph(gsm, None)
    with pytest.raises(TypeError, match="paragraphs must be a Skill or a list of strings, not str"):
        V.as_after_paragraph(gsm, "one paragraph")
    with pytest.raises(ValueError, match="holds no non-empty paragraph"):
        V.as_after_paragraph(gsm, ["", "  "])
    with pytest.raises(TypeError, match=r"paragraphs\[1\] is int, not a str"):
        V.as_after_paragraph(gsm, ["a", 1])


def test_multiple_choice_gsm8k(gsm: Skill) -> None:
    out = V.as_multiple_choice(gsm, seed=0)
    _check_common(out, gsm, "multiple_choice")
    labels = []
    for new, q in zip(out, _questions(gsm), strict=True):
        options, label = new.meta["choices"], new.meta["label"]
        assert len(options) == 4 and len(set(options)) == 4
        assert [o == new.meta["final"] for o in options].count(True) == 1
        assert options[label] == new.meta["final"]
        assert all(re.fullmatch(r"-?\d+", o) for o in options)
        if int(new.meta["final"]) >= 0:
            assert all(int(o) >= 0 for o in options)
        letters = "".join(f"\n{c}. {o}" for c, o in zip("ABCD", options, strict=True))
        assert new.prompt == f"{q}{letters}\nAnswer:"
        labels.append(label)
    assert len(set(labels)) == 4  # the correct option's position varies with the example
    again = V.as_multiple_choice(gsm, seed=0)
    assert again.prompts == out.prompts and [e.meta["label"] for e in again] == labels
    other = V.as_multiple_choice(gsm, seed=1)
    assert [e.meta["label"] for e in other] != labels
    assert sorted(V._numeric_distractors("0")) == ["1", "10", "2"]
    assert V._numeric_distractors("18") == ["19", "17", "36"]


def test_multiple_choice_keeps_mmlu_choices_and_uses_answers_elsewhere(data_dir: Path) -> None:
    mmlu = load_skill("mmlu:anatomy", n=8, data_dir=data_dir)
    out = V.as_multiple_choice(mmlu, seed=5)
    assert out.prompts == mmlu.prompts  # same layout, order kept: the letter answer still holds
    assert [e.meta["label"] for e in out] == [e.meta["label"] for e in mmlu]
    answers = [f" ans {i}\nmore" for i in range(6)]
    texts = Skill.from_texts("t", [f"q{i}" for i in range(6)], answers)
    out = V.as_multiple_choice(texts, seed=0)
    for i, ex in enumerate(out):
        options = ex.meta["choices"]
        assert len(set(options)) == 4 and options.count(f"ans {i}") == 1
        assert options[ex.meta["label"]] == f"ans {i}"
        assert all(re.fullmatch(r"ans \d", o) for o in options)
    with pytest.raises(ValueError, match="needs at least 4 distinct answers .* has 3; add"):
        V.as_multiple_choice(Skill.from_texts("t", ["a", "b", "c"], ["1", "2", "3"]))
    with pytest.raises(ValueError, match="example 4 of skill 't' has an empty answer, so the "):
        V.as_multiple_choice(Skill.from_texts("t", list("abcde"), ["x", "y", "z", "w", " "]))


def test_chat_template(gsm: Skill, chat_tokenizer) -> None:
    out = V.as_chat(gsm[:5], chat_tokenizer)
    _check_common(out, gsm[:5], "chat")
    for prompt, q in zip(out.prompts, _questions(gsm[:5]), strict=True):
        assert prompt == f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="the 'chat' variant needs tokenizer="):
        V.as_chat(gsm, None)
    plain = copy.deepcopy(chat_tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError, match="has no chat template; pass the tokenizer of an instruct"):
        V.as_chat(gsm, plain)
    with pytest.raises(TypeError, match="tokenizer str has no apply_chat_template"):
        V.as_chat(gsm, "smollm2")


def test_chat_template_of_the_default_model(gsm: Skill) -> None:
    from mechunlearn.models import cache_dir

    folder = cache_dir() / "SmolLM2-135M-Instruct-Q4_1-dequantized"
    if not (folder / "tokenizer.json").exists():
        pytest.skip("the default model's tokenizer is not cached")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    out = V.as_chat(gsm[:3], tok)
    for prompt, q in zip(out.prompts, _questions(gsm[:3]), strict=True):
        assert prompt.startswith("<|im_start|>system\n")
        assert f"<|im_start|>user\n{q}<|im_end|>\n" in prompt
        assert prompt.endswith("<|im_start|>assistant\n")


def test_numbers_changed(gsm: Skill) -> None:
    out = V.as_numbers_changed(gsm, seed=0)
    _check_common(out, gsm, "numbers_changed", answers_kept=False)
    digits = re.compile(r"[0-9]+")
    n_changed = 0
    for new, old in zip(out, gsm, strict=True):
        assert new.answer == "" and new.meta["answer_valid"] is False
        before, after = digits.findall(old.prompt), digits.findall(new.prompt)
        assert [len(x) for x in before] == [len(x) for x in after]  # digit counts kept
        assert digits.sub("#", old.prompt) == digits.sub("#", new.prompt)  # text around kept
        assert all(a != b for a, b in zip(before, after, strict=True))  # every number changed
        mapping = new.meta["numbers"]
        assert [mapping[b] for b in before] == after  # the same number, the same replacement
        for b, a in zip(before, after, strict=True):
            if len(b) > 1 and b[0] != "0":
                assert a[0] != "0"  # no new leading zero
        n_changed += len(before)
    assert n_changed > 100
    assert V.as_numbers_changed(gsm, seed=0).prompts == out.prompts
    assert V.as_numbers_changed(gsm, seed=1).prompts != out.prompts
    lead = V.as_numbers_changed(Skill.from_texts("t", ["7 and 1,050 and 0.25"]))[0]
    runs = digits.findall(lead.prompt)
    assert [len(r) for r in runs] == [1, 1, 3, 1, 2] and runs[2][0] != "0"
    assert runs[3] != "0" and runs[4] != "25" and runs[2] != "050"


def test_variants_convenience(gsm: Skill, chat_tokenizer) -> None:
    default = V.variants(gsm)
    assert list(default) == [
        "plain", "question_prefix", "docstring", "comment", "multiple_choice", "numbers_changed"
    ]  # fmt: skip
    every = V.variants(gsm, paragraphs=PARAGRAPHS, tokenizer=chat_tokenizer, seed=2)
    assert list(every) == list(V.VARIANTS)
    for name, skill in every.items():
        assert skill.name == f"gsm8k[{name}]" and len(skill) == len(gsm)
    assert every["numbers_changed"].prompts == V.as_numbers_changed(gsm, seed=2).prompts
    assert every["after_paragraph"].prompts == V.as_after_paragraph(gsm, PARAGRAPHS, 2).prompts
    some = V.variants(gsm, names=["comment", "plain"])
    assert list(some) == ["comment", "plain"]
    assert V.make_variant(gsm, "docstring").prompts == V.as_docstring(gsm).prompts
    with pytest.raises(
        ValueError, match=r"unknown format variant 'coment'. Did you mean 'comment'\?"
    ):
        V.variants(gsm, names=["plain", "coment"])
    with pytest.raises(ValueError, match=r"unknown format variant 'json'\. \(variants: plain"):
        V.make_variant(gsm, "json")
    with pytest.raises(ValueError, match="variant names repeat: plain; give each once"):
        V.variants(gsm, names=["plain", "plain"])
    with pytest.raises(ValueError, match="the 'chat' variant needs tokenizer="):
        V.variants(gsm, names=["chat"])
    with pytest.raises(TypeError, match="a format variant needs a Skill, got list"):
        V.as_plain(["a"])
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        V.variants(gsm, seed=-1)
