"""mechunlearn.study: a study as tasks x seeds x a grid, each cell a resumable run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import mechunlearn as mu
from mechunlearn.pipeline import attack
from mechunlearn.study import (
    FLUENCY,
    SWEEP,
    Study,
    StudyParser,
    Task,
    data_dir_or_exit,
    results_folder,
)

GRID = {"NA 5%": {"method": "NA", "ratio": 0.05}, "SP": {"method": "SP", "ratio": 0.05}}


@pytest.fixture(scope="module")
def skills(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("study")
    rows = {
        "arith": [(f"Q: {i}+{i + 3}=", f" {2 * i + 3}") for i in range(16)],
        "code": [(f"def f{i}(x):", f"\n  return x*{i}") for i in range(16)],
    }
    paths = {}
    for name, pairs in rows.items():
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in pairs))
        paths[name] = str(path)
    return paths


def prose(n: int, seed: int, data_dir: str | None) -> mu.Skill:
    texts = [f"The {w} sat" for w in "abcdefghijkl"]
    return mu.Skill.from_texts("prose", texts, [" on the mat."] * len(texts)).subsample(n, seed)


def test_cells_run_resume_and_score_the_extra_skills(tiny_llama, skills, tmp_path):
    study = Study(
        tasks={"arith": Task(skills["arith"], (skills["code"],), general=None,
                             extra={"prose": ("general", prose)})},
        methods=GRID, seeds=(0, 1), n=4, out=tmp_path / "study", quiet=True,
    )  # fmt: skip
    finished = []
    tables = study.run(
        tiny_llama, finish=lambda folder, table: finished.append(folder.out.name),
    )  # fmt: skip
    assert finished == ["seed0", "seed1"]
    assert [t["seed"].iloc[0] for t in tables] == [0, 1]
    first = tables[0]
    assert set(first["method"]) == {"base", "NA 5%", "SP"}
    assert dict(zip(first["skill"], first["role"], strict=False))["prose"] == "general"
    sweep = study.folder("arith", 0) / SWEEP
    saved = pd.read_csv(sweep)
    assert list(saved.columns[:2]) == ["task", "seed"] and len(saved) == len(first)
    # A cell collects only what its methods fit on: NA's pre-activations, SP's importances.
    stats = {p.name for p in (sweep.parent / "stats").iterdir()}
    assert len(stats) == 4 and {"forget.pre.safetensors", "forget.importance.safetensors"} < stats
    assert {name.split(".")[-2] for name in stats} == {"pre", "importance"}
    fitted = {p.name: p.stat().st_mtime_ns for p in (sweep.parent / "interventions").iterdir()}
    again = study.run_cell("arith", 0, tiny_llama)  # resumes: nothing is fitted again
    now = {p.name: p.stat().st_mtime_ns for p in (sweep.parent / "interventions").iterdir()}
    assert now == fitted
    pd.testing.assert_frame_equal(again, first)


def test_a_cell_of_other_settings_is_refused_unless_forced(tiny_llama, skills, tmp_path):
    def declared(methods, force=False):
        return Study(tasks={"arith": Task(skills["arith"], (skills["code"],), general=None)},
                     methods=methods, n=4, out=tmp_path / "study", quiet=True,
                     force=force)  # fmt: skip

    declared({"SP": GRID["SP"]}).run_cell("arith", 0, tiny_llama)
    with pytest.raises(mu.pipeline.PipelineError, match="other settings .*pass --force"):
        declared(GRID).run_cell("arith", 0, tiny_llama)
    table = declared(GRID, force=True).run_cell("arith", 0, tiny_llama)
    assert set(table["method"]) == {"base", "NA 5%", "SP"}
    saved = pd.read_csv(declared(GRID).folder("arith", 0) / SWEEP)
    assert set(saved["method"]) == {"base", "NA 5%", "SP"}


def test_cells_score_fluency_and_add_it_to_finished_cells(tiny_llama, skills, tmp_path):
    def study(fluency_prompts=None):
        return Study(
            tasks={"arith": Task(skills["arith"], (skills["code"],), general=None)},
            methods=GRID, seeds=(0,), n=4, out=tmp_path / "study", quiet=True,
            fluency_prompts=fluency_prompts,
        )  # fmt: skip

    prompts = lambda seed, data_dir: ["The cat", "A dog"]  # noqa: E731
    study().run_cell("arith", 0, tiny_llama)  # a cell run without fluency
    written = study().folder("arith", 0) / FLUENCY
    assert not written.exists() and study().fluency_cell("arith", 0, tiny_llama) is None
    added = study(prompts).fluency_cell("arith", 0, tiny_llama)  # from the saved methods
    saved = pd.read_csv(written)
    assert list(saved["method"]) == ["base", "NA 5%", "SP"] == list(added["method"])
    assert set(saved["task"]) == {"arith"} and set(saved["seed"]) == {0}
    assert saved.loc[0, "perplexity_ratio"] == 1.0
    expected = mu.fluency_table(tiny_llama, ["The cat", "A dog"], {}, batch_size=16)
    assert saved.loc[0, "perplexity"] == pytest.approx(expected.loc["base", "perplexity"])
    written.unlink()
    study(prompts).run_cell("arith", 0, tiny_llama)  # a run with fluency writes it too
    pd.testing.assert_frame_equal(pd.read_csv(written), saved)


def test_attacks_reuse_a_cell_of_labelled_variants(tiny_llama, skills, tmp_path):
    study = Study(
        tasks={"arith": Task(skills["arith"], (skills["code"],), general=None)},
        methods=GRID, seeds=(0,), n=4, out=tmp_path / "study", quiet=True,
    )  # fmt: skip
    study.run_cell("arith", 0, tiny_llama)
    written = attack(study.folder("arith", 0), ["quantization"], quiet=True, model=tiny_llama)
    table = pd.read_csv(written["quantization"])
    assert set(table["method"]) == {"SP"}  # the grid's label; NA has no weight form


def test_a_cell_is_a_run_of_its_config(skills):
    study = Study(
        tasks={"t": Task(skills["arith"], skills["code"], general=None)},
        methods=GRID, seeds=(3,), n=4, out="results/x", model="tiny",
        folder_name=lambda seed: f"s{seed}",
    )  # fmt: skip
    config = study.config("t", 3)
    assert (config.forget, config.retain, config.seed, config.model) == (
        skills["arith"], (skills["code"],), 3, "tiny",
    )  # fmt: skip
    assert list(config.methods) == list(GRID)
    assert study.folder("t", 3) == Path("results/x/t/s3")
    with pytest.raises(ValueError, match="Unknown task 'u'"):
        list(study.cells(["u"]))


def test_results_folders_of_two_models_never_mix():
    assert results_folder("results/a", None) == Path("results/a")
    assert results_folder("results/a", mu.DEFAULT_MODEL) == Path("results/a")
    assert results_folder("results/a", "gemma-3-270m") == Path("results/a-gemma-3-270m")
    assert results_folder("results/a", "org/m") != results_folder("results/a", "other/m")


def test_study_parser_adds_the_shared_arguments_and_resolves_out(monkeypatch):
    monkeypatch.setenv("MECHUNLEARN_DATA", "/data/benchmarks")
    parser = StudyParser("A study.", out="results/my_study")
    parser.add_argument("--n", type=int, default=32)
    args = parser.parse_args([])
    assert vars(args) == {
        "data_dir": "/data/benchmarks", "model": None, "out": "results/my_study",
        "quiet": False, "seed": 0, "n": 32,
    }  # fmt: skip
    args = parser.parse_args(["--model", "org/other", "--seed", "3", "--quiet"])
    assert (args.out, args.seed, args.quiet) == ("results/my_study-org--other", 3, True)
    assert parser.parse_args(["--model", "org/other", "--out", "here"]).out == "here"
    # a script with --seeds of its own, or without progress bars, leaves those out
    bare = StudyParser("A study.", out="results/x", quiet=False, seed=False)
    assert sorted(vars(bare.parse_args([]))) == ["data_dir", "model", "out"]
    # a study of run folders offers --force (the folder's refusal names it)
    forced = StudyParser("A study.", out="results/x", force=True)
    assert (forced.parse_args([]).force, forced.parse_args(["--force"]).force) == (False, True)


def test_data_dir_or_exit_says_how_to_give_the_folder(monkeypatch):
    monkeypatch.delenv("MECHUNLEARN_DATA", raising=False)
    args = StudyParser("A study.", out="results/x").parse_args([])
    with pytest.raises(SystemExit, match="Set MECHUNLEARN_DATA"):
        data_dir_or_exit(args)
    assert data_dir_or_exit(StudyParser("s", out="r").parse_args(["--data-dir", "d"])) == "d"
