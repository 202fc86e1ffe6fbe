"""Hooks never read a tensor on the host (no `.item()`, `.cpu()`, `nonzero()`, Python `if` on a
tensor value): on a GPU each would stall the pipeline. Checked on the CPU with a
`__torch_function__` mode that records every host-reading call made inside a hook, and on CUDA
(when present) with `torch.cuda.set_sync_debug_mode("error")`."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from mechunlearn import (
    EllipsoidDetector,
    KeySpaceDetector,
    NeuronAdjust,
    SelectivePruning,
    Skill,
    collect,
)

F = Skill.from_texts(
    "f", [f"Q: {i}+{i + 1}?" for i in range(8)], [f" {2 * i + 1}" for i in range(8)]
)
R = Skill.from_texts(
    "r", [f"def f{i}(x):" for i in range(8)], [f"\n  return x*{i}" for i in range(8)]
)

HOST_READS = {
    Tensor.item,
    Tensor.tolist,
    Tensor.numpy,
    Tensor.cpu,
    Tensor.__bool__,
    Tensor.__int__,
    Tensor.__float__,
    Tensor.__index__,
    Tensor.nonzero,
    torch.nonzero,
}


class HostReads(TorchFunctionMode):
    """Records every call that reads a tensor's value on the host (or needs its size on the
    host, like boolean indexing and one-argument ``torch.where``)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS:
            self.calls.append(getattr(func, "__name__", str(func)))
        elif func is Tensor.__getitem__ or func is Tensor.__setitem__:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, Tensor) and i.dtype == torch.bool for i in index):
                self.calls.append("boolean indexing")
        elif func is torch.where and len(args) + len(kwargs) == 1:
            self.calls.append("torch.where(condition)")
        return func(*args, **kwargs)


def watched(hooks, mode: HostReads):
    def wrap(fn):
        def hook(activation, hook=None):
            with mode:
                return fn(activation, hook)

        return hook

    return [(name, wrap(fn)) for name, fn in hooks]


def test_the_watcher_catches_host_reads():
    mode = HostReads()
    x = torch.randn(4)
    with mode:
        if x.sum() > 0:  # a Python branch on a tensor value
            pass
        x[0].item(), x[x > 0], torch.where(x > 0), x.cpu()
    assert mode.calls == [
        "__bool__",
        "item",
        "boolean indexing",
        "torch.where(condition)",
        "cpu",
    ]


@pytest.fixture(scope="module")
def fitted(llama_like):
    model = llama_like
    probe_f = collect(model, F, what=("pre", "keys", "importance"), quiet=True)
    probe_r = collect(model, R, what=("pre", "keys", "importance"), quiet=True)
    return [
        NeuronAdjust(ratio=0.1).fit(probe_f.pre, probe_r.pre),
        SelectivePruning(ratio=0.1).fit(probe_f.importance, probe_r.importance),
        KeySpaceDetector(layers=None, fpr=0.3).fit(probe_f.keys, probe_r.keys),
        EllipsoidDetector(layers=[0, 2], fpr=0.3).fit(probe_f.keys, probe_r.keys),
    ]


def test_intervention_hooks_read_nothing_on_the_host(llama_like, fitted):
    model = llama_like
    tokens = model.to_tokens(["Q: 3+4?", "def g(y):"])
    for iv in fitted:
        mode = HostReads()
        with torch.no_grad():
            model.run_with_hooks(tokens, fwd_hooks=watched(iv.hooks(model), mode))
        assert mode.calls == [], f"{type(iv).__name__}: {mode.calls}"


def test_collection_and_scoring_hooks_read_nothing_on_the_host(llama_like, monkeypatch):
    collect_module = importlib.import_module("mechunlearn.collect")
    evaluation_module = importlib.import_module("mechunlearn.evaluation")
    mode = HostReads()
    original = collect_module.forward_until

    def spy(model, batch, hooks, stop_after):  # run_pass's forward: collection and scoring
        return original(model, batch, watched(hooks, mode), stop_after)

    monkeypatch.setattr(collect_module, "forward_until", spy)
    collect(llama_like, F, what=("pre", "key", "keys", "mean_keys", "importance"), quiet=True)
    evaluation_module.teacher_forced(llama_like, F)
    assert mode.calls == []


def sync_checked(hooks):
    """Each hook runs with CUDA's sync debug mode at "error": any synchronising call inside it
    raises (TransformerLens's own code outside our hooks is not checked)."""

    def wrap(fn):
        def hook(activation, hook=None):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(activation, hook)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        return hook

    return [(name, wrap(fn)) for name, fn in hooks]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hooks_never_synchronise_on_cuda(char_tokenizer):
    from tests.tiny_models import make_tiny_llama

    model = make_tiny_llama(char_tokenizer, "cuda")
    probe_f = collect(model, F, what=("pre", "keys", "importance"), quiet=True)
    probe_r = collect(model, R, what=("pre", "keys", "importance"), quiet=True)
    ivs = [
        NeuronAdjust(ratio=0.1).fit(probe_f.pre, probe_r.pre),
        SelectivePruning(ratio=0.1).fit(probe_f.importance, probe_r.importance),
        KeySpaceDetector(layers=None, fpr=0.3).fit(probe_f.keys, probe_r.keys),
        EllipsoidDetector(layers=[0, 2], fpr=0.3).fit(probe_f.keys, probe_r.keys),
    ]
    tokens = model.to_tokens(["Q: 3+4?", "def g(y):"]).cuda()
    for iv in ivs:
        hooks = iv.hooks(model)
        with torch.no_grad():
            model.run_with_hooks(tokens, fwd_hooks=hooks)  # first use moves fitted tensors
            torch.cuda.synchronize()
            model.run_with_hooks(tokens, fwd_hooks=sync_checked(hooks))
