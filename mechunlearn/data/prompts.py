"""Few-shot prompts for the generation protocols: GSM8K 8-shot chain of thought, MMLU 5-shot.

Example:
    >>> shot = Example("Q: 1+1?\\nA:", " 2")
    >>> few_shot_prompt(Example("Q: 2+2?\\nA:"), [shot])
    'Q: 1+1?\\nA: 2\\n\\nQ: 2+2?\\nA:'
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .benchmarks import MMLU_SUBJECTS
from .checks import check_count
from .skill import Example, Skill
from .sources import load_skill

__all__ = [
    "few_shot_prompt",
    "gsm8k_few_shot_prompts",
    "gsm8k_shots",
    "mmlu_few_shot_prompts",
    "mmlu_header",
    "mmlu_shots",
]


def few_shot_prompt(
    example: Example, shots: Sequence[Example], header: str = "", sep: str = "\n\n"
) -> str:
    """``header`` + each shot's ``prompt + answer`` + the example's prompt, joined by ``sep``.

    Args:
        example: The query; its answer is not included.
        shots: Solved exemplars.
        header: Text before the first shot (e.g. :func:`mmlu_header`).
        sep: Separator between blocks.

    Returns:
        The prompt, ending with the example's prompt.

    Example:
        >>> few_shot_prompt(Example("Q:"), [Example("Q1:", " a")], header="H\\n")
        'H\\nQ1: a\\n\\nQ:'
    """
    blocks = [s.prompt + s.answer for s in shots] + [example.prompt]
    return header + sep.join(blocks)


def gsm8k_shots(k: int = 8, seed: int = 0, data_dir: str | os.PathLike[str] | None = None) -> Skill:
    """``k`` GSM8K *train* problems, chosen by ``seed``, to use as chain-of-thought exemplars.

    Each renders as ``"Question: ...\\nAnswer: <reasoning>\\nThe answer is N."``.

    Example:
        >>> shots = gsm8k_shots(8, data_dir=data_dir)
        >>> len(shots), shots[0].prompt.startswith("Question: ")
        (8, True)
    """
    return load_skill("gsm8k", n=k, split="train", seed=seed, data_dir=data_dir)


def gsm8k_few_shot_prompts(
    skill: Skill | Sequence[Example],
    k: int = 8,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
    shots: Sequence[Example] | None = None,
) -> list[str]:
    """GSM8K k-shot chain-of-thought prompts (the paper's 8-shot protocol).

    Exemplars come from the train split (:func:`gsm8k_shots`) unless ``shots`` is given; an
    exemplar whose prompt equals the query is skipped. Prompts end with ``"Answer:"``; parse
    the number after ``"The answer is"`` in the generation.

    Args:
        skill: The GSM8K queries.
        k: Number of exemplars (0: zero-shot, the query alone).
        seed: Which train problems.
        data_dir: Local data directory (as in :func:`~mechunlearn.data.load_skill`).
        shots: Exemplars to use instead of loading them.

    Returns:
        One prompt per example.

    Example:
        >>> prompts = gsm8k_few_shot_prompts(load_skill("gsm8k", n=5, data_dir=data_dir),
        ...                                  data_dir=data_dir)
        >>> len(prompts), prompts[0].count("Question: ")   # 8 shots + the question
        (5, 9)
    """
    k = check_count(k, "k", allow_zero=True)
    pool = list(shots) if shots is not None else list(gsm8k_shots(k + 1, seed, data_dir))
    out = []
    for ex in skill:
        chosen = [s for s in pool if s.prompt != ex.prompt][:k]
        out.append(few_shot_prompt(ex, chosen))
    return out


def mmlu_header(subject: str, answer_format: str = "letter") -> str:
    """The standard MMLU few-shot header (for the text format: without "multiple choice").

    Example:
        >>> mmlu_header("abstract_algebra")
        'The following are multiple choice questions (with answers) about abstract algebra.\\n\\n'
        >>> mmlu_header("anatomy", "text")
        'The following are questions (with answers) about anatomy.\\n\\n'
    """
    pretty = " ".join(subject.split("_"))
    kind = "multiple choice questions" if answer_format == "letter" else "questions"
    return f"The following are {kind} (with answers) about {pretty}.\n\n"


def mmlu_shots(
    subject: str,
    k: int = 5,
    data_dir: str | os.PathLike[str] | None = None,
    answer_format: str = "letter",
) -> Skill:
    """The first ``k`` dev-split questions of one MMLU subject (the standard exemplars).

    Example:
        >>> mmlu_shots("anatomy", data_dir=data_dir)
        Skill(name='mmlu:anatomy', n=5, source=...)
    """
    k = check_count(k, "k")
    dev = load_skill(f"mmlu:{subject}", split="dev", data_dir=data_dir, answer_format=answer_format)
    return dev[:k]


def mmlu_few_shot_prompts(
    skill: Skill | Sequence[Example],
    k: int = 5,
    data_dir: str | os.PathLike[str] | None = None,
    dev: Sequence[Example] | None = None,
) -> list[str]:
    """MMLU k-shot prompts: the subject header, then ``k`` dev questions of the same subject.

    Each example's subject is read from ``meta["subject"]`` and its format from
    ``meta["answer_format"]`` (``"letter"`` when absent); the exemplars are rendered in the
    same format. Letter-format prompts end with ``"Answer:"`` and expect ``" A"`` .. ``" D"``.

    Args:
        skill: MMLU examples (any mix of subjects; one answer format).
        k: Exemplars per prompt (at most 5 with the standard dev split; 0: the header and the
            query alone).
        data_dir: Local data directory (as in :func:`~mechunlearn.data.load_skill`).
        dev: Exemplars to use instead of loading the dev split (grouped by ``meta["subject"]``).

    Returns:
        One prompt per example.

    Raises:
        ValueError: Examples without ``meta["subject"]``, or a mix of answer formats.

    Example:
        >>> skill = load_skill("mmlu:anatomy", n=3, data_dir=data_dir)
        >>> prompts = mmlu_few_shot_prompts(skill, data_dir=data_dir)
        >>> prompts[0].startswith("The following are multiple choice questions")
        True
    """
    k = check_count(k, "k", allow_zero=True)
    examples = list(skill)
    if not all("subject" in ex.meta for ex in examples):
        raise ValueError(
            "MMLU few-shot prompts need meta['subject'] on every example; load them with "
            "load_skill('mmlu...')"
        )
    formats = {ex.meta.get("answer_format", "letter") for ex in examples}
    if len(formats) > 1:
        raise ValueError(
            f"the examples mix MMLU answer formats ({', '.join(sorted(formats))}); "
            "build few-shot prompts for one format at a time"
        )
    fmt = formats.pop() if formats else "letter"
    order = {s: i for i, s in enumerate(MMLU_SUBJECTS)}
    subjects = sorted({ex.meta["subject"] for ex in examples}, key=lambda s: order.get(s, 99))
    if dev is None:
        dev = load_skill(
            "mmlu", split="dev", data_dir=data_dir, subjects=subjects, answer_format=fmt
        )
    by: dict[str, list[Example]] = {}
    for ex in dev:
        by.setdefault(ex.meta["subject"], []).append(ex)
    out = []
    for ex in examples:
        subj = ex.meta["subject"]
        shots = [s for s in by.get(subj, []) if s.prompt != ex.prompt][:k]
        out.append(few_shot_prompt(ex, shots, header=mmlu_header(subj, fmt)))
    return out
