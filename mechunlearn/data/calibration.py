"""The shipped calibration set: ordinary questions that a skill detector must let through.

``mechunlearn/resources/general_questions.jsonl`` holds 252 short questions and requests written
for mechunlearn (MIT, like the package) in 18 everyday domains (cooking, travel, history,
geography, biology, physics, health, sports, the arts, grammar, technology help, law, ...).
It has no arithmetic word problems and no programming tasks, the skills people usually
unlearn, so it can serve as the negatives of :class:`mechunlearn.KeySpaceDetector` when no
retain skill is at hand: ``fit(keys_f, mu.collect_keys(model, mu.calibration_skill()))``
chooses alpha so that at most ``fpr`` of these questions are detected.
:func:`calibration_skill` returns them in several prompt formats (bare, and as
``"Question: ...\\nAnswer:"``; in the chat template too when given a tokenizer).
``mechunlearn/resources/README.md`` describes the file.

Example:
    >>> s = calibration_skill()
    >>> s.name, len(s), len({ex.meta["domain"] for ex in s})
    ('general-questions', 504, 18)
    >>> s[0].prompt
    'How do I get a red wine stain out of a light carpet?'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

from .checks import check_seed
from .files import DataFileError, iter_jsonl
from .skill import Example, Skill, check_text
from .variants import variants

__all__ = ["CALIBRATION_FILE", "calibration_skill"]

#: The calibration file, relative to the ``mechunlearn`` package.
CALIBRATION_FILE = "resources/general_questions.jsonl"


def calibration_skill(
    n: int | None = None,
    seed: int = 0,
    formats: Sequence[str] | None = None,
    tokenizer: Any = None,
) -> Skill:
    """The shipped general questions as a :class:`Skill`, in one or more prompt formats.

    A detector's negatives must come in the format of its forget prompts: key vectors at the
    last prompt token carry the format as much as the content (fitted on
    ``"Question: ...\\nAnswer:"`` prompts and calibrated on bare questions only, a detector
    refuses most ``"Question: ...\\nAnswer:"`` prompts of any topic; see
    ``analysis/ksd_defaults.py``). So by default every question comes twice: bare
    (``"plain"``) and as ``"Question: {q}\\nAnswer:"`` (``"question_prefix"``, GSM8K's and
    MMLU's format), and a third time in the model's chat template when ``tokenizer`` is given.
    Each example's ``meta`` has ``"domain"`` and ``"variant"`` (the format).

    Args:
        n: How many questions (a deterministic subsample, :meth:`Skill.subsample`, taken
            before formatting, so the skill holds ``n * len(formats)`` prompts); None for all.
        seed: The subsample's seed.
        formats: Names of :data:`mechunlearn.data.VARIANTS` without extra inputs, or
            ``"chat"`` (needs ``tokenizer``); default ``("plain", "question_prefix")``, plus
            ``"chat"`` when ``tokenizer`` is given.
        tokenizer: The model's tokenizer, for the ``"chat"`` format (``model.tokenizer``).

    Returns:
        A Skill named ``"general-questions"``: all questions in the first format, then all in
        the next, each in the file's order (or the subsample's).

    Raises:
        ValueError: ``n`` larger than the set or not positive; an unknown or repeated format,
            or ``"chat"`` without a tokenizer.
        DataFileError: The installed file is damaged (the message names the line).

    Example:
        >>> s = calibration_skill(n=3, formats=["plain", "question_prefix"])
        >>> len(s), s[3].prompt == f"Question: {s[0].prompt}\\nAnswer:"
        (6, True)
    """
    seed = check_seed(seed)
    if formats is None:
        formats = ("plain", "question_prefix") + (() if tokenizer is None else ("chat",))
    elif isinstance(formats, str):
        formats = (formats,)
    formats = tuple(formats)
    if not formats:
        raise ValueError("formats is empty; pass e.g. formats=['plain'] or None for the default")
    base = _load()
    if n is not None:
        base = base.subsample(n, seed)
    parts = variants(base, formats, tokenizer=tokenizer)  # checks the names
    examples = [ex for part in parts.values() for ex in part]
    note = base.with_note(formats="+".join(formats))
    return Skill("general-questions", examples, note)


def _load() -> Skill:
    ref = resources.files("mechunlearn").joinpath(CALIBRATION_FILE)
    with resources.as_file(ref) as path:
        if not path.is_file():
            raise FileNotFoundError(
                f"the calibration set {path} is missing from the installed package; reinstall "
                "mechunlearn (pip install --force-reinstall mechunlearn)"
            )
        examples = [_example(row, path, line) for line, row in iter_jsonl(path)]
    return Skill("general-questions", examples, f"package:mechunlearn/{CALIBRATION_FILE}")


def _example(row, path, line: int) -> Example:
    if not isinstance(row, Mapping):
        raise DataFileError(path, line, "the record is not a JSON object; reinstall mechunlearn")
    prompt, domain = row.get("prompt"), row.get("domain")
    if not isinstance(prompt, str) or not isinstance(domain, str) or not prompt.strip():
        raise DataFileError(
            path, line, "the record needs a non-empty string 'prompt' and a string 'domain'"
        )
    check_text(prompt, f"{path}:{line}: prompt")
    return Example(prompt, "", {"domain": domain})
