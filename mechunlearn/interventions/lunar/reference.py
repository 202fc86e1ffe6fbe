"""LUNAR's reference prompts: prompts a model declines to answer (the direction's first mean)."""

from __future__ import annotations

import json
from importlib import resources

from ...data import Example, Skill

REFERENCE_KINDS = ("fictitious", "refuse")
_REFERENCE_FILE = "reference_prompts.jsonl"


def reference_prompts(kind: str | None = None, template: str = "{prompt}") -> Skill:
    """The reference prompts shipped with mechunlearn: prompts a model declines to answer.

    76 prompts written for this project (see ``mechunlearn/resources/README.md``): 52 questions
    about fictitious people, places and objects (``kind="fictitious"``) and 24 requests an
    assistant should refuse (``kind="refuse"``). Prompts only (every answer is ``""``); each
    example's ``meta["kind"]`` says which kind it is.

    Args:
        kind: ``"fictitious"``, ``"refuse"``, or None for both.
        template: format string applied to each prompt, with the field ``{prompt}``: e.g.
            ``"Question: {prompt}\\nAnswer:"`` to match the forget skill's prompt format, so
            that the direction does not also encode the difference in format.

    Returns:
        A Skill named ``"reference"``.

    Example:
        >>> ref = reference_prompts()
        >>> len(ref), ref[0].meta["kind"]
        (76, 'fictitious')
        >>> reference_prompts("refuse", template="Question: {prompt}\\nAnswer:")[0].prompt[:9]
        'Question:'
    """
    if kind is not None and kind not in REFERENCE_KINDS:
        raise ValueError(f"kind must be one of {REFERENCE_KINDS} or None, got {kind!r}.")
    if not isinstance(template, str) or "{prompt}" not in template:
        raise ValueError(
            f"template must be a string containing '{{prompt}}', got {template!r}: "
            "e.g. 'Question: {prompt}\\nAnswer:'."
        )
    text = resources.files("mechunlearn.resources").joinpath(_REFERENCE_FILE).read_text("utf-8")
    examples = []
    for line in text.splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if kind is None or row["kind"] == kind:
            prompt = template.format(prompt=row["prompt"])
            examples.append(Example(prompt, "", {"kind": row["kind"]}))
    return Skill("reference", examples, f"package:mechunlearn/resources/{_REFERENCE_FILE}")
