"""The built-in benchmarks: their names, MMLU subjects and languages, and how a record becomes
an :class:`~mechunlearn.data.skill.Example` (the same for every source).

Prompt formats (zero-shot; ``prompt + answer`` is the teacher-forced text):

- GSM8K: ``"Question: {q}\\nAnswer:"`` / ``" {reasoning}\\nThe answer is N."`` (the
  ``<<calculator>>`` annotations removed); ``meta["final"]`` is N without thousands commas.
- MBPP: ``"{text}\\nYour code should pass these tests:\\n{test_list, one a line}\\n"`` /
  the reference code (``\\r\\n`` and lone ``\\r`` turned into ``\\n``).
- MMLU, ``answer_format="letter"`` (the default): ``"{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..
  \\nAnswer:"`` / ``" B"``. ``answer_format="text"``: ``"Question: {question}\\nAnswer:"`` /
  ``" {text of the correct choice}"`` (the GSM8K layout; the choices are not shown, so the
  teacher-forced score measures the answer's text rather than the skill of picking a letter).
  ``meta``: ``subject``, ``choices``, ``label`` (0-3) and ``answer_format``.
- XQuAD, MLQA: ``"Context: {context}\\nQuestion: {question}\\nAnswer:"`` / ``" {first answer}"``.
- HumanEval: the signature and docstring / the canonical solution.

A record that lacks a field or holds a bad value raises :class:`RecordError`; the sources add
the file and line (or the hub row) to its message.

Example:
    >>> ex = mmlu_example("virology", "Q?", ["a", "b", "c", "d"], 2)
    >>> ex.prompt, ex.answer
    ('Q?\\nA. a\\nB. b\\nC. c\\nD. d\\nAnswer:', ' C')
    >>> mmlu_example("virology", "Q?", ["a", "b", "c", "d"], 2, answer_format="text").text
    'Question: Q?\\nAnswer: c'
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from .checks import did_you_mean
from .skill import Example

__all__ = [
    "ANSWER_FORMATS",
    "BUILTIN_SKILLS",
    "MBPP_SPLITS",
    "MLQA_LANGS",
    "MMLU_GROUPS",
    "MMLU_SUBJECTS",
    "XQUAD_LANGS",
    "RecordError",
    "gsm8k_example",
    "humaneval_example",
    "mbpp_example",
    "mmlu_example",
    "mmlu_label",
    "multiple_choice_prompt",
    "qa_example",
    "record_field",
    "resolve_mmlu_subjects",
    "squad_examples",
]

#: Name patterns accepted by :func:`~mechunlearn.data.load_skill` (besides paths and texts).
BUILTIN_SKILLS: tuple[str, ...] = (
    "gsm8k",
    "mbpp",
    "mmlu",
    "mmlu:<subject>[,<subject>...]",
    "mmlu:math",
    "mmlu:-math",
    "xquad:<lang>",
    "mlqa:<lang>",
    "humaneval",
)

#: The 57 MMLU subjects (file-name spelling), in the alphabetical order of the release.
MMLU_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics",
    "econometrics", "electrical_engineering", "elementary_mathematics", "formal_logic",
    "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics",
    "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history",
    "high_school_world_history", "human_aging", "human_sexuality", "international_law",
    "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law",
    "professional_medicine", "professional_psychology", "public_relations",
    "security_studies", "sociology", "us_foreign_policy", "virology", "world_religions",
)  # fmt: skip

#: Named groups of MMLU subjects usable in ``mmlu:<items>`` (add your own entries).
MMLU_GROUPS: dict[str, tuple[str, ...]] = {
    "math": (
        "abstract_algebra",
        "college_mathematics",
        "elementary_mathematics",
        "high_school_mathematics",
        "high_school_statistics",
    ),
}

#: XQuAD languages (``ro`` was added to the release later than the other eleven).
XQUAD_LANGS: tuple[str, ...] = (
    "ar", "de", "el", "en", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh",
)  # fmt: skip

#: MLQA languages (context and question in the same language).
MLQA_LANGS: tuple[str, ...] = ("en", "es", "hi", "de", "zh", "vi", "ar")

#: MBPP splits by inclusive task_id range (the Hugging Face convention; the original README
#: calls 1-10 the prompt examples, 11-510 the test set and 511-1000 training data).
MBPP_SPLITS: dict[str, tuple[int, int]] = {
    "prompt": (1, 10),
    "test": (11, 510),
    "validation": (511, 600),
    "train": (601, 10**9),
}

#: MMLU answer formats: ``"letter"`` (``" B"`` after the lettered choices) or ``"text"``
#: (``" <correct choice>"`` after ``"Question: ...\\nAnswer:"``).
ANSWER_FORMATS: tuple[str, ...] = ("letter", "text")


class RecordError(ValueError):
    """A benchmark record without a needed field or with a bad value (no location yet).

    Example:
        >>> try:
        ...     record_field({"answer": "#### 4"}, "question", "GSM8K")
        ... except RecordError as err:
        ...     print(str(err).split(";")[0])
        the GSM8K record has no field 'question' (it has: answer)
    """


_NEEDS = {
    "GSM8K": ("question", "answer"),
    "MBPP": ("task_id", "text", "code", "test_list"),
    "HumanEval": ("task_id", "prompt", "canonical_solution", "test", "entry_point"),
}


def record_field(row: Any, key: str, kind: str, types: type | tuple[type, ...] = str) -> Any:
    """``row[key]``, checked to exist and to have one of ``types``.

    Raises:
        RecordError: ``row`` is not a mapping, lacks ``key``, or the value has another type.

    Example:
        >>> record_field({"question": "Q"}, "question", "GSM8K")
        'Q'
    """
    if not isinstance(row, Mapping):
        raise RecordError(f"the {kind} record is a {type(row).__name__}, not an object")
    if key not in row:
        needs = _NEEDS.get(kind)
        tail = f"; each record needs {', '.join(needs)}" if needs else ""
        raise RecordError(
            f"the {kind} record has no field {key!r} (it has: {', '.join(map(str, row))}){tail}"
        )
    value = row[key]
    if not isinstance(value, types) or isinstance(value, bool):
        want = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise RecordError(
            f"the {kind} record's {key!r} must be {want}, got {type(value).__name__} {value!r:.40}"
        )
    return value


_CALC = re.compile(r"<<[^<>]*>>")


def gsm8k_example(row: Mapping[str, Any]) -> Example:
    """A GSM8K record ``{"question", "answer"}`` (answer ending ``#### N``) as an Example.

    Example:
        >>> gsm8k_example({"question": "1+1?", "answer": "1+1=<<1+1=2>>2\\n#### 2"}).answer
        ' 1+1=2\\nThe answer is 2.'
    """
    question = record_field(row, "question", "GSM8K")
    solution = record_field(row, "answer", "GSM8K")
    reasoning, sep, final = solution.rpartition("####")
    if not sep:
        raise RecordError(
            f"the GSM8K answer has no final '#### N' line (it ends {solution[-40:]!r}); "
            "end the solution with '#### <number>'"
        )
    final = final.strip()
    reasoning = _CALC.sub("", reasoning).strip()
    answer = f" {reasoning}\nThe answer is {final}." if reasoning else f" The answer is {final}."
    return Example(
        f"Question: {question.strip()}\nAnswer:", answer, {"final": final.replace(",", "")}
    )


def _crlf(s: str) -> str:
    """Universal newlines: ``\\r\\n`` and a lone ``\\r`` (ending 4 MBPP solutions) -> ``\\n``."""
    return s.replace("\r\n", "\n").replace("\r", "\n")


def mbpp_task_id(row: Any) -> int:
    """The ``task_id`` of an MBPP record as an int.

    Example:
        >>> mbpp_task_id({"task_id": "11"})
        11
    """
    value = record_field(row, "task_id", "MBPP", (int, str))
    try:
        return int(value)
    except ValueError:
        raise RecordError(f"the MBPP task_id {value!r} is not an integer") from None


def mbpp_example(row: Mapping[str, Any]) -> Example:
    """An MBPP record (``text``, ``code``, ``task_id``, ``test_list``, ...) as an Example.

    Example:
        >>> row = {"task_id": 1, "text": "Add.", "code": "def f(a, b):\\r\\n    return a + b",
        ...        "test_list": ["assert f(1, 2) == 3"]}
        >>> mbpp_example(row).prompt
        'Add.\\nYour code should pass these tests:\\nassert f(1, 2) == 3\\n'
    """
    task_id = mbpp_task_id(row)
    text = record_field(row, "text", "MBPP")
    code = record_field(row, "code", "MBPP")
    test_list = record_field(row, "test_list", "MBPP", (list, tuple))
    if not all(isinstance(t, str) for t in test_list):
        raise RecordError("the MBPP record's 'test_list' must hold strings")
    tests = [_crlf(t) for t in test_list]
    prompt = f"{_crlf(text)}\nYour code should pass these tests:\n" + "\n".join(tests) + "\n"
    meta = {
        "task_id": task_id,
        "test_list": tests,
        "test_setup_code": _crlf(row.get("test_setup_code") or ""),
        "challenge_test_list": [_crlf(t) for t in row.get("challenge_test_list") or []],
    }
    return Example(prompt, _crlf(code), meta)


def multiple_choice_prompt(question: str, choices: Sequence[str]) -> str:
    """The MMLU layout: the question, one ``"X. choice"`` line per choice, then ``"Answer:"``.

    Example:
        >>> multiple_choice_prompt("2+2?", ["3", "4"])
        '2+2?\\nA. 3\\nB. 4\\nAnswer:'
    """
    if not 2 <= len(choices) <= 10:
        raise ValueError(f"a multiple-choice prompt needs 2 to 10 choices, got {len(choices)}")
    letters = "ABCDEFGHIJ"
    lines = [question] + [f"{letters[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines) + "\nAnswer:"


def mmlu_label(x: Any) -> int:
    """An MMLU answer (``"A"``-``"D"``, or ``0``-``3`` as int or text) as a label 0-3.

    Raises:
        RecordError: Anything else.

    Example:
        >>> mmlu_label("C"), mmlu_label(" 2 "), mmlu_label(3)
        (2, 2, 3)
    """
    if isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 3:
        return x
    s = str(x).strip()
    if s in ("A", "B", "C", "D"):
        return "ABCD".index(s)
    if s in ("0", "1", "2", "3"):
        return int(s)
    raise RecordError(
        f"the MMLU answer {x!r} is not one of A, B, C, D or 0-3; fix the answer column"
    )


def _check_answer_format(answer_format: str) -> str:
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(
            f"unknown answer_format {answer_format!r}."
            f"{did_you_mean(str(answer_format), ANSWER_FORMATS)} "
            f"(answer formats: {', '.join(ANSWER_FORMATS)})"
        )
    return answer_format


def mmlu_example(
    subject: str,
    question: str,
    choices: Sequence[str],
    label: int,
    answer_format: str = "letter",
) -> Example:
    """One MMLU question as an Example, in the ``"letter"`` or ``"text"`` answer format.

    Args:
        subject: The subject (file-name spelling), stored in ``meta["subject"]``.
        question: The question.
        choices: The four choices.
        label: The correct choice, 0-3.
        answer_format: ``"letter"``: the lettered choices in the prompt and ``" B"`` as answer
            (zero-shot letter accuracy, the usual MMLU protocol); ``"text"``:
            ``"Question: {question}\\nAnswer:"`` and the correct choice's text (stripped, after
            one space) as answer, for a teacher-forced score of the answer itself.

    Returns:
        The Example; ``meta`` has ``subject``, ``choices``, ``label`` and ``answer_format``.

    Raises:
        RecordError: Not four string choices, a label outside 0-3, a non-string question, or
            (text format) an empty correct choice.
        ValueError: An unknown ``answer_format``.

    Example:
        >>> mmlu_example("anatomy", "Q?", ["a", "b", "c", "d"], 1).answer
        ' B'
    """
    answer_format = _check_answer_format(answer_format)
    if not isinstance(question, str):
        raise RecordError(f"the MMLU question must be a string, got {type(question).__name__}")
    choices = list(choices)
    if len(choices) != 4 or not all(isinstance(c, str) for c in choices):
        raise RecordError(f"the MMLU question needs 4 string choices, got {choices!r:.80}")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= 3:
        raise RecordError(f"the MMLU label must be an int 0-3, got {label!r}")
    meta = {"subject": subject, "choices": choices, "label": label, "answer_format": answer_format}
    if answer_format == "letter":
        return Example(multiple_choice_prompt(question, choices), " " + "ABCD"[label], meta)
    correct = choices[label].strip()
    if not correct:
        raise RecordError(
            f"the correct MMLU choice ({'ABCD'[label]}) is empty, so it cannot be scored as "
            "text; use answer_format='letter'"
        )
    return Example(f"Question: {question.strip()}\nAnswer:", " " + correct, meta)


def qa_example(context: str, question: str, answers: Sequence[str], lang: str, qid: str) -> Example:
    """An extractive QA item (XQuAD, MLQA) as an Example; the first answer is the reference.

    Example:
        >>> qa_example("Die Katze schläft.", "Wer?", ["Die Katze"], "de", "q1").answer
        ' Die Katze'
    """
    answers = list(answers)
    if not answers:
        raise RecordError(f"the QA item {qid!r} has no answer")
    if not all(isinstance(x, str) for x in (context, question, *answers)):
        raise RecordError(f"the QA item {qid!r} has a context, question or answer that is no text")
    prompt = f"Context: {context}\nQuestion: {question}\nAnswer:"
    return Example(prompt, " " + answers[0], {"answers": answers, "lang": lang, "id": qid})


def squad_examples(data: Any, lang: str) -> list[Example]:
    """The questions of a SQuAD v1.1 JSON document (XQuAD, MLQA files) as Examples.

    Raises:
        RecordError: A missing field; the message gives its JSON path
            (``data[0].paragraphs[3].qas[2]``).

    Example:
        >>> doc = {"data": [{"paragraphs": [{"context": "C.", "qas": [
        ...     {"id": "1", "question": "Q?", "answers": [{"text": "C"}]}]}]}]}
        >>> squad_examples(doc, "en")[0].prompt
        'Context: C.\\nQuestion: Q?\\nAnswer:'
    """

    def get(obj: Any, key: str, where: str, types: type | tuple[type, ...]) -> Any:
        if not isinstance(obj, Mapping) or key not in obj:
            raise RecordError(f"{where} has no field {key!r}; is this a SQuAD v1.1 JSON file?")
        value = obj[key]
        if not isinstance(value, types):
            raise RecordError(f"{where}.{key} has type {type(value).__name__}")
        return value

    out = []
    for a, article in enumerate(get(data, "data", "the top level", list)):
        for p, par in enumerate(get(article, "paragraphs", f"data[{a}]", list)):
            where = f"data[{a}].paragraphs[{p}]"
            context = get(par, "context", where, str)
            for q, qa in enumerate(get(par, "qas", where, list)):
                w = f"{where}.qas[{q}]"
                answers = get(qa, "answers", w, list)
                texts = [get(x, "text", f"{w}.answers[{i}]", str) for i, x in enumerate(answers)]
                question, qid = get(qa, "question", w, str), get(qa, "id", w, str)
                try:
                    out.append(qa_example(context, question, texts, lang, qid))
                except RecordError as err:
                    raise RecordError(f"{w}: {err}") from None
    return out


def humaneval_example(row: Mapping[str, Any]) -> Example:
    """A HumanEval record as an Example: the signature and docstring / the solution.

    Example:
        >>> row = {"task_id": "T/0", "prompt": "def f():\\n", "canonical_solution": "    pass\\n",
        ...        "test": "", "entry_point": "f"}
        >>> humaneval_example(row).text
        'def f():\\n    pass\\n'
    """
    get = record_field
    meta = {
        "task_id": get(row, "task_id", "HumanEval"),
        "test": get(row, "test", "HumanEval"),
        "entry_point": get(row, "entry_point", "HumanEval"),
    }
    return Example(
        get(row, "prompt", "HumanEval"), get(row, "canonical_solution", "HumanEval"), meta
    )


# --------------------------------------------------------------------------------------------
# MMLU subjects
# --------------------------------------------------------------------------------------------


def norm_key(s: str) -> str:
    """Lower case, spaces and hyphens as ``_``: the file-name spelling of a subject.

    Example:
        >>> norm_key("High School Mathematics")
        'high_school_mathematics'
    """
    return re.sub(r"[\s\-]+", "_", s.strip().lower())


def mmlu_items(spec: str | Sequence[str]) -> list[str]:
    """Split and normalise ``mmlu:`` items, keeping a leading ``-``.

    Example:
        >>> mmlu_items("Anatomy, -math")
        ['anatomy', '-math']
    """
    items = spec.split(",") if isinstance(spec, str) else [str(s) for s in spec]
    out = []
    for item in (s.strip() for s in items):
        if item:
            neg = item.startswith("-")
            out.append(("-" if neg else "") + norm_key(item[1:] if neg else item))
    return out


def resolve_mmlu_subjects(spec: str | Sequence[str]) -> list[str]:
    """Turn ``"math"``, ``"-math"``, ``"anatomy,virology"`` (or a list of items) into subjects.

    Items are subject names (case, spaces and hyphens are normalised to the file-name
    spelling) or group names from :data:`MMLU_GROUPS`; an item starting with ``-`` removes
    its subjects. If every item is a removal, they are removed from all 57 subjects.

    Args:
        spec: Comma-separated items, or a sequence of items.

    Returns:
        The subjects in :data:`MMLU_SUBJECTS` order.

    Raises:
        ValueError: For an empty selection (``""``, ``","``: pass nothing for all subjects), an
            unknown subject or group (with a did-you-mean), or a selection that leaves nothing.

    Example:
        >>> resolve_mmlu_subjects("math")[:2]
        ['abstract_algebra', 'college_mathematics']
        >>> len(resolve_mmlu_subjects("-math"))
        52
    """
    items = mmlu_items(spec)
    if not items:
        raise ValueError(
            f"the MMLU subject list {spec!r} is empty; use 'mmlu' for all 57 subjects or name "
            "subjects or groups, e.g. 'mmlu:anatomy' or 'mmlu:math'"
        )
    include: set[str] = set()
    exclude: set[str] = set()
    any_positive = False
    for item in items:
        neg = item.startswith("-")
        key = item[1:] if neg else item
        if key in MMLU_GROUPS:
            found = set(MMLU_GROUPS[key])
        elif key in MMLU_SUBJECTS:
            found = {key}
        else:
            raise ValueError(
                f"unknown MMLU subject or group {key!r}."
                f"{did_you_mean(key, [*MMLU_SUBJECTS, *MMLU_GROUPS])} "
                f"(groups: {', '.join(MMLU_GROUPS)}; subjects: {', '.join(MMLU_SUBJECTS)})"
            )
        if neg:
            exclude |= found
        else:
            include |= found
            any_positive = True
    chosen = (include if any_positive else set(MMLU_SUBJECTS)) - exclude
    if not chosen:
        raise ValueError(f"MMLU subject selection {spec!r} leaves no subjects")
    return [s for s in MMLU_SUBJECTS if s in chosen]
