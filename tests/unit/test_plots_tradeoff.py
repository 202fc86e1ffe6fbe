"""plot_tradeoff: one point per method and hyperparameter, at the right coordinates."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mechunlearn.plots import plot_matched_frontier, plot_tradeoff


def _table():
    methods = ["base", "NA ratio=0.01", "NA ratio=0.03", "KSD h=1.0"]
    rows = []
    rel = {"(forget)": [1.0, 0.8, 0.4, 0.1], "(retain)": [1.0, 0.99, 0.9, 0.97],
           "(general)": [1.0, 0.97, 0.8, 0.93]}  # fmt: skip
    for part, values in rel.items():
        for m, r in zip(methods, values, strict=True):
            rows.append({"skill": f"s {part}", "method": m, "relative": r})
    return pd.DataFrame(rows)


def test_points_and_labels():
    fig = plot_tradeoff(_table(), title="t")
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.lines if not line.get_label().startswith("_")}
    assert set(lines) == {"NA", "KSD"}
    na = lines["NA"]
    # keep = mean(retain, general); joined in keep order
    np.testing.assert_allclose(na.get_xdata(), [0.85, 0.98])
    np.testing.assert_allclose(na.get_ydata(), [0.4, 0.8])
    np.testing.assert_allclose(lines["KSD"].get_xdata(), [0.95])
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == ["h=1.0", "ratio=0.01", "ratio=0.03"]
    assert ax.get_title() == "t" and "forget" in ax.get_ylabel()


def test_needs_a_forget_skill_and_interventions():
    table = _table()
    with pytest.raises(ValueError, match="only 'base'"):
        plot_tradeoff(table[table.method == "base"])
    with pytest.raises(ValueError, match="forget"):
        plot_tradeoff(table[~table.skill.str.contains("forget")])


def test_matched_frontier_draws_candidates_at_their_worst_kept_skill_and_the_chosen_held_out():
    tuning = pd.DataFrame({
        "method": ["NA", "NA", "KSD"], "knob": ["ratio", "ratio", "fpr"],
        "value": [0.01, 0.03, 0.1], "forget": [0.9, 0.5, 0.2], "mbpp": [1.0, 0.95, 0.99],
        "mmlu": [0.97, 0.8, 0.92], "meets_floor": [True, False, True], "rank": [1, 2, 1],
        "chosen": [True, False, True],
    })  # fmt: skip
    fig = plot_matched_frontier(tuning, _table(), floor=0.9, title="t")
    ax = fig.axes[0]
    thin = [line for line in ax.lines if line.get_linestyle() == "-"]
    np.testing.assert_allclose(
        np.asarray(thin[0].get_xdata(), float), [0.97, 0.8]
    )  # NA: min(mbpp, mmlu)
    np.testing.assert_allclose(np.asarray(thin[0].get_ydata(), float), [0.9, 0.5])
    np.testing.assert_allclose(np.asarray(thin[1].get_xdata(), float), [0.92])
    # the chosen ones held out: the worst kept skill of _table() (general, then retain)
    chosen = {c.get_label(): c.lines[0] for c in ax.containers}
    np.testing.assert_allclose(np.asarray(chosen["NA"].get_xdata(), float), [0.97, 0.8])
    np.testing.assert_allclose(np.asarray(chosen["KSD"].get_xdata(), float), [0.93])
    assert sorted(t.get_text() for t in ax.texts) == ["0.01", "0.03", "0.1"]
    with pytest.raises(ValueError, match="no kept skill"):
        plot_matched_frontier(tuning[["method", "value", "forget", "chosen"]], _table())
