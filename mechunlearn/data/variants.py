"""Format variants of a skill's prompts, for the "skill or format?" study.

Each variant rewrites every prompt of a :class:`~mechunlearn.data.skill.Skill` into another
format and returns a new Skill named ``"<skill>[<variant>]"``, with the examples in the same
order, ``meta["variant"]``, ``meta["original_prompt"]`` and ``meta["answer_valid"]`` added to
each example's meta, and the original answer kept (except ``numbers_changed``, whose answers
no longer hold). The question of an example is :func:`question_text`: its prompt without the
``"Question: "`` prefix, the ``"\\nAnswer:"`` suffix and, for MMLU, the lettered choices.

=====================  ======================================================================
``plain``              the bare question
``question_prefix``    ``"Question: {q}\\nAnswer:"`` (exactly GSM8K's prompt)
``docstring``          ``def solve():\\n    \"\"\"{q}\"\"\"\\n`` (valid Python; the docstring is q)
``comment``            the question as ``#`` comment lines, then a newline
``after_paragraph``    an unrelated paragraph, a blank line, then the original prompt
``multiple_choice``    the question with four lettered options (the MMLU layout); the correct
                       option is ``meta["final"]`` with three numeric distractors (GSM8K), the
                       example's own choices (MMLU, order kept), or else the first line of
                       the answer with other examples' first lines as distractors;
                       ``meta["choices"]`` and ``meta["label"]`` describe the options
``chat``               the question as the user turn of the tokenizer's chat template, with the
                       generation prompt (``apply_chat_template``)
``numbers_changed``    the original prompt with every integer replaced by another integer of
                       the same number of digits (the same number -> the same replacement);
                       answer ``""``, ``meta["answer_valid"] = False``
=====================  ======================================================================

Every choice that depends on ``seed`` (paragraphs, option order, new numbers) is a SHA-256 hash
of the seed and the example's prompt, so it does not depend on the example's position, the
machine or the Python version.

Example:
    >>> s = Skill.from_texts("toy", ["Question: Tom has 3 apples.\\nAnswer:"], [" 3"])
    >>> as_comment(s)[0].prompt
    '# Tom has 3 apples.\\n'
    >>> as_docstring(s).name
    'toy[docstring]'
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .benchmarks import multiple_choice_prompt
from .checks import check_seed, did_you_mean
from .skill import Example, Skill

__all__ = [
    "VARIANTS",
    "as_after_paragraph",
    "as_chat",
    "as_comment",
    "as_docstring",
    "as_multiple_choice",
    "as_numbers_changed",
    "as_plain",
    "as_question_prefix",
    "make_variant",
    "question_text",
    "variants",
]

#: The variant names, in the order :func:`variants` returns them.
VARIANTS: tuple[str, ...] = (
    "plain",
    "question_prefix",
    "docstring",
    "comment",
    "after_paragraph",
    "multiple_choice",
    "chat",
    "numbers_changed",
)

_PREFIX = "Question: "
_SUFFIX = "\nAnswer:"


def _hash_int(*parts: object) -> int:
    data = "\0".join(str(p) for p in parts).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def question_text(example: Example) -> str:
    """The question of an example: its prompt without the usual wrapping, stripped.

    Removes, when present, the lettered-choices block of an MMLU prompt (``meta["choices"]``),
    the trailing ``"\\nAnswer:"`` and the leading ``"Question: "``. Other prompts are returned
    stripped.

    Example:
        >>> question_text(Example("Question: 2+2?\\nAnswer:", " 4"))
        '2+2?'
        >>> question_text(Example("2+2?\\nA. 3\\nB. 4\\nC. 5\\nD. 6\\nAnswer:", " B",
        ...                       {"choices": ["3", "4", "5", "6"], "label": 1}))
        '2+2?'
    """
    p = example.prompt
    choices = example.meta.get("choices")
    if isinstance(choices, (list, tuple)) and 2 <= len(choices) <= 10:
        block = multiple_choice_prompt("", [str(c) for c in choices])  # "\nA. ..\nAnswer:"
        if p.endswith(block):
            p = p[: -len(block)]
    p = p.removesuffix(_SUFFIX)
    p = p.removeprefix(_PREFIX)
    return p.strip()


def _rewrite(
    skill: Skill,
    variant: str,
    fn: Callable[[int, Example], tuple[str, str, dict[str, Any]]],
    answer_valid: bool = True,
    **note: Any,
) -> Skill:
    if not isinstance(skill, Skill):
        raise TypeError(f"a format variant needs a Skill, got {type(skill).__name__}")
    examples = []
    for i, ex in enumerate(skill):
        prompt, answer, extra = fn(i, ex)
        meta = {**ex.meta, **extra, "variant": variant, "original_prompt": ex.prompt}
        meta["answer_valid"] = answer_valid
        examples.append(Example(prompt, answer, meta))
    source = skill.with_note(variant=variant, **note)
    return Skill(f"{skill.name}[{variant}]", examples, source)


def as_plain(skill: Skill) -> Skill:
    """Each prompt replaced by its bare question (:func:`question_text`).

    Example:
        >>> as_plain(Skill.from_texts("g", ["Question: 1+1?\\nAnswer:"]))[0].prompt
        '1+1?'
    """
    return _rewrite(skill, "plain", lambda i, ex: (question_text(ex), ex.answer, {}))


def as_question_prefix(skill: Skill) -> Skill:
    """Each prompt as ``"Question: {q}\\nAnswer:"`` (GSM8K's own prompt format).

    Example:
        >>> as_question_prefix(Skill.from_texts("g", ["1+1?"]))[0].prompt
        'Question: 1+1?\\nAnswer:'
    """
    return _rewrite(
        skill,
        "question_prefix",
        lambda i, ex: (f"{_PREFIX}{question_text(ex)}{_SUFFIX}", ex.answer, {}),
    )


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _docstring_source(question: str) -> str:
    body = question.replace("\\", "\\\\")
    body = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", body)
    body = body.replace('"""', '\\"\\"\\"')
    if body.endswith('"'):
        body = body[:-1] + '\\"'
    lines = body.split("\n")
    body = "\n".join([lines[0]] + [("    " + line) if line.strip() else "" for line in lines[1:]])
    return f'def solve():\n    """{body}"""\n'


def as_docstring(skill: Skill) -> Skill:
    """Each question as the docstring of a Python function: ``def solve():\\n    \"\"\"q\"\"\"\\n``.

    Backslashes, control characters and triple quotes are escaped, so the prompt always parses
    with :mod:`ast` and its docstring is the question (continuation lines indented by 4).

    Example:
        >>> print(as_docstring(Skill.from_texts("g", ["Question: 1+1?\\nAnswer:"]))[0].prompt)
        def solve():
            \"\"\"1+1?\"\"\"
        <BLANKLINE>
    """
    return _rewrite(
        skill, "docstring", lambda i, ex: (_docstring_source(question_text(ex)), ex.answer, {})
    )


def as_comment(skill: Skill) -> Skill:
    """Each question as Python comment lines (``"# "`` + line; ``"#"`` for a blank line).

    Example:
        >>> as_comment(Skill.from_texts("g", ["a\\n\\nb"]))[0].prompt
        '# a\\n#\\n# b\\n'
    """

    def fn(i: int, ex: Example) -> tuple[str, str, dict[str, Any]]:
        lines = question_text(ex).splitlines() or [""]
        return "\n".join(f"# {x}" if x.strip() else "#" for x in lines) + "\n", ex.answer, {}

    return _rewrite(skill, "comment", fn)


def _paragraph_list(paragraphs: Skill | Iterable[str] | None) -> list[str]:
    if paragraphs is None:
        raise ValueError(
            "the 'after_paragraph' variant needs paragraphs=: a Skill (its prompts) or a list "
            "of paragraphs of unrelated English text"
        )
    if isinstance(paragraphs, Skill):
        items: list[Any] = paragraphs.prompts
    elif isinstance(paragraphs, (str, bytes)) or not isinstance(paragraphs, Iterable):
        raise TypeError(
            "paragraphs must be a Skill or a list of strings, not "
            f"{type(paragraphs).__name__}; wrap one paragraph in a list"
        )
    else:
        items = list(paragraphs)
    out: list[str] = []
    for j, p in enumerate(items):
        if not isinstance(p, str):
            raise TypeError(f"paragraphs[{j}] is {type(p).__name__}, not a str")
        p = p.strip()
        if p and p not in out:
            out.append(p)
    if not out:
        raise ValueError("paragraphs= holds no non-empty paragraph")
    return out


def as_after_paragraph(
    skill: Skill, paragraphs: Skill | Iterable[str] | None, seed: int = 0
) -> Skill:
    """Each original prompt after an unrelated paragraph and a blank line.

    The paragraph of an example is chosen by a hash of ``seed`` and the prompt (duplicates and
    blank paragraphs are dropped first); ``meta["paragraph_index"]`` records which one.

    Args:
        skill: The skill.
        paragraphs: A Skill (its prompts are the paragraphs) or a list of strings.
        seed: A non-negative int.

    Example:
        >>> s = Skill.from_texts("g", ["Question: 1+1?\\nAnswer:"])
        >>> as_after_paragraph(s, ["The sky is blue."])[0].prompt
        'The sky is blue.\\n\\nQuestion: 1+1?\\nAnswer:'
    """
    seed = check_seed(seed)
    pars = _paragraph_list(paragraphs)

    def fn(i: int, ex: Example) -> tuple[str, str, dict[str, Any]]:
        j = _hash_int("after_paragraph", seed, ex.prompt) % len(pars)
        return f"{pars[j]}\n\n{ex.prompt}", ex.answer, {"paragraph_index": j}

    return _rewrite(skill, "after_paragraph", fn, seed=seed)


_INT = re.compile(r"-?[0-9]+")


def _numeric_distractors(final: str) -> list[str]:
    n = int(final)
    candidates = [n + 1, n - 1, 2 * n, n + 10, n - 10, 10 * n, n + 2, n - 2, n + 100, 3 * n]
    if n % 2 == 0:
        candidates.insert(3, n // 2)
    out: list[str] = []
    for c in candidates:
        if c == n or (n >= 0 and c < 0) or str(c) in out:
            continue
        out.append(str(c))
    return out[:3]


def as_multiple_choice(skill: Skill, seed: int = 0) -> Skill:
    """Each question with four lettered options (the MMLU layout), ending with ``"Answer:"``.

    - An example with four ``meta["choices"]`` and a ``meta["label"]`` (MMLU) keeps them, in
      their order (so a letter answer stays right).
    - An example whose ``meta["final"]`` is an integer (GSM8K) gets that number and three
      distractors derived from it (n+1, n-1, 2n, n/2, n+10, ...; no negative ones for n >= 0).
    - Otherwise the correct option is the first non-blank line of the answer and the
      distractors are first lines of other examples' answers.

    The position of the correct option (and the order of the others) comes from a hash of
    ``seed``, the prompt and the option. ``meta["choices"]`` and ``meta["label"]`` describe the
    new options; the answer is kept.

    Raises:
        ValueError: Fewer than four distinct answers to draw options from, or an empty answer.

    Example:
        >>> s = Skill("g", [Example("Question: 2+2?\\nAnswer:", " 2+2=4\\nThe answer is 4.",
        ...                         {"final": "4"})])
        >>> sorted(as_multiple_choice(s)[0].meta["choices"], key=int)
        ['3', '4', '5', '8']
    """
    seed = check_seed(seed)
    first_lines = [
        next((x.strip() for x in ex.answer.splitlines() if x.strip()), "") for ex in skill
    ]
    pool = list(dict.fromkeys(x for x in first_lines if x))

    def other_answers(i: int, ex: Example, correct: str) -> list[str]:
        if len(pool) < 4:
            raise ValueError(
                f"the multiple_choice variant of skill {skill.name!r} needs at least 4 distinct "
                f"answers to draw options from (example {i} has no numeric meta['final'] or "
                f"choices), but the skill has {len(pool)}; add examples"
            )
        picked: list[str] = []
        c = 0
        while len(picked) < 3 and c < 64:
            cand = pool[_hash_int("mc-pick", seed, ex.prompt, c) % len(pool)]
            if cand != correct and cand not in picked:
                picked.append(cand)
            c += 1
        for cand in pool:  # a deterministic fallback (only for tiny pools)
            if len(picked) == 3:
                break
            if cand != correct and cand not in picked:
                picked.append(cand)
        return picked

    def fn(i: int, ex: Example) -> tuple[str, str, dict[str, Any]]:
        q = question_text(ex)
        choices, label = ex.meta.get("choices"), ex.meta.get("label")
        has_label = isinstance(label, int) and not isinstance(label, bool) and 0 <= label < 4
        if isinstance(choices, (list, tuple)) and len(choices) == 4 and has_label:
            options = [str(x) for x in choices]
            meta = {"choices": options, "label": label}
            return multiple_choice_prompt(q, options), ex.answer, meta
        final = ex.meta.get("final")
        if isinstance(final, str) and _INT.fullmatch(final.strip()):
            correct = str(int(final))
            distractors = _numeric_distractors(correct)
        else:
            correct = first_lines[i]
            if not correct:
                raise ValueError(
                    f"example {i} of skill {skill.name!r} has an empty answer, so the "
                    "multiple_choice variant has no correct option; give it an answer"
                )
            distractors = other_answers(i, ex, correct)
        options = sorted(
            [correct, *distractors], key=lambda o: _hash_int("mc-order", seed, ex.prompt, o)
        )
        meta = {"choices": options, "label": options.index(correct)}
        return multiple_choice_prompt(q, options), ex.answer, meta

    return _rewrite(skill, "multiple_choice", fn, seed=seed)


def as_chat(skill: Skill, tokenizer: Any) -> Skill:
    """Each question as the user turn of ``tokenizer``'s chat template, ready for the reply.

    Uses ``tokenizer.apply_chat_template([{"role": "user", "content": q}],
    add_generation_prompt=True, tokenize=False)``; pass the tokenizer of the model under
    study (for the default model: ``model.tokenizer``). The template may add its own system
    turn (SmolLM2-Instruct's does).

    Raises:
        ValueError: The tokenizer has no chat template.
        TypeError: It has no ``apply_chat_template`` or it does not return text.

    Example:
        >>> chat = as_chat(skill, model.tokenizer)  # doctest: +SKIP
        >>> chat[0].prompt.startswith("<|im_start|>system")  # doctest: +SKIP
        True
    """
    if tokenizer is None:
        raise ValueError(
            "the 'chat' variant needs tokenizer=: the model's tokenizer (with a chat template)"
        )
    if not callable(getattr(tokenizer, "apply_chat_template", None)):
        raise TypeError(
            f"tokenizer {type(tokenizer).__name__} has no apply_chat_template; pass a "
            "transformers tokenizer"
        )
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!s} "
            "has no chat template; pass the tokenizer of an instruct/chat model"
        )

    def fn(i: int, ex: Example) -> tuple[str, str, dict[str, Any]]:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question_text(ex)}],
            add_generation_prompt=True,
            tokenize=False,
        )
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template returned {type(text).__name__}, not text")
        # The template's markers are real special tokens: tokenise them as such.
        return text, ex.answer, {"special_tokens": True}

    return _rewrite(skill, "chat", fn)


_DIGITS = re.compile(r"[0-9]+")


def _new_number(old: str, seed: int, prompt: str) -> str:
    lead_zero_ok = len(old) == 1 or old[0] == "0"
    for c in range(1000):
        digits = [_hash_int("numbers_changed", seed, prompt, old, c, j) for j in range(len(old))]
        new = "".join(
            str(1 + h % 9) if j == 0 and not lead_zero_ok else str(h % 10)
            for j, h in enumerate(digits)
        )
        if new != old:
            return new
    raise AssertionError("unreachable: 1000 draws gave back the same number")


def as_numbers_changed(skill: Skill, seed: int = 0) -> Skill:
    """Each prompt with every integer replaced by another one with the same number of digits.

    Every run of ASCII digits is an integer (``3.5`` holds two, ``1,000`` two); a run with a
    leading digit other than 0 gets a replacement without a leading 0; within a prompt the
    same run always gets the same replacement. The answers no longer hold, so they are set to
    ``""`` with ``meta["answer_valid"] = False`` (detection studies use prompts only);
    ``meta["numbers"]`` maps each original run to its replacement.

    Example:
        >>> s = Skill.from_texts("g", ["Question: 12 eggs, 12 hens, 7 days.\\nAnswer:"], [" 1"])
        >>> ex = as_numbers_changed(s)[0]
        >>> ex.answer, ex.meta["answer_valid"], len(ex.meta["numbers"])
        ('', False, 2)
    """
    seed = check_seed(seed)

    def fn(i: int, ex: Example) -> tuple[str, str, dict[str, Any]]:
        mapping: dict[str, str] = {}
        for old in _DIGITS.findall(ex.prompt):
            if old not in mapping:
                mapping[old] = _new_number(old, seed, ex.prompt)
        prompt = _DIGITS.sub(lambda m: mapping[m.group()], ex.prompt)
        return prompt, "", {"numbers": mapping}

    return _rewrite(skill, "numbers_changed", fn, answer_valid=False, seed=seed)


def make_variant(
    skill: Skill,
    name: str,
    *,
    paragraphs: Skill | Iterable[str] | None = None,
    tokenizer: Any = None,
    seed: int = 0,
) -> Skill:
    """One format variant of ``skill`` by name (see :data:`VARIANTS`).

    Args:
        skill: The skill.
        name: One of :data:`VARIANTS`.
        paragraphs: For ``"after_paragraph"``.
        tokenizer: For ``"chat"``.
        seed: For ``"after_paragraph"``, ``"multiple_choice"``, ``"numbers_changed"``.

    Raises:
        ValueError: An unknown name (with a did-you-mean), or a missing input.

    Example:
        >>> make_variant(Skill.from_texts("g", ["1+1?"]), "question_prefix")[0].prompt
        'Question: 1+1?\\nAnswer:'
    """
    seed = check_seed(seed)
    if not isinstance(name, str) or name not in VARIANTS:
        raise ValueError(
            f"unknown format variant {name!r}.{did_you_mean(str(name), VARIANTS)} "
            f"(variants: {', '.join(VARIANTS)})"
        )
    if name == "after_paragraph":
        return as_after_paragraph(skill, paragraphs, seed)
    if name == "multiple_choice":
        return as_multiple_choice(skill, seed)
    if name == "numbers_changed":
        return as_numbers_changed(skill, seed)
    if name == "chat":
        return as_chat(skill, tokenizer)
    simple: Mapping[str, Callable[[Skill], Skill]] = {
        "plain": as_plain,
        "question_prefix": as_question_prefix,
        "docstring": as_docstring,
        "comment": as_comment,
    }
    return simple[name](skill)


def variants(
    skill: Skill,
    names: Sequence[str] | None = None,
    paragraphs: Skill | Iterable[str] | None = None,
    tokenizer: Any = None,
    seed: int = 0,
) -> dict[str, Skill]:
    """Several format variants of ``skill``, by name.

    Args:
        skill: The skill.
        names: Variant names (:data:`VARIANTS`); ``None``: every variant whose input is given
            (``"after_paragraph"`` only with ``paragraphs``, ``"chat"`` only with
            ``tokenizer``). Explicitly named variants need their inputs.
        paragraphs: For ``"after_paragraph"``: a Skill or a list of paragraphs.
        tokenizer: For ``"chat"``: the model's tokenizer.
        seed: A non-negative int.

    Returns:
        ``{name: Skill}`` in the order of ``names`` (default: :data:`VARIANTS` order).

    Raises:
        ValueError: An unknown or repeated name, or a named variant without its input.

    Example:
        >>> s = Skill("g", [Example("Question: 1+1?\\nAnswer:", " 2", {"final": "2"})])
        >>> out = variants(s)
        >>> list(out)
        ['plain', 'question_prefix', 'docstring', 'comment', 'multiple_choice', 'numbers_changed']
    """
    if names is None:
        names = [
            v
            for v in VARIANTS
            if not (v == "after_paragraph" and paragraphs is None)
            and not (v == "chat" and tokenizer is None)
        ]
    elif isinstance(names, str):
        names = [names]
    names = list(names)
    repeated = sorted({v for v in names if names.count(v) > 1})
    if repeated:
        raise ValueError(f"variant names repeat: {', '.join(repeated)}; give each once")
    for v in names:  # all names checked before any work
        if v not in VARIANTS:
            raise ValueError(
                f"unknown format variant {v!r}.{did_you_mean(str(v), VARIANTS)} "
                f"(variants: {', '.join(VARIANTS)})"
            )
    return {
        v: make_variant(skill, v, paragraphs=paragraphs, tokenizer=tokenizer, seed=seed)
        for v in names
    }
