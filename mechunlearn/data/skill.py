"""The skill container (:class:`Example`, :class:`Skill`) and the one split rule.

A :class:`Skill` is what the rest of mechunlearn consumes: ``collect`` runs the model on its
prompts (and answers), the interventions are fitted on skills, and the evaluation scores a
model on them. Every text in a skill is checked when the skill is built: a non-string or a lone
surrogate (``"\\ud800"``, which tokenizers reject) is refused there, with the example's index.

Example:
    >>> s = Skill.from_texts("toy", ["a", "b", "c", "d"], [" 1", " 2", " 3", " 4"])
    >>> fit, held = s.split(0.5, seed=0)
    >>> len(fit), len(held)
    (2, 2)
    >>> split_sizes(101, 0.3)
    (70, 31)
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import operator
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, overload

from .checks import check_count, check_seed, check_texts

__all__ = ["Example", "Skill", "check_text", "split_sizes"]


def check_text(value: Any, what: str) -> str:
    """``value`` if it is a valid Unicode string, else a one-line error naming ``what``.

    Args:
        value: The text.
        what: Where it comes from, e.g. ``"skill 'toy' example 3: prompt"``.

    Returns:
        ``value``, unchanged.

    Raises:
        TypeError: Not a ``str``.
        ValueError: A lone surrogate code point (not encodable as UTF-8; tokenizers reject it).

    Example:
        >>> check_text("caf\\u00e9", "prompt")
        'café'
        >>> try:
        ...     check_text("a\\ud800", "prompt")
        ... except ValueError as err:
        ...     print(str(err).split(",")[0])
        prompt has a lone surrogate '\\ud800' at character 1
    """
    if not isinstance(value, str):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise TypeError(
            f"{what} must be a str, got {type(value).__name__} {shown}; "
            "pass text (convert it with str() yourself if that is really meant)"
        )
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(
                f"{what} has a lone surrogate {value[err.start]!r} at character {err.start}, "
                "which is not valid Unicode (tokenizers reject it); fix the text, e.g. decode "
                "its bytes with errors='replace'"
            ) from None
    return value


def split_sizes(n: int, test_size: float | int) -> tuple[int, int]:
    """THE rule mechunlearn uses to size a ``(fit, held_out)`` split of ``n`` items.

    - an int ``test_size`` is the held-out count, ``1 <= test_size <= n - 1``;
    - a float ``test_size`` in (0, 1) is a fraction; the held-out count is rounded **up**:
      ``n_test = ceil(test_size * n)`` (as scikit-learn does), with ``test_size`` taken as the
      decimal it is written as, so float noise never adds one (``0.07`` of 100 is 7, not 8);
      the fit part must keep at least one item.

    Args:
        n: Number of items (an int >= 2).
        test_size: Fraction held out (float in (0, 1)) or held-out count (int).

    Returns:
        ``(n_fit, n_test)``, both >= 1, summing to ``n``.

    Raises:
        TypeError: ``n`` or ``test_size`` is a bool or not a number; ``n`` is not an int.
        ValueError: A fraction outside (0, 1), a count outside [1, n-1], or a fraction that
            leaves the fit part empty.

    Example:
        >>> split_sizes(10, 0.3), split_sizes(101, 0.3), split_sizes(10, 4)
        ((7, 3), (70, 31), (6, 4))
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"split_sizes: n must be an int number of items, got {n!r}")
    n = int(n)
    if n < 2:
        raise ValueError(
            f"cannot split {n} item(s) into two non-empty parts; it needs at least 2 items"
        )
    if isinstance(test_size, bool) or not isinstance(test_size, numbers.Real):
        raise TypeError(
            f"test_size must be a fraction in (0, 1) or an int count of held-out items, "
            f"not {test_size!r} ({type(test_size).__name__})"
        )
    if isinstance(test_size, numbers.Integral):
        k = int(test_size)
        if not 1 <= k <= n - 1:
            raise ValueError(
                f"test_size={k} held-out items is outside [1, {n - 1}] for {n} items; pass a "
                f"count in that range or a fraction in (0, 1)"
            )
        return n - k, k
    frac = float(test_size)
    if not 0.0 < frac < 1.0:  # also refuses nan and inf
        raise ValueError(
            f"test_size={test_size!r} is a fraction outside (0, 1); pass e.g. 0.5, or an int "
            f"count of held-out items in [1, {n - 1}]"
        )
    k = math.ceil(Fraction(repr(frac)) * n)
    if k >= n:
        raise ValueError(
            f"test_size={test_size!r} of {n} items holds out {k} (rounded up) and leaves no "
            f"fit item; pass a smaller fraction or a count in [1, {n - 1}]"
        )
    return n - k, k


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
            "label", "answer_format"}`` (label 0-3); XQuAD / MLQA ``{"answers", "lang", "id"}``;
            HumanEval ``{"task_id", "test", "entry_point"}``. Not part of the hash.

    Raises:
        TypeError: ``prompt`` or ``answer`` is not a str, or ``meta`` is not a mapping.

    Example:
        >>> ex = Example("Question: 1+1?\\nAnswer:", " 2", {"final": "2"})
        >>> ex.prompt + ex.answer
        'Question: 1+1?\\nAnswer: 2'
    """

    prompt: str
    answer: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        for name in ("prompt", "answer"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(
                    f"Example.{name} must be a str, got {type(value).__name__} {value!r:.60}"
                )
        if not isinstance(self.meta, Mapping):
            raise TypeError(f"Example.meta must be a mapping, got {type(self.meta).__name__}")

    @property
    def text(self) -> str:
        """``prompt + answer``, the full teacher-forced text."""
        return self.prompt + self.answer


def _hash_order(examples: Sequence[Example], seed: int, salt: str) -> list[int]:
    prefix = f"mechunlearn:{salt}:{int(seed)}\0".encode()

    def key(i: int) -> tuple[bytes, int]:
        ex = examples[i]
        digest = hashlib.sha256(prefix + ex.prompt.encode() + b"\0" + ex.answer.encode())
        return digest.digest(), i

    return sorted(range(len(examples)), key=key)


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
            that :meth:`subsample`, :meth:`split` and the format variants add.

    Raises:
        TypeError: An item is not an :class:`Example`, or ``name`` is not a str.
        ValueError: A text holds a lone surrogate (the message names the example's index).

    Example:
        >>> s = Skill.from_texts("toy", ["a", "b", "c"], [" 1", " 2", " 3"])
        >>> len(s), s[0].answer, s[1:].prompts
        (3, ' 1', ['b', 'c'])
    """

    name: str
    examples: list[Example]
    source: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"Skill name must be a str, got {type(self.name).__name__}")
        if isinstance(self.examples, (str, bytes)):
            raise TypeError("Skill examples must be Example objects, not a string")
        self.examples = list(self.examples)
        for i, ex in enumerate(self.examples):
            if not isinstance(ex, Example):
                raise TypeError(
                    f"skill {self.name!r} example {i} is {type(ex).__name__}, not an Example; "
                    "use Skill.from_texts(name, prompts, answers) for plain strings"
                )
            check_text(ex.prompt, f"skill {self.name!r} example {i}: prompt")
            check_text(ex.answer, f"skill {self.name!r} example {i}: answer")

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
            seed: A non-negative int.

        Returns:
            A new Skill with the same name; ``[n=..., seed=...]`` appended to its source.

        Raises:
            TypeError: ``n`` or ``seed`` is a bool, a float or not a number.
            ValueError: If ``n`` is not positive or larger than ``len(self)`` (asking for more
                examples than exist is treated as a mistake, not silently capped), or ``seed``
                is negative.

        Example:
            >>> s = Skill.from_texts("toy", [str(i) for i in range(10)])
            >>> s.subsample(3, seed=1).prompts == s.subsample(5, seed=1).prompts[:3]
            True
        """
        n = check_count(n, "n")
        seed = check_seed(seed)
        if n > len(self):
            raise ValueError(
                f"cannot subsample n={n} from skill {self.name!r}, which has only "
                f"{len(self)} examples; use n<={len(self)} (or n=None in load_skill for all)"
            )
        order = _hash_order(self.examples, seed, salt="subsample")
        return Skill(
            self.name, [self.examples[i] for i in order[:n]], self.with_note(n=n, seed=seed)
        )

    def split(self, test_size: float | int = 0.5, seed: int = 0) -> tuple[Skill, Skill]:
        """Split into disjoint ``(fit, held_out)`` parts, deterministically.

        The sizes follow :func:`split_sizes`, the one rounding rule of mechunlearn: an int
        ``test_size`` is the held-out count; a float is a fraction in (0, 1) and the held-out
        count is ``ceil(test_size * n)`` (rounded up, as scikit-learn does, on the decimal
        value: 0.3 of 101 holds out 31). Examples are ordered by a SHA-256 hash of
        ``(seed, prompt, answer)``; the first ``n_test`` go to ``held_out``. All copies of a
        prompt (a skill may hold one prompt twice, with different answers) go to the same
        part, so no held-out prompt is also a fit prompt: a prompt's copies follow its first
        copy in the hash order, and the held-out part may then hold a few more than
        ``n_test`` examples (whole prompts are added until it has at least ``n_test``). Both
        parts keep the original order of the examples and the skill's name; the part is noted
        in their source (``[fit 100/200, seed=0]``).

        Args:
            test_size: Fraction of examples held out (a float in (0, 1)) or their number
                (an int in [1, n-1]).
            seed: A non-negative int.

        Returns:
            ``(fit, held_out)``, both non-empty.

        Raises:
            TypeError: ``test_size`` is a bool or not a number; ``seed`` is not an int.
            ValueError: Either part would be empty (also when copies of one prompt would fill
                both parts), or ``test_size`` is out of range.

        Example:
            >>> s = Skill.from_texts("toy", [str(i) for i in range(10)])
            >>> fit, held = s.split(0.3, seed=0)
            >>> len(fit), len(held), set(fit.prompts) & set(held.prompts)
            (7, 3, set())
        """
        n = len(self)
        seed = check_seed(seed)
        try:
            n_fit, k = split_sizes(n, test_size)
        except ValueError as err:
            raise ValueError(f"split of skill {self.name!r}: {err}") from None
        # Copies of a prompt (with the same or another answer) go to the same part, so that
        # no held-out prompt was seen in the fit part. Each prompt's copies move together at
        # the rank of its first copy in the hash order; with unique prompts this is exactly
        # the first k examples of the hash order.
        order = _hash_order(self.examples, seed, salt="split")
        copies: dict[str, list[int]] = {}
        for i in order:
            copies.setdefault(self.examples[i].prompt, []).append(i)
        held: list[int] = []
        for group in copies.values():
            if len(held) >= k:
                break
            held += group
        if len(held) >= n:
            raise ValueError(
                f"split of skill {self.name!r}: test_size={test_size!r} holds out every example, "
                "because copies of a prompt stay in one part; pass a smaller test_size or drop "
                "the duplicate prompts"
            )
        k, n_fit = len(held), n - len(held)
        held_set = set(held)
        held = sorted(held)
        fit = [i for i in range(n) if i not in held_set]
        fit_part = Skill(
            self.name,
            [self.examples[i] for i in fit],
            self.with_note(fit=f"{n_fit}/{n}", seed=seed),
        )
        held_part = Skill(
            self.name,
            [self.examples[i] for i in held],
            self.with_note(held_out=f"{k}/{n}", seed=seed),
        )
        return fit_part, held_part

    # -- construction / export ------------------------------------------------------------
    @classmethod
    def from_texts(
        cls, name: str, prompts: Iterable[str], answers: Iterable[str] | None = None
    ) -> Skill:
        """Build a skill from plain strings.

        Args:
            name: The skill's name.
            prompts: The prompts: any iterable of strings (a generator is read once).
            answers: Reference answers, one per prompt; default ``""`` for each.

        Returns:
            A Skill with source ``"texts"``.

        Raises:
            ValueError: If there are no prompts, the lengths differ, or a text holds a lone
                surrogate.
            TypeError: If ``prompts`` or ``answers`` is a single string, or an item is not a
                string (nothing is converted silently: ``[1, None]`` is refused).

        Example:
            >>> Skill.from_texts("french", ["Bonjour", "Merci"])
            Skill(name='french', n=2, source='texts')
            >>> Skill.from_texts("gen", (f"q{i}" for i in range(3))).prompts
            ['q0', 'q1', 'q2']
        """
        prompts = check_texts(prompts, "prompts")
        answers = [""] * len(prompts) if answers is None else check_texts(answers, "answers")
        if len(answers) != len(prompts):
            raise ValueError(
                f"got {len(prompts)} prompts but {len(answers)} answers; give one answer per "
                "prompt, or none"
            )
        if not prompts:
            raise ValueError(f"skill {name!r} would be empty: no prompts given")
        return cls(name, [Example(p, a) for p, a in zip(prompts, answers, strict=True)], "texts")

    def to_jsonl(self, path: str | os.PathLike[str]) -> Path:
        """Write the examples as JSON Lines ``{"prompt", "answer", "meta"}``.

        :func:`~mechunlearn.data.load_skill` reads the file back (with the file's stem as
        name).

        Args:
            path: Output file.

        Returns:
            The path written.

        Example:
            >>> Skill.from_texts("toy", ["a"], ["b"]).to_jsonl("toy.jsonl")
            PosixPath('toy.jsonl')
            >>> Path("toy.jsonl").read_text()
            '{"prompt": "a", "answer": "b", "meta": {}}\\n'
        """
        path = Path(path)
        with path.open("w", encoding="utf-8") as fh:
            for ex in self.examples:
                row = {"prompt": ex.prompt, "answer": ex.answer, "meta": dict(ex.meta)}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        return path

    def with_note(self, **items: Any) -> str:
        """This skill's source with ``[k=v, ...]`` appended (``n`` and ``seed`` as ``k=v``,
        other items as ``k v``), as :meth:`subsample` and :meth:`split` record themselves.

        Example:
            >>> Skill.from_texts("toy", ["a"]).with_note(variant="chat", seed=0)
            'texts [variant chat, seed=0]'
        """
        note = ", ".join(f"{k}={v}" if k in ("n", "seed") else f"{k} {v}" for k, v in items.items())
        return f"{self.source} [{note}]" if self.source else f"[{note}]"


def special_token_flags(skill: Skill) -> list[bool]:
    """Per example, whether its text holds real special tokens (chat-formatted prompts, marked
    ``meta["special_tokens"]`` by :mod:`mechunlearn.data.variants`; see
    :func:`mechunlearn.batching.tokenize_examples`). Every path that tokenises a Skill passes
    these flags, so a chat-formatted skill is tokenised the same way when it is collected,
    fitted on, detected and scored."""
    return [bool(ex.meta.get("special_tokens", False)) for ex in skill]
