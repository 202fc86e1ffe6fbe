"""Every architecture the package supports, in the unit tier: tiny random models of eleven
architectures (gated MLPs: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3, OLMo 2, Phi-3;
plain ones: GPT-2, GPT-NeoX), built from local configs without ``architectures`` (as a GGUF file
gives them) and loaded through ``mu.load_model(hf_model=...)``.

For each: the bridge reproduces the Hugging Face model; ``mu.collect`` gathers every ``what``;
every registered method of the package fits as the run fits it (``pipeline.fit_method``), its
hooks (or weight edit) change the logits, Neuron Adjust leaves BOS alone where the model has a
BOS, save/load gives the same outputs; ``mu.evaluate`` scores them all; LUNAR's hooks equal its
weight edit (also where a norm follows the MLP); the unembedding shortcut of the scoring equals
the model's own logits (Gemma 2's final soft-capping included).
"""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch

import mechunlearn as mu
from mechunlearn import evaluation, scoring
from mechunlearn.batching import forward_until, iter_batches
from mechunlearn.models import model_bos_id
from mechunlearn.scoring import _final_site, _unembed
from mechunlearn.sites import hook_name
from tests.tiny_models import TINY_ARCHITECTURES, make_tiny, make_tiny_hf

ARCHS = list(TINY_ARCHITECTURES)
#: Architectures whose tokenizer convention adds no BOS (TransformerLens sets
#: ``default_prepend_bos=False`` for them): mechunlearn prepends nothing, NA guards nothing.
NO_BOS = {"qwen2", "qwen3", "gpt_neox"}
#: A norm follows the MLP: the bridge's hook_mlp_out fires after it.
POST_MLP_NORM = {"gemma2", "gemma3", "olmo2"}
LAYER = 1

F = mu.Skill.from_texts(
    "f", [f"Q: {i}+{i + 1}?" for i in range(8)], [f" {2 * i + 1}" for i in range(8)]
)
R = mu.Skill.from_texts(
    "r", [f"def f{i}(x):" for i in range(8)], [f"\n  return x*{i}" for i in range(8)]
)
REF = mu.Skill.from_texts("ref", [f"Who is Zorb {c}?" for c in "ABCD"])
TEXTS = ["Q: 3+4?", "def g(y): return y"]


def _package_specs():
    """The package's own registered methods (a test may register toys of its own)."""
    return [s for s in mu.methods() if s.cls.__module__.startswith("mechunlearn.")]


#: Settings that keep the trained methods' fits cheap on the tiny models (others: defaults; the
#: detectors' conformal cap needs ``1 / fpr - 1`` negatives, and the tiny probes have 8).
CHEAP = {
    "KSD": {"fpr": 0.2},
    "Ellipsoid": {"fpr": 0.2},
    "LUNAR": {"layer": LAYER},
    "SIMU": {"max_steps": 1, "layers": [LAYER]},
    "GA": {"max_steps": 2, "lr": 1e-3, "layers": [LAYER]},
    "GradDiff": {"max_steps": 2, "lr": 1e-3, "layers": [LAYER]},
    "NPO": {"max_steps": 2, "lr": 1e-3, "layers": [LAYER]},
    "RMU": {"layer": LAYER, "max_steps": 2, "lr": 1e-3},
}


def _fit(spec, model, probe_f, probe_r):
    """Fit as ``pipeline.fit_method`` does, with settings cheap enough for the unit tier."""
    estimator = spec.make(CHEAP.get(spec.name))
    if spec.fits_on == "pre":
        return estimator.fit(probe_f.pre, probe_r.pre)
    if spec.fits_on == "importance":
        return estimator.fit(probe_f.importance, probe_r.importance)
    if spec.fits_on == "keys":
        with warnings.catch_warnings():  # random keys: the calibrated region detects few
            warnings.simplefilter("ignore", UserWarning)
            return estimator.fit(probe_f.keys, probe_r.keys)
    params = inspect.signature(estimator.fit).parameters
    extra = {"reference": REF, "batch_size": 8, "quiet": True}
    return estimator.fit(model, F, R, **{k: v for k, v in extra.items() if k in params})


@pytest.fixture(scope="module", params=ARCHS)
def case(request, char_tokenizer, device):
    """One architecture: the HF model, its bridge, the probes and every method fitted."""
    arch = request.param
    hf = make_tiny_hf(arch, char_tokenizer)
    assert not getattr(hf.config, "architectures", None)  # as a GGUF-derived config
    model = mu.load_model(f"tiny-{arch}", hf_model=hf, tokenizer=char_tokenizer, device=device)
    what = ("pre", "keys", "importance")
    probe_f = mu.collect(model, F, what=what, quiet=True)
    probe_r = mu.collect(model, R, what=what, quiet=True)
    fitted = {spec.name: _fit(spec, model, probe_f, probe_r) for spec in _package_specs()}
    return {"arch": arch, "hf": hf, "model": model, "probe": probe_f, "fitted": fitted}


def _logits(model, fitted=None, tokens=None):
    tokens = model.to_tokens(TEXTS) if tokens is None else tokens
    with torch.no_grad():
        if fitted is None:
            return model(tokens)
        with evaluation.applied(model, fitted) as hooks:
            return model.run_with_hooks(tokens, fwd_hooks=hooks)


def test_bridge_equals_the_hf_model(case):
    model, hf = case["model"], case["hf"]
    assert hf.config.architectures == [type(hf).__name__]
    assert model.cfg.n_layers == 2 and model.cfg.d_mlp == 48
    tokens = model.to_tokens(TEXTS[0])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-4)


def test_bos_convention(case):
    model, arch = case["model"], case["arch"]
    bos = model_bos_id(model)
    batch = next(iter_batches(model, TEXTS, ["", ""]))
    if arch in NO_BOS:
        assert bos is None and not (batch.tokens[:, 0] == model.tokenizer.bos_token_id).any()
    else:
        assert bos == model.tokenizer.bos_token_id and (batch.tokens[:, 0] == bos).all()


def test_collect_every_what(case):
    model, probe = case["model"], case["probe"]
    shape = (model.cfg.n_layers, model.cfg.d_mlp)
    assert tuple(probe.pre.mean.shape) == shape and tuple(probe.importance.values.shape) == shape
    assert tuple(probe.keys.values.shape) == (len(F), *shape)
    # BOS is never counted: one token per character of prompt and answer
    assert probe.pre.n_tokens == sum(len(e.prompt) + len(e.answer) for e in F)
    alone = mu.collect(model, F, site="pre", quiet=True)
    torch.testing.assert_close(alone.mean, probe.pre.mean)
    assert bool(torch.isfinite(probe.keys.values).all())


def test_every_method_fits_and_acts(case):
    model, fitted = case["model"], case["fitted"]
    assert set(fitted) == {s.name for s in _package_specs()}
    base = _logits(model)
    for name, iv in fitted.items():
        if isinstance(iv, mu.Detector):
            detection = iv.detect(model, TEXTS)
            assert detection.detected.shape == (len(TEXTS),), name
            torch.testing.assert_close(_logits(model, iv), base)  # detectors only watch
        else:
            changed = (_logits(model, iv) - base).abs().amax()
            assert changed > 1e-6, f"{name} does not change the logits"
    torch.testing.assert_close(_logits(model), base)  # nothing left attached or edited


def test_neuron_adjust_leaves_bos_alone(case):
    model, na = case["model"], case["fitted"]["NA"]
    tokens = model.to_tokens(TEXTS)
    seen = {}

    def keep(name):
        def hook(act, hook=None):
            seen[name] = act.detach().clone()

        return hook

    names = [hook_name("pre", layer) for layer in range(model.cfg.n_layers)]
    record = [(n, keep(n)) for n in names]
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=record)
        base = dict(seen)
        model.run_with_hooks(tokens, fwd_hooks=na.hooks(model) + record)
    moved = [(seen[n] - base[n]).abs().amax(-1) for n in names]  # [batch, pos] per layer
    assert any(bool((m[:, 1:] > 0).any()) for m in moved)
    if model_bos_id(model) is not None:
        assert all(bool((m[:, 0] == 0).all()) for m in moved)  # BOS untouched
    else:
        # No BOS: position 0 is an ordinary token, adjusted like the others.
        assert any(bool((m[:, 0] > 0).any()) for m in moved)


def test_save_load_round_trip(case, tmp_path, device):
    model = case["model"]
    for name, iv in case["fitted"].items():
        back = type(iv).load(iv.save(tmp_path / name), device=device)
        assert back.get_params() == iv.get_params(), name
        if isinstance(iv, mu.Detector):
            a, b = iv.detect(model, TEXTS), back.detect(model, TEXTS)
            assert torch.equal(a.margin, b.margin), name
        else:
            assert torch.equal(_logits(model, iv), _logits(model, back)), name
        if name == "LUNAR":  # without a model, the hook points of the model it was fitted on
            assert [h for h, _ in back.hooks()] == [h for h, _ in iv.hooks(model)]


def test_evaluate_runs(case):
    table = mu.evaluate(case["model"], [F, R], case["fitted"], quiet=True, n_boot=20, batch_size=8)
    assert len(table) == 2 * (1 + len(case["fitted"]))
    assert table["score"].between(0, 1).all()
    answered = table[table["abstention_rate"] < 1]  # a detector abstaining on all has no NLL
    assert (answered["method"] == "base").sum() == 2 and answered["nll"].map(math.isfinite).all()


def test_lunar_hooks_equal_weight_edit(case):
    model, lunar = case["model"], case["fitted"]["LUNAR"]
    assert all(d["linear_check"] < 1e-4 for d in lunar.diagnostics_)
    tokens = model.to_tokens(TEXTS)
    base, hooked = _logits(model, None, tokens), _logits(model, lunar, tokens)
    with torch.no_grad(), lunar.apply_to_weights(model):
        edited = model(tokens)
    effect = float((edited - base).abs().amax())
    # float rounding only (OLMo 2's norm after the MLP amplifies it to ~3e-5); adding the edit
    # after that norm instead (hook_mlp_out) missed by ~0.25-0.45, as much as the effect.
    assert effect > 0.05 and float((hooked - edited).abs().amax()) < 1e-3 * effect
    if case["arch"] in POST_MLP_NORM:  # the edit goes in before the norm after the MLP
        assert lunar.hooks(model)[1][0] == f"blocks.{LAYER}.mlp.hook_out"
        assert lunar.hooks()[1][0] == f"blocks.{LAYER}.mlp.hook_out"  # remembered from fit


def test_unembedding_shortcut_equals_the_logits(case):
    """Scoring reads the final residual stream and unembeds it itself: it must give the model's
    own logits (Gemma 2 soft-caps them)."""
    model = case["model"]
    final = _final_site(model)
    assert final is not None
    batch = next(iter_batches(model, TEXTS, ["", ""]))
    captured = {}

    def capture(act, hook=None):
        captured["resid"] = act
        return act

    with torch.no_grad():
        forward_until(model, batch, [(final, capture)], final)
        logits = model(batch.tokens, attention_mask=batch.attention_mask)
        resid = captured["resid"]
        mine = _unembed(model, resid.reshape(-1, resid.shape[-1]))
    torch.testing.assert_close(mine, logits.reshape(-1, logits.shape[-1]), rtol=1e-5, atol=1e-5)


def test_gemma2_softcapping_is_on():
    assert TINY_ARCHITECTURES["gemma2"][0] == "Gemma2Config"
    from transformers import Gemma2Config

    assert Gemma2Config().final_logit_softcapping == 30.0


def test_unsupported_architecture_is_one_clear_line(char_tokenizer):
    from transformers import BioGptConfig, BioGptForCausalLM

    hf = BioGptForCausalLM(BioGptConfig(vocab_size=len(char_tokenizer), hidden_size=16,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=24))  # fmt: skip
    with pytest.raises(mu.UnsupportedArchitectureError, match="BioGptForCausalLM") as err:
        mu.load_model("bert", hf_model=hf, tokenizer=char_tokenizer, device="cpu")
    assert "\n" not in str(err.value)


def test_scoring_in_chunks_changes_nothing(case, monkeypatch):
    """The float64 scoring goes a few rows at a time (memory bound at large vocabularies); the
    scores are those of all rows at once, bit for bit."""
    model = case["model"]
    whole = evaluation.teacher_forced(model, F, batch_size=8)
    monkeypatch.setattr(scoring, "SCORE_CHUNK_VALUES", 1)  # one row per chunk
    rows = evaluation.teacher_forced(model, F, batch_size=8)
    assert (whole.nll == rows.nll).all() and (whole.correct == rows.correct).all()


def test_make_tiny_fills_in_the_architecture(char_tokenizer):
    model = make_tiny("gemma3", char_tokenizer)
    assert model.cfg.d_mlp == 48 and model.cfg.n_layers == 2
