"""Skill data: named sets of (prompt, answer) examples, loaded from local files, the hub or PyPI.

The bottom layer of mechunlearn (it imports nothing else from the package). One job per module:

- :mod:`~mechunlearn.data.skill`: :class:`Example`, :class:`Skill` (split, subsample,
  from_texts, to_jsonl) and :func:`split_sizes`, the one split rounding rule;
- :mod:`~mechunlearn.data.sources`: :func:`load_skill` and the sources (local folder, hub,
  PyPI) of the built-in benchmarks; the list of built-in names and the data layout are there;
- :mod:`~mechunlearn.data.benchmarks`: benchmark names, MMLU subjects and groups, languages,
  and how a record becomes an :class:`Example` (prompt formats, MMLU ``answer_format``);
- :mod:`~mechunlearn.data.files`: strict JSONL / JSON / CSV readers whose errors name the file
  and the line (:class:`DataFileError`), and :func:`load_file` for a user's file;
- :mod:`~mechunlearn.data.prompts`: few-shot prompts (GSM8K 8-shot, MMLU 5-shot);
- :mod:`~mechunlearn.data.variants`: format variants of a skill's prompts (docstring, comment,
  chat template, multiple choice, numbers changed, ...) for the "skill or format?" study;
- :mod:`~mechunlearn.data.calibration`: :func:`calibration_skill`, the shipped general
  questions (negatives for a detector's false-positive calibration);
- :mod:`~mechunlearn.data.checks`: the argument checks shared by these modules.

Example:
    >>> import mechunlearn as mu                                    # doctest: +SKIP
    >>> forget = mu.load_skill("gsm8k", n=200, data_dir="shared/data")  # doctest: +SKIP
    >>> fit, held_out = forget.split(0.5, seed=0)                  # doctest: +SKIP
"""

from .benchmarks import (
    ANSWER_FORMATS,
    BUILTIN_SKILLS,
    MBPP_SPLITS,
    MLQA_LANGS,
    MMLU_GROUPS,
    MMLU_SUBJECTS,
    XQUAD_LANGS,
    RecordError,
    mmlu_example,
    multiple_choice_prompt,
    resolve_mmlu_subjects,
)
from .calibration import calibration_skill
from .files import DataFileError, load_file
from .prompts import (
    few_shot_prompt,
    gsm8k_few_shot_prompts,
    gsm8k_shots,
    mmlu_few_shot_prompts,
    mmlu_header,
    mmlu_shots,
)
from .skill import Example, Skill, special_token_flags, split_sizes
from .sources import DATA_ENV_VAR, SOURCES, SkillNotFoundError, load_skill
from .variants import VARIANTS, make_variant, question_text
from .variants import variants as format_variants

__all__ = [
    "ANSWER_FORMATS",
    "BUILTIN_SKILLS",
    "DATA_ENV_VAR",
    "MBPP_SPLITS",
    "MLQA_LANGS",
    "MMLU_GROUPS",
    "MMLU_SUBJECTS",
    "SOURCES",
    "VARIANTS",
    "XQUAD_LANGS",
    "DataFileError",
    "Example",
    "RecordError",
    "Skill",
    "SkillNotFoundError",
    "calibration_skill",
    "few_shot_prompt",
    "special_token_flags",
    "format_variants",
    "gsm8k_few_shot_prompts",
    "gsm8k_shots",
    "load_file",
    "load_skill",
    "make_variant",
    "mmlu_example",
    "mmlu_few_shot_prompts",
    "mmlu_header",
    "mmlu_shots",
    "multiple_choice_prompt",
    "question_text",
    "resolve_mmlu_subjects",
    "split_sizes",
]
