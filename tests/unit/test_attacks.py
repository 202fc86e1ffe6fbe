"""mechunlearn.attacks on the tiny model: each attack changes what it should and nothing else.

Prompt wrappers change the prompts only; few-shot examples are disjoint from the scored ones;
relearning restores the weights bit for bit (also after an exception) and fine-tunes the base
reference the same way; quantization stays within the quantizer's bound and touches the edited
tensors only; the probe and the logit lens read what they should.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd
import pytest
import torch

from mechunlearn import Skill
from mechunlearn.attacks import (
    ATTACKS,
    attack_skill,
    edited_parameters,
    few_shot_skill,
    finetune,
    last_prompt_states,
    linear_probe,
    logit_lens,
    prompt_attacks,
    quantization_step,
    quantize_tensor,
    recovery_interval,
    relearning,
    requantization,
    residual_knowledge,
    weights_restored,
)
from mechunlearn.attacks.quantization import _quantized
from mechunlearn.evaluation import evaluate, teacher_forced
from mechunlearn.interventions import Detector, SelectivePruning, WeightIntervention
from mechunlearn.interventions.weights import WeightEdit, w_out
from tests.tiny_models import unchanged as _same
from tests.tiny_models import weights as _snapshot
from tests.unit import test_cli, test_interventions_common

ADD = [(f"{a}+{b}=", f"{a + b}") for a in range(8) for b in range(5)]  # 40 examples
F = Skill.from_texts("add", [p for p, _ in ADD], [a for _, a in ADD])
R = Skill.from_texts(
    "copy", [f"copy {c}:" for c in "abcdefghijklmnopqrstuvwxyz0123456789ABCD"],
    [f" {c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789ABCD"],
)  # fmt: skip
F_FIT, F_TEST = F[:20], F[20:32]
R_FIT, R_TEST = R[:20], R[20:32]
SHOTS = F[32:]

#: Fixtures shared with the other suites: every registered method fitted by the pipeline's own
#: generic fit on the tiny model, and a tiny model and three skills saved to disk.
fitted = test_interventions_common.fitted
setup = test_cli.setup


@pytest.fixture(scope="module")
def model(llama_like):
    return llama_like


# ------------------------------------------------------------------------------ prompts
@pytest.mark.parametrize("attack", [a for a in ATTACKS if a != "chat"])
def test_a_wrapper_changes_the_prompts_only(attack):
    skill = Skill.from_texts(
        "q", [f"Question: {p}\nAnswer:" for p in F_TEST.prompts], F_TEST.answers
    )
    wrapped = attack_skill(skill, attack, shots=SHOTS)
    assert len(wrapped) == len(skill)
    assert wrapped.answers == skill.answers
    for question, old, new in zip(F_TEST.prompts, skill, wrapped, strict=True):
        assert question in new.prompt
        assert (new.prompt == old.prompt) == (attack == "none")


def test_chat_without_a_template_and_unknown_attacks_are_refused(model):
    with pytest.raises(ValueError, match="chat template"):
        attack_skill(F_TEST, "chat", tokenizer=model.tokenizer)
    with pytest.raises(ValueError, match="attack"):
        attack_skill(F_TEST, "shouting")
    with pytest.raises(ValueError, match="shots"):
        attack_skill(F_TEST, "few_shot_3")


@pytest.mark.parametrize("k", [1, 3])
def test_few_shot_examples_are_disjoint_from_the_scored_ones(k):
    primed = few_shot_skill(F_TEST, SHOTS, k)
    scored = set(F_TEST.prompts)
    for old, new in zip(F_TEST, primed, strict=True):
        assert new.prompt.endswith(old.prompt) and new.answer == old.answer
        blocks = new.prompt.split("\n\n")
        assert len(blocks) == k + 1
        shots = [SHOTS[i] for i in new.meta["shots"]]
        assert blocks[:-1] == [s.prompt + s.answer for s in shots]
        assert not scored & {s.prompt for s in shots}
    with pytest.raises(ValueError, match="also scored"):
        few_shot_skill(F_TEST, F[25:30], 1)
    with pytest.raises(ValueError, match="at least"):
        few_shot_skill(F_TEST, SHOTS[:2], 3)


def test_prompt_attacks_score_forget_and_kept_skills_under_the_same_wrapper(model, fitted):
    snap = _snapshot(model)
    attacks = ["none", "comment", "few_shot_1", "ignore_instructions"]
    table = prompt_attacks(
        model, fitted, F_TEST, [R_TEST], shots=SHOTS, attacks=attacks, quiet=True, n_boot=100
    )
    assert _same(model, snap)
    assert len(table) == len(attacks) * 2 * len(fitted)
    assert set(table["role"]) == {"forget", "retain"}
    ratio = table["method_score"] / table["base_score"]
    assert np.allclose(table["relative"], ratio, equal_nan=True)
    # The "none" rows are evaluate()'s on the unwrapped skills.
    full = evaluate(model, [F_TEST, R_TEST], fitted, quiet=True, n_boot=100)
    none = table[table["attack"] == "none"].set_index(["skill", "method"])
    ref = full[full["method"] != "base"].set_index(["skill", "method"])
    assert np.allclose(none["method_score"], ref.loc[none.index, "score"])
    bare = full[full["method"] == "base"].set_index("skill")["score"]
    assert np.allclose(none["base_score"], bare.loc[none.index.get_level_values("skill")])
    with pytest.raises(ValueError, match="repeat"):
        prompt_attacks(model, fitted, F_TEST, [R_TEST], attacks=["none", "none"])


# ---------------------------------------------------------------------------- relearning
def test_relearning_restores_every_weight_bit_for_bit(model, fitted):
    snap = _snapshot(model)
    flags = [p.requires_grad for p in model.parameters()]
    table = relearning(
        model, fitted, F_FIT, [F_TEST, R_TEST], roles={"add": "forget", "copy": "retain"},
        control=R_FIT, steps=[1, 2], lr=1e-2, quiet=True, n_boot=100,
    )  # fmt: skip
    assert _same(model, snap)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert len(table) == 2 * len(fitted) * 2 * 2  # train sets x methods x steps x skills
    assert set(table["train_on"]) == {"forget", "control"}
    gap = table["base"] - table["unlearned"]
    expect = (table["attacked"] - table["unlearned"]) / gap.where(gap != 0)
    assert np.allclose(table["recovery"], expect, equal_nan=True)
    # The fine-tuning did something: the base reference moved off the base score.
    assert (table["base_attacked"] != table["base"]).any()


def test_weights_come_back_after_an_exception_mid_fine_tuning(model, fitted):
    snap = _snapshot(model)

    def boom(step):
        if step == 2:
            raise KeyboardInterrupt

    for iv in (None, fitted["SIMU"], fitted["SP"]):
        with pytest.raises(KeyboardInterrupt):
            with weights_restored(model):
                ctx = iv.apply_to_weights(model) if iv is not None else contextlib.nullcontext()
                with ctx:
                    finetune(model, F_FIT, 3, lr=1e-2, callback=boom)
        assert _same(model, snap)
    assert all(p.requires_grad for p in model.parameters())


def test_the_base_reference_is_fine_tuned_the_same_way(model, fitted):
    table = relearning(
        model, {"KSD": fitted["KSD"]}, F_FIT, [F_TEST], steps=[2], lr=1e-2, quiet=True,
        n_boot=50,
    )  # fmt: skip
    with weights_restored(model):
        finetune(model, F_FIT, 2, lr=1e-2)
        again = teacher_forced(model, F_TEST).score
    assert table["base_attacked"].iloc[0] == again
    # A detector's model is fine-tuned bare: its attacked score is the base reference's with
    # its abstentions counted wrong, never above it.
    assert table["attacked"].iloc[0] <= table["base_attacked"].iloc[0]


def test_hooks_are_active_during_fine_tuning(model, fitted):
    """Selective Pruning's hooks zero the pruned keys, so no gradient reaches their W_out rows:
    AdamW leaves exactly those rows unchanged while the rest of W_out moves."""
    sp: SelectivePruning = fitted["SP"]
    layer, idx = next((layer, idx) for layer, idx in sp._index.items() if len(idx))
    before = w_out(model, layer).detach().clone()
    with weights_restored(model):
        finetune(model, F_FIT, 2, sp.hooks(model), lr=1e-2)
        after = w_out(model, layer).detach().clone()
    rest = torch.ones(before.shape[0], dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(after[idx], before[idx])
    assert not torch.equal(after[rest], before[rest])


def test_relearning_resumes_from_its_store_and_redoes_only_missing_runs(
    model, fitted, tmp_path, monkeypatch
):
    import importlib

    from mechunlearn.io import JsonStore

    relearning_module = importlib.import_module("mechunlearn.attacks.relearning")  # the module

    methods = {"SP": fitted["SP"], "KSD": fitted["KSD"]}
    kwargs = dict(roles={"add": "forget"}, control=R_FIT, steps=[1, 2], lr=1e-2, quiet=True,
                  n_boot=50)  # fmt: skip
    path = tmp_path / "parts.json"
    first = relearning(model, methods, F_FIT, [F_TEST], store=JsonStore(path), **kwargs)
    store = JsonStore(path)  # read back from the file, as after a kill
    runs = {key.rsplit("/", 1)[0] for key in store if key.startswith("attacked/")}
    assert runs == {
        f"attacked/{w}/{m}" for w in ("forget", "control") for m in ("base", "KSD", "SP")
    }
    del store["attacked/control/SP/2"]  # a run that did not finish
    tuned = []
    real = relearning_module.finetune
    monkeypatch.setattr(relearning_module, "finetune",
                        lambda *a, **k: tuned.append(a[1].name) or real(*a, **k))  # fmt: skip
    kwargs["steps"] = [np.int64(1), np.int64(2)]  # the same settings as numpy integers
    again = relearning(model, methods, F_FIT, [F_TEST], store=store, **kwargs)
    assert tuned == [R_FIT.name]  # only the control run of SP is fine-tuned again
    pd.testing.assert_frame_equal(again, first)
    # Other scored texts (same name, same size) or settings clear the store rather than mix runs.
    relearning(model, methods, F_FIT, [F[21:33]], store=store, **kwargs)
    assert len(tuned) == 1 + 2 * 2  # every run again: bare and SP, on both training sets
    relearning(model, {"KSD": fitted["KSD"]}, F_FIT, [F_TEST], store=store, steps=[1],
               lr=1e-2, quiet=True, n_boot=50)  # fmt: skip
    assert store["settings"]["steps"] == [1] and "attacked/control/SP/1" not in store


def test_json_store_keeps_its_values_and_survives_a_damaged_file(tmp_path):
    from mechunlearn.io import JsonStore

    path = tmp_path / "store.json"
    store = JsonStore(path)
    store.update({"a": [1.5, float("nan")], "b": {"c": True}})
    back = JsonStore(path)
    assert back["b"] == {"c": True} and back["a"][0] == 1.5 and np.isnan(back["a"][1])
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="damaged"):
        assert len(JsonStore(path)) == 0


def test_training_on_scored_examples_is_refused(model, fitted):
    with pytest.raises(ValueError, match="share"):
        relearning(model, fitted, F_TEST, [F_TEST], steps=[1], quiet=True)


def test_recovery_interval_brackets_the_recovery():
    rng = np.random.default_rng(0)
    base = np.ones(200)
    unlearned = np.zeros(200)
    attacked = (rng.random(200) < 0.3).astype(float)
    low, high = recovery_interval(attacked, unlearned, base, n_boot=500)
    assert low < attacked.mean() < high and high - low < 0.2
    assert np.isnan(recovery_interval(attacked, base, base, n_boot=10)).all()


# -------------------------------------------------------------------------- quantization
@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_error_is_within_the_documented_bound(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 96, generator=g) * torch.logspace(-3, 0, 96)
    q = quantize_tensor(x, bits)
    assert q.shape == x.shape and q.dtype == x.dtype
    step = quantization_step(x, bits)
    blocks = x.reshape(-1, 32)
    assert torch.allclose(
        step.reshape(-1, 32)[:, 0], blocks.abs().amax(1) / (127 if bits == 8 else 8)
    )
    # Q8_0: round to nearest, |x - q| <= d / 2 (d stored as float16: 2^-11 relative error per
    # level, up to 127 levels); Q4_0: one side of the range is clipped, |x - q| <= d.
    bound = step / 2 if bits == 8 else step
    slack = step * (127 if bits == 8 else 8) * 2.0**-10
    assert bool(((x - q).abs() <= bound + slack).all())


def test_quantization_touches_the_edited_tensors_only_and_restores(model, fitted):
    snap = _snapshot(model)
    lunar = fitted["LUNAR"]
    tensors = edited_parameters(model, lunar)
    assert len(tensors) == 1 and ".1." in next(iter(tensors))
    assert _same(model, snap)
    with _quantized(model, tensors, 4):
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, snap[n])}
    assert changed == set(tensors)
    assert _same(model, snap)
    with pytest.raises(TypeError, match="weight form"):
        edited_parameters(model, fitted["NA"])


def test_requantization_covers_the_weight_forms_and_restores(model, fitted):
    snap = _snapshot(model)
    table = requantization(model, fitted, [F_TEST, R_TEST], bits=(8, 4), quiet=True, n_boot=50)
    assert _same(model, snap)
    weighty = {
        m for m, iv in fitted.items()
        if not isinstance(iv, Detector) and hasattr(iv, "apply_to_weights")
    }  # fmt: skip
    assert set(table["method"]) == weighty and "NA" not in weighty
    assert len(table) == len(weighty) * 2 * 2
    # Zeroed entries sit on every grid: Selective Pruning's edit survives rounding (only the
    # entries that rounded to 0 anyway count as erased).
    assert (table[table["method"] == "SP"]["erased"] < 0.5).all()
    sp = fitted["SP"]
    layer, idx = next((layer, idx) for layer, idx in sp._index.items() if len(idx))
    tensors = edited_parameters(model, sp)
    with sp.apply_to_weights(model), _quantized(model, tensors, 4):
        assert not w_out(model, layer)[idx].any()


class _Nudge(WeightIntervention):
    """A weight edit far below one Q8_0 step: W_out of layer 0 plus 1e-7."""

    def apply_to_weights(self, model):
        edit = WeightEdit(model)
        edit.apply(w_out(model, 0), lambda w: w.add_(1e-7))
        return edit


def test_an_edit_below_one_step_is_erased_by_quantization(model):
    table = requantization(model, {"nudge": _Nudge()}, [F_TEST], bits=(8,), quiet=True, n_boot=50)
    row = table.iloc[0]
    assert row["delta_over_step"] < 0.5
    assert row["erased"] > 0.99
    assert row["quantized"] == row["base_quantized"]


# ------------------------------------------------------------------------------ residual
def test_the_probe_separates_separable_data_and_not_shuffled_labels():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 2
    x = torch.randn(400, 16, generator=g)
    x[:, 0] += 6 * y
    assert linear_probe(x[:200], y[:200], x[200:], y[200:]) >= 0.99
    accs = []
    for seed in range(5):
        perm = torch.randperm(400, generator=torch.Generator().manual_seed(seed))
        accs.append(linear_probe(x[:200], y[perm][:200], x[200:], y[perm][200:]))
    assert abs(np.mean(accs) - 0.5) < 0.06
    with pytest.raises(ValueError, match="both labels"):
        linear_probe(x[:10], torch.zeros(10), x[10:20], y[10:20])


def test_the_logit_lens_at_the_last_layer_is_the_models_own_ranking(llama_like):
    model = llama_like
    states, targets = last_prompt_states(model, F_TEST)
    ranks, top1 = logit_lens(model, states, targets)
    prompts = F_TEST.prompts
    for i, prompt in enumerate(prompts):
        logits = model(model.to_tokens(prompt))[0, -1]
        own = int((logits > logits[targets[i]]).sum())
        assert int(ranks[i, -1]) == own
    assert torch.equal(top1, ranks == 0)


def test_residual_knowledge_says_a_detector_leaves_the_states_untouched(model, fitted):
    snap = _snapshot(model)
    chosen = {m: fitted[m] for m in ("KSD", "SP", "SIMU")}
    table = residual_knowledge(model, chosen, F_FIT, R_FIT, F_TEST, R_TEST, quiet=True)
    assert _same(model, snap)
    assert len(table) == 3 * 3
    ksd = table[table["method"] == "KSD"]
    assert not ksd["states_changed"].any()
    assert (ksd["probe_before"] == ksd["probe_after"]).all()
    assert table[table["method"] != "KSD"]["states_changed"].any()
    assert table["probe_before"].between(0, 1).all()


# ------------------------------------------------------------------------------- command
@pytest.mark.slow
def test_the_attack_command_reuses_a_finished_run(tmp_path, setup, capsys):
    from mechunlearn.cli import main
    from mechunlearn.pipeline import MARKER

    out = tmp_path / "report"
    assert main(test_cli.argv(setup, out, command="unlearn")) == 0
    saved = {p.name: p.stat().st_mtime_ns for p in (out / "interventions").iterdir()}
    families = ["prompts", "relearning", "quantization", "residual"]
    cmd = ["attack", "--out", str(out), "--attacks", *families, "--steps", "1", "--quiet"]
    with pytest.warns(UserWarning, match="left out"):  # prose has one answer: no MC options
        assert main(cmd) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "interventions").iterdir()} == saved
    for family in families:
        table = pd.read_csv(out / "tables" / f"attacks_{family}.csv")
        assert len(table) > 0
        assert f"tables/attacks_{family}.csv" in (out / MARKER).read_text()
    # the relearning attack's finished runs, kept so that a killed attack resumes
    assert "tables/attacks_relearning.parts.json" in (out / MARKER).read_text()
    assert main(["attack", "--out", str(tmp_path / "nothing")]) == 2
    assert "holds no config.json" in capsys.readouterr().err


@pytest.mark.slow
def test_the_report_shows_the_prompt_attacks_once_they_have_run(tmp_path, setup):
    from mechunlearn.cli import main

    out = tmp_path / "report"
    assert main(test_cli.argv(setup, out)) == 0
    assert "Robustness" not in (out / "index.html").read_text()
    with pytest.warns(UserWarning, match="left out"):
        assert main(["attack", "--out", str(out), "--quiet"]) == 0
    page = (out / "index.html").read_text()
    table = pd.read_csv(out / "tables" / "attacks_prompts.csv", keep_default_na=False)
    assert "Robustness: prompt attacks" in page
    for attack in table["attack"].unique():
        assert f"<code>{attack}</code>" in page
    section = page.split("Robustness: prompt attacks")[1].split("<h2>")[0]
    assert all(f"<th>{m}</th>" in section for m in table["method"].unique())
    assert "Relative performance" in page  # the run's own table is still there
