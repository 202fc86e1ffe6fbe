"""The recovery table (mechunlearn.attacks.summary), its figure, and analysis/attack_study.py's
declaration: the forget skill's number per method and attack, from the four families' tables."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import mechunlearn as mu
from mechunlearn.attacks import recovery_markdown, recovery_table
from mechunlearn.plots import close, plot_attack_recovery
from mechunlearn.study import Task

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "analysis"))
import attack_study  # noqa: E402
from attack_study import METHODS, cell_name, method_settings  # noqa: E402

KINDS = {"SP": "SelectivePruning", "KSD": "KeySpaceDetector"}


def tables() -> dict[str, pd.DataFrame]:
    prompts, relearning, quantization, residual = [], [], [], []
    for m, kind in KINDS.items():
        for skill, role in (("gsm8k", "forget"), ("mbpp", "retain")):
            for attack, rel in (("none", 0.2), ("comment", 0.5), ("few_shot_1", 0.4)):
                prompts.append(dict(attack=attack, skill=skill, role=role, method=m, kind=kind,
                                    relative=rel, relative_low=rel - 0.1,
                                    relative_high=rel + 0.1))  # fmt: skip
            for train_on in ("forget", "control"):
                for k in (1, 5):
                    relearning.append(dict(train_on=train_on, steps=k, skill=skill, role=role,
                                           method=m, kind=kind, recovery=k / 10,
                                           recovery_low=0.0, recovery_high=k / 5))  # fmt: skip
            if m == "SP":  # a detector has no weight form: no re-quantization rows
                for bits in (8, 4):
                    quantization.append(dict(bits=bits, skill=skill, role=role, method=m,
                                             kind=kind, relative=0.2, relative_quantized=bits / 10,
                                             relative_quantized_low=np.nan,
                                             relative_quantized_high=np.nan))  # fmt: skip
        for layer in range(3):
            residual.append(
                dict(
                    method=m,
                    kind=kind,
                    layer=layer,
                    probe_before=0.8,
                    probe_after=0.6 + layer / 10,
                    lens_top1_before=0.1 + layer / 10,
                    lens_top1_after=0.05,
                    states_changed=m == "SP" and layer > 0,
                )
            )
            # fmt: skip
    return {
        "prompts": pd.DataFrame(prompts),
        "relearning": pd.DataFrame(relearning),
        "quantization": pd.DataFrame(quantization),
        "residual": pd.DataFrame(residual),
    }


def test_the_table_keeps_the_forget_skill_with_one_row_per_method_and_attack():
    table = recovery_table(tables())
    sp = table[table["method"] == "SP"].set_index(["family", "attack"])
    assert list(dict.fromkeys(table["family"])) == [
        "prompts",
        "relearning",
        "quantization",
        "residual",
    ]
    assert sp.index.is_unique and len(sp) == 3 + 4 + 2 + 2
    assert sp.loc[("prompts", "comment"), "value"] == 0.5
    assert sp.loc[("relearning", "forget 5"), ["value", "low", "high"]].tolist() == [0.5, 0, 1]
    assert sp.loc[("quantization", "Q4"), ["value", "reference"]].tolist() == [0.4, 0.2]
    assert sp.loc[("residual", "probe"), ["value", "reference"]].tolist() == [0.8, 0.8]
    # the best of the layers SP changes (1 and 2); every layer for the detector
    assert sp.loc[("residual", "lens"), ["value", "reference"]].tolist() == pytest.approx(
        [0.05, 0.3]
    )
    ksd = table[table["method"] == "KSD"].set_index(["family", "attack"])
    assert ksd.loc[("residual", "probe"), "value"] == pytest.approx(0.8)
    assert not (table[table["method"] == "KSD"]["family"] == "quantization").any()


def test_the_markdown_names_the_best_wrapper_and_marks_what_did_not_run():
    text = recovery_markdown(recovery_table(tables()), methods=["SP", "KSD", "NA"])
    lines = text.splitlines()
    assert lines[0].startswith("| method | prompts: none | prompts: best wrapper | relearning:")
    sp = next(line for line in lines if line.startswith("| SP |"))
    assert (
        "0.50 [0.40, 0.60] (comment)" in sp
        and "0.80 (bare 0.80)" in sp
        and "0.05 (bare 0.30)" in sp
    )
    ksd = next(line for line in lines if line.startswith("| KSD |"))
    assert ksd.count("—") == 2  # no Q8, no Q4
    assert lines[-1] == "| NA |" + " — |" * (len(lines[0].split("|")) - 3)
    every = recovery_markdown(recovery_table(tables()), prompts="all").splitlines()[0]
    assert "prompts: few_shot_1" in every and "best wrapper" not in every


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="Unknown attack family 'fuzzing'"):
        recovery_table({"fuzzing": pd.DataFrame()})
    with pytest.raises(ValueError, match="'role' column"):
        recovery_table({"prompts": tables()["prompts"].drop(columns="role")})
    with pytest.raises(ValueError, match="prompts must be"):
        recovery_markdown(recovery_table(tables()), prompts="some")
    with pytest.raises(ValueError, match="No attack rows"):
        plot_attack_recovery(recovery_table({}))


def test_the_figure_has_one_panel_per_family_and_a_point_per_method_and_attack():
    table = recovery_table(tables())
    fig = plot_attack_recovery(table, title="t")
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["prompts", "relearning", "quantization", "residual"]
    points = sum(len(line.get_xdata()) for line in axes[0].lines if line.get_marker() == "o")
    assert points == 2 * 3  # two methods x three wrappers
    assert [t.get_text() for t in axes[2].get_xticklabels()] == ["Q8", "Q4"]
    close(fig)


def test_the_declaration_covers_every_registered_method():
    assert METHODS == tuple(spec.name for spec in mu.methods())
    assert method_settings("SIMU", 30)["layers"] == list(range(24, 30))
    assert method_settings("RMU", 30) == {"max_length": 512}
    assert method_settings("KSD", 30) == {}
    assert cell_name(1, ["LUNAR", "NA"]) == "seed1-NA-LUNAR"


@pytest.mark.slow
def test_the_study_fits_attacks_resumes_and_summarizes_on_the_tiny_model(
    tiny_llama, tmp_path, monkeypatch
):
    rows = {
        "arith": [(f"Q: {i}+{i + 3}=", f" {2 * i + 3}") for i in range(16)],
        "code": [(f"def f{i}(x):", f"\n  return x*{i}") for i in range(16)],
    }
    paths = {}
    for name, pairs in rows.items():
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text(
            "".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in pairs)
        )
    monkeypatch.setattr(
        attack_study, "TASKS", {"gsm8k-vs-mbpp": Task(str(paths["arith"]), (str(paths["code"]),),
                                                       general=None)}
    )  # fmt: skip
    out = tmp_path / "attacks"
    args = SimpleNamespace(
        seeds=[0], n=4, out=str(out), model=None, data_dir=None, batch_size=4, quiet=True,
        device=None, methods=["SP", "NA"], attacks=["quantization", "relearning"], steps=[1],
        force=False,
    )  # fmt: skip
    folder = attack_study.run_cell("gsm8k-vs-mbpp", 0, args, tiny_llama)
    assert folder.name == "seed0-NA-SP"
    timings = json.loads((out / "timings.json").read_text())["gsm8k-vs-mbpp/seed0-NA-SP"]
    assert list(timings) == ["fit + evaluate", "attack quantization", "attack relearning"]
    saved = (folder / "tables" / "attacks_relearning.csv").stat().st_mtime_ns
    args.attacks = ["relearning", "residual"]  # resumes: only the missing family runs
    attack_study.run_cell("gsm8k-vs-mbpp", 0, args, tiny_llama)
    assert (folder / "tables" / "attacks_relearning.csv").stat().st_mtime_ns == saved
    assert (folder / "tables" / "attacks_residual.csv").exists()
    assert json.loads((folder / "study_settings.json").read_text())["methods"] == ["SP", "NA"]
    attack_study.summarize(out)
    table = pd.read_csv(out / "gsm8k-vs-mbpp" / "recovery.csv", keep_default_na=False)
    assert list(dict.fromkeys(table["method"])) == ["NA", "SP"] and set(table["seed"]) == {0}
    assert list(dict.fromkeys(table["family"])) == [
        "unlearned",
        "relearning",
        "quantization",
        "residual",
    ]
    assert (out / "gsm8k-vs-mbpp" / "recovery.png").exists()
    assert (out / "timings.md").read_text().startswith("| run folder | fit + evaluate |")
    assert (
        "| method | unlearned: no attack | relearning: forget 1 |"
        in (out / "gsm8k-vs-mbpp" / "recovery.md").read_text()
    )
    assert "| NA |" in (out / "gsm8k-vs-mbpp" / "recovery.md").read_text()
    # --force on a finished cell of the same settings changes nothing; of other settings, the
    # cell is refused without it and started over (old times dropped) with it.
    sweep = (folder / "sweep.csv").stat().st_mtime_ns
    args.force = True
    attack_study.run_cell("gsm8k-vs-mbpp", 0, args, tiny_llama)
    assert (folder / "sweep.csv").stat().st_mtime_ns == sweep
    args.force, args.n, args.attacks = False, 6, ["quantization"]
    with pytest.raises(mu.pipeline.PipelineError, match="pass --force"):
        attack_study.run_cell("gsm8k-vs-mbpp", 0, args, tiny_llama)
    args.force = True
    attack_study.run_cell("gsm8k-vs-mbpp", 0, args, tiny_llama)
    assert not (folder / "tables" / "attacks_relearning.csv").exists()
    timings = json.loads((out / "timings.json").read_text())["gsm8k-vs-mbpp/seed0-NA-SP"]
    assert list(timings) == ["fit + evaluate", "attack quantization"]
