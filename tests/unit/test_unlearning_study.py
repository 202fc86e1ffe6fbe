"""analysis/unlearning_study.py: run folders per method subset, and merging their tables."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "analysis"))
from unlearning_study import METHODS, merge_sweeps, run_folder_name  # noqa: E402


def sweep(seed: int, methods: list[str], base: float = 0.5) -> pd.DataFrame:
    rows = []
    for skill, role in [("gsm8k", "forget"), ("mbpp", "retain")]:
        rows.append(dict(task="gsm8k-vs-mbpp", seed=seed, method="base", skill=skill, role=role,
                         score=base, relative=1.0))  # fmt: skip
        for m in methods:
            rows.append(dict(task="gsm8k-vs-mbpp", seed=seed, method=m, skill=skill, role=role,
                             score=base / 2, relative=0.5))  # fmt: skip
    return pd.DataFrame(rows)


def test_folder_names_tell_subsets_apart():
    assert run_folder_name(0, list(METHODS)) == "seed0"
    assert run_folder_name(0, list(reversed(METHODS))) == "seed0"
    assert run_folder_name(2, ["SP", "NA"]) == "seed2-NA-SP"
    assert run_folder_name(2, ["LUNAR", "SIMU"]) != run_folder_name(2, ["NA", "SP"])


def test_merge_keeps_base_once_and_every_method():
    merged = merge_sweeps([sweep(0, ["LUNAR auto"]), sweep(0, ["NA ratio=0.03"]), sweep(1, ["NA"])])
    seed0 = merged[merged["seed"] == 0]
    assert (seed0["method"] == "base").sum() == 2  # one row per skill, not per folder
    assert set(seed0["method"]) == {"base", "LUNAR auto", "NA ratio=0.03"}
    assert merged["seed"].tolist() == sorted(merged["seed"])


def test_merge_rejects_disagreeing_base_scores():
    with pytest.raises(SystemExit, match="disagree on the base score"):
        merge_sweeps([sweep(0, ["LUNAR auto"]), sweep(0, ["NA ratio=0.03"], base=0.6)])


def test_merge_rejects_a_method_scored_twice():
    with pytest.raises(SystemExit, match="scored in two run folders"):
        merge_sweeps([sweep(0, ["NA ratio=0.03"]), sweep(0, ["NA ratio=0.03"])])
