"""SelectivePruning: hook and weight edit agree, top-fraction selection, iterative progress."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mechunlearn import Importance, SelectivePruning, Skill, collect, collect_importance
from mechunlearn.batching import tokenize_examples
from mechunlearn.sites import hook_name
from mechunlearn.tuning import prune_iteratively

F = Skill.from_texts(
    "f", [f"Q: {i}+{i + 1}?" for i in range(8)], [f" {2 * i + 1}" for i in range(8)]
)
R = Skill.from_texts(
    "r", [f"def f{i}(x):" for i in range(8)], [f"\n  return x*{i}" for i in range(8)]
)


def toy_importance(values, skill="toy") -> Importance:
    values = torch.as_tensor(values, dtype=torch.float64)
    layers, width = values.shape
    meta = {"model": "toy", "n_layers": layers, "d_mlp": width, "d_model": 8, "skill": skill}
    return Importance(values, list(range(layers)), 100, meta)


def test_top_fraction_of_score():
    gen = torch.Generator().manual_seed(0)
    imp_f = toy_importance(torch.rand(3, 20, generator=gen, dtype=torch.float64))
    imp_r = toy_importance(torch.rand(3, 20, generator=gen, dtype=torch.float64))
    sp = SelectivePruning(ratio=0.1, eps=1e-3).fit(imp_f, imp_r)
    score = imp_f.values / (imp_r.values + 1e-3)
    top = torch.topk(score.flatten(), 6).indices
    expected = torch.zeros(60, dtype=torch.bool)
    expected[top] = True
    assert torch.equal(sp.selected_.cpu().flatten(), expected)
    assert sum(sp.n_selected_) == 6
    torch.testing.assert_close(sp.scores_, score)


def test_collect_importance_matches_brute_force(llama_like):
    model = llama_like
    imp = collect_importance(model, F, batch_size=3)
    total = np.zeros((model.cfg.n_layers, model.cfg.d_mlp))
    count = 0
    for ids, _ in tokenize_examples(model, F.prompts, F.answers):
        store = {}

        def keep(layer, store=store):
            def hook(act, hook):
                store[layer] = act[0, 1:].detach().double().abs().cpu().numpy()  # BOS excluded

            return hook

        tokens = torch.tensor([ids], device=next(model.parameters()).device)
        hooks = [(hook_name("key", layer), keep(layer)) for layer in range(model.cfg.n_layers)]
        model.run_with_hooks(tokens, fwd_hooks=hooks)
        total += np.stack([store[layer].sum(0) for layer in range(model.cfg.n_layers)])
        count += len(ids) - 1
    assert imp.n_tokens == count
    np.testing.assert_allclose(imp.values.cpu().numpy(), total / count, rtol=1e-5, atol=1e-9)


def test_importance_save_load(tmp_path, llama_like):
    imp = collect_importance(llama_like, F, layers=[0, 2])
    back = Importance.load(imp.save(tmp_path / "imp"))
    assert torch.equal(back.values, imp.values.cpu())
    assert back.layers == [0, 2] and back.n_tokens == imp.n_tokens and back.meta == imp.meta
    back.check_model(llama_like)


def test_hook_equals_weight_zeroing(tiny_model):
    model = tiny_model
    sp = SelectivePruning(ratio=0.1).fit(collect_importance(model, F), collect_importance(model, R))
    tokens = model.to_tokens(["Q: 3+4?", "def g(y):"])
    with torch.no_grad():
        base = model(tokens)
        hooked = model.run_with_hooks(tokens, fwd_hooks=sp.hooks(model))
        with sp.apply_to_weights(model) as edit:
            assert edit.active
            edited = model(tokens)
        restored = model(tokens)
    assert not edit.active
    assert not torch.equal(hooked, base)
    torch.testing.assert_close(edited, hooked, rtol=1e-6, atol=1e-6)
    assert torch.equal(restored, base)
    edit = sp.apply_to_weights(model)  # undo by hand, twice is harmless
    for layer, idx in sp._index.items():
        assert not model.blocks[layer].mlp.W_out[idx.to(tokens.device)].any()
    edit.undo()
    edit.undo()
    with torch.no_grad():
        assert torch.equal(model(tokens), base)


def test_a_failing_weight_edit_restores_every_layer(tiny_model, monkeypatch):
    from mechunlearn.interventions import weights

    model = tiny_model
    sp = SelectivePruning(ratio=0.2).fit(collect_importance(model, F), collect_importance(model, R))
    layers = [layer for layer, idx in sp._index.items() if len(idx)]
    assert len(layers) >= 2
    before = [model.blocks[layer].mlp.W_out.detach().clone() for layer in range(len(model.blocks))]
    real = weights.w_out

    def failing(m, layer):
        if layer == layers[-1]:
            raise KeyboardInterrupt
        return real(m, layer)

    monkeypatch.setattr(weights, "w_out", failing)
    with pytest.raises(KeyboardInterrupt):
        sp.apply_to_weights(model)
    for layer, weight in enumerate(before):
        assert torch.equal(model.blocks[layer].mlp.W_out, weight), f"layer {layer} left pruned"


def test_iterative_makes_progress(llama_like):
    model = llama_like
    total = model.cfg.n_layers * model.cfg.d_mlp  # 144
    sp = prune_iteratively(model, F, R, ratio=0.1, step=0.04)
    target = round(0.1 * total)
    assert int(sp.selected_.sum()) == target
    steps = math.ceil(target / round(0.04 * total))
    assert len(sp.history_) == steps
    fractions = [h["pruned_fraction"] for h in sp.history_]
    assert fractions[0] == 0 and all(b > a for a, b in zip(fractions, fractions[1:], strict=False))
    # importances are recollected on the pruned model: pruned neurons read zero
    imp = collect_importance(model, F, fwd_hooks=sp.hooks(model))
    assert (imp.values[sp.selected_] == 0).all()
    assert (imp.values[~sp.selected_] > 0).all()
    one_shot = SelectivePruning(ratio=0.1).fit(
        collect_importance(model, F), collect_importance(model, R)
    )
    assert int(one_shot.selected_.sum()) == target


def test_fit_checks_inputs(llama_like):
    imp = toy_importance(torch.rand(2, 5))
    stats = collect(llama_like, F, site="key", quiet=True)
    with pytest.raises(TypeError, match="collect_importance"):
        SelectivePruning().fit(stats, stats)
    with pytest.raises(TypeError, match="missing 1 required positional argument"):
        SelectivePruning().fit(imp)
    with pytest.raises(TypeError, match="importance_r must be Importance"):
        SelectivePruning().fit(imp, "mbpp")
    with pytest.raises(TypeError, match="pruned must be SelectivePruning"):
        SelectivePruning().fit(imp, toy_importance(torch.rand(2, 5)), pruned="all")
    other = toy_importance(torch.rand(3, 5))
    with pytest.raises(ValueError, match="n_layers"):
        SelectivePruning().fit(imp, other)


def test_a_step_keeps_what_was_pruned(llama_like):
    imp_f = collect_importance(llama_like, F)
    imp_r = collect_importance(llama_like, R)
    first = SelectivePruning(ratio=0.05).fit(imp_f, imp_r)
    second = SelectivePruning(ratio=0.05).fit(imp_f, imp_r, pruned=first)
    assert (second.selected_ & first.selected_).sum() == first.selected_.sum()
    assert int(second.selected_.sum()) == 2 * int(first.selected_.sum())
    assert len(second.history_) == 2 and second.history_[0] == first.history_[0]
