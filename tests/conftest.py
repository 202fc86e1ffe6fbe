"""Shared fixtures: tiny random models built from a local config (no network), the device option,
and the real default model for integration tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.tiny_models import (
    LEGACY,
    SHARED_DATA,
    make_char_tokenizer,
    make_tiny_gpt2,
    make_tiny_legacy_llama,
    make_tiny_llama,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


@pytest.fixture(scope="session")
def char_tokenizer(tmp_path_factory):
    return make_char_tokenizer(tmp_path_factory.mktemp("tokenizer"))


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
