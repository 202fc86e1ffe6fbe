"""analysis/matched_study.py on the tiny model: the probe halves split again (fit / tune, never
the held-out examples), each method's knob chosen by the floor rule, the chosen estimators
scored held out, and a cell that resumes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import mechunlearn as mu
from mechunlearn.pipeline import RunConfig, load_skills
from mechunlearn.study import Task

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "analysis"))
import matched_study  # noqa: E402


def task_files(tmp_path: Path, model=None) -> dict[str, Path]:
    """Three skills as JSONL files; with ``model``, each answer is the model's own greedy next
    character (the bare model scores 1, so every relative score is a real number)."""
    prompts = {
        "arith": [f"{a}+{b}=" for a in range(4) for b in range(4)],
        "code": [f"{a}{b}>" for a in range(4) for b in range(4)],
        "words": [f"w{a}{b}:" for a in range(4) for b in range(4)],
    }
    paths = {}
    for name, texts in prompts.items():
        answers = [" x"] * len(texts)
        if model is not None:
            with torch.no_grad():
                answers = [model.tokenizer.decode([int(model(model.to_tokens(t))[0, -1].argmax())])
                           for t in texts]  # fmt: skip
        paths[name] = tmp_path / f"{name}.jsonl"
        pairs = zip(texts, answers, strict=True)
        lines = [json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in pairs]
        paths[name].write_text("".join(lines))
    return paths


def cell_args(model, tmp_path: Path, monkeypatch, data_dir, methods: list[str]):
    """The study's arguments for one tiny cell ``arith-vs-code`` of ``methods`` (floor 0.5), and
    its task (patched into the study's tasks)."""
    paths = task_files(tmp_path, model)
    task = Task(str(paths["arith"]), (str(paths["code"]),), general=None)
    monkeypatch.setattr(matched_study, "TASKS", {"arith-vs-code": task})
    args = SimpleNamespace(n=8, out=str(tmp_path / "matched"), model=None, data_dir=str(data_dir),
                           batch_size=4, quiet=True, device=None, methods=methods,
                           floor=0.5, force=False)  # fmt: skip
    return args, task


def test_split_probes_keeps_held_out_apart_and_splits_each_probe_half(tmp_path):
    paths = task_files(tmp_path)
    config = RunConfig(forget=str(paths["arith"]), retain=(str(paths["code"]),),
                       general=str(paths["words"]), n=8, methods={"NA": {}})  # fmt: skip
    skills = load_skills(config)
    fit, tune = matched_study.split_probes(skills, seed=0)
    assert list(tune) == ["forget", skills.retain[str(paths["code"])][0].name,
                          skills.general[0].name]  # fmt: skip
    for (probe, held), (fit_half, fit_held) in [
        (skills.forget, fit.forget),
        (skills.general, fit.general),
        *zip(skills.retain.values(), fit.retain.values(), strict=True),
    ]:
        assert fit_held is held  # the held-out half is untouched
        fit_prompts = set(fit_half.prompts)
        assert len(fit_half) == 4 and fit_prompts <= set(probe.prompts)
        assert not fit_prompts & set(held.prompts)
    assert not set(tune["forget"].prompts) & set(fit.forget[0].prompts)
    assert not set(tune["forget"].prompts) & set(skills.forget[1].prompts)


def test_a_cell_chooses_by_the_floor_rule_scores_held_out_and_resumes(
    tiny_llama, tmp_path, monkeypatch, data_dir
):
    monkeypatch.setitem(matched_study.KNOBS, "NA", ({"ratio": [0.1, 0.5, 1.0]}, {}))
    monkeypatch.setitem(matched_study.KNOBS, "SP", ({"ratio": [0.1, 0.5, 0.9]}, {}))
    args, task = cell_args(tiny_llama, tmp_path, monkeypatch, data_dir, ["NA", "SP"])
    table = matched_study.run_cell("arith-vs-code", 0, args, tiny_llama)
    folder = tmp_path / "matched" / "arith-vs-code" / "seed0-floor0.5"
    tuning = pd.read_csv(folder / "tuning.csv", keep_default_na=False)
    assert list(tuning["method"].unique()) == ["NA", "SP"]
    assert tuning.groupby("method")["chosen"].sum().tolist() == [1, 1]
    # The rule by hand: among the candidates keeping the floor, the lowest forget score (ties:
    # the earlier); none keeping it: the mildest (the first).
    for _, rows in tuning.groupby("method"):
        ok = rows[rows["meets_floor"]]
        expect = ok["forget"].idxmin() if len(ok) else rows.index[0]
        assert rows.loc[expect, "chosen"]
        kept = rows.columns[(rows.columns != "forget") & ~rows.columns.isin(
            ["method", "knob", "value", "meets_floor", "rank", "chosen"])]  # fmt: skip
        assert (rows["meets_floor"] == (rows[kept] >= 0.5).all(axis=1)).all()
    chosen = tuning[tuning["chosen"]]
    labels = {f"{r.method} {r.knob}={r.value}" for r in chosen.itertuples()}
    assert set(table["method"]) - {"base"} == labels
    # Held out: the rows are scored on the held-out halves, which the tuning never saw.
    skills = load_skills(RunConfig(forget=task.forget, retain=task.retain, general=None, n=8))
    assert set(table["skill"]) == {skills.forget[1].name, *(h.name for _, h in
                                                            skills.retain.values())}  # fmt: skip
    assert (table["n"] == 8).all()
    assert (folder / "frontier.png").exists()
    fluent = pd.read_csv(folder / "fluency.csv", keep_default_na=False, index_col="method")
    assert list(fluent.index) == ["base", *sorted(labels, key=lambda m: m.split()[0] != "NA")]
    assert fluent.loc["base", "perplexity_ratio"] == 1.0
    saved = (folder / "matched.csv").stat().st_mtime_ns
    again = matched_study.run_cell("arith-vs-code", 0, args, tiny_llama)
    assert (folder / "matched.csv").stat().st_mtime_ns == saved
    assert len(again) == len(table)
    summary = matched_study.summary_markdown([tmp_path / "matched"])
    assert "**arith-vs-code**, seed 0" in summary
    assert summary.count("| NA ratio=") == 1 and summary.count("| SP ratio=") == 1
    assert "| fluency: perplexity ratio | repeated 3-grams |" in summary
    # Killed after NA's search: the rerun searches SP alone and loads NA's chosen estimator.
    (folder / "matched.csv").unlink()
    (folder / "tuning" / "SP.csv").unlink()
    searched, real_tune = [], mu.tune
    monkeypatch.setattr(
        mu, "tune", lambda method, *a, **k: searched.append(method) or real_tune(method, *a, **k)
    )
    resumed = matched_study.run_cell("arith-vs-code", 0, args, tiny_llama)
    assert searched == ["SP"]
    pd.testing.assert_frame_equal(resumed, table)
    # SP's grid changed since its search: SP is searched again, NA's search reused.
    (folder / "matched.csv").unlink()
    monkeypatch.setitem(matched_study.KNOBS, "SP", ({"ratio": [0.1, 0.5]}, {}))
    searched.clear()
    matched_study.run_cell("arith-vs-code", 0, args, tiny_llama)
    assert searched == ["SP"]
    assert len(pd.read_csv(folder / "tuning" / "SP.csv")) == 2


def test_every_tuned_method_is_registered_and_its_knob_a_setting(tiny_llama):
    for method in matched_study.KNOBS:
        candidates, shared = matched_study.knob_settings(method, tiny_llama)
        settings = mu.interventions.get_method(method).settings()
        assert set(candidates) | set(shared) <= set(settings), method
        values = next(iter(candidates.values()))
        assert values == sorted(values), f"{method}: candidates must go from mild to strong"
    assert matched_study.knob_settings("SIMU", tiny_llama)[1]["layers"] == [0, 1, 2]


def test_lunar_and_simu_are_tuned_on_the_fit_quarters(tiny_llama, tmp_path, monkeypatch, data_dir):
    monkeypatch.setitem(matched_study.KNOBS, "LUNAR", ({"layer": [2, 0]}, {}))
    simu = {"layers": [1, 2], "steps": 1, "max_steps": 2, "batch_size": 4, "max_length": 64}
    monkeypatch.setitem(matched_study.KNOBS, "SIMU", ({"lr": [0.02, 1.0]}, simu))
    args, _ = cell_args(tiny_llama, tmp_path, monkeypatch, data_dir, ["LUNAR", "SIMU"])
    table = matched_study.run_cell("arith-vs-code", 0, args, tiny_llama)
    folder = tmp_path / "matched" / "arith-vs-code" / "seed0-floor0.5"
    tuning = pd.read_csv(folder / "tuning.csv", keep_default_na=False)
    assert tuning["knob"].tolist() == ["layer", "layer", "lr", "lr"]
    assert tuning.groupby("method")["chosen"].sum().tolist() == [1, 1]
    chosen = {r.method: float(r.value) for r in tuning[tuning["chosen"]].itertuples()}
    labels = [m.split() for m in table["method"].unique() if m != "base"]  # "LUNAR layer=2"
    assert {m: float(setting.split("=")[1]) for m, setting in labels} == chosen
    # A run with other --methods in another folder joins the same cell's summary and figure.
    cheap = SimpleNamespace(**{**vars(args), "out": str(tmp_path / "cheap"), "methods": ["NA"]})
    na = matched_study.run_cell("arith-vs-code", 0, cheap, tiny_llama)
    roots = [tmp_path / "cheap", tmp_path / "matched"]
    summary = matched_study.summary_markdown(roots)
    assert summary.count("**arith-vs-code**, seed 0") == 1 and summary.count("| base |") == 1
    for label in (set(table["method"]) | set(na["method"])) - {"base"}:
        assert summary.count(f"| {label} |") == 1, label
    # a method under several roots is taken from the first that has it
    assert matched_study.summary_markdown([*roots, tmp_path / "cheap"]) == summary
    matched_study.write_summary(tmp_path / "cheap", roots)
    assert (tmp_path / "cheap" / "arith-vs-code-seed0-floor0.5-frontier.png").exists()


def test_a_finished_cell_of_other_settings_is_refused_unless_forced(
    tiny_llama, tmp_path, monkeypatch, data_dir
):
    monkeypatch.setitem(matched_study.KNOBS, "NA", ({"ratio": [0.5]}, {}))
    args, _ = cell_args(tiny_llama, tmp_path, monkeypatch, data_dir, ["NA"])
    matched_study.run_cell("arith-vs-code", 0, args, tiny_llama)
    args.n = 6  # other settings, the same (finished) folder: refused before any work
    folder = tmp_path / "matched" / "arith-vs-code" / "seed0-floor0.5"
    with pytest.raises(mu.pipeline.PipelineError, match="pass --force"):
        matched_study.run_cell("arith-vs-code", 0, args, tiny_llama)
    args.force = True
    table = matched_study.run_cell("arith-vs-code", 0, args, tiny_llama)
    assert set(table["method"]) == {"base", "NA ratio=0.5"}
    assert json.loads((folder / "config.json").read_text())["n"] == 6


def test_the_summary_over_seeds_reads_each_seeds_held_out_rows(
    tiny_llama, tmp_path, monkeypatch, data_dir
):
    monkeypatch.setitem(matched_study.KNOBS, "NA", ({"ratio": [0.1, 1.0]}, {}))
    monkeypatch.setitem(matched_study.KNOBS, "SP", ({"ratio": [0.1, 0.9]}, {}))
    args, _ = cell_args(tiny_llama, tmp_path, monkeypatch, data_dir, ["NA", "SP"])
    # short continuation prompts (another seed's Wikipedia sentences overrun the tiny context)
    monkeypatch.setattr(matched_study, "fluency_prompts", lambda seed, data_dir: ["The cat"] * 2)
    tables = {seed: matched_study.run_cell("arith-vs-code", seed, args, tiny_llama)
              for seed in (0, 1)}  # fmt: skip
    roots = [tmp_path / "matched"]
    over_seeds = matched_study.seeds_markdown(roots)
    assert over_seeds.count("| NA |") == 1
    lines = {line.split(" | ")[0]: line for line in over_seeds.splitlines()}
    for fam in ("NA", "SP"):
        left = []
        for table in tables.values():
            rows = table[table["method"].str.startswith(fam + " ")]
            forget = rows[rows["role"] == "forget"].iloc[0]
            setting = forget["method"].split(" ", 1)[1]
            assert f"{setting}: {forget.relative:.2f} [" in lines[f"| {fam}"]
            left.append(forget["relative"])
        sd = pd.Series(left).std()
        assert f"| {sum(left) / 2:.2f} ({sd:.2f}; 2 seeds) |" in lines[f"| {fam}"]
    summary = matched_study.write_summary(tmp_path / "matched", roots).read_text()
    assert "## Over seeds" in summary and "seeds 0, 1" in summary
    # one seed alone: no table over seeds
    only = tmp_path / "one"
    (only / "arith-vs-code").mkdir(parents=True)
    src = tmp_path / "matched" / "arith-vs-code" / "seed0-floor0.5"
    (only / "arith-vs-code" / "seed0-floor0.5").symlink_to(src)
    assert matched_study.seeds_markdown([only]) == ""
