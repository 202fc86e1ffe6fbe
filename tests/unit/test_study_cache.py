"""analysis/study_cache.py: a study's results are computed once and read back on a rerun."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mechunlearn import NeuronAdjust, NeuronStats, Skill, collect

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "analysis"))
from study_cache import cached_evaluate, load_or_make  # noqa: E402

PROMPTS = ["Q: 1+1?\nA:", "def f(x):", "The cat sat on the", "abc"]
ANSWERS = [" 2", "\n    return x", " mat.", "defg"]


@pytest.fixture(scope="module")
def skills():
    return {
        "forget": Skill.from_texts("forget", PROMPTS[:2], ANSWERS[:2]),
        "retain": Skill.from_texts("retain", PROMPTS[2:], ANSWERS[2:]),
    }


def test_load_or_make_computes_once_and_recomputes_a_damaged_file(tiny_llama, skills, tmp_path):
    path, calls = tmp_path / "stats" / "forget.safetensors", []

    def make():
        calls.append(1)
        return collect(tiny_llama, skills["forget"], quiet=True)

    first = load_or_make(path, NeuronStats, make)
    again = load_or_make(path, NeuronStats, make)
    assert len(calls) == 1 and (again.mean == first.mean).all()
    path.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="is damaged"):
        load_or_make(path, NeuronStats, make)
    assert len(calls) == 2


def test_cached_evaluate_reads_back_and_rescores_a_missing_method(tiny_llama, skills, tmp_path):
    stats = {n: collect(tiny_llama, s, quiet=True) for n, s in skills.items()}
    na = NeuronAdjust(ratio=0.1).fit(stats["forget"], stats["retain"])
    path, calls = tmp_path / "chunks" / "na.csv", []

    def grid(names=("NA",)):
        calls.append(names)
        return {name: na for name in names}

    first = cached_evaluate(path, tiny_llama, skills, grid, quiet=True)
    assert path.with_suffix(".json").exists()
    again = cached_evaluate(path, tiny_llama, skills, grid, methods=["NA"], quiet=True)
    assert len(calls) == 1
    assert again[["method", "skill", "score"]].equals(first[["method", "skill", "score"]])
    both = cached_evaluate(
        path, tiny_llama, skills, lambda: grid(("NA", "NA again")), methods=["NA again"], quiet=True
    )
    assert len(calls) == 2 and set(both["method"]) == {"base", "NA", "NA again"}
    # A dict's keys name the methods; a damaged file is scored again.
    cached_evaluate(path, tiny_llama, skills, grid, methods={"NA": na}, quiet=True)
    assert len(calls) == 2
    path.write_text("")
    cached_evaluate(path, tiny_llama, skills, grid, methods={"NA": na}, quiet=True)
    assert len(calls) == 3
