"""Tests for mechunlearn.data.files: user files as skills, and errors that name file and line."""

from __future__ import annotations

import csv
import gzip
import json
import re
from pathlib import Path

import pytest

from mechunlearn.data import DataFileError, Example, load_file, load_skill
from mechunlearn.data.files import iter_csv_rows, iter_json_list, iter_jsonl, read_json


def raises_at(path: Path, line: int | None, pattern: str, fn, *args):
    """Assert ``fn(*args)`` raises a one-line DataFileError at ``path:line`` matching pattern."""
    where = f"{path}:{line}: " if line is not None else f"{path}: "
    with pytest.raises(DataFileError, match=re.escape(where) + pattern) as err:
        fn(*args)
    assert "\n" not in str(err.value), str(err.value)
    assert err.value.path == path and err.value.line == line
    return err.value


def test_jsonl_and_csv_paths(tmp_path: Path) -> None:  # moved from test_data.py
    jl = tmp_path / "qa.jsonl"
    rows = [{"question": "Q1", "answer": " A1", "id": 1}, {"question": "Q2", "answer": 7}]
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    skill = load_skill(str(jl))
    assert skill.name == "qa" and skill.prompts == ["Q1", "Q2"] and skill.answers == [" A1", "7"]
    assert skill[0].meta == {"id": 1}
    cs = tmp_path / "texts.csv"
    with cs.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows([["hello, world", "x"], ["line\nbreak", "y"]])
    skill = load_skill(cs)
    assert skill.prompts == ["hello, world", "line\nbreak"] and skill.answers == ["", ""]
    assert skill[1].meta == {"label": "y"}
    pa = tmp_path / "pa.json"
    pa.write_text(json.dumps([{"prompt": "P", "answer": " A"}]))
    assert load_skill(pa).examples == [Example("P", " A")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"input": "x"}) + "\n")
    with pytest.raises(ValueError, match="none of the fields 'prompt', 'question', 'text'"):
        load_skill(bad)
    with pytest.raises(FileNotFoundError):
        load_skill(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="split= does not apply to a file or texts"):
        load_skill(pa, split="test")
    with pytest.raises(ValueError, match="subjects= does not apply to a file or texts"):
        load_skill(pa, subjects=["anatomy"])


def test_file_names_gz_and_renaming(tmp_path: Path) -> None:
    gz = tmp_path / "zipped.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"text": "Bonjour"}) + "\n")
    skill = load_skill(gz)
    assert skill.name == "zipped" and skill.prompts == ["Bonjour"] and skill.answers == [""]
    assert load_skill(gz, name="french").name == "french"
    assert load_file(gz, name="fr").name == "fr"
    meta = tmp_path / "m.jsonl"
    meta.write_text(json.dumps({"prompt": "p", "answer": "a", "meta": {"k": 1}, "x": 2}) + "\n")
    assert load_skill(meta)[0].meta == {"x": 2, "k": 1}


# ---------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------


def test_csv_unclosed_quote_is_refused_not_merged(tmp_path: Path) -> None:
    f = tmp_path / "q.csv"
    # Two rows meant; the first quote is never closed where it should be. A lenient parser
    # returns one example ('a,b\nc"', 'd').
    f.write_text('prompt,answer\n"a,b\n"c",d\n', encoding="utf-8")
    err = raises_at(
        f,
        2,
        r"malformed CSV row \(',' expected after '\"'; it runs to line 3\): "
        r"an unclosed or stray quote\? Quote fields",
        load_skill,
        f,
    )
    assert "double the quotes inside them" in str(err)
    never = tmp_path / "never.csv"
    never.write_text('prompt,answer\nx,y\n"a,b\nc,d\ne,f\n', encoding="utf-8")
    raises_at(
        never,
        3,
        r"malformed CSV row \(unexpected end of data; it runs to line 5\)",
        load_skill,
        never,
    )
    stray = tmp_path / "stray.csv"
    stray.write_text('prompt,answer\n"a" b,c\n', encoding="utf-8")
    raises_at(stray, 2, r"malformed CSV row", load_skill, stray)


def test_csv_field_counts_and_header(tmp_path: Path) -> None:
    extra = tmp_path / "extra.csv"
    extra.write_text("prompt,answer\nfine,ok\na,b,c\n", encoding="utf-8")
    raises_at(
        extra,
        3,
        r"3 fields, but the header has 2 \(prompt, answer\); quote fields that "
        "hold commas",
        load_skill,
        extra,
    )
    short = tmp_path / "short.csv"
    short.write_text("prompt,answer,id\na,b\n", encoding="utf-8")
    raises_at(short, 2, r"2 fields, but the header has 3", load_skill, short)
    dup = tmp_path / "dup.csv"
    dup.write_text("prompt,prompt\na,b\n", encoding="utf-8")
    raises_at(dup, 1, r"column 'prompt' appears twice in the header", load_skill, dup)
    blank = tmp_path / "blank.csv"
    blank.write_text("prompt,\na,b\n", encoding="utf-8")
    raises_at(blank, 1, r"column 2 of the header has no name; name it", load_skill, blank)


def test_csv_line_numbers_count_multiline_fields(tmp_path: Path) -> None:
    f = tmp_path / "m.csv"
    f.write_text('h1,h2\n"a\nb",x\n\nc,d\n', encoding="utf-8")
    assert list(iter_csv_rows(f)) == [(1, ["h1", "h2"]), (2, ["a\nb", "x"]), (5, ["c", "d"])]


def test_latin1_file_names_line_and_byte(tmp_path: Path) -> None:
    f = tmp_path / "latin.csv"
    f.write_bytes("prompt,answer\nok,fine\ncaf\u00e9,x\n".encode("latin-1"))
    raises_at(
        f,
        3,
        r"byte 0xe9 at column 4 is not UTF-8 \(a latin-1 or cp1252 file\?\); "
        r"re-save the file as UTF-8",
        load_skill,
        f,
    )
    jl = tmp_path / "latin.jsonl"
    jl.write_bytes(b'{"text": "ok"}\n{"text": "na\xefve"}\n')
    raises_at(jl, 2, r"byte 0xef at column 13 is not UTF-8", load_skill, jl)


# ---------------------------------------------------------------------------------------------
# JSON Lines and JSON
# ---------------------------------------------------------------------------------------------


def test_broken_jsonl_line(tmp_path: Path) -> None:
    f = tmp_path / "b.jsonl"
    f.write_text('{"prompt": "a"}\n\n{"prompt": "b"\n{"prompt": "c"}\n', encoding="utf-8")
    raises_at(
        f,
        3,
        r"not valid JSON \(Expecting ',' delimiter, column 15\); fix or remove "
        "this line",
        load_skill,
        f,
    )
    pretty = tmp_path / "pretty.jsonl"
    pretty.write_text('{\n  "prompt": "a"\n}\n', encoding="utf-8")
    err = raises_at(pretty, 1, r"not valid JSON", load_skill, pretty)
    assert "one whole JSON object per line" in str(err)


def test_cut_off_and_malformed_json(tmp_path: Path) -> None:
    cut = tmp_path / "cut.json"
    cut.write_text('[\n  {"prompt": "a"},\n  {"prompt": "b", "ans', encoding="utf-8")
    raises_at(
        cut,
        3,
        r"the JSON ends early \(Unterminated string starting at\); the file is cut off: "
        r"copy or download it again",
        load_skill,
        cut,
    )
    cut2 = tmp_path / "cut2.json"
    cut2.write_text('[{"prompt": "a"},\n{"prompt": "b"}\n', encoding="utf-8")
    raises_at(cut2, 3, r"the JSON ends early \(no closing '\]'\)", load_skill, cut2)
    obj = tmp_path / "obj.json"
    obj.write_text('{"prompt": "a"}', encoding="utf-8")
    raises_at(obj, 1, r"the file holds a JSON dict, not a list of records", load_skill, obj)
    sep = tmp_path / "sep.json"
    sep.write_text('[{"prompt": "a"}\n {"prompt": "b"}]', encoding="utf-8")
    raises_at(sep, 2, r"expected ',' or '\]' between records, found '\{'", load_skill, sep)
    doc = tmp_path / "doc.json"
    doc.write_text('{"a": [1, 2,\n  3,, 4]}', encoding="utf-8")
    raises_at(doc, 2, r"not valid JSON \(Expecting value, column 5\)", read_json, doc)
    lst = tmp_path / "lines.json"
    lst.write_text('[\n {"prompt": "a"},\n\n {"prompt": "b"}\n]\n', encoding="utf-8")
    assert [line for line, _ in iter_json_list(lst)] == [2, 4]
    assert list(iter_json_list(tmp_path / "lines.json"))[1][1] == {"prompt": "b"}


def test_bad_records_name_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "r.jsonl"
    f.write_text('{"prompt": "a"}\n[1, 2]\n', encoding="utf-8")
    raises_at(f, 2, r"the record is a JSON list, not an object", load_skill, f)
    f.write_text('{"prompt": "a"}\n{"prompt": 3}\n', encoding="utf-8")
    raises_at(f, 2, r"'prompt' must be a string, got int 3", load_skill, f)
    f.write_text('{"prompt": "a", "answer": ["x"]}\n', encoding="utf-8")
    raises_at(f, 1, r"'answer' must be a string or a number, got list", load_skill, f)
    f.write_text('{"prompt": "a"}\n{"text": "\\ud800 b"}\n', encoding="utf-8")
    raises_at(f, 2, r"'text' has a lone surrogate '\\ud800' at character 0", load_skill, f)
    j = tmp_path / "r.json"
    j.write_text('[\n  {"prompt": "a"},\n  {"input": "b"}\n]', encoding="utf-8")
    raises_at(
        j,
        3,
        r"the record has none of the fields 'prompt', 'question', 'text' \(it has "
        r"input\); add one",
        load_skill,
        j,
    )
    c = tmp_path / "r.csv"
    c.write_text("input,x\na,b\n", encoding="utf-8")
    raises_at(c, 2, r"the record has none of the fields", load_skill, c)
    e = tmp_path / "e.csv"
    e.write_text("prompt,answer\n", encoding="utf-8")
    raises_at(e, None, r"the skill file has no examples; add records", load_skill, e)


def test_iter_jsonl_skips_blank_lines_and_numbers_lines(tmp_path: Path) -> None:
    f = tmp_path / "a.jsonl"
    f.write_text('\n{"a": 1}\n  \n{"a": 2}\r\n', encoding="utf-8")
    assert list(iter_jsonl(f)) == [(2, {"a": 1}), (4, {"a": 2})]
