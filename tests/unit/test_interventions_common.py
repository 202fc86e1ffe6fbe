"""The contract every registered method follows (scikit-learn's ``parametrize_with_checks``
idea): validation, NotFittedError, model checks, hook and weight hygiene, save/load.

The suite iterates the method registry (:func:`mechunlearn.methods`): a method registered in the
package is checked here without being named. Each is fitted by the pipeline's own generic fit
(:func:`mechunlearn.pipeline.fit_method`, from what its registration says it fits on), with the
few settings in ``FAST`` that keep the trained methods quick on the tiny model."""

from __future__ import annotations

import contextlib

import pytest
import torch

from mechunlearn import Skill, collect, collect_importance, collect_keys
from mechunlearn.interventions import (
    Detector,
    EllipsoidDetector,
    KeySpaceDetector,
    NeuronAdjust,
    NotFittedError,
    SelectivePruning,
    WeightIntervention,
    methods,
)
from mechunlearn.pipeline import Probes, RunConfig, Skills, fit_method
from tests.tiny_models import changed_weights, make_tiny_llama, unchanged
from tests.tiny_models import weights as _weights

F = Skill.from_texts(
    "f", [f"Q: {i}+{i + 1}?" for i in range(8)], [f" {2 * i + 1}" for i in range(8)]
)
R = Skill.from_texts(
    "r", [f"def f{i}(x):" for i in range(8)], [f"\n  return x*{i}" for i in range(8)]
)
KINDS = [spec.name for spec in methods()]
#: Settings that keep each method's fit quick and its effect visible on the tiny model.
FAST = {
    "NA": {"ratio": 0.05, "seed": 7},
    "SP": {"ratio": 0.05},
    "KSD": {"layers": None, "rule": 2, "fpr": 0.2},  # 8 negatives: a conformal rank at 0.2
    "Ellipsoid": {"layers": [0, 2], "fpr": 0.2},
    "LUNAR": {"layer": 1},
    "SIMU": {"max_steps": 2, "steps": 1},
    "GA": {"max_steps": 3, "lr": 1e-3},
    "GradDiff": {"max_steps": 3, "lr": 1e-3},
    "NPO": {"max_steps": 3, "lr": 1e-3},
    "RMU": {"layer": 1, "max_steps": 3, "lr": 1e-3},
}


@pytest.fixture(scope="module")
def fitted(llama_like):
    """Every registered method, fitted by the pipeline's generic fit on the tiny model."""
    model = llama_like
    probes = Probes()
    for role, skill in (("forget", F), ("retain:r", R)):
        probes.pre[role] = collect(model, skill, site="pre", quiet=True)
        probes.keys[role] = collect_keys(model, skill, quiet=True)
        probes.importance[role] = collect_importance(model, skill)
    skills = Skills(forget=(F, F), retain={"r": (R, R)})
    out = {}
    for name in KINDS:
        config = RunConfig(forget="f", retain=("r",), methods={name: FAST.get(name, {})})
        out[name] = fit_method(config, name, model, skills, probes)
    return out


@contextlib.contextmanager
def applied(iv, model):
    """Run the block with ``iv`` applied as its kind says; yields the hooks to pass."""
    if isinstance(iv, WeightIntervention):
        with iv.apply_to_weights(model):
            yield []
    else:
        yield iv.hooks(model)


@pytest.fixture(scope="module")
def other_model(char_tokenizer, device):
    """Same layer count, different d_mlp."""
    return make_tiny_llama(char_tokenizer, device, d_mlp=40)


def _tokens(model):
    return model.to_tokens(["Q: 3+4?", "def g(y):"])


def _outputs(iv, model, tokens):
    """What an intervention does to a forward: logits, and detection margins for detectors."""
    with torch.no_grad(), applied(iv, model) as hooks:
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    margin = iv.record.margin if isinstance(iv, Detector) else None
    return logits, margin


@pytest.mark.parametrize("kind", KINDS)
def test_every_registered_method_is_fitted_and_changes_or_watches(fitted, kind, llama_like):
    iv = fitted[kind]
    assert iv.is_fitted and all(hasattr(iv, a) for a in iv._fitted_attrs)
    tokens = _tokens(llama_like)
    with torch.no_grad():
        base = llama_like(tokens)
    logits, _ = _outputs(iv, llama_like, tokens)
    if isinstance(iv, Detector):
        assert torch.equal(logits, base)  # a detector only watches
    else:
        assert not torch.allclose(logits, base)


@pytest.mark.parametrize("kind", KINDS)
def test_unfitted_raises_everywhere(kind, llama_like):
    from mechunlearn import get_method

    iv = get_method(kind).make()
    assert not iv.is_fitted
    with pytest.raises(NotFittedError, match="not fitted"):
        iv.hooks()
    with pytest.raises(NotFittedError):
        iv.save("/tmp/never")
    with pytest.raises(NotFittedError):
        iv.check_model(llama_like)
    assert "fitted" not in repr(iv)


@pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 1.5, float("nan")])
def test_bad_ratio_value(ratio):
    with pytest.raises(ValueError, match="ratio"):
        NeuronAdjust(ratio=ratio)
    with pytest.raises(ValueError, match="ratio"):
        SelectivePruning(ratio=ratio)


@pytest.mark.parametrize("ratio", ["x", "0.1", None, True])
def test_bad_ratio_type_is_refused_not_converted(ratio):
    with pytest.raises(TypeError, match="ratio must be a number"):
        NeuronAdjust(ratio=ratio)
    with pytest.raises(TypeError, match="ratio must be a number"):
        SelectivePruning(ratio=ratio)


@pytest.mark.parametrize("cls", [KeySpaceDetector, EllipsoidDetector])
def test_bad_detector_params(cls):
    for kw in ({"h": 0}, {"h": -1.0}, {"alpha": 0}, {"alpha": float("inf")}):
        with pytest.raises(ValueError, match="h|alpha"):
            cls(**kw)
    with pytest.raises(TypeError, match="h must be a number"):
        cls(h="big")
    for fpr in (0, 1, 1.5):
        with pytest.raises(ValueError, match="fpr"):
            cls(fpr=fpr)
    with pytest.raises(TypeError, match="seed must be an integer"):
        cls(seed=1.5)
    with pytest.raises(TypeError, match="Layers must be integers"):
        cls(layers=[1.7])
    with pytest.raises(ValueError, match="not both"):
        cls(h=1.0, alpha=2.0)
    for rule in ("some", 0, -1, 1.5, True):
        with pytest.raises(ValueError, match="rule"):
            cls(rule=rule)
    with pytest.raises(ValueError, match="layers"):
        cls(layers=[])


def test_other_bad_params():
    with pytest.raises(ValueError, match="mode"):
        NeuronAdjust(mode="mirror")
    with pytest.raises(ValueError, match="seed"):
        NeuronAdjust(seed=-1)
    with pytest.raises(ValueError, match="score"):
        NeuronAdjust(score="cosine")
    with pytest.raises(TypeError, match="adjust_bos must be True or False"):
        NeuronAdjust(adjust_bos=1)
    with pytest.raises(ValueError, match="eps"):
        SelectivePruning(eps=0)


@pytest.mark.parametrize("kind", KINDS)
def test_repr_and_params(fitted, kind):
    iv = fitted[kind]
    text = repr(iv)
    assert text.startswith(type(iv).__name__ + "(") and "# fitted" in text
    assert type(iv)(**iv.get_params()).get_params() == iv.get_params()


@pytest.mark.parametrize("kind", KINDS)
def test_model_mismatch_raises(fitted, kind, other_model):
    iv = fitted[kind]
    before = _weights(other_model)
    with pytest.raises(ValueError, match="d_mlp"):
        with applied(iv, other_model):
            pass
    assert unchanged(other_model, before)
    if isinstance(iv, WeightIntervention):
        return
    # without the model, the hook itself checks the activation's width
    tokens = _tokens(other_model)
    with pytest.raises(ValueError, match="d_mlp=48"):
        other_model.run_with_hooks(tokens, fwd_hooks=iv.hooks())
    assert all(not hp.fwd_hooks for hp in other_model.hook_dict.values())


@pytest.mark.parametrize("kind", KINDS)
def test_fewer_layers_raises(fitted, kind, char_tokenizer, device):
    shallow = make_tiny_llama(char_tokenizer, device, n_layers=2)
    with pytest.raises(ValueError, match="n_layers"):
        with applied(fitted[kind], shallow):
            pass


@pytest.mark.parametrize("kind", KINDS)
def test_hooks_never_stay_attached(fitted, kind, llama_like):
    model = llama_like
    iv = fitted[kind]
    if isinstance(iv, WeightIntervention):  # the weight edit is undone, bit for bit
        before = _weights(model)
        with pytest.raises(RuntimeError, match="boom"):
            with iv.apply_to_weights(model):
                assert changed_weights(model, before)
                raise RuntimeError("boom")
        assert unchanged(model, before)
        with pytest.raises(NotImplementedError, match="apply_to_weights"):
            iv.hooks(model)
        return
    hooks = iv.hooks(model)
    assert hooks and all(isinstance(name, str) and callable(fn) for name, fn in hooks)
    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks(fwd_hooks=hooks):
            assert any(model.hook_dict[name].fwd_hooks for name, _ in hooks)
            raise RuntimeError("boom")
    for name, _ in hooks:
        assert not model.hook_dict[name].fwd_hooks


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(fitted, kind, llama_like, tmp_path, device):
    model = llama_like
    iv = fitted[kind]
    path = iv.save(tmp_path / kind)
    assert path.suffix == ".safetensors"
    back = type(iv).load(path, device=device)
    assert back.get_params() == iv.get_params()
    assert back.layers_ == iv.layers_ and back.d_mlp_ == iv.d_mlp_
    tokens = _tokens(model)
    logits_a, margin_a = _outputs(iv, model, tokens)
    logits_b, margin_b = _outputs(back, model, tokens)
    assert torch.equal(logits_a, logits_b)
    if margin_a is not None:
        assert torch.equal(margin_a, margin_b)
    with pytest.raises(ValueError, match="holds"):
        (NeuronAdjust if kind != "NA" else SelectivePruning).load(path)


@pytest.mark.parametrize("kind", KINDS)
def test_hooks_first_used_in_inference_mode_then_with_autograd(fitted, kind, llama_like, tmp_path):
    # The hook-side tensors are cached on first use; a first use under inference_mode (as in
    # generation and evaluation) must not leave inference tensors that autograd then refuses.
    model = llama_like
    if isinstance(fitted[kind], WeightIntervention):
        pytest.skip("a weight edit has no hook-side cache")
    fresh = type(fitted[kind]).load(fitted[kind].save(tmp_path / kind))  # empty cache
    tokens = _tokens(model)
    with torch.inference_mode():
        first = model.run_with_hooks(tokens, fwd_hooks=fresh.hooks(model))
    again = model.run_with_hooks(tokens, fwd_hooks=fresh.hooks(model))
    assert again.requires_grad
    if kind != "NA":  # NA samples fresh uniforms on every pass
        assert torch.equal(first, again.detach())


def test_batched_matches_single_for_deterministic_hooks(fitted, llama_like):
    # hooks work in batches: one prompt alone gives the same logits as in an unpadded batch
    model = llama_like
    tokens = model.to_tokens(["Q: 3+4?", "Q: 5+6?"])
    for kind in ("SP", "KSD"):
        hooks = fitted[kind].hooks(model)
        with torch.no_grad():
            both = model.run_with_hooks(tokens, fwd_hooks=hooks)
            one = model.run_with_hooks(tokens[1:], fwd_hooks=hooks)
        torch.testing.assert_close(both[1:], one, rtol=1e-5, atol=1e-5)
