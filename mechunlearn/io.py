"""Saving and loading mechunlearn objects: safetensors with JSON metadata in the header."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

META_KEY = "mechunlearn"


def _with_suffix(path: str | Path) -> Path:
    path = Path(path)
    return path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")


def save_tensors(path: str | Path, tensors: dict[str, Tensor], info: dict[str, Any]) -> Path:
    """Write ``tensors`` to ``path`` (``.safetensors`` added if missing) with ``info`` as JSON.

    ``info["kind"]`` names the object so that :func:`load_tensors` can refuse the wrong file.
    """
    from . import __version__

    path = _with_suffix(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {**info, "version": __version__}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(info)})
    return path


def load_tensors(
    path: str | Path, kind: str, device: torch.device | str = "cpu"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensors`, checking that it holds a ``kind``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a mechunlearn file, or one holding another kind of object.
    """
    path = Path(path)
    if not path.exists() and _with_suffix(path).exists():
        path = _with_suffix(path)
    if not path.exists():
        raise FileNotFoundError(f"No {kind} file at {path}.")
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        header = (f.metadata() or {}).get(META_KEY)
        if header is None:
            raise ValueError(f"{path} is not a mechunlearn file (no '{META_KEY}' metadata).")
        info = json.loads(header)
        if info.get("kind") != kind:
            raise ValueError(f"{path} holds {info.get('kind')}, not {kind}.")
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return tensors, info
