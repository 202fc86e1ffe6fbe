"""LUNAR: direction and least-squares solution against brute force, the redirection it achieves,
Adam vs closed form, hooks == weight edit (padding, other hooks), exact restore, save/load,
errors."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pytest
import torch

from mechunlearn import (
    Lunar,
    NeuronAdjust,
    NotFittedError,
    SelectivePruning,
    Skill,
    collect,
    collect_importance,
    reference_prompts,
)
from mechunlearn.batching import forward, iter_batches, tokenize_examples
from mechunlearn.data import calibration_skill
from mechunlearn.evaluation import teacher_forced
from mechunlearn.generation import own_continuations
from mechunlearn.interventions import get_method
from mechunlearn.interventions.lunar import choose_layer
from mechunlearn.interventions.lunar.layer import kept_share
from mechunlearn.pipeline import Probes, Skills, fit_estimator
from mechunlearn.sites import hook_name, mlp_output_hook
from tests.tiny_models import make_tiny_llama

# No prefix is shared between the two sets (a shared prefix has one key with two targets).
F = Skill.from_texts(
    "f", [f"Q: {i}+{i + 1}?" for i in range(8)], [f" {2 * i + 1}" for i in range(8)]
)
R = Skill.from_texts(
    "r", [f"def f{i}(x):" for i in range(8)], [f"\n  return x*{i}" for i in range(8)]
)
REF = Skill.from_texts("ref", [f"Who is Zorb {c}?" for c in "ABCDEFGH"])
LAYER = 1


@pytest.fixture(scope="module")
def fitted(llama_like):
    return Lunar(layer=LAYER).fit(llama_like, F, R, REF, batch_size=3)


def _device(model):
    return next(model.parameters()).device


def _single_runs(model, prompts, names):
    """For each prompt alone (no padding, no batching): {hook name: activation[0]}."""
    out = []
    for ids, _ in tokenize_examples(model, prompts, [""] * len(prompts)):
        store = {}

        def keep(name, store=store):
            def hook(act, hook):
                store[name] = act[0].detach().double().cpu()

            return hook

        tokens = torch.tensor([ids], device=_device(model))
        with torch.no_grad():
            model.run_with_hooks(tokens, fwd_hooks=[(n, keep(n)) for n in names])
        out.append(store)
    return out


def _brute_force(model, layer, coef, ridge, reference=REF):
    """Direction, rows and the ridge solution, from single unbatched runs (float64, numpy)."""
    res, key = hook_name("resid_post", layer), hook_name("key", layer)
    ref = np.mean([r[res][-1].numpy() for r in _single_runs(model, reference.prompts, [res])], 0)
    runs_f = _single_runs(model, F.prompts, [res, key])
    runs_r = _single_runs(model, R.prompts, [key])
    direction = ref - np.mean([r[res][-1].numpy() for r in runs_f], 0)
    # forget rows: prompt tokens; kept rows: BOS of every prompt and all retain tokens
    rows_f = np.concatenate([r[key][1:].numpy() for r in runs_f])
    rows_k = np.concatenate([r[key][:1].numpy() for r in runs_f] + [r[key].numpy() for r in runs_r])
    keys = np.concatenate([rows_f, rows_k])
    targets = np.zeros((len(keys), direction.size))
    targets[: len(rows_f)] = coef * direction
    gram = keys.T @ keys
    lam = ridge * np.trace(gram) / gram.shape[0]
    delta = np.linalg.solve(gram + lam * np.eye(len(gram)), keys.T @ targets)
    return direction, keys, targets, lam, delta


# ------------------------------------------------------------------------ reference prompts
def test_reference_prompts_ship_with_the_package():
    ref = reference_prompts()
    assert len(ref) >= 60 and ref.name == "reference" and "resources" in ref.source
    assert len(set(ref.prompts)) == len(ref) and all(p.strip() for p in ref.prompts)
    assert all(a == "" for a in ref.answers)
    kinds = [ex.meta["kind"] for ex in ref]
    assert set(kinds) == {"fictitious", "refuse"}
    fict, refuse = reference_prompts("fictitious"), reference_prompts("refuse")
    assert len(fict) == kinds.count("fictitious") and len(refuse) == kinds.count("refuse")
    assert len(fict) >= 40 and len(refuse) >= 20
    framed = reference_prompts(template="Question: {prompt}\nAnswer:")
    assert framed.prompts == [f"Question: {p}\nAnswer:" for p in ref.prompts]
    readme = resources.files("mechunlearn.resources").joinpath("README.md").read_text("utf-8")
    assert "reference_prompts.jsonl" in readme and "Provenance" in readme
    with pytest.raises(ValueError, match="kind"):
        reference_prompts("harmful")
    with pytest.raises(ValueError, match="template"):
        reference_prompts(template="Question:")


# ---------------------------------------------------------------------------- the method
def test_direction_matches_brute_force(llama_like, fitted):
    direction = _brute_force(llama_like, LAYER, 2.0, 1e-4)[0]
    assert fitted.direction_[LAYER].dtype == torch.float64
    np.testing.assert_allclose(
        fitted.direction_[LAYER].cpu().numpy(), direction, rtol=1e-5, atol=1e-6
    )


def test_closed_form_is_the_ridge_least_squares_solution(llama_like, fitted):
    # Rows from unbatched runs: checks the batching, the padding and the BOS rows as well.
    _, keys, targets, lam, delta = _brute_force(llama_like, LAYER, 2.0, 1e-4)
    info = fitted.diagnostics_[0]
    assert info["n_forget_rows"] + info["n_kept_rows"] == len(keys)
    assert info["ridge_lambda"] == pytest.approx(lam, rel=1e-5)
    got = fitted.delta_w_out_[LAYER]
    assert got.dtype == torch.float32 and got.shape == (
        llama_like.cfg.d_mlp,
        llama_like.cfg.d_model,
    )
    # the normal equations hold: K^T (K dW - Y) + lam dW = 0 (relative to K^T Y)
    got64 = got.double().cpu().numpy()
    grad = keys.T @ (keys @ got64 - targets) + lam * got64
    assert np.abs(grad).max() <= 1e-4 * np.abs(keys.T @ targets).max()
    np.testing.assert_allclose(got64, delta, rtol=1e-3, atol=1e-5 * np.abs(delta).max())
    # and it is rank one: dW = u (c r)^T
    assert torch.linalg.matrix_rank(got.double(), rtol=1e-6) == 1
    mse = ((keys @ got64 - targets) ** 2).mean()
    assert info["mse_after"] == pytest.approx(mse, rel=1e-4)
    assert info["mse_before"] == pytest.approx((targets**2).mean(), rel=1e-6)
    assert fitted.fit_loss_ == {LAYER: info["mse_after"]}
    assert info["linear_check"] < 1e-5


def test_forget_moves_by_c_r_and_retain_stays(char_tokenizer, device):
    """With more neurons than rows, least squares interpolates: the edit moves every forget
    prompt token's MLP output by exactly c r_l and leaves retain tokens and BOS unchanged."""
    model = make_tiny_llama(char_tokenizer, device, d_mlp=512)
    forget, retain = F[:4], R[:4]
    lunar = Lunar(layer=LAYER, coef=1.5, ridge=1e-10).fit(model, forget, retain, REF)
    info = lunar.diagnostics_[0]
    assert info["n_forget_rows"] + info["n_kept_rows"] < 512
    assert info["forget_redirect"] == pytest.approx(1.0, abs=1e-6)
    assert info["kept_shift"] < 1e-6
    shift = (1.5 * lunar.direction_[LAYER]).float()
    name = hook_name("mlp_out", LAYER)
    scale = float(shift.norm())
    for skill, moved in ((forget, True), (retain, False)):
        for ids, _ in tokenize_examples(model, skill.prompts, [""] * len(skill)):
            tokens = torch.tensor([ids], device=device)
            seen = {}

            def keep(key, seen=seen):
                def hook(act, hook):
                    seen[key] = act[0].detach().clone()

                return hook

            with torch.no_grad():
                model.run_with_hooks(tokens, fwd_hooks=[(name, keep("base"))])
                model.run_with_hooks(tokens, fwd_hooks=lunar.hooks(model) + [(name, keep("new"))])
            change = seen["new"] - seen["base"]
            assert float(change[0].norm()) <= 1e-4 * scale  # BOS pinned
            expected = shift.expand_as(change[1:]) if moved else torch.zeros_like(change[1:])
            torch.testing.assert_close(change[1:], expected, rtol=0, atol=1e-4 * scale)


def test_adam_agrees_with_closed_form(llama_like):
    """Both minimise J = MSE + lam |dW|^2 / (rows d_model). The closed form is the exact
    minimiser, so Adam never gets below it. With the learning rate decayed by 0.9 per epoch,
    Adam's total travel is bounded and it freezes at its mini-batch noise level; on a
    well-conditioned problem (ridge = 1: lam = the mean eigenvalue of the Gram) it gets within
    a few percent of the minimiser (measured: 2 % in dW, 0.03 % in J at lr 0.1, 100
    epochs; the bounds below leave 2.5x and 40x margins). At the authors' settings this tiny
    problem gets 3 steps per epoch and stops 6x above the minimum."""
    cf = Lunar(layer=LAYER, ridge=1.0).fit(llama_like, F, R, REF)
    adam = Lunar(layer=LAYER, ridge=1.0, solver="adam", lr=0.1, epochs=100).fit(
        llama_like, F, R, REF
    )
    j_cf, j_adam = cf.diagnostics_[0]["objective"], adam.diagnostics_[0]["objective"]
    assert j_cf <= j_adam * (1 + 1e-9)
    assert (j_adam - j_cf) / j_cf < 1e-2
    a, b = adam.delta_w_out_[LAYER], cf.delta_w_out_[LAYER]
    assert float((a - b).norm() / b.norm()) < 0.05
    history = adam.diagnostics_[0]["epoch_loss"]
    assert len(history) == 100 and history[-1] < history[0]
    # at the authors' settings (20 epochs, lr 0.01) it is not better than the closed form either
    authors = Lunar(layer=LAYER, solver="adam").fit(llama_like, F, R, REF)
    exact = Lunar(layer=LAYER).fit(llama_like, F, R, REF)
    assert exact.diagnostics_[0]["objective"] <= authors.diagnostics_[0]["objective"]
    assert authors.diagnostics_[0]["mse_after"] < authors.diagnostics_[0]["mse_before"]


# ---------------------------------------------------------------------- hooks / weight edit
def test_hooks_equal_weight_edit(tiny_model):
    model = tiny_model
    lunar = Lunar(layer=[0, -1], coef=3.0).fit(model, F, R, REF)
    assert lunar.layers_ == [0, model.cfg.n_layers - 1]
    assert all(d["linear_check"] < 1e-5 for d in lunar.diagnostics_)  # GPT-2 has b_out too
    tokens = model.to_tokens(["Q: 3+4?", "def g(y):"])
    with torch.no_grad():
        base = model(tokens)
        hooked = model.run_with_hooks(tokens, fwd_hooks=lunar.hooks(model))
        with lunar.apply_to_weights(model) as edit:
            assert edit.active
            edited = model(tokens)
        restored = model(tokens)
    assert not edit.active
    assert (hooked - base).abs().max() > 1e-3
    torch.testing.assert_close(hooked, edited, rtol=1e-5, atol=1e-5)
    assert torch.equal(restored, base)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_hooks_compose_with_other_hooks_and_padding(llama_like, fitted, padding_side):
    """NA changes hook_pre of the same layer and SP zeroes keys at hook_post: the recorded key
    is what W_out multiplies, so hooks == weight edit under both, in padded batches."""
    model = llama_like
    pre = [collect(model, s, site="pre", quiet=True) for s in (F, R)]
    na = NeuronAdjust(ratio=0.2, seed=3).fit(*pre)
    assert na.n_selected_[na.layers_.index(LAYER)] > 0
    sp = SelectivePruning(ratio=0.2).fit(*[collect_importance(model, s) for s in (F, R)])
    texts = F.prompts[:3] + R.prompts[:2]
    batch = next(iter(iter_batches(model, texts, batch_size=8, padding_side=padding_side)))
    mask = batch.attention_mask.bool()
    with torch.no_grad():
        hooked = forward(model, batch, na.hooks(model) + sp.hooks(model) + fitted.hooks(model))
        with fitted.apply_to_weights(model):
            edited = forward(model, batch, na.hooks(model) + sp.hooks(model))
        plain = forward(model, batch, na.hooks(model) + sp.hooks(model))
    torch.testing.assert_close(hooked[mask], edited[mask], rtol=1e-5, atol=1e-5)
    assert (hooked[mask] - plain[mask]).abs().max() > 1e-3
    # each row of the padded batch equals that text alone
    for row, i in enumerate(batch.example_index.tolist()):
        alone = model.to_tokens([texts[i]])
        with torch.no_grad():
            one = model.run_with_hooks(alone, fwd_hooks=fitted.hooks(model))
            both = forward(model, batch, fitted.hooks(model))
        torch.testing.assert_close(both[row][mask[row]], one[0], rtol=1e-4, atol=1e-4)


def test_weights_restored_bit_identical_even_after_an_exception(llama_like, fitted):
    model = llama_like
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    w0 = model.blocks[LAYER].mlp.W_out.detach().clone()
    with pytest.raises(RuntimeError, match="boom"):
        with fitted.apply_to_weights(model):
            edited = model.blocks[LAYER].mlp.W_out
            delta = fitted.delta_w_out_[LAYER].to(edited.device)
            torch.testing.assert_close(edited, w0 + delta, rtol=0, atol=1e-6)
            raise RuntimeError("boom")
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    edit = fitted.apply_to_weights(model)  # without `with`: undo by hand, twice is harmless
    assert not torch.equal(model.blocks[LAYER].mlp.W_out, w0)
    edit.undo()
    edit.undo()
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)


def test_generation_with_hooks_equals_generation_with_edited_weights(llama_like):
    model = llama_like
    lunar = Lunar(layer=LAYER, coef=8.0).fit(model, F, R, REF)
    tokens = model.to_tokens("Q: 3+4?")
    kw = dict(max_new_tokens=6, do_sample=False, verbose=False)
    with model.hooks(fwd_hooks=lunar.hooks(model)):
        hooked = model.generate(tokens, **kw)
    with lunar.apply_to_weights(model):
        edited = model.generate(tokens, **kw)
    assert torch.equal(hooked, edited)
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


def test_weight_edit_refuses_a_copy(llama_like, fitted, monkeypatch):
    import mechunlearn.interventions.weights as weights_module

    model = llama_like
    real = weights_module.w_out
    monkeypatch.setattr(weights_module, "w_out", lambda m, layer: real(m, layer).detach().clone())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotImplementedError, match="use hooks"):
        fitted.apply_to_weights(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_hook_without_its_partner_raises(llama_like, fitted):
    add_only = [h for h in fitted.hooks(llama_like) if h[0] == mlp_output_hook(llama_like, LAYER)]
    assert len(add_only) == 1
    tokens = llama_like.to_tokens(["Q: 1+2?"])
    with pytest.raises(RuntimeError, match="whole list"):
        llama_like.run_with_hooks(tokens, fwd_hooks=add_only)


# ------------------------------------------------------------------------ layer selection
def test_choose_layer():
    rows = [
        dict(layer=0, forget=0.10, retain=0.50, retain_base=0.9),  # retain too low
        dict(layer=1, forget=0.30, retain=0.88, retain_base=0.9),
        dict(layer=2, forget=0.30, retain=0.90, retain_base=0.9),  # tie: higher retain wins
        dict(layer=3, forget=0.60, retain=0.95, retain_base=0.9),
    ]
    assert choose_layer(rows) == 2
    assert choose_layer(rows, retain_floor=0.5) == 0
    with pytest.warns(UserWarning, match="No layer keeps"):
        assert (
            choose_layer(rows[:1] + [dict(layer=5, forget=0.2, retain=0.6, retain_base=0.9)]) == 5
        )
    # With several kept skills the warning names the one the best layer keeps least of.
    worst = dict(layer=6, forget=0.2, retain=0.4, retain_base=0.8, worst_retain="mmlu")
    with pytest.warns(UserWarning, match="0.400 of 0.800 on its worst kept skill, 'mmlu'"):
        assert choose_layer([worst]) == 6
    # Layers are compared by the share of its base their worst kept skill keeps, not raw scores:
    # layer 7 keeps 92 % of 0.65, layer 8 70 % of 1.0 (a higher raw score).
    shares = [dict(layer=7, forget=0.5, retain=0.60, retain_base=0.65),
              dict(layer=8, forget=0.5, retain=0.70, retain_base=1.0)]  # fmt: skip
    with pytest.warns(UserWarning, match="layer 7 keeps the most"):
        assert choose_layer(shares) == 7
    with pytest.raises(ValueError, match="empty"):
        choose_layer([])


def test_layer_auto_sweeps_on_held_back_examples(llama_like):
    model = llama_like
    some = Lunar(layer="auto", candidates=(2, 0)).fit(model, F, R, REF)
    assert [row["layer"] for row in some.layer_sweep_] == [0, 2]
    assert some.get_params()["candidates"] == [2, 0]
    assert [r["layer"] for r in Lunar(layer="auto").fit(model, F, R, REF).layer_sweep_] == [2]
    every = list(range(model.cfg.n_layers))  # the default sweeps every third layer only
    lunar = Lunar(layer="auto", seed=1, candidates=every).fit(
        model, F, R, REF, held_out=0.25, general=None
    )
    sweep = lunar.layer_sweep_
    assert [row["layer"] for row in sweep] == every
    assert lunar.layers_ == [choose_layer(sweep)]
    probe_f, probe_r = F.split(0.25, seed=1)[1], R.split(0.25, seed=1)[1]
    assert all(row["n_probe_forget"] == len(probe_f) == 2 for row in sweep)
    base_f, base_r = teacher_forced(model, probe_f), teacher_forced(model, probe_r)
    assert all(row["forget_base"] == base_f.score for row in sweep)
    assert all(row["retain_base"] == base_r.score for row in sweep)
    assert all(row["eligible"] == (row["retain"] >= 0.95 * row["retain_base"]) for row in sweep)
    # the final direction uses every forget example (refit after the choice)
    fixed = Lunar(layer=lunar.layers_[0]).fit(model, F, R, REF)
    torch.testing.assert_close(lunar.direction_, fixed.direction_)
    torch.testing.assert_close(lunar.delta_w_out_, fixed.delta_w_out_)
    import pandas as pd

    assert len(pd.DataFrame(sweep)) == model.cfg.n_layers


def test_layer_auto_holds_general_text_at_its_floor(llama_like):
    """By default the sweep also scores the shipped general questions on the unedited model's
    own continuations; a given general skill replaces them; None drops the floor."""
    model = llama_like
    shipped = Lunar(layer="auto", candidates=(0, 2), coef=0.5).fit(model, F, R, REF)
    own = own_continuations(model, calibration_skill(n=32, formats=["plain"]).prompts, 16)
    for row in shipped.layer_sweep_:
        assert row["retain_base[general-questions]"] == teacher_forced(model, own).score
        shares = {name: kept_share(row[f"retain[{name}]"], row[f"retain_base[{name}]"])
                  for name in ("general-questions", R.name)}  # fmt: skip
        worst = row["worst_retain"]  # the floor is on the kept skill it holds least of
        assert shares[worst] == min(shares.values())
        assert (row["retain"], row["retain_base"]) == (row[f"retain[{worst}]"],
                                                       row[f"retain_base[{worst}]"])  # fmt: skip
    assert shipped.meta_["general"] == "general-questions"
    given = Skill.from_texts("prose", ["The cat sat", "A dog ran"], [" on a mat.", " home."])
    rows = Lunar(layer="auto", candidates=(0,)).fit(model, F, R, REF, general=given).layer_sweep_
    assert rows[0]["retain_base[prose]"] == teacher_forced(model, given).score
    assert "worst_retain" not in Lunar(layer="auto", candidates=(0,)).fit(
        model, F, R, REF, general=None).layer_sweep_[0]  # fmt: skip
    with pytest.raises(ValueError, match="general must be 'shipped'"):
        Lunar(layer=0).fit(model, F, R, REF, general="mmlu")  # checked for a fixed layer too
    with pytest.raises(ValueError, match="both named"):
        Lunar(layer="auto").fit(model, F, R, REF, general=R)
    with pytest.raises(ValueError, match="has no answers"):
        Lunar(layer="auto").fit(model, F, R, REF, general=Skill.from_texts("q", ["Why?"]))


def test_the_pipeline_gives_its_general_skill_instead_of_the_shipped_one(tiny_llama):
    prose = Skill.from_texts("prose", ["The cat sat", "A dog ran"], [" on a mat.", " home."])
    skills = Skills(forget=(F, F), retain={R.name: (R, R)}, general=(prose, prose))
    lunar = Lunar(layer="auto", candidates=(0,))
    fit_estimator(lunar, get_method("LUNAR"), tiny_llama, skills, Probes(), batch_size=4)
    row = lunar.layer_sweep_[0]
    assert "retain[prose]" in row and "retain[general-questions]" not in row
    # A run without a general skill has no general floor either (not the shipped questions).
    alone = Lunar(layer="auto", candidates=(0,))
    without = Skills(forget=(F, F), retain={R.name: (R, R)}, general=None)
    fit_estimator(alone, get_method("LUNAR"), tiny_llama, without, Probes(), batch_size=4)
    assert "worst_retain" not in alone.layer_sweep_[0] and alone.meta_["general"] is None


def test_default_reference_is_the_shipped_set(llama_like):
    lunar = Lunar(layer=0).fit(llama_like, F[:2], R[:2])
    assert lunar.meta_["reference"] == "reference"
    assert lunar.meta_["n_reference"] == len(reference_prompts())


# --------------------------------------------------------------------------- the contract
def test_save_load_round_trip(tmp_path, llama_like, device):
    model = llama_like
    lunar = Lunar(layer="auto", coef=1.5, ridge=1e-3).fit(model, F, R, REF)
    back = Lunar.load(lunar.save(tmp_path / "lunar"), device=device)
    assert back.get_params() == lunar.get_params()
    assert Lunar(**back.get_params()).get_params() == lunar.get_params()
    assert back.layers_ == lunar.layers_ and back.meta_ == lunar.meta_
    assert back.layer_sweep_ == lunar.layer_sweep_ and back.fit_loss_ == lunar.fit_loss_
    assert back.diagnostics_ == lunar.diagnostics_
    for layer in lunar.layers_:
        assert torch.equal(back.direction_[layer].cpu(), lunar.direction_[layer].cpu())
        assert torch.equal(back.delta_w_out_[layer].cpu(), lunar.delta_w_out_[layer].cpu())
    tokens = model.to_tokens(["Q: 3+4?"])
    with torch.no_grad():
        a = model.run_with_hooks(tokens, fwd_hooks=lunar.hooks(model))
        b = model.run_with_hooks(tokens, fwd_hooks=back.hooks(model))
    assert torch.equal(a, b)
    multi = Lunar(layer=[0, 2], solver="adam", epochs=2).fit(model, F, R, REF)
    again = Lunar.load(multi.save(tmp_path / "multi"))
    assert again.layers_ == [0, 2] and again.get_params()["layer"] == [0, 2]
    assert again.diagnostics_[0]["epoch_loss"] == multi.diagnostics_[0]["epoch_loss"]
    with pytest.raises(ValueError, match="holds Lunar"):
        NeuronAdjust.load(tmp_path / "lunar.safetensors")


def test_not_fitted(llama_like):
    lunar = Lunar()
    assert not lunar.is_fitted and "fitted" not in repr(lunar)
    for call in (lunar.hooks, lambda: lunar.apply_to_weights(llama_like), lambda: lunar.save("x")):
        with pytest.raises(NotFittedError, match="not fitted"):
            call()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"layer": "best"}, "layer"),
        ({"layer": []}, "layer"),
        ({"layer": 1.5}, "layer"),
        ({"layer": True}, "layer"),
        ({"coef": 0}, "coef"),
        ({"coef": float("nan")}, "coef"),
        ({"coef": "2"}, "coef"),
        ({"solver": "lbfgs"}, "solver"),
        ({"ridge": 0}, "ridge"),
        ({"ridge": -1e-3}, "ridge"),
        ({"epochs": 0}, "epochs"),
        ({"epochs": 2.5}, "epochs"),
        ({"lr": 0}, "lr"),
        ({"seed": -1}, "seed"),
        ({"candidates": []}, "candidates"),
        ({"candidates": "0,1"}, "candidates"),
        ({"layer": 1, "candidates": [0, 1]}, "only applies to layer='auto'"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    # a value of the wrong type (2.5 epochs) is a TypeError, a bad value a ValueError
    with pytest.raises((ValueError, TypeError), match=match):
        Lunar(**kwargs)


def test_bad_fit_input(llama_like):
    model = llama_like
    with pytest.raises(ValueError, match="reference skill 'empty' is empty.*reference=None"):
        Lunar(layer=0).fit(model, F, R, Skill("empty", []))
    with pytest.raises(ValueError, match="retain skill 'none' is empty"):
        Lunar(layer=0).fit(model, F, Skill("none", []), REF)
    with pytest.raises(TypeError, match="Skill.from_texts"):
        Lunar(layer=0).fit(model, F.prompts, R, REF)
    with pytest.raises(ValueError, match=r"Layer 3 is out of range.*\(0\.\.2"):
        Lunar(layer=3).fit(model, F, R, REF)
    with pytest.raises(ValueError, match="held_out.*fixed layer"):
        Lunar().fit(model, F[:1], R, REF)
    with pytest.raises(ValueError, match="retain skill 'p' has none.*fixed layer"):
        Lunar().fit(model, F, Skill.from_texts("p", R.prompts), REF)
    with pytest.raises(ValueError, match="direction at layer 0 is zero"):
        Lunar(layer=0).fit(model, F, R, F)
    with pytest.raises(ValueError, match="batch_size"):
        Lunar(layer=0).fit(model, F, R, REF, batch_size=0)


def test_another_model_is_refused(fitted, char_tokenizer, device):
    other = make_tiny_llama(char_tokenizer, device, d_mlp=40)
    for call in (lambda: fitted.hooks(other), lambda: fitted.apply_to_weights(other)):
        with pytest.raises(ValueError, match="d_mlp"):
            call()
    tokens = other.to_tokens(["Q: 1+2?"])
    with pytest.raises(ValueError, match="d_mlp=48"):
        other.run_with_hooks(tokens, fwd_hooks=fitted.hooks())
    assert all(not hp.fwd_hooks for hp in other.hook_dict.values())


def test_interrupted_fit_leaves_model_and_object_as_they_were(llama_like, monkeypatch):
    model = llama_like
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    lunar = Lunar(layer=0, solver="adam").fit(model, F, R, REF)
    old = lunar.delta_w_out_[0].clone()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.optim.AdamW, "step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        lunar.fit(model, F, R[:3], REF)
    assert torch.equal(lunar.delta_w_out_[0], old) and lunar.meta_["n_retain"] == len(R)
    with pytest.raises(KeyboardInterrupt):
        Lunar(layer=0, solver="adam").fit(model, F, R, REF)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


R2 = Skill.from_texts("r2", [f"The {c} sat on" for c in "abcdefgh"], [" the mat."] * 8)


def test_several_kept_skills_all_enter_the_normal_equations(llama_like):
    """Each kept skill's keys are "unchanged" rows: the two-skill fit equals a fit on one skill
    holding both skills' examples (the normal equations only see the rows)."""
    model = llama_like
    both = Lunar(layer=1).fit(model, F, [R, R2], REF)
    merged = Skill("r+r2", [*R.examples, *R2.examples])
    one = Lunar(layer=1).fit(model, F, merged, REF)
    torch.testing.assert_close(both.delta_w_out_[1], one.delta_w_out_[1], rtol=1e-5, atol=1e-6)
    assert both.meta_["retain"] == "r, r2" and both.meta_["n_retain"] == 16
    alone = Lunar(layer=1).fit(model, F, R, REF)
    assert not torch.allclose(both.delta_w_out_[1], alone.delta_w_out_[1])


def test_the_layer_sweep_keeps_every_kept_skill_above_its_floor(llama_like):
    model = llama_like
    lunar = Lunar(layer="auto", candidates=[0, 1, 2]).fit(model, F, [R, R2], REF)
    for row in lunar.layer_sweep_:
        shares = [
            row[f"retain[{name}]"] / row[f"retain_base[{name}]"]
            for name in ("r", "r2")
            if row[f"retain_base[{name}]"] > 0
        ]
        worst = row["worst_retain"]
        assert row["retain"] == row[f"retain[{worst}]"]
        if shares:
            assert row["retain"] / row["retain_base"] == pytest.approx(min(shares))
        assert row["eligible"] == (row["retain"] >= 0.95 * row["retain_base"])
    chosen = [r for r in lunar.layer_sweep_ if r["layer"] == lunar.layers_[0]][0]
    if any(r["eligible"] for r in lunar.layer_sweep_):
        assert chosen["eligible"]


@pytest.mark.parametrize(
    "retain, message",
    [([], "retain is an empty list"), ([R, R], "retain names a skill twice"),
     ([R, "text"], "retain must be a Skill")],
)  # fmt: skip
def test_bad_kept_skill_lists(llama_like, retain, message):
    with pytest.raises((TypeError, ValueError), match=message):
        Lunar(layer=1).fit(llama_like, F, retain, REF)
