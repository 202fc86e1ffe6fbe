"""analysis/unlearning_study.py: run folders per method subset, and merging their tables."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "analysis"))
from unlearning_study import (  # noqa: E402
    METHODS,
    merge_sweeps,
    run_folder_name,
    summary_markdown,
)


def sweep(seed: int, methods: list[str], base: float = 0.5) -> pd.DataFrame:
    rows = []
    for skill, role in [("gsm8k", "forget"), ("mbpp", "retain")]:
        rows.append(dict(task="gsm8k-vs-mbpp", seed=seed, method="base", skill=skill,
                         role=role, score=base, relative=1.0, relative_low=1.0,
                         relative_high=1.0))  # fmt: skip
        for m in methods:
            rel = 0.5 + seed / 10
            rows.append(dict(task="gsm8k-vs-mbpp", seed=seed, method=m, skill=skill, role=role,
                             score=base * rel, relative=rel, relative_low=rel - 0.05,
                             relative_high=rel + 0.05))  # fmt: skip
    for row in rows:
        row.update(n=4, score_low=0.0, score_high=1.0, chance=0.0)
    return pd.DataFrame(rows)


def test_folder_names_tell_subsets_apart():
    assert run_folder_name(0, list(METHODS)) == "seed0"
    assert run_folder_name(0, list(reversed(METHODS))) == "seed0"
    assert run_folder_name(2, ["SP", "NA"]) == "seed2-NA-SP"
    assert run_folder_name(2, ["LUNAR", "SIMU"]) != run_folder_name(2, ["NA", "SP"])


def test_merge_keeps_base_once_and_every_method():
    merged = merge_sweeps(
        [sweep(1, ["NA ratio=0.03"]), sweep(0, ["LUNAR auto"]), sweep(0, ["NA ratio=0.03"])]
    )
    seed0 = merged[merged["seed"] == 0]
    assert (seed0["method"] == "base").sum() == 2  # one row per skill, not per folder
    assert set(seed0["method"]) == {"base", "LUNAR auto", "NA ratio=0.03"}
    assert merged["seed"].tolist() == sorted(merged["seed"])


def test_summary_rows_in_family_order_with_each_methods_own_first_seed():
    merged = merge_sweeps(
        [sweep(0, ["LUNAR auto"]), sweep(1, ["NA ratio=0.03"]), sweep(2, ["NA ratio=0.03"])]
    )
    lines = summary_markdown(merged).splitlines()
    rows = [line for line in lines if line.startswith("| ") and "method" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| NA ratio=0.03", "| LUNAR auto"]
    # NA: mean and sd of seeds 1 and 2 (0.6, 0.7), the interval of seed 1, two of three seeds.
    assert "| 0.65 ± 0.07 [0.55, 0.65] (2 seeds) |" in rows[0]
    assert "| 0.50 [0.45, 0.55] (1 seed) |" in rows[1]


def test_merge_rejects_disagreeing_base_scores():
    with pytest.raises(SystemExit, match="disagree on the base score"):
        merge_sweeps([sweep(0, ["LUNAR auto"]), sweep(0, ["NA ratio=0.03"], base=0.6)])


def test_merge_rejects_a_method_scored_twice():
    with pytest.raises(SystemExit, match="scored in two run folders"):
        merge_sweeps([sweep(0, ["NA ratio=0.03"]), sweep(0, ["NA ratio=0.03"])])


def test_summary_adds_the_fluency_columns_where_cells_have_them():
    merged = merge_sweeps([sweep(0, ["NA ratio=0.03", "LUNAR auto"]), sweep(1, ["NA ratio=0.03"])])
    fluency = pd.DataFrame(
        [dict(task="gsm8k-vs-mbpp", seed=s, method=m, perplexity_ratio=r, repeated_ngrams_diff=d)
         for s, m, r, d in [(0, "base", 1.0, 0.0), (0, "NA ratio=0.03", 1.2, 0.1),
                            (1, "NA ratio=0.03", 1.4, 0.3)]]
    )  # fmt: skip
    lines = summary_markdown(merged, fluency).splitlines()
    header = next(line for line in lines if line.startswith("| method"))
    assert header.endswith("| fluency: perplexity ratio | repeated 3-grams (change) |")
    na = next(line for line in lines if line.startswith("| NA ratio=0.03"))
    assert na.endswith("| 1.30 ± 0.14 | 0.20 ± 0.14 |")  # mean ± sd over seeds 0 and 1
    lunar = next(line for line in lines if line.startswith("| LUNAR auto"))
    assert lunar.endswith("| — | — |")  # no cell scored its fluency
    assert "fluency" not in summary_markdown(merged)


def test_simu_frontier_labels_its_learning_rates_and_keeps_the_registered_one_as_before():
    from argparse import Namespace

    from unlearning_study import SIMU_LR, grid, simu_params

    args = Namespace(methods=["SIMU"], na_ratios=[0.01], simu_lrs=[SIMU_LR, 0.2])
    cells = grid(args, 30)
    assert cells["SIMU"] == {"method": "SIMU", **simu_params(30)}  # the folders' config as before
    assert cells["SIMU lr=0.2"] == {"method": "SIMU", **simu_params(30), "lr": 0.2}
