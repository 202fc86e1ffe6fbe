"""Saving and loading: safetensors with JSON metadata in the header, JSON and text files.

Every write is **atomic**: the file is written beside its target under a temporary name
(``.<name>.<8 random characters>.tmp``, :func:`is_temporary`) and moved into place with
``os.replace``, so an interrupted run never leaves a half-written file where a later run would
read it; a run killed mid-write leaves at most such a temporary, which
:class:`mechunlearn.pipeline.RunFolder` removes when it next locks the folder. A failed write
raises ``OSError`` naming the target and keeping the ``errno`` (a full disk, a read-only file
system), whatever library wrote the file.

Every mechunlearn file records ``kind`` (the class it holds), ``format_version`` (the layout of
its tensors and metadata, :data:`FORMAT_VERSION`) and the package ``version`` that wrote it.
:func:`load_tensors` checks them and the tensors' names and dtypes against a schema, and every
failure names the file: a damaged or truncated file, another kind of object, a file from a newer
mechunlearn, a missing tensor or a wrong dtype. Files written before ``format_version`` existed
(mechunlearn 0.1.0) have the same layout and load as version 0. Unknown tensors or metadata keys
are dropped with a warning. Each class then checks its shapes against each other and its
metadata (see their ``load`` methods).
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._version import __version__
from .validation import check_device

META_KEY = "mechunlearn"
FORMAT_VERSION = 1
"""Layout version of the files this mechunlearn writes."""
TEMP_SUFFIX = ".tmp"
# ``.<target name>.<tempfile's 8 random characters>.tmp``: what atomic_write's mkstemp makes.
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX) + "$")


class DamagedFileError(ValueError):
    """A file mechunlearn wrote cannot be read back (truncated, corrupted or inconsistent)."""


def _with_suffix(path: str | Path) -> Path:
    if str(path).strip() in ("", "."):
        raise ValueError(f"Cannot save to {str(path)!r}: give a file name, e.g. 'na_gsm8k'.")
    path = Path(path)
    return path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")


def _check_target(path: Path) -> Path:
    if str(path) in ("", ".") or path.name in ("", ".safetensors"):
        raise ValueError(f"Cannot save to {str(path)!r}: give a file name, e.g. 'na_gsm8k'.")
    if path.exists() and path.is_dir():
        err = IsADirectoryError(f"Cannot save to {path}: it is a folder; give a file name.")
        err.errno = errno.EISDIR
        raise err
    return path


def is_temporary(path: str | Path) -> bool:
    """Whether ``path`` is named like the temporary files :func:`atomic_write` makes.

    Example:
        >>> is_temporary("stats/.forget.pre.safetensors.k2x_9qz1.tmp"), is_temporary("a.tmp")
        (True, False)
    """
    return _TEMPORARY.match(Path(path).name) is not None


def write_error(path: str | Path, err: BaseException) -> OSError | None:
    """The ``OSError`` to raise when writing ``path`` failed with ``err``, or None.

    The message names ``path``; the ``errno`` (``err.errno``, or the ``os error N`` of a
    safetensors I/O error) is kept so that callers can tell a full disk from a read-only one.
    None when ``err`` is not an I/O error.
    """
    if isinstance(err, OSError):
        code, reason = err.errno, err.strerror or str(err)
    else:
        found = re.search(r"I/O error: (.*?) \(os error (\d+)\)", str(err))
        if found is None:
            return None
        code, reason = int(found.group(2)), found.group(1)
    out = (type(err) if isinstance(err, OSError) else OSError)(
        f"Cannot write {path}: {str(reason).rstrip('.')}."
    )
    out.errno = code
    return out


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then move it onto ``path``.

    Raises:
        OSError: the folder cannot be created or written (also a safetensors I/O error); the
            message names ``path`` and ``errno`` is kept (:func:`write_error`).
    """
    path = _check_target(Path(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        os.close(fd)
    except OSError as err:
        raise write_error(path, err) from None
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; files get the usual mode
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        failure = write_error(path, err)
        if failure is not None:
            raise failure from None
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def load_or_make(
    path: str | Path,
    load: Callable[[Path], Any],
    make: Callable[[], Any],
    save: Callable[[Any, Path], Any],
) -> Any:
    """``load(path)`` if the file exists and reads back; else ``make()``, saved by ``save``.

    A damaged file (:class:`DamagedFileError`, or any ``ValueError``/``OSError`` on reading) is
    named in a warning and made again, so a cache of results resumes instead of failing.

    Args:
        path: where the object is kept.
        load: reads it, e.g. ``NeuronStats.load``.
        make: computes it.
        save: ``save(obj, path)`` writes it, e.g. ``NeuronStats.save``.

    Returns:
        The loaded or the new object.
    """
    path = Path(path)
    if path.exists():
        try:
            return load(path)
        except (ValueError, OSError) as err:  # DamagedFileError is a ValueError
            warnings.warn(f"{path} is damaged ({err}); computing it again.", stacklevel=2)
    obj = make()
    save(obj, path)
    return obj


def read_json(path: str | Path, what: str = "file") -> Any:
    """Read a JSON file; a damaged one raises :class:`DamagedFileError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedFileError(f"The {what} {path} is damaged ({err}): delete it.") from None


def save_tensors(path: str | Path, tensors: dict[str, Tensor], info: dict[str, Any]) -> Path:
    """Write ``tensors`` to ``path`` (``.safetensors`` added if missing) with ``info`` as JSON.

    ``info["kind"]`` names the object so that :func:`load_tensors` can refuse the wrong file;
    ``format_version`` and ``version`` are added.
    """
    from safetensors.torch import save_file

    path = _with_suffix(path)
    info = {**info, "format_version": FORMAT_VERSION, "version": __version__}
    header = {META_KEY: json.dumps(info)}
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=header))


def load_tensors(
    path: str | Path,
    kind: str,
    device: torch.device | str = "cpu",
    schema: Mapping[str, torch.dtype | tuple[torch.dtype, ...]] | None = None,
    info_keys: tuple[str, ...] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensors`, checking that it holds a ``kind``.

    Args:
        path: the file (``.safetensors`` may be left out).
        kind: the class name it must hold.
        device: where to put the tensors (checked with :func:`mechunlearn.validation.check_device`:
            a device this machine lacks raises a ValueError, not a damaged-file error).
        schema: ``{tensor name: dtype or dtypes}``; every name must be present with one of its
            dtypes (others are dropped with a warning).
        info_keys: the metadata keys that must be present (others are dropped with a warning).

    Raises:
        ValueError: ``device`` is unknown or not on this machine.
        FileNotFoundError: no such file.
        DamagedFileError: not a readable mechunlearn file, another kind, a newer format, a
            missing or wrongly typed tensor or metadata key; the message names the file.
    """
    from safetensors import SafetensorError, safe_open

    device = check_device(device)
    path = Path(path)
    if not path.exists() and _with_suffix(path).exists():
        path = _with_suffix(path)
    if not path.exists():
        raise FileNotFoundError(f"No {kind} file at {path}.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = (f.metadata() or {}).get(META_KEY)
            names = list(f.keys())
            if header is None:
                raise DamagedFileError(
                    f"{path} is not a mechunlearn file (no '{META_KEY}' metadata)."
                )
            tensors = {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise DamagedFileError(
            f"{path} is damaged or not a safetensors file ({str(err).strip()}): delete it and "
            "compute it again."
        ) from None
    try:
        info = json.loads(header)
    except json.JSONDecodeError as err:
        raise DamagedFileError(f"{path} has damaged metadata ({err}): delete it.") from None
    if not isinstance(info, dict) or info.get("kind") != kind:
        found = info.get("kind") if isinstance(info, dict) else None
        raise DamagedFileError(f"{path} holds {found}, not {kind}.")
    version = info.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DamagedFileError(
            f"{path} was written by a newer mechunlearn ({info.get('version')}, file format "
            f"{version}; this is {__version__}, format {FORMAT_VERSION}): upgrade mechunlearn."
        )
    if schema is not None:
        missing = [n for n in schema if n not in tensors]
        if missing:
            raise DamagedFileError(f"{path} lacks the tensors {missing}: it is damaged.")
        for name in [n for n in tensors if n not in schema]:
            warnings.warn(f"{path}: unknown tensor {name!r} dropped.", stacklevel=3)
            tensors.pop(name)
        for name, dtypes in schema.items():
            allowed = dtypes if isinstance(dtypes, tuple) else (dtypes,)
            if tensors[name].dtype not in allowed:
                raise DamagedFileError(
                    f"{path}: tensor {name!r} is {tensors[name].dtype}, expected "
                    f"{' or '.join(str(d) for d in allowed)}: the file is damaged."
                )
    if info_keys is not None:
        required = set(info_keys)
        known = required | {"kind", "format_version", "version"}
        missing = sorted(required - set(info))
        if missing:
            raise DamagedFileError(f"{path} lacks the metadata {missing}: it is damaged.")
        for key in [k for k in info if k not in known]:
            warnings.warn(f"{path}: unknown metadata key {key!r} dropped.", stacklevel=3)
            info.pop(key)
    # Opened on the CPU above, so that a device that is not there is not called a damaged file.
    tensors = {name: t.to(device) for name, t in tensors.items()}
    return tensors, info


def check_shape(path: Any, name: str, tensor: Tensor, shape: tuple[int, ...]) -> None:
    """Raise :class:`DamagedFileError` if a loaded ``tensor`` does not have ``shape``."""
    if tuple(tensor.shape) != tuple(shape):
        raise DamagedFileError(
            f"{path}: tensor {name!r} has shape {list(tensor.shape)}, expected {list(shape)}: "
            "the file is damaged."
        )


class JsonStore(MutableMapping[str, Any]):
    """A dict of JSON values kept in a JSON file: read when made, written (atomically) after
    every change, so that a long computation that stores each finished part resumes after a
    kill. A damaged file is named in a warning and the store starts empty.

    Args:
        path: the file.
        write: ``write(path, writer)`` writes the file by calling ``writer(path)`` (e.g. a run
            folder's ``write``, which records it); default: ``writer(path)``.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "parts.json"
        >>> store = JsonStore(path)
        >>> store["base"] = {"score": 0.5}
        >>> JsonStore(path)["base"], len(JsonStore(path))       # read back by a new store
        ({'score': 0.5}, 1)
    """

    def __init__(
        self, path: str | Path, write: Callable[[Path, Callable[[Path], Any]], Any] | None = None
    ):
        self.path = Path(path)
        self._write = write or (lambda target, writer: writer(target))
        self._data: dict[str, Any] = {}
        if self.path.exists():
            try:
                data = read_json(self.path, "store")
            except DamagedFileError as err:
                warnings.warn(f"{err} Starting it again.", stacklevel=2)
            else:
                if isinstance(data, dict):
                    self._data = data
                else:
                    warnings.warn(f"{self.path} holds no JSON object: starting it again.",
                                  stacklevel=2)  # fmt: skip

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._data[key] = value
        self._flush()

    def __delitem__(self, key: str) -> None:
        del self._data[key]
        self._flush()

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        """Empty the store, with one write."""
        self._data.clear()
        self._flush()

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """As ``dict.update``, with one write."""
        self._data.update(other, **kwargs)
        self._flush()

    def _flush(self) -> None:
        self._write(self.path, lambda target: write_json(target, self._data))
