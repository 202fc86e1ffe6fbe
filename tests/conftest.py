"""Shared fixtures: tiny random models built from a local config (no network), the device option,
and the real default model for integration tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default="cpu",
        help="torch device for the tests' models (e.g. cuda); default cpu",
    )


@pytest.fixture(scope="session")
def device(request) -> str:
    dev = request.config.getoption("--device")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--device cuda given but no GPU is visible")
    return dev


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real benchmark files (../shared/data beside the repo, or $MECHUNLEARN_DATA)."""
    path = Path(os.environ.get("MECHUNLEARN_DATA", SHARED_DATA))
    if not path.exists():
        pytest.skip(f"benchmark data not found at {path}; set MECHUNLEARN_DATA")
    return path


def _char_tokenizer(folder: Path):
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


@pytest.fixture(scope="session")
def char_tokenizer(tmp_path_factory):
    return _char_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def make_tiny_llama(tokenizer, device="cpu", n_layers=3, d_mlp=48, seed=0):
    """A tiny random Llama-style (gated MLP) TransformerBridge."""
    from transformer_lens.model_bridge import TransformerBridge
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
    hf = LlamaForCausalLM(cfg).eval()
    return TransformerBridge.boot_transformers(
        "tiny-llama", hf_model=hf, tokenizer=tokenizer, device=device
    ).eval()


def make_tiny_gpt2(tokenizer, device="cpu", n_layers=2, seed=0):
    """A tiny random GPT-2-style (GELU MLP, d_mlp = 4 * d_model = 128) TransformerBridge."""
    from transformer_lens.model_bridge import TransformerBridge
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
    hf = GPT2LMHeadModel(cfg).eval()
    return TransformerBridge.boot_transformers(
        "tiny-gpt2", hf_model=hf, tokenizer=tokenizer, device=device
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
    import warnings

    from transformer_lens import HookedTransformer, HookedTransformerConfig

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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return HookedTransformer(cfg, tokenizer=tokenizer).eval()


@pytest.fixture(scope="session")
def tiny_legacy(char_tokenizer, device):
    return make_tiny_legacy_llama(char_tokenizer, device)


@pytest.fixture(scope="session")
def tiny_llama(char_tokenizer, device):
    return make_tiny_llama(char_tokenizer, device)


@pytest.fixture(scope="session")
def tiny_gpt2(char_tokenizer, device):
    return make_tiny_gpt2(char_tokenizer, device)


@pytest.fixture(params=["llama", "gpt2"] + (["legacy"] if LEGACY else []))
def tiny_model(request):
    """Each kind of tiny model: bridges for Llama and GPT-2, and a legacy HookedTransformer
    where this TransformerLens has one."""
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(scope="session", params=["bridge"] + (["legacy"] if LEGACY else []))
def llama_like(request):
    """The tiny Llama as a TransformerBridge, and as a legacy HookedTransformer where this
    TransformerLens has one: for the hook-level tests that must hold on both."""
    return request.getfixturevalue("tiny_llama" if request.param == "bridge" else "tiny_legacy")


@pytest.fixture(scope="session")
def default_model(device):
    """The real default model (SmolLM2-135M-Instruct), offline."""
    import mechunlearn as mu

    return mu.load_model(device=device, quiet=True)
