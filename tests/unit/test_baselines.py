"""The trained baselines (GA, GradDiff, NPO, RMU): each loss against a hand computation, the
trained and frozen parameters, the model left bit-identical, weight deltas, save/load, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mechunlearn import NPO, RMU, GradAscent, GradDiff, Skill
from mechunlearn.batching import iter_batches, tokenize_examples
from mechunlearn.interventions import NotFittedError, get_method
from mechunlearn.interventions.baselines import npo_loss, random_direction
from mechunlearn.interventions.baselines.common import block_parameters
from mechunlearn.interventions.baselines.grad_diff import grad_diff_loss
from mechunlearn.interventions.training import grad_diff_parts, tokenize_answers, train
from mechunlearn.interventions.weights import w_out
from mechunlearn.sites import hook_name
from tests.tiny_models import make_tiny_llama
from tests.tiny_models import unchanged as _same
from tests.tiny_models import weights as _params

F_SKILL = Skill.from_texts(
    "f", [f"Q: {i}+{i + 1}?" for i in range(8)], [f" {2 * i + 1}" for i in range(8)]
)
R_SKILL = Skill.from_texts(
    "r", [f"def f{i}(x):" for i in range(8)], [f"\n  return x*{i}" for i in range(8)]
)
SMALL = dict(max_steps=3, lr=1e-2, batch_size=4, forget_loss_factor=None)
RMU_SMALL = dict(layer=2, steering_coeff=5.0, max_steps=3, lr=1e-2, batch_size=4)
MAKERS = {
    "GA": lambda **kw: GradAscent(**{**SMALL, **kw}),
    "GradDiff": lambda **kw: GradDiff(**{**SMALL, **kw}),
    "NPO": lambda **kw: NPO(**{**SMALL, **kw}),
    "RMU": lambda **kw: RMU(**{**RMU_SMALL, **kw}),
}
NAMES = list(MAKERS)


def _tokens(model):
    return model.to_tokens(["Q: 3+4?", "def g(y):"])


@pytest.fixture(scope="module")
def fitted(llama_like):
    return {name: make().fit(llama_like, F_SKILL, R_SKILL, quiet=True) for name, make in
            MAKERS.items()}  # fmt: skip


# ---------------------------------------------------------------------- hand computations
def _example_nll(model, skill) -> tuple[list[float], list[int]]:
    """Per example, alone (no padding): summed answer-token cross-entropy (float64), count."""
    device = next(model.parameters()).device
    nll, count = [], []
    with torch.no_grad():
        for ids, n_head in tokenize_examples(model, skill.prompts, skill.answers):
            tokens = torch.tensor([ids], device=device)
            logp = model(tokens)[0, n_head - 1 : -1].double().log_softmax(-1)
            nll.append(-float(logp.gather(1, tokens[0, n_head:, None]).sum()))
            count.append(len(ids) - n_head)
    return nll, count


def _mean(nll, count) -> float:
    return sum(nll) / sum(count)


def _resid(model, skill, layer) -> torch.Tensor:
    """Residual stream after ``layer`` at every token but BOS, example by example, stacked."""
    device = next(model.parameters()).device
    rows = []
    with torch.no_grad():
        for ids, _ in tokenize_examples(model, skill.prompts, skill.answers):
            _, cache = model.run_with_cache(torch.tensor([ids], device=device))
            rows.append(cache[hook_name("resid_post", layer)][0, 1:].double())
    return torch.cat(rows)


def _step0(cls, model, **kw):
    """The loop's terms at step 0, with one batch holding every example."""
    est = cls(max_steps=1, batch_size=8, **kw).fit(model, F_SKILL, R_SKILL, quiet=True)
    return est, est.history_[0]


def test_ga_loss_is_minus_the_forget_loss(tiny_llama):
    lf = _mean(*_example_nll(tiny_llama, F_SKILL))
    lr_ = _mean(*_example_nll(tiny_llama, R_SKILL))
    est, h = _step0(GradAscent, tiny_llama, forget_loss_factor=None)
    assert h["forget_loss"] == pytest.approx(lf, rel=1e-5)
    assert h["loss"] == pytest.approx(-lf, rel=1e-5)
    assert h["retain_loss"] == pytest.approx(lr_, rel=1e-5)  # logged, not trained on
    assert h["forget_loss_initial"] == pytest.approx(lf, rel=1e-5)
    assert est.forget_loss_initial_ == pytest.approx(lf, rel=1e-5)


def test_graddiff_loss(tiny_llama):
    lf = _mean(*_example_nll(tiny_llama, F_SKILL))
    lr_ = _mean(*_example_nll(tiny_llama, R_SKILL))
    _, h = _step0(GradDiff, tiny_llama, gamma=2.5, forget_loss_factor=None)
    assert h["forget_loss"] == pytest.approx(lf, rel=1e-5)
    assert h["retain_loss"] == pytest.approx(lr_, rel=1e-5)
    assert h["loss"] == pytest.approx(2.5 * lr_ - lf, rel=1e-5)


def test_npo_loss_at_step_0_is_its_value_at_log_ratio_0(tiny_llama):
    lr_ = _mean(*_example_nll(tiny_llama, R_SKILL))
    _, h = _step0(NPO, tiny_llama, beta=0.1, gamma=0.5, forget_loss_factor=None)
    npo = 2 / 0.1 * math.log(2)  # the reference is the model before training
    assert h["npo_loss"] == pytest.approx(npo, rel=1e-5)
    assert h["loss"] == pytest.approx(npo + 0.5 * lr_, rel=1e-5)


def test_npo_loss_against_its_formula(tiny_llama):
    """With a reference other than the model: -(2/beta) mean log sigmoid(-beta log ratio)."""
    model = tiny_llama
    nll, count = _example_nll(model, F_SKILL)
    ref = torch.tensor(nll) + torch.linspace(-3.0, 4.0, len(nll), dtype=torch.float64)
    batch_f = next(iter(iter_batches(model, F_SKILL.prompts, F_SKILL.answers, batch_size=8)))
    batch_r = next(iter(iter_batches(model, R_SKILL.prompts, R_SKILL.answers, batch_size=8)))
    beta, gamma = 0.3, 2.0
    with torch.no_grad():
        loss, terms = npo_loss(model, batch_f, batch_r, ref.float(), beta, gamma)
    log_ratio = ref.float().double() - torch.tensor(nll)  # log pi - log pi_ref
    expected = float(-(2 / beta) * F.logsigmoid(-beta * log_ratio).mean())
    lr_ = _mean(*_example_nll(model, R_SKILL))
    assert float(terms["npo_loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(terms["forget_loss"]) == pytest.approx(_mean(nll, count), rel=1e-5)
    assert float(loss) == pytest.approx(expected + gamma * lr_, rel=1e-5)
    assert loss.dtype == torch.float32


def test_rmu_loss(tiny_llama):
    model = tiny_llama
    c, alpha = 5.0, 7.0
    est, h = _step0(RMU, model, layer=1, steering_coeff=c, alpha=alpha, seed=4, lr=1e-2)
    u = random_direction(model.cfg.d_model, seed=4).double()
    expected = float(((_resid(model, F_SKILL, 1) - c * u) ** 2).mean())
    assert torch.equal(est.direction_, random_direction(model.cfg.d_model, seed=4))
    assert h["forget_loss"] == pytest.approx(expected, rel=1e-5)
    assert h["retain_loss"] == pytest.approx(0.0, abs=1e-9)  # the frozen model is the model
    assert h["loss"] == pytest.approx(expected + alpha * h["retain_loss"], rel=1e-5)
    # After one update the retain activations moved: the retain MSE against the original.
    est2 = RMU(layer=1, steering_coeff=c, alpha=alpha, seed=4, max_steps=2, batch_size=8, lr=1e-2)
    est2.fit(model, F_SKILL, R_SKILL, quiet=True)
    ref = _resid(model, R_SKILL, 1)
    with est.apply_to_weights(model):
        moved = _resid(model, R_SKILL, 1)
    assert est2.history_[1]["retain_loss"] == pytest.approx(
        float(((moved - ref) ** 2).mean()), rel=1e-4
    )


# ------------------------------------------------------------------------ fit invariants
def _trained_ids(model, name) -> set[int]:
    if name == "RMU":  # W_out of layers 0..2 (layer 2, the two below it)
        storages = {w_out(model, layer).untyped_storage().data_ptr() for layer in range(3)}
        return {id(p) for p in model.parameters() if p.untyped_storage().data_ptr() in storages}
    return {id(p) for p in model.blocks[1].parameters()}  # layers=[1]


@pytest.mark.parametrize("name", NAMES)
def test_only_the_trained_parameters_change(tiny_llama, name, monkeypatch):
    model = tiny_llama
    before = _params(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    snaps = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        snaps.append((_params(model), {id(p) for p in model.parameters() if p.requires_grad}))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    kw = {} if name == "RMU" else {"layers": [1]}
    est = MAKERS[name](**kw).fit(model, F_SKILL, R_SKILL, quiet=True)
    assert len(snaps) == est.n_updates_ == 3
    named = dict(model.named_parameters())
    trained = _trained_ids(model, name)
    for params, requires_grad in snaps:
        assert requires_grad == trained
        for n, value in params.items():
            if id(named[n]) not in trained:
                assert torch.equal(value, before[n]), n  # frozen: bit-identical
    last = snaps[-1][0]
    assert all(not torch.equal(last[n], before[n]) for n in est.deltas_ if "norm" not in n)
    assert {id(named[n]) for n in est.deltas_} <= trained
    # After fit: the model exactly as before, flags included, no gradients left.
    assert _same(model, before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_deltas_reproduce_the_trained_model(tiny_llama, name, monkeypatch):
    model = tiny_llama
    tokens = _tokens(model)
    trained_logits = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        with torch.no_grad():
            trained_logits.append(model(tokens))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    est = MAKERS[name]().fit(model, F_SKILL, R_SKILL, quiet=True)
    before = _params(model)
    with torch.no_grad():
        base = model(tokens)
        with est.apply_to_weights(model) as edit:
            assert edit.active
            edited = model(tokens)
        assert _same(model, before)
        assert torch.equal(model(tokens), base)
    torch.testing.assert_close(edited, trained_logits[-1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(edited, base)


def test_full_fine_tuning_on_every_kind_of_model(tiny_model):
    """layers=None trains every parameter the loss reaches (a GPT-2 bridge's q/k/v views, not
    their fused weight); the model comes back bit-identical."""
    before = _params(tiny_model)
    est = GradDiff(**SMALL).fit(tiny_model, F_SKILL, R_SKILL, quiet=True)
    assert len(est.deltas_) > 3 * 4
    assert not any(".qkv." in n for n in est.deltas_)
    assert _same(tiny_model, before)
    with est.apply_to_weights(tiny_model):
        assert not _same(tiny_model, before)
    assert _same(tiny_model, before)


@pytest.mark.parametrize("name", NAMES)
def test_apply_to_weights_restores_after_an_exception(llama_like, fitted, name):
    before = _params(llama_like)
    with pytest.raises(RuntimeError, match="boom"):
        with fitted[name].apply_to_weights(llama_like):
            assert not _same(llama_like, before)
            raise RuntimeError("boom")
    assert _same(llama_like, before)


@pytest.mark.parametrize("name", NAMES)
def test_hooks_point_to_apply_to_weights(fitted, llama_like, name):
    with pytest.raises(NotImplementedError, match="apply_to_weights"):
        fitted[name].hooks(llama_like)


def test_early_stop(tiny_llama):
    est = GradAscent(max_steps=40, lr=0.05, batch_size=4, forget_loss_factor=1.05).fit(
        tiny_llama, F_SKILL, R_SKILL, quiet=True
    )
    assert est.stop_reason_ == "forget_loss_target"
    last = est.history_[-1]
    assert last["forget_loss"] >= 1.05 * last["forget_loss_initial"]
    assert all(h["forget_loss"] < 1.05 * h["forget_loss_initial"] for h in est.history_[:-1])
    assert est.n_updates_ == len(est.history_) - 1 < 40
    assert "updates (forget_loss_target)" in repr(est)


def test_loop_frees_each_part_before_the_next_and_sums_their_gradients(tiny_llama):
    """The training loop differentiates the forget part (freeing its graph) before the retain
    part's forward pass, so a step holds one batch's activations at a time; the summed
    gradients are the joint loss's (same deltas as one ``-L_F + gamma * L_R`` scalar)."""
    model = tiny_llama
    items_f = tokenize_answers(model, F_SKILL, None, "forget", "GradDiff")
    items_r = tokenize_answers(model, R_SKILL, None, "retain", "GradDiff")
    params = block_parameters(model, [1])
    live = [0]  # tensors that autograd holds for a backward pass

    class Held:
        def __init__(self, tensor):
            self.tensor = tensor
            live[0] += 1

        def __del__(self):
            live[0] -= 1

    seen = []

    def counted_parts(batch_f, batch_r):
        parts = grad_diff_parts(model, batch_f, batch_r, 2.0)
        first = next(parts)
        seen.append(live[0])  # the forget part's graph, alive
        yield first
        seen.append(live[0])  # after the loop differentiated it
        yield next(parts)

    def run(loss_fn):
        return train(
            model, params, loss_fn, lambda t: torch.optim.SGD([p for _, p in t], lr=0.1),
            items_f, items_r, max_steps=2, batch_size=4, seed=0, name="GradDiff", quiet=True,
        )  # fmt: skip

    with torch.autograd.graph.saved_tensors_hooks(Held, lambda held: held.tensor):
        parts = run(counted_parts)
    assert seen[0::2] == [seen[0]] * 2 and seen[0] > 10
    assert seen[1::2] == [0, 0]
    joint = run(lambda batch_f, batch_r: grad_diff_loss(model, batch_f, batch_r, 2.0))
    assert parts.deltas.keys() == joint.deltas.keys() and len(parts.deltas) > 5
    for key, delta in joint.deltas.items():
        assert delta.abs().max() > 0
        torch.testing.assert_close(parts.deltas[key], delta, rtol=1e-5, atol=1e-7)
    for a, b in zip(parts.history, joint.history, strict=True):
        assert a == pytest.approx(b, rel=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_deltas(tiny_llama, name):
    a = MAKERS[name](seed=3).fit(tiny_llama, F_SKILL, R_SKILL, quiet=True)
    b = MAKERS[name](seed=3).fit(tiny_llama, F_SKILL, R_SKILL, quiet=True)
    assert a.deltas_.keys() == b.deltas_.keys()
    assert all(torch.equal(a.deltas_[k], b.deltas_[k]) for k in a.deltas_)
    assert a.history_ == b.history_


# ---------------------------------------------------------------------------- failures
@pytest.mark.parametrize("name", NAMES)
def test_blow_up_stops_names_the_step_and_restores(tiny_llama, name):
    before = _params(tiny_llama)
    est = MAKERS[name](lr=1e30, max_steps=5)
    with pytest.raises(FloatingPointError, match=r"at step \d.*restored") as err:
        est.fit(tiny_llama, F_SKILL, R_SKILL, quiet=True)
    assert f"lower lr (now {1e30})" in str(err.value)
    assert _same(tiny_llama, before)
    assert all(p.grad is None for p in tiny_llama.parameters())
    assert not est.is_fitted


def test_interrupted_fit_leaves_the_model_as_it_was(tiny_llama, monkeypatch):
    before = _params(tiny_llama)
    flags = [p.requires_grad for p in tiny_llama.parameters()]
    calls = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    est = NPO(**SMALL)
    with pytest.raises(KeyboardInterrupt):
        est.fit(tiny_llama, F_SKILL, R_SKILL, quiet=True)
    assert _same(tiny_llama, before)
    assert [p.requires_grad for p in tiny_llama.parameters()] == flags
    assert not est.is_fitted


# ---------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(tmp_path, llama_like, fitted, name):
    est = fitted[name]
    back = type(est).load(est.save(tmp_path / name), device=next(llama_like.parameters()).device)
    assert back.get_params() == est.get_params()
    assert back.layers_ == est.layers_ and back.d_mlp_ == est.d_mlp_
    assert back.deltas_.keys() == est.deltas_.keys()
    assert all(torch.equal(back.deltas_[k].cpu(), est.deltas_[k].cpu()) for k in back.deltas_)
    assert back.history_ == est.history_ and back.stop_reason_ == est.stop_reason_
    assert back.n_updates_ == est.n_updates_
    if name == "RMU":
        assert back.layer_ == est.layer_ and torch.equal(back.direction_, est.direction_)
    else:
        assert back.forget_loss_initial_ == est.forget_loss_initial_
    tokens = _tokens(llama_like)
    with torch.no_grad():
        with est.apply_to_weights(llama_like):
            a = llama_like(tokens)
        with back.apply_to_weights(llama_like):
            b = llama_like(tokens)
    assert torch.equal(a, b)


# -------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name", NAMES)
def test_unfitted_raises(name, llama_like):
    est = MAKERS[name]()
    assert not est.is_fitted and "fitted" not in repr(est)
    for call in (
        lambda: est.apply_to_weights(llama_like),
        lambda: est.hooks(),
        lambda: est.save("/tmp/never"),
        lambda: est.check_model(llama_like),
    ):
        with pytest.raises(NotFittedError, match="not fitted"):
            call()


@pytest.mark.parametrize("name", NAMES)
def test_repr_and_params(fitted, name):
    est = fitted[name]
    assert repr(est).startswith(type(est).__name__ + "(") and "# fitted" in repr(est)
    assert type(est)(**est.get_params()).get_params() == est.get_params()


SHARED = {"lr": 1e-4, "weight_decay": 0.01, "max_steps": 30, "forget_loss_factor": 3.0,
          "batch_size": 8, "max_length": None, "seed": 0}  # fmt: skip


def test_ga_graddiff_npo_settings_in_their_order():
    """GA, GradDiff and NPO share ForgetLossBaseline's constructor; each keeps its own
    positional order and defaults."""
    assert list(get_method("GA").settings().items()) == [("layers", None), *SHARED.items()]
    own = {"GradDiff": [("gamma", 1.0)], "NPO": [("beta", 0.1), ("gamma", 1.0)]}
    for name, first in own.items():
        expected = [("layers", None), *first, *SHARED.items()]
        assert list(get_method(name).settings().items()) == expected
    assert GradDiff(None, 2.0, 1e-3).get_params()["gamma"] == 2.0
    assert NPO(None, 0.2, 2.0, 1e-3).get_params() == {
        "layers": None, "beta": 0.2, "gamma": 2.0, **SHARED, "lr": 1e-3
    }  # fmt: skip


COMMON_BAD = [
    ({"lr": 0}, ValueError, r"lr must lie in \(0, inf\)"),
    ({"lr": float("inf")}, ValueError, "lr must be finite"),
    ({"weight_decay": -0.1}, ValueError, r"weight_decay must lie in \[0, inf\]"),
    ({"max_steps": 0}, ValueError, r"max_steps must lie in \[1, inf\]"),
    ({"max_steps": 2.0}, TypeError, "max_steps must be an integer"),
    ({"batch_size": 0}, ValueError, r"batch_size must lie in \[1, inf\]"),
    ({"max_length": 1}, ValueError, r"max_length must lie in \[2, inf\]"),
    ({"seed": -1}, ValueError, "seed"),
]
OWN_BAD = {
    "GA": [({"forget_loss_factor": 1.0}, ValueError, "forget_loss_factor must be > 1"),
           ({"layers": "all"}, TypeError, "layers must be None, an int or a list of ints")],
    "GradDiff": [({"gamma": -1}, ValueError, r"gamma must lie in \[0, inf\]"),
                 ({"gamma": float("nan")}, ValueError, "gamma must be a number, got NaN")],
    "NPO": [({"beta": 0}, ValueError, r"beta must lie in \(0, inf\)"),
            ({"gamma": float("inf")}, ValueError, "gamma must be finite")],
    "RMU": [({"steering_coeff": 0}, ValueError, r"steering_coeff must lie in \(0, inf\)"),
            ({"alpha": -1.0}, ValueError, r"alpha must lie in \[0, inf\]"),
            ({"layer": 1.5}, TypeError, "layer must be an integer"),
            ({"trained_layers": []}, ValueError, "trained_layers is empty")],
}  # fmt: skip


@pytest.mark.parametrize(
    "name, kwargs, error, message",
    [(n, *case) for n in NAMES for case in COMMON_BAD + OWN_BAD[n]],
)
def test_constructor_validates(name, kwargs, error, message):
    cls = get_method(name).cls
    with pytest.raises(error, match=message) as err:
        cls(**kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", NAMES)
def test_bad_fit_input(tiny_llama, name):
    est = MAKERS[name]()
    with pytest.raises(ValueError, match="The forget skill 'f' has no examples"):
        est.fit(tiny_llama, Skill("f", []), R_SKILL)
    with pytest.raises(TypeError, match="forget must be a Skill with answers"):
        est.fit(tiny_llama, ["a text"], R_SKILL)
    with pytest.raises(ValueError, match="retain skill 'r' has no answer tokens"):
        est.fit(tiny_llama, F_SKILL, Skill.from_texts("r", ["def f():"]))
    assert not est.is_fitted


def test_bad_layers_at_fit(tiny_llama):
    with pytest.raises(ValueError, match="Layer 5 is out of range"):
        GradDiff(layers=[5]).fit(tiny_llama, F_SKILL, R_SKILL)
    with pytest.raises(ValueError, match="Layer 7 is out of range"):
        RMU().fit(tiny_llama, F_SKILL, R_SKILL)  # the default model's layer
    with pytest.raises(ValueError, match="go past the steered layer 1"):
        RMU(layer=1, trained_layers=[2]).fit(tiny_llama, F_SKILL, R_SKILL)


@pytest.mark.parametrize("name", NAMES)
def test_fitted_on_another_model(fitted, char_tokenizer, device, name):
    other = make_tiny_llama(char_tokenizer, device, d_mlp=40)
    before = _params(other)
    with pytest.raises(ValueError, match="d_mlp"):
        fitted[name].apply_to_weights(other)
    assert _same(other, before)


def test_delta_for_a_parameter_the_model_lacks(fitted, llama_like):
    est = fitted["GradDiff"]
    broken = GradDiff(**SMALL)
    broken.__dict__.update(est.__dict__)
    first = next(iter(est.deltas_))
    broken.deltas_ = {**est.deltas_, "nope.weight": est.deltas_[first]}
    before = _params(llama_like)
    with pytest.raises(ValueError, match="nope.weight, a parameter this model does not have"):
        broken.apply_to_weights(llama_like)
    assert _same(llama_like, before)


def test_registered_in_table_order():
    from mechunlearn.interventions import methods

    names = [spec.name for spec in methods()]
    assert names[names.index("SIMU") + 1 :][:4] == ["GA", "GradDiff", "NPO", "RMU"]
    for name, full in (("GA", "GradAscent"), ("GradDiff", "GradDiff"), ("NPO", "NPO"),
                       ("RMU", "RMU")):  # fmt: skip
        spec = get_method(name)
        assert spec.full_name == full and spec.kind == "weights" and spec.fits_on == "model"
