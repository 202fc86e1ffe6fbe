"""The mechunlearn command's one-line errors (no model needed)."""

from __future__ import annotations

import json

import pytest

from mechunlearn.cli import MARKER, main


def test_foreign_output_folder_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    assert main(["run", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a mechunlearn report" in err and "--force" in err
    assert "Traceback" not in err
    assert (out / "thesis.tex").read_text() == "precious"


def test_report_with_other_settings_needs_force(tmp_path, capsys):
    out = tmp_path / "rep"
    out.mkdir()
    (out / MARKER).write_text(json.dumps({"settings": {"forget": "gsm8k"}}))
    (out / "x").write_text("")
    assert main(["collect", "--out", str(out), "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "--force" in err


def test_unknown_skill_is_one_line(tmp_path, capsys):
    assert main(["collect", "--forget", "gsm9k", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("mechunlearn: error:") and "gsm9k" in last and "gsm8k" in last


def test_too_small_n(tmp_path, capsys):
    assert main(["run", "--n", "2", "--out", str(tmp_path / "r")]) == 2
    assert "--n must be at least 4" in capsys.readouterr().err


def test_help_lists_the_stages(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for stage in ("run", "collect", "analyze", "unlearn", "evaluate"):
        assert stage in out
