"""SIMU: attribution against a brute-force Riemann sum, the training mask (parameters and
optimizer moments), the model left bit-identical, weight deltas, save/load and errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from mechunlearn import Simu, Skill
from mechunlearn.batching import tokenize_examples
from mechunlearn.interventions import (
    MaskedSophiaH,
    NotFittedError,
    critical_neurons,
    neuron_attribution,
)
from mechunlearn.interventions.weights import WeightEdit, w_out
from mechunlearn.sites import hook_name
from tests.tiny_models import LEGACY, make_tiny_llama
from tests.tiny_models import unchanged as _same
from tests.tiny_models import weights as _params

F = Skill.from_texts(
    "f", [f"Q: {i}+{i + 1}?" for i in range(8)], [f" {2 * i + 1}" for i in range(8)]
)
R = Skill.from_texts(
    "r", [f"def f{i}(x):" for i in range(8)], [f"\n  return x*{i}" for i in range(8)]
)
SMALL = dict(max_steps=4, lr=0.05, batch_size=4, forget_loss_factor=None)


def _tokens(model):
    return model.to_tokens(["Q: 3+4?", "def g(y):"])


@pytest.fixture(scope="module")
def fitted(llama_like):
    return Simu(**SMALL).fit(llama_like, F, R, quiet=True)


# ------------------------------------------------------------------------------ attribution
def brute_force_attribution(model, skill, layers, steps):
    """Att by explicit per-example, per-step hooked forwards and autograd (no batching)."""
    device = next(model.parameters()).device
    total = torch.zeros((len(layers), model.cfg.d_mlp), dtype=torch.float64)
    n_answer = 0
    for ids, n_head in tokenize_examples(model, skill.prompts, skill.answers):
        tokens = torch.tensor([ids], device=device)
        n_answer += len(ids) - n_head
        clean = {}

        def save(layer, clean=clean):
            def hook(act, hook):
                clean[layer] = act.detach().clone()

            return hook

        with torch.no_grad():
            model.run_with_hooks(
                tokens, fwd_hooks=[(hook_name("key", layer), save(layer)) for layer in layers]
            )
        for j in range(1, steps + 1):
            leaves = {}

            def scale(layer, alpha=j / steps, clean=clean, leaves=leaves):
                def hook(act, hook):
                    x = clean[layer].clone()
                    x[:, 1:] = x[:, 1:] * alpha  # BOS (position 0) keeps its clean key
                    leaves[layer] = x.requires_grad_(True)
                    return leaves[layer]

                return hook

            logits = model.run_with_hooks(
                tokens, fwd_hooks=[(hook_name("key", layer), scale(layer)) for layer in layers]
            )
            # Positions n_head - 1 .. len - 2 predict the answer tokens.
            logp = logits[0, n_head - 1 : -1].double().log_softmax(-1)
            loglik = logp.gather(1, tokens[0, n_head:, None]).sum()
            grads = torch.autograd.grad(loglik, [leaves[layer] for layer in layers])
            for i, layer in enumerate(layers):
                total[i] += (grads[i][0, 1:] * clean[layer][0, 1:]).double().sum(0).cpu()
    return total / (steps * n_answer)


@pytest.mark.parametrize("layers", [None, [0, 2]])
def test_attribution_equals_brute_force_riemann_sum(llama_like, layers):
    model = llama_like
    att = neuron_attribution(model, F, layers=layers, steps=3, batch_size=3)
    chosen = list(range(model.cfg.n_layers)) if layers is None else layers
    expected = brute_force_attribution(model, F, chosen, steps=3)
    assert att.layers == chosen and att.values.dtype == torch.float64
    scale = float(expected.abs().max())
    torch.testing.assert_close(att.values.cpu(), expected, rtol=1e-4, atol=1e-5 * scale)


def test_attribution_is_integrated_gradients_completeness(tiny_llama):
    """Sum of all attributions -> logL(clean keys) - logL(zero keys) as the steps grow."""
    model = tiny_llama
    layers = list(range(model.cfg.n_layers))
    skill = F[:4]

    def mean_loglik(zero: bool) -> float:
        total, count = 0.0, 0
        for ids, n_head in tokenize_examples(model, skill.prompts, skill.answers):
            tokens = torch.tensor([ids], device=next(model.parameters()).device)

            def zero_keys(act, hook):
                return torch.cat([act[:, :1], torch.zeros_like(act[:, 1:])], dim=1)

            hooks = [(hook_name("key", layer), zero_keys) for layer in layers] if zero else []
            with torch.no_grad():
                logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
            logp = logits[0, n_head - 1 : -1].double().log_softmax(-1)
            total += float(logp.gather(1, tokens[0, n_head:, None]).sum())
            count += len(ids) - n_head
        return total / count

    gap = mean_loglik(False) - mean_loglik(True)
    errors = {
        m: abs(float(neuron_attribution(model, skill, steps=m).values.sum()) - gap) for m in (4, 64)
    }
    assert errors[64] < 0.02 * abs(gap), (errors, gap)
    assert errors[64] < errors[4]


def test_attribution_records_the_clean_loss(tiny_llama):
    att = neuron_attribution(tiny_llama, F, steps=2, batch_size=5)
    tokens = torch.tensor([len(ids) - n for ids, n in tokenize_examples(tiny_llama, F.prompts,
                                                                         F.answers)])  # fmt: skip
    assert torch.equal(att.example_tokens.cpu(), tokens)
    assert 0 < att.loss < 20 and math.isfinite(att.loss)


def test_critical_neurons_rule():
    values = torch.tensor([[1.0, 0.5, 0.2, 0.3], [-1.0, -2.0, -0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    expected = torch.tensor([[True, True, False, False], [False, False, False, False], [False] * 4])
    assert torch.equal(critical_neurons(values, 0.3), expected)
    assert torch.equal(critical_neurons(values, 0.0)[0], torch.tensor([True] * 4))


@pytest.mark.parametrize("dual", [False, True])
def test_critical_mask_is_forget_only_or_dual(tiny_llama, dual):
    simu = Simu(threshold=0.3, dual=dual, **SMALL).fit(tiny_llama, F, R, quiet=True)
    crit_f = critical_neurons(neuron_attribution(tiny_llama, F, batch_size=4).values, 0.3)
    crit_r = critical_neurons(neuron_attribution(tiny_llama, R, batch_size=4).values, 0.3)
    expected = crit_f if dual else crit_f & ~crit_r
    assert torch.equal(simu.critical_, expected)
    assert (simu.attribution_retain_ is None) == dual
    assert simu.attribution_.dtype == torch.float32 and simu.attribution_.shape == (3, 48)
    assert simu.n_critical_ == expected.sum(1).tolist()


# ------------------------------------------------------------------------------- optimizer
def _toy_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 4, generator=gen).requires_grad_(True)
    x = torch.randn(10, 6, generator=gen)
    mask = torch.zeros(6, 4, dtype=torch.bool)
    mask[[1, 4]] = True  # two trainable rows

    def loss_fn():
        # Cross terms between rows: the Hessian-vector product reaches the masked rows.
        return (x @ w).tanh().square().sum() + (w.sum(0) ** 3).sum()

    return w, mask, loss_fn


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_masked_sophia_keeps_masked_entries_and_moments_at_zero(weight_decay):
    w, mask, loss_fn = _toy_problem()
    w0 = w.detach().clone()
    opt = MaskedSophiaH([w], [mask], lr=0.5, update_period=2, weight_decay=weight_decay)
    for _ in range(5):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # create_graph's reference cycle
            loss_fn().backward(create_graph=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert torch.equal(w.detach()[~mask], w0[~mask])
        state = opt.state[w]
        for key in ("momentum", "hessian_moment", "hessian"):
            assert torch.equal(state[key][~mask], torch.zeros_like(state[key][~mask])), key
    assert not torch.equal(w.detach()[mask], w0[mask])
    assert bool((opt.state[w]["hessian"][mask] != 0).any())


def test_unmasked_sophia_would_estimate_curvature_on_masked_rows():
    """The masking of the Hessian estimate matters: SophiaH alone fills the masked rows."""
    from pytorch_optimizer import SophiaH

    w, mask, loss_fn = _toy_problem()
    opt = SophiaH([w], lr=0.5)
    (grad,) = torch.autograd.grad(loss_fn(), [w], create_graph=True)
    w.grad = torch.where(mask, grad, 0.0)  # masked gradient, graph kept
    opt.step()
    assert bool((opt.state[w]["hessian"][~mask] != 0).any())


def test_masked_sophia_rejects_bad_masks():
    w = torch.zeros(3, 2, requires_grad=True)
    with pytest.raises(ValueError, match="shape"):
        MaskedSophiaH([w], [torch.ones(2, 3, dtype=torch.bool)])
    with pytest.raises(ValueError, match="1 parameters but 2 masks"):
        MaskedSophiaH([w], [None, None])
    with pytest.raises(ValueError, match="Gaussian"):
        MaskedSophiaH([w], [None], hessian_distribution="rademacher")


# ------------------------------------------------------------------------ fit invariants
def _critical_rows(simu) -> dict[int, torch.Tensor]:
    return {
        layer: torch.nonzero(simu.critical_[row]).flatten()
        for row, layer in enumerate(simu.layers_)
        if simu.n_critical_[row]
    }


def _trainable_ids(model, simu) -> set[int]:
    """Attention parameters, and the parameters holding a W_out with critical rows."""
    ids = {id(p) for block in model.blocks for p in block.attn.parameters()}
    storages = {w_out(model, layer).untyped_storage().data_ptr() for layer in _critical_rows(simu)}
    return ids | {id(p) for p in model.parameters() if p.untyped_storage().data_ptr() in storages}


def test_training_changes_only_attention_and_critical_rows(tiny_model, monkeypatch):
    model = tiny_model
    layers = range(model.cfg.n_layers)
    before = _params(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    w_before = [w_out(model, layer).detach().clone() for layer in layers]
    snaps = []
    real_step = MaskedSophiaH.step

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        snaps.append(
            (
                _params(model),
                [w_out(model, layer).detach().clone() for layer in layers],
                {id(p) for p in model.parameters() if p.requires_grad},
            )
        )
        return out

    monkeypatch.setattr(MaskedSophiaH, "step", step)
    simu = Simu(**SMALL).fit(model, F, R, quiet=True)
    assert len(snaps) == simu.n_updates_ == 4
    named = dict(model.named_parameters())
    trainable = _trainable_ids(model, simu)
    attn = {id(p) for block in model.blocks for p in block.attn.parameters()}
    for params, rows, requires_grad in snaps:
        assert requires_grad == trainable
        for name, value in params.items():
            if id(named[name]) not in trainable:
                assert torch.equal(value, before[name]), name  # frozen: bit-identical
        for layer in layers:
            crit = simu.critical_[layer].to(rows[layer].device)
            assert torch.equal(rows[layer][~crit], w_before[layer][~crit]), layer
    last_params, last_rows, _ = snaps[-1]
    assert any(not torch.equal(last_params[n], before[n]) for n in named if id(named[n]) in attn)
    for layer, idx in _critical_rows(simu).items():
        idx = idx.to(last_rows[layer].device)
        assert not torch.equal(last_rows[layer][idx], w_before[layer][idx])
    # After fit: the model exactly as before, flags included, no gradients left.
    assert _same(model, before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_deltas_reproduce_the_trained_model(tiny_model, monkeypatch):
    model = tiny_model
    tokens = _tokens(model)
    trained_logits = []
    real_step = MaskedSophiaH.step

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        with torch.no_grad():
            trained_logits.append(model(tokens))
        return out

    monkeypatch.setattr(MaskedSophiaH, "step", step)
    simu = Simu(**SMALL).fit(model, F, R, quiet=True)
    before = _params(model)
    with torch.no_grad():
        base = model(tokens)
        with simu.apply_to_weights(model) as edit:
            assert edit.active
            edited = model(tokens)
        assert _same(model, before)
        assert torch.equal(model(tokens), base)
    torch.testing.assert_close(edited, trained_logits[-1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(edited, base)
    # Only attention parameters and the critical W_out rows carry deltas.
    for name, delta in simu.deltas_.items():
        layer = int(name.split(".")[1])
        if name.endswith(".mlp.W_out"):
            assert delta.shape == (simu.n_critical_[layer], model.cfg.d_model)
        else:
            assert name.startswith(f"blocks.{layer}.attn.") and "norm" not in name


def test_gpt2_bridge_trains_the_q_k_v_views_not_their_fused_weight(tiny_gpt2):
    simu = Simu(**SMALL).fit(tiny_gpt2, F, R, quiet=True)
    names = list(simu.deltas_)
    assert any(".attn.q." in n for n in names) and not any(".qkv." in n for n in names)
    before = _params(tiny_gpt2)
    with simu.apply_to_weights(tiny_gpt2):
        assert not _same(tiny_gpt2, before)
    assert _same(tiny_gpt2, before)


def test_apply_to_weights_restores_after_an_exception(llama_like, fitted):
    before = _params(llama_like)
    with pytest.raises(RuntimeError, match="boom"):
        with fitted.apply_to_weights(llama_like):
            assert not _same(llama_like, before)
            raise RuntimeError("boom")
    assert _same(llama_like, before)


def test_mlp_hooks_equal_the_w_out_row_deltas(llama_like, fitted):
    model = llama_like
    tokens = _tokens(model)
    rows = _critical_rows(fitted)
    assert rows, "the fixture should have critical neurons"
    with torch.no_grad():
        hooked = model.run_with_hooks(tokens, fwd_hooks=fitted.mlp_hooks(model))
        with WeightEdit(model) as edit:
            for layer, idx in rows.items():
                idx = idx.to(tokens.device)
                delta = fitted.deltas_[f"blocks.{layer}.mlp.W_out"]
                edit.apply(w_out(model, layer), lambda w, i=idx, d=delta: w.index_add_(0, i, d))
            edited = model(tokens)
        base = model(tokens)
    torch.testing.assert_close(hooked, edited, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hooked, base)


def test_hooks_point_to_apply_to_weights(fitted, llama_like):
    with pytest.raises(NotImplementedError, match="apply_to_weights"):
        fitted.hooks(llama_like)


def test_history_and_early_stop(tiny_llama):
    simu = Simu(max_steps=40, lr=1.0, batch_size=4, forget_loss_factor=1.05).fit(
        tiny_llama, F, R, quiet=True
    )
    assert simu.stop_reason_ == "forget_loss_target"
    last = simu.history_[-1]
    assert last["forget_loss"] >= 1.05 * last["forget_loss_initial"]
    assert all(h["forget_loss"] < 1.05 * h["forget_loss_initial"] for h in simu.history_[:-1])
    assert simu.n_updates_ == len(simu.history_) - 1 < 40
    first = simu.history_[0]
    assert first["forget_loss"] == pytest.approx(first["forget_loss_initial"], rel=1e-4)
    assert "updates (forget_loss_target)" in repr(simu)


def test_same_seed_same_deltas(tiny_llama):
    a = Simu(**SMALL, seed=3).fit(tiny_llama, F, R, quiet=True)
    b = Simu(**SMALL, seed=3).fit(tiny_llama, F, R, quiet=True)
    assert a.deltas_.keys() == b.deltas_.keys()
    assert all(torch.equal(a.deltas_[k], b.deltas_[k]) for k in a.deltas_)
    assert a.history_ == b.history_


# --------------------------------------------------------------------------- failures
def test_nan_loss_stops_and_restores(tiny_llama):
    before = _params(tiny_llama)
    simu = Simu(max_steps=5, lr=1e30, batch_size=4, forget_loss_factor=None)
    with pytest.raises(FloatingPointError, match="not finite at step 1 .*restored"):
        simu.fit(tiny_llama, F, R, quiet=True)
    assert _same(tiny_llama, before)
    assert not simu.is_fitted


def test_interrupted_fit_leaves_the_model_as_it_was(tiny_llama, monkeypatch):
    before = _params(tiny_llama)
    flags = [p.requires_grad for p in tiny_llama.parameters()]
    calls = []
    real_step = MaskedSophiaH.step

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(MaskedSophiaH, "step", step)
    simu = Simu(**SMALL)
    with pytest.raises(KeyboardInterrupt):
        simu.fit(tiny_llama, F, R, quiet=True)
    assert _same(tiny_llama, before)
    assert [p.requires_grad for p in tiny_llama.parameters()] == flags
    assert all(p.grad is None for p in tiny_llama.parameters())
    assert not simu.is_fitted


# ---------------------------------------------------------------------------- save / load
def test_save_load_round_trip(tmp_path, llama_like, fitted):
    back = Simu.load(fitted.save(tmp_path / "simu"), device=next(llama_like.parameters()).device)
    assert back.get_params() == fitted.get_params()
    assert back.layers_ == fitted.layers_ and back.d_mlp_ == fitted.d_mlp_
    assert torch.equal(back.critical_.cpu(), fitted.critical_.cpu())
    assert torch.equal(back.attribution_.cpu(), fitted.attribution_.cpu())
    assert back.deltas_.keys() == fitted.deltas_.keys()
    assert all(torch.equal(back.deltas_[k].cpu(), fitted.deltas_[k].cpu()) for k in back.deltas_)
    assert back.history_ == fitted.history_ and back.stop_reason_ == fitted.stop_reason_
    tokens = _tokens(llama_like)
    with torch.no_grad():
        with fitted.apply_to_weights(llama_like):
            a = llama_like(tokens)
        with back.apply_to_weights(llama_like):
            b = llama_like(tokens)
    assert torch.equal(a, b)


# -------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"threshold": 1.0}, r"threshold must lie in \[0, 1\)"),
        ({"steps": 0}, r"steps must lie in \[1, inf\]"),
        ({"gamma": -1}, "gamma must be a finite number >= 0"),
        ({"lr": 0}, r"lr must lie in \(0, inf\)"),
        ({"max_steps": 0}, r"max_steps must lie in \[1, inf\]"),
        ({"forget_loss_factor": 1.0}, "forget_loss_factor must be > 1"),
        ({"dual": "yes"}, "dual must be True or False"),
        ({"optimizer_kwargs": {"lr": 1.0}}, "must not hold 'lr'"),
        ({"optimizer_kwargs": {"hessian_distribution": "rademacher"}}, "must be 'gaussian'"),
        ({"optimizer_kwargs": {"betas": (2.0, 0.9)}}, "SophiaH rejects"),
        ({"optimizer_kwargs": {"foo": 1}}, r"unknown SophiaH arguments \['foo'\]; it takes"),
    ],
)
def test_constructor_validates(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Simu(**kwargs)
    with pytest.raises(TypeError, match="layers must be None, an int or a list of ints"):
        Simu(layers="all")


def test_bad_fit_input(tiny_llama):
    simu = Simu(**SMALL)
    with pytest.raises(ValueError, match="The forget skill 'f' has no examples"):
        simu.fit(tiny_llama, Skill("f", []), R)
    with pytest.raises(ValueError, match="The retain skill 'r' has no examples"):
        simu.fit(tiny_llama, F, Skill("r", []))
    with pytest.raises(TypeError, match="forget must be a Skill with answers"):
        simu.fit(tiny_llama, ["a text"], R)
    with pytest.raises(ValueError, match="retain skill 'r' has no answer tokens"):
        simu.fit(tiny_llama, F, Skill.from_texts("r", ["def f():"]))
    with pytest.raises(ValueError, match="Layer 5 is out of range"):
        Simu(layers=[5]).fit(tiny_llama, F, R)
    assert not simu.is_fitted


def test_fitted_simu_on_another_model(fitted, char_tokenizer, device):
    with pytest.raises(NotFittedError, match="not fitted"):
        Simu().apply_to_weights(make_tiny_llama(char_tokenizer, device))
    other = make_tiny_llama(char_tokenizer, device, d_mlp=40)
    before = _params(other)
    with pytest.raises(ValueError, match="d_mlp"):
        fitted.apply_to_weights(other)
    with pytest.raises(ValueError, match="d_mlp"):
        fitted.mlp_hooks(other)
    assert _same(other, before)


def test_delta_for_a_parameter_the_model_lacks(fitted, llama_like):
    broken = Simu(**SMALL)
    broken.__dict__.update(fitted.__dict__)
    name = next(n for n in fitted.deltas_ if ".attn." in n)
    broken.deltas_ = {**fitted.deltas_, "blocks.0.attn.nope.weight": fitted.deltas_[name]}
    before = _params(llama_like)
    with pytest.raises(ValueError, match="blocks.0.attn.nope.weight, a parameter this model"):
        broken.apply_to_weights(llama_like)
    assert _same(llama_like, before)


@pytest.mark.skipif(not LEGACY, reason="this TransformerLens has no HookedTransformer")
def test_bridge_fit_refused_on_a_legacy_model(tiny_llama, tiny_legacy):
    simu = Simu(**SMALL).fit(tiny_llama, F, R, quiet=True)
    before = _params(tiny_legacy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # another model name, same shape
        with pytest.raises(ValueError, match="fitted on another kind of model"):
            simu.apply_to_weights(tiny_legacy)
    assert _same(tiny_legacy, before)
