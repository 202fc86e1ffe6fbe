"""Saved files: those written by mechunlearn 0.1.0 (tests/fixtures/v0_1_0, on the tiny Llama) still
load; every load checks what it reads and names the file when something is wrong."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mechunlearn as mu
from mechunlearn.io import FORMAT_VERSION, DamagedFileError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "v0_1_0"
KINDS = {
    "stats_forget": mu.NeuronStats,
    "keys_forget": mu.KeyVectors,
    "importance_forget": mu.Importance,
    "NeuronAdjust": mu.NeuronAdjust,
    "KeySpaceDetector": mu.KeySpaceDetector,
    "EllipsoidDetector": mu.EllipsoidDetector,
    "SelectivePruning": mu.SelectivePruning,
}


@pytest.mark.parametrize("name", list(KINDS))
def test_files_of_mechunlearn_0_1_0_load(name, tiny_llama):
    with pytest.warns(UserWarning) if name == "SelectivePruning" else _nothing():
        obj = KINDS[name].load(FIXTURES / name)
    if hasattr(obj, "hooks"):
        tokens = tiny_llama.to_tokens(["Q: 3+4?"])
        with torch.no_grad():
            tiny_llama.run_with_hooks(tokens, fwd_hooks=obj.hooks(tiny_llama))
    else:
        obj.check_model(tiny_llama)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_old_pruning_files_drop_their_iterative_settings_with_a_warning():
    with pytest.warns(UserWarning, match="hyperparameter iterative=False is not one of"):
        sp = mu.SelectivePruning.load(FIXTURES / "SelectivePruning")
    assert set(sp.get_params()) == {"ratio", "eps"}


def _rewrite(src: Path, dst: Path, tensors=None, info_update=None, drop=()):
    """A copy of a mechunlearn file with some tensors or metadata changed."""
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        data = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    info = json.loads(meta["mechunlearn"])
    info.update(info_update or {})
    data.update(tensors or {})
    save_file(data, str(dst), metadata={"mechunlearn": json.dumps(info)})
    return dst


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(tensors={"mean": torch.zeros(3, 48, dtype=torch.int64)}),
         "tensor 'mean' is torch.int64"),
        (dict(tensors={"std_like": torch.zeros(3)}), None),  # unknown tensor: dropped, warned
        (dict(tensors={"m2": torch.zeros(48, 3, dtype=torch.float64)}), "'m2' has shape [48, 3]"),
        (dict(tensors={"samples": torch.zeros(3, 16, 40)}), "'samples' has shape [3, 16, 40]"),
        (dict(info_update={"n_tokens": -5}), "n_tokens=-5 is not a count"),
        (dict(info_update={"layers": [0, 1]}), "has shape [3, 48], expected [2, 48]"),
        (dict(info_update={"layers": [0, 1, 9]}), "layers=[0, 1, 9] are not distinct layer"),
        (dict(drop=("m2",)), "lacks the tensors ['m2']"),
        (dict(info_update={"format_version": FORMAT_VERSION + 1}),
         "written by a newer mechunlearn"),
        (dict(info_update={"kind": "KeyVectors"}), "holds KeyVectors, not NeuronStats"),
        (dict(info_update={"site": "mlp"}), "Unknown site 'mlp'"),
    ],
)  # fmt: skip
def test_a_tampered_statistics_file_is_named(tmp_path, change, message):
    path = _rewrite(FIXTURES / "stats_forget.safetensors", tmp_path / "s.safetensors", **change)
    if message is None:
        with pytest.warns(UserWarning, match="unknown tensor 'std_like' dropped"):
            mu.NeuronStats.load(path)
        return
    with pytest.raises(DamagedFileError) as info:
        mu.NeuronStats.load(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_truncated_and_foreign_files_are_named(tmp_path):
    good = FIXTURES / "keys_forget.safetensors"
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(DamagedFileError, match="cut.safetensors is damaged"):
        mu.KeyVectors.load(cut)
    header_only = tmp_path / "header.safetensors"
    blob = good.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header_only.write_bytes(blob[: 8 + n])  # a header whose data is gone
    with pytest.raises(DamagedFileError, match="header.safetensors"):
        mu.KeyVectors.load(header_only)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(DamagedFileError, match="not a mechunlearn file"):
        mu.KeyVectors.load(plain)


def test_a_damaged_intervention_file_is_named(tmp_path):
    path = tmp_path / "na.safetensors"
    shutil.copy(FIXTURES / "NeuronAdjust.safetensors", path)
    _rewrite(path, path, tensors={"mu_f": torch.zeros(2, 48, dtype=torch.float64)})
    with pytest.raises(DamagedFileError, match="na.safetensors does not hold a valid NeuronAdjust"):
        mu.NeuronAdjust.load(path)


def test_writes_are_atomic(tmp_path, monkeypatch):
    """A save that fails half-way leaves the previous file intact and no temporary behind."""
    stats = mu.NeuronStats.load(FIXTURES / "stats_forget")
    path = stats.save(tmp_path / "s")
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(KeyboardInterrupt):
        stats.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_temporaries_are_named_as_is_temporary_expects(tmp_path):
    """The run folder removes a killed run's temporaries by this name: it must match them."""
    from mechunlearn.io import atomic_write, is_temporary

    seen = []
    for name in ("forget.pre.safetensors", ".mechunlearn-report.json", "index.html"):
        atomic_write(tmp_path / name, lambda tmp: (seen.append(tmp), tmp.write_text("x")))
    assert len(seen) == 3 and all(is_temporary(p) for p in seen)
    assert not any(is_temporary(tmp_path / name) for name in ("index.html", "x.tmp", ".a.tmp"))


def test_a_failed_write_names_the_file_and_keeps_errno(tmp_path, monkeypatch):
    import errno

    from safetensors import SafetensorError

    stats = mu.NeuronStats.load(FIXTURES / "stats_forget")

    def full(tensors, filename, metadata=None):
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr("safetensors.torch.save_file", full)
    with pytest.raises(OSError, match="Cannot write .*s.safetensors: No space left") as info:
        stats.save(tmp_path / "s")
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []
