"""analysis/format_study.py's verdict against issue #26 item 6's goal (robust.csv, robust.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "analysis"))
import format_study  # noqa: E402


def table(rates: dict[str, dict[str, dict[str, float]]]) -> pd.DataFrame:
    """detection.csv's rows from {detector: {variant: {skill: rate}}} (n = 10 per cell)."""
    rows = []
    for det, by_variant in rates.items():
        for variant, by_skill in by_variant.items():
            for skill, rate in by_skill.items():
                low, high = format_study.wilson_interval(round(rate * 10), 10)
                rows.append({
                    "detector": det, "skill": skill, "variant": variant, "rate": rate,
                    "low": low, "high": high, "n": 10, "fitted_on_this_format": variant == "a",
                    "pool": "mean", "layers": "all", "fit": "one", "fpr_setting": None,
                })  # fmt: skip
    return pd.DataFrame(rows)


def test_robustness_takes_the_worst_control_and_the_goal_needs_every_wrapper():
    t = table({
        "good": {"a": {"gsm8k": 0.9, "x": 0.0, "y": 0.0}, "b": {"gsm8k": 0.8, "x": 0.0}},
        "leaky": {"a": {"gsm8k": 1.0, "x": 0.1, "y": 0.3}, "b": {"gsm8k": 1.0, "x": 0.0}},
        "blind": {"a": {"gsm8k": 0.9, "x": 0.0, "y": 0.0}, "b": {"gsm8k": 0.7}},
    })  # fmt: skip
    robust = format_study.robustness(t)
    leaky = robust[(robust["detector"] == "leaky") & (robust["variant"] == "a")].iloc[0]
    assert leaky["worst_control"] == "y" and leaky["control_rate"] == 0.3
    blind_b = robust[(robust["detector"] == "blind") & (robust["variant"] == "b")].iloc[0]
    assert pd.isna(blind_b["control_rate"])  # a wrapper without controls
    md = format_study.robust_summary(robust, t)
    verdict = {line.split(" | ")[0][2:]: line.split(" | ")[-1] for line in md.splitlines()[4:7]}
    assert verdict == {"good": "**yes** |", "leaky": "no |", "blind": "no |"}
    assert "0.30 [" in md and "(y, a)" in md and "(none)" in md and "/ — |" in md
