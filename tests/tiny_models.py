"""The tiny random models of the tests, built from local configs (no network): a character-level
tokenizer, a Llama-style and a GPT-2-style ``TransformerBridge``, and a legacy Llama-style
``HookedTransformer`` where this TransformerLens has one.

Plain factories, imported by tests/conftest.py (the fixtures) and by the repository's root
conftest.py (the doctests' namespace), and by tests that need a model of another size.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def weights(model) -> dict[str, torch.Tensor]:
    """A copy of every parameter by name, to check later that the model is as it was."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed_weights(model, before: dict[str, torch.Tensor]) -> list[str]:
    """The parameters that differ from :func:`weights`' copy ``before`` (bit for bit)."""
    return [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]


def unchanged(model, before: dict[str, torch.Tensor]) -> bool:
    """Whether every parameter equals :func:`weights`' copy ``before`` bit for bit."""
    return not changed_weights(model, before)


def make_char_tokenizer(folder: Path):
    """A character-level tokenizer with BOS/EOS/PAD, saved and reloaded so that
    TransformerLens can rebuild it (it needs name_or_path)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for c in [chr(i) for i in range(32, 127)] + ["\n", "\t"]:
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
    )
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def make_tiny_llama(tokenizer, device="cpu", n_layers=3, d_mlp=48, seed=0):
    """A tiny random Llama-style (gated MLP) TransformerBridge."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _bridge("tiny-llama", LlamaForCausalLM(cfg), tokenizer, device)


def make_tiny_gpt2(tokenizer, device="cpu", n_layers=2, seed=0):
    """A tiny random GPT-2-style (GELU MLP, d_mlp = 4 * d_model = 128) TransformerBridge."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=n_layers,
        n_head=4,
        n_positions=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _bridge("tiny-gpt2", GPT2LMHeadModel(cfg), tokenizer, device)


# Every architecture of the unit tier's matrix (tests/unit/test_architectures.py): the
# transformers classes and what differs from the shared shape (d_model 32, 4 heads of 8, two key
# and value heads, d_mlp 48). Gemma 2 keeps its default logit soft-capping (final 30, attention
# 50), and the Gemmas get a sliding window of 4 so that it matters in short texts.
TINY_ARCHITECTURES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 4}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 4}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 {"num_key_value_heads": 4, "rotary_pct": 0.25}),
}  # fmt: skip
"""``{short name: (config class, model class, config overrides)}`` in ``transformers``."""


def make_tiny_hf(arch, tokenizer, n_layers=2, d_mlp=48, seed=0, **overrides):
    """A tiny random Hugging Face causal LM of architecture ``arch`` (a key of
    :data:`TINY_ARCHITECTURES`), from a config built in code: like a GGUF-derived config, it has
    no ``architectures`` entry."""
    import transformers

    config_cls, model_cls, extra = TINY_ARCHITECTURES[arch]
    if arch == "gpt2":
        kw = dict(n_embd=32, n_layer=n_layers, n_head=4, n_inner=d_mlp, n_positions=256)
    else:
        kw = dict(hidden_size=32, intermediate_size=d_mlp, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256)  # fmt: skip
    kw.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
              eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**kw, **extra, **overrides})
    return getattr(transformers, model_cls)(config).eval()


def make_tiny(arch, tokenizer, device="cpu", n_layers=2, d_mlp=48, seed=0, **overrides):
    """A tiny random TransformerBridge of architecture ``arch``, loaded as a user's model is
    (``mu.load_model(hf_model=..., tokenizer=...)``, which fills in ``architectures``)."""
    import mechunlearn as mu

    hf = make_tiny_hf(arch, tokenizer, n_layers=n_layers, d_mlp=d_mlp, seed=seed, **overrides)
    return mu.load_model(f"tiny-{arch}", hf_model=hf, tokenizer=tokenizer, device=device,
                         quiet=True)  # fmt: skip


def _permute_rotary(weight, n_heads):
    """llama.cpp's reordering of a Llama query/key projection's rows (transformers undoes it)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_llama_gguf(hf_model, tokenizer, path):
    """Write a Llama Hugging Face model and its tokenizer as a float32 GGUF file, with llama.cpp's
    names and metadata (what ``convert_hf_to_gguf.py`` writes for Llama), in well under a second
    for a tiny model. The tokenizer becomes a sentencepiece vocabulary of the same tokens.

    Returns:
        ``path``.
    """
    import gguf

    cfg = hf_model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama-gguf")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([token.replace(" ", "\u2581") for token, _ in vocab])
    writer.add_token_scores([0.0] * len(vocab))
    writer.add_token_types([3 if token in special else 1 for token, _ in vocab])  # 3: control
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    sd = {k: v.detach().float().cpu().numpy() for k, v in hf_model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {
        "attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    }  # fmt: skip
    for i in range(cfg.num_hidden_layers):
        hf = f"model.layers.{i}."
        q, k = sd[hf + "self_attn.q_proj.weight"], sd[hf + "self_attn.k_proj.weight"]
        writer.add_tensor(f"blk.{i}.attn_q.weight", _permute_rotary(q, cfg.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _permute_rotary(k, cfg.num_key_value_heads))
        for gguf_name, hf_name in names.items():
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", sd[f"{hf}{hf_name}.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _bridge(name, hf_model, tokenizer, device):
    """A random Hugging Face model wrapped as a TransformerBridge, in eval mode."""
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(
        name, hf_model=hf_model.eval(), tokenizer=tokenizer, device=device
    ).eval()


def legacy_available() -> bool:
    """Whether this TransformerLens still ships the legacy ``HookedTransformer`` (3.x does, 4.x
    removed it). CI's transformer-lens 3.x job sets ``MECHUNLEARN_EXPECT_LEGACY=1`` so that its
    absence fails instead of skipping."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        if os.environ.get("MECHUNLEARN_EXPECT_LEGACY") == "1":
            raise
        return False
    return True


LEGACY = legacy_available()


def make_tiny_legacy_llama(tokenizer, device="cpu", n_layers=3, d_mlp=48, seed=0):
    """A tiny random Llama-style legacy ``HookedTransformer`` (gated MLP, RMSNorm, rotary,
    grouped-query attention) from a local config."""
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=32,
        d_head=8,
        n_heads=4,
        n_key_value_heads=2,
        d_mlp=d_mlp,
        d_vocab=len(tokenizer),
        n_ctx=256,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        final_rms=True,
        positional_embedding_type="rotary",
        rotary_dim=8,
        seed=seed,
        device=device,
    )
    return _legacy(cfg, tokenizer)


def make_tiny_legacy_gpt2(tokenizer, device="cpu", n_layers=2, seed=0):
    """A tiny random GPT-2-style legacy ``HookedTransformer`` (GELU MLP, LayerNorm, learned
    positional embeddings added to the residual stream) from a local config."""
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=32,
        d_head=8,
        n_heads=4,
        d_mlp=128,
        d_vocab=len(tokenizer),
        n_ctx=256,
        act_fn="gelu_new",
        normalization_type="LN",
        positional_embedding_type="standard",
        seed=seed,
        device=device,
    )
    return _legacy(cfg, tokenizer)


def _legacy(cfg, tokenizer):
    """A legacy HookedTransformer from ``cfg`` (its deprecation warnings silenced), in eval mode."""
    import warnings

    from transformer_lens import HookedTransformer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return HookedTransformer(cfg, tokenizer=tokenizer).eval()
