"""Reading local data files (JSON Lines, JSON, CSV) with errors that name the file and the line.

Every reader here decodes UTF-8 strictly (a latin-1 file is refused at the first bad byte, with
its line), parses strictly (a CSV row with an unclosed or stray quote is refused instead of
being merged with the rows after it; a CSV row with more or fewer fields than the header is
refused) and raises :class:`DataFileError`, a ``ValueError`` whose one-line message reads
``<file>:<line>: <what is wrong>; <what to do>``. Line numbers are 1-based and point at the
line where the record starts.

:func:`load_file` turns a user's file into a :class:`~mechunlearn.data.skill.Skill`; the
benchmark sources read their files through the same readers.

Example:
    >>> _ = Path("my_prompts.jsonl").write_text(
    ...     '{"prompt": "2+2=", "answer": "4"}\\n{"prompt": "3+3=", "answer": 6}\\n')
    >>> skill = load_file("my_prompts.jsonl")
    >>> skill, skill.answers
    (Skill(name='my_prompts', n=2, source='local:my_prompts.jsonl'), ['4', '6'])
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .skill import Example, Skill, check_text

__all__ = [
    "DataFileError",
    "iter_csv_records",
    "iter_csv_rows",
    "iter_json_list",
    "iter_jsonl",
    "load_file",
    "read_json",
    "read_text",
]

#: File endings :func:`load_file` reads.
FILE_SUFFIXES: tuple[str, ...] = (".jsonl", ".jsonl.gz", ".json", ".csv")


class DataFileError(ValueError):
    """A data file that cannot be read as it should; the message names the file and line.

    Attributes:
        path: The file.
        line: The 1-based line (None when the problem is not on one line).

    Example:
        >>> str(DataFileError("a.jsonl", 3, "not valid JSON; fix the line"))
        'a.jsonl:3: not valid JSON; fix the line'
    """

    def __init__(self, path: str | Path, line: int | None, problem: str) -> None:
        self.path = Path(path)
        self.line = line
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {problem}")


class _NonStandardConstant(ValueError):
    """``NaN``, ``Infinity`` or ``-Infinity`` in a JSON text (Python's json accepts them)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _refuse_constant(name: str) -> Any:
    raise _NonStandardConstant(name)


def _constant_problem(name: str) -> str:
    return (
        f"the value {name} is not standard JSON (it would become the text "
        f"{str(float(name)).lower()!r}); write it as a quoted string, or fix or remove the record"
    )


def read_text(path: str | Path) -> str:
    """The whole file as text: UTF-8 (a BOM is dropped), gunzipped if it ends in ``.gz``.

    Universal newlines are **not** applied, so CSV quoting sees the file as written.

    Raises:
        DataFileError: The bytes are not UTF-8 (the message gives the line and the byte), the
            text holds a NUL byte (a binary or UTF-16 file), or a ``.gz`` file is truncated or
            not gzip.

    Example:
        >>> read_text(Path(data_dir) / "gsm8k" / "test.jsonl")[:11]
        '{"question"'
    """
    path = Path(path)
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (EOFError, gzip.BadGzipFile, zlib.error) as err:
            raise DataFileError(
                path,
                None,
                f"not a complete gzip file ({type(err).__name__}: {err}); it is cut off or not "
                "compressed: download or copy it again (check it with `gzip -t`), or drop the "
                ".gz ending if it is plain text",
            ) from None
    nul = raw.find(b"\x00")
    if nul >= 0:
        line = raw[:nul].count(b"\n") + 1
        column = nul - (raw.rfind(b"\n", 0, nul) + 1) + 1
        raise DataFileError(
            path,
            line,
            f"a NUL byte at column {column}: this is not a UTF-8 text file (binary, UTF-16, or "
            "damaged); re-save it as UTF-8 text, or remove the NUL bytes",
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataFileError(
            path,
            line,
            f"byte 0x{raw[err.start]:02x} at column {column} is not UTF-8 (a latin-1 or cp1252 "
            "file?); re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`",
        ) from None


def _json_problem(err: json.JSONDecodeError, what: str) -> str:
    return f"not valid JSON ({err.msg}, column {err.colno}); fix or remove this {what}"


def _cut_off(err: json.JSONDecodeError, text: str) -> bool:
    """Whether the parser ran out of text (an unterminated string runs to the end too)."""
    return err.pos >= len(text.rstrip()) or err.msg.startswith("Unterminated string")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(line, record)`` for each non-blank line of a JSON Lines file (``.gz`` too).

    Raises:
        DataFileError: A line that is not valid JSON, or bytes that are not UTF-8.

    Example:
        >>> next(iter_jsonl(Path(data_dir) / "gsm8k" / "test.jsonl"))[0]
        1
    """
    text = read_text(path)
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line, parse_constant=_refuse_constant)
        except _NonStandardConstant as err:
            raise DataFileError(path, i, _constant_problem(err.name)) from None
        except json.JSONDecodeError as err:
            problem = _json_problem(err, "line")
            if line.strip() in ("[", "{") or line.lstrip().startswith("["):
                problem += " (a .jsonl file holds one whole JSON object per line)"
            raise DataFileError(path, i, problem) from None


def read_json(path: str | Path) -> Any:
    """The parsed content of a JSON file.

    Raises:
        DataFileError: Invalid or cut-off JSON (with the line where the parser stopped).

    Example:
        >>> read_json(Path(data_dir) / "xquad" / "xquad.en.json")["version"]
        '1.1'
    """
    text = read_text(path)
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except _NonStandardConstant as err:
        raise DataFileError(path, None, _constant_problem(err.name)) from None
    except json.JSONDecodeError as err:
        problem = (
            f"the JSON ends early ({err.msg}); the file is cut off: copy or download it again"
            if _cut_off(err, text)
            else _json_problem(err, "spot")
        )
        raise DataFileError(path, err.lineno, problem) from None


def iter_json_list(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(line, element)`` for each element of a JSON file that holds one top-level list.

    The line is where the element starts, so later errors about a record can name it.

    Raises:
        DataFileError: Invalid or cut-off JSON, or a top level that is not a list.

    Example:
        >>> _ = Path("records.json").write_text('[\\n  {"prompt": "a"},\\n  {"prompt": "b"}\\n]\\n')
        >>> [line for line, _ in iter_json_list("records.json")]
        [2, 3]
    """
    text = read_text(path)
    decoder = json.JSONDecoder(parse_constant=_refuse_constant)

    def fail(pos: int, problem: str) -> DataFileError:
        return DataFileError(path, text.count("\n", 0, pos) + 1, problem)

    def skip_ws(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    def decode(pos: int) -> tuple[Any, int]:
        try:
            return decoder.raw_decode(text, pos)
        except _NonStandardConstant as err:
            raise fail(pos, _constant_problem(err.name)) from None
        except json.JSONDecodeError as err:
            if _cut_off(err, text):
                raise fail(
                    err.pos,
                    f"the JSON ends early ({err.msg}); the file is cut off: "
                    "copy or download it again",
                ) from None
            raise fail(err.pos, _json_problem(err, "spot")) from None

    pos = skip_ws(0)
    if pos >= len(text):
        return
    if text[pos] != "[":
        value, _ = decode(pos)
        raise fail(
            pos,
            f"the file holds a JSON {type(value).__name__}, not a list of records; write "
            '[{"prompt": ..., "answer": ...}, ...] or use a .jsonl file',
        )
    pos = skip_ws(pos + 1)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        start = pos
        value, pos = decode(pos)
        yield text.count("\n", 0, start) + 1, value
        pos = skip_ws(pos)
        if pos >= len(text):
            raise fail(pos, "the JSON ends early (no closing ']'); the file is cut off")
        if text[pos] == "]":
            rest = skip_ws(pos + 1)
            if rest < len(text):
                raise fail(rest, "extra data after the closing ']'; remove it")
            return
        if text[pos] != ",":
            raise fail(pos, f"expected ',' or ']' between records, found {text[pos]!r}")
        pos = skip_ws(pos + 1)


def iter_csv_rows(path: str | Path) -> Iterator[tuple[int, list[str]]]:
    """``(line, fields)`` for each non-empty row of a CSV file, parsed strictly.

    A quoted field may span lines (the line given is where its row starts), but an unclosed
    quote, or a quote followed by anything other than a comma or the end of the line, is an
    error rather than a row silently merged with the next ones.

    Raises:
        DataFileError: Malformed quoting, or bytes that are not UTF-8.

    Example:
        >>> next(iter_csv_rows(Path(data_dir) / "mmlu" / "dev" / "anatomy_dev.csv"))[1][0]
        'question'
    """
    reader = csv.reader(io.StringIO(read_text(path), newline=""), strict=True)
    end = 0
    while True:
        start = end + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise DataFileError(
                path,
                start,
                f"malformed CSV row ({err}; it runs to line {reader.line_num}): an unclosed or "
                'stray quote? Quote fields that hold commas, quotes or line breaks ("..."), '
                'and double the quotes inside them ("")',
            ) from None
        end = reader.line_num
        if row and any(f.strip() for f in row):
            yield start, row


def iter_csv_records(path: str | Path) -> tuple[list[str], Iterator[tuple[int, dict[str, str]]]]:
    """The header and ``(line, {column: value})`` rows of a CSV file with a header line.

    Raises:
        DataFileError: An empty or duplicated column name, a row whose number of fields
            differs from the header's, or anything :func:`iter_csv_rows` refuses.

    Example:
        >>> _ = Path("texts.csv").write_text("text,topic\\nhello,greeting\\nbye,farewell\\n")
        >>> header, rows = iter_csv_records("texts.csv")
        >>> header, next(rows)
        (['text', 'topic'], (2, {'text': 'hello', 'topic': 'greeting'}))
    """
    rows = iter_csv_rows(path)
    first = next(rows, None)
    if first is None:
        return [], iter(())
    line0, header = first
    header = [h.strip() for h in header]
    for j, h in enumerate(header):
        if not h:
            raise DataFileError(path, line0, f"column {j + 1} of the header has no name; name it")
        if h in header[:j]:
            raise DataFileError(path, line0, f"column {h!r} appears twice in the header")

    def records() -> Iterator[tuple[int, dict[str, str]]]:
        for line, row in rows:
            if len(row) != len(header):
                raise DataFileError(
                    path,
                    line,
                    f"{len(row)} fields, but the header has {len(header)} "
                    f"({', '.join(header)}); quote fields that hold commas",
                )
            yield line, dict(zip(header, row, strict=True))

    return header, records()


# --------------------------------------------------------------------------------------------
# A user's file as a Skill
# --------------------------------------------------------------------------------------------


def skill_name_of(path: str | Path) -> str:
    """The skill name for a file: its name without a known data suffix.

    Example:
        >>> skill_name_of("/tmp/qa.jsonl.gz")
        'qa'
    """
    name = Path(path).name
    for suffix in FILE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_file(path: str | Path, name: str | None = None) -> Skill:
    """Read a skill from a ``.jsonl`` (or ``.jsonl.gz``), ``.json`` or ``.csv`` file.

    Records have ``prompt`` and optional ``answer``, or ``question`` and optional ``answer``,
    or ``text`` (taken verbatim); other fields, and the fields of a ``meta`` object, go to
    :attr:`Example.meta`. A ``.json`` file holds one list of such objects; a ``.csv`` file has
    a header line. An ``answer`` that is a number is written as text (``7`` -> ``"7"``); any
    other non-string value is refused.

    Args:
        path: The file.
        name: The skill's name; default the file name without its suffix.

    Returns:
        The skill, with source ``"local:<path>"``.

    Raises:
        FileNotFoundError: No such file.
        DataFileError: A malformed file or record (the message names the file and line).

    Example:
        >>> _ = Path("prompts.jsonl").write_text('{"prompt": "2+2=", "answer": 4}\\n')
        >>> load_file("prompts.jsonl").name
        'prompts'
        >>> _ = Path("texts.csv").write_text("text\\nhello\\nbye\\n")   # texts taken verbatim
        >>> load_file("texts.csv").prompts
        ['hello', 'bye']
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no such skill file: {path}")
    low = path.name.lower()
    records: Iterator[tuple[int, Any]]
    if low.endswith(".csv"):
        _, records = iter_csv_records(path)
    elif low.endswith(".json"):
        records = iter_json_list(path)
    else:
        records = iter_jsonl(path)
    examples = [_row_example(row, path, line) for line, row in records]
    if not examples:
        raise DataFileError(path, None, "the skill file has no examples; add records")
    return Skill(skill_name_of(path) if name is None else name, examples, f"local:{path}")


def _row_example(row: Any, path: Path, line: int) -> Example:
    if not isinstance(row, Mapping):
        raise DataFileError(
            path,
            line,
            f"the record is a JSON {type(row).__name__}, not an object; write "
            '{"prompt": ..., "answer": ...}',
        )
    pkey = next((k for k in ("prompt", "question", "text") if k in row), None)
    if pkey is None:
        raise DataFileError(
            path,
            line,
            f"the record has none of the fields 'prompt', 'question', 'text' "
            f"(it has {', '.join(map(str, row)) or 'no fields'}); add one",
        )
    akey = None if pkey == "text" else "answer"
    prompt = row[pkey]
    answer = row.get(akey) if akey else None
    if not isinstance(prompt, str):
        raise DataFileError(
            path, line, f"{pkey!r} must be a string, got {type(prompt).__name__} {prompt!r:.40}"
        )
    if answer is None:
        answer = ""
    elif isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    elif not isinstance(answer, str):
        raise DataFileError(
            path,
            line,
            f"'answer' must be a string or a number, got {type(answer).__name__} {answer!r:.40}",
        )
    try:
        check_text(prompt, repr(pkey))
        check_text(answer, "'answer'")
    except ValueError as err:
        raise DataFileError(path, line, str(err)) from None
    meta: dict[str, Any] = {k: v for k, v in row.items() if k not in (pkey, akey, "meta")}
    if isinstance(row.get("meta"), Mapping):
        meta.update(row["meta"])
    return Example(prompt, answer, meta)
