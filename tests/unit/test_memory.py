"""predict_memory: the exact rows equal the real objects' nbytes on the tiny models; the paper's
models' parameter counts; LUNAR's fit peak against the peak RSS of a subprocess; bad input.

How the fit peak is measured: torch's CPU allocations are invisible to ``tracemalloc``, so a
subprocess loads a tiny model whose ``d_mlp`` makes LUNAR's float64 Gram matrices dominate
(2048 neurons: 32 MiB each), resets the kernel's peak-RSS mark (``/proc/self/clear_refs``),
fits, and reports ``VmHWM - VmRSS before the fit`` (Linux only; skipped elsewhere), with glibc
returning freed blocks over 128 KiB to the system (``MALLOC_MMAP_THRESHOLD_``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mechunlearn as mu
from mechunlearn import Skill
from mechunlearn.interventions.registry import unregister_method
from mechunlearn.memory import KNOWN_METHODS, model_shape, predict_memory

F = Skill.from_texts(
    "f", [f"Q: {i}+{i + 1}?" for i in range(12)], [f" {2 * i + 1}" for i in range(12)]
)
R = Skill.from_texts(
    "r", [f"def f{i}(x):" for i in range(12)], [f"\n  return x*{i}" for i in range(12)]
)


def state_bytes(est) -> int:
    """The bytes of the tensors an estimator saves (its fitted state)."""
    return sum(t.numel() * t.element_size() for t in est._state()[0].values())


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_known_methods_are_registered():
    assert set(KNOWN_METHODS) <= {m.name for m in mu.methods()}


def test_shape_of_the_tiny_model_and_its_configs(tiny_llama):
    shape = model_shape(tiny_llama)
    assert shape.n_params == sum(p.numel() for p in tiny_llama.parameters())
    hf = model_shape(tiny_llama.original_model.config)
    # TransformerLens 3's bridge gives the unembedding a bias the Llama config does not have.
    bias = getattr(tiny_llama.original_model.lm_head, "bias", None)
    added = sum(p.numel() for p in tiny_llama.parameters() if p is bias)
    assert (hf.n_params, hf.attn_params, hf.block_params) == (
        shape.n_params - added, shape.attn_params, shape.block_params,
    )  # fmt: skip
    tl = model_shape(tiny_llama.cfg)
    assert (tl.d_model, tl.d_mlp, tl.n_layers, tl.attn_params) == (
        32, 48, 3, shape.attn_params,
    )  # fmt: skip


def test_paper_models_parameter_counts():
    from transformers import LlamaConfig

    common = dict(vocab_size=128256, tie_word_embeddings=False)
    llama8 = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, **common)  # fmt: skip
    llama70 = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, **common)  # fmt: skip
    # The published counts of Meta-Llama-3-8B and -70B.
    assert model_shape(llama8).n_params == 8_030_261_248
    assert model_shape(llama70).n_params == 70_553_706_496
    pred = predict_memory(llama8, dtype="bfloat16", methods=["LUNAR"])
    assert pred.bytes("model", "weights") == 2 * 8_030_261_248
    assert pred.shape.dtype == torch.bfloat16


@pytest.fixture(scope="module")
def probe(tiny_llama):
    probe_f = mu.collect(tiny_llama, F, what=("pre", "keys", "importance"), quiet=True,
                         reservoir_size=64)  # fmt: skip
    probe_r = mu.collect(tiny_llama, R, what=("pre", "keys", "importance"), quiet=True,
                         reservoir_size=64)  # fmt: skip
    return probe_f, probe_r


def test_collect_rows_are_exact(tiny_llama, probe):
    stats, keys, imp = probe[0].pre, probe[0].keys, probe[0].importance
    pred = predict_memory(tiny_llama, reservoir_size=64, n_examples=len(F), methods=[])
    moments = nbytes(stats.count, stats.mean, stats.m2, stats.min, stats.max, stats.n_nonfinite)
    assert pred.bytes("collect", "moments") == moments
    assert pred.bytes("collect", "reservoir") == nbytes(stats.samples, stats.sample_keys)
    assert pred.bytes("collect", "keys") == nbytes(keys.values)
    assert pred.bytes("collect", "importance") == nbytes(imp.values)
    # a subset of layers
    sub = mu.collect(tiny_llama, F, layers=[0, 2], reservoir_size=0, quiet=True)
    small = predict_memory(tiny_llama, layers=[0, 2], reservoir_size=0, methods=[])
    assert small.bytes("collect", "moments") == nbytes(sub.count, sub.mean, sub.m2, sub.min,
                                                       sub.max, sub.n_nonfinite)  # fmt: skip
    assert small.bytes("collect", "reservoir") == nbytes(sub.samples, sub.sample_keys) == 0


def test_hook_methods_states_are_exact(tiny_llama, probe):
    (pf, pr), n = probe, len(F)
    pred = predict_memory(tiny_llama, n_examples=n, methods=["NA", "SP"])
    na = mu.NeuronAdjust(ratio=0.05).fit(pf.pre, pr.pre)
    sp = mu.SelectivePruning(ratio=0.05).fit(pf.importance, pr.importance)
    assert pred.bytes("state", "NA") == state_bytes(na)
    assert pred.bytes("state", "SP") == state_bytes(sp)


@pytest.mark.parametrize("settings", [{}, {"layers": [-1]}])
def test_detector_states_are_exact(tiny_llama, probe, settings):
    (pf, pr), n = probe, len(F)
    pred = predict_memory(
        tiny_llama, n_examples=n, methods={"KSD": settings, "Ellipsoid": settings}
    )
    ksd = mu.KeySpaceDetector(fpr=0.2, **settings).fit(pf.keys, pr.keys)
    ell = mu.EllipsoidDetector(fpr=0.2, **settings).fit(pf.keys, pr.keys)
    assert pred.bytes("state", "KSD") == state_bytes(ksd)
    assert pred.bytes("state", "Ellipsoid") == state_bytes(ell)


def test_lunar_state_is_exact(tiny_llama):
    lunar = mu.Lunar(layer=1).fit(tiny_llama, F, R)
    pred = predict_memory(tiny_llama, methods={"LUNAR": {"layer": 1}})
    assert pred.bytes("state", "LUNAR") == state_bytes(lunar)


def test_trained_states_are_exact(tiny_llama):
    kw = dict(max_steps=1, batch_size=4, forget_loss_factor=None)
    ga = mu.GradAscent(layers=[2], **kw).fit(tiny_llama, F, R, quiet=True)
    npo = mu.NPO(**kw).fit(tiny_llama, F, R, quiet=True)  # every parameter
    rmu = mu.RMU(layer=2, max_steps=1, batch_size=4).fit(tiny_llama, F, R, quiet=True)
    simu = mu.Simu(max_steps=1, batch_size=4, forget_loss_factor=None).fit(
        tiny_llama, F, R, quiet=True
    )
    cells = simu.critical_.numel()
    pred = predict_memory(
        tiny_llama,
        methods={"GA": {"layers": [2]}, "NPO": {}, "RMU": {"layer": 2}, "SIMU": {}},
        simu_critical=int(simu.critical_.sum()) / cells,
    )
    assert pred.bytes("state", "GA") == state_bytes(ga)
    assert pred.bytes("state", "NPO") == state_bytes(npo)
    assert pred.bytes("state", "RMU") == state_bytes(rmu)
    assert pred.bytes("state", "SIMU") == state_bytes(simu)


def test_prediction_reports(tiny_llama):
    pred = predict_memory(tiny_llama, methods=["NA", "LUNAR"])
    text = repr(pred)
    assert text.startswith("MemoryPrediction(") and "fit LUNAR" in text and "exact" in text
    frame = pred.to_frame()
    assert list(frame.columns) == ["stage", "item", "bytes", "GiB", "device", "exact", "note"]
    assert set(frame["device"]) == {"cpu"}
    assert "| fit | LUNAR |" in pred.to_markdown()
    assert pred.peak("NA") > pred.bytes("model", "weights")
    assert predict_memory(tiny_llama.cfg, methods=[]).rows[0].device == "model"


def test_reservoir_and_layers_scale_the_rows(tiny_llama):
    small = predict_memory(tiny_llama, reservoir_size=16, layers=-1, methods=["NA"])
    large = predict_memory(tiny_llama, reservoir_size=1024, methods=["NA"])
    assert small.bytes("collect", "reservoir") == 1 * 16 * 48 * 4 + 16 * 8
    assert large.bytes("collect", "reservoir") == 3 * 1024 * 48 * 4 + 1024 * 8
    assert small.bytes("state", "NA") * 3 == large.bytes("state", "NA")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"methods": ["XYZ"]}, "Unknown method 'XYZ'"),
        ({"methods": {"LUNAR": {"nope": 1}}}, "has no setting"),
        ({"reservoir_size": -1}, "reservoir_size"),
        ({"layers": 9}, "out of range"),
        ({"methods": {"LUNAR": {"layer": 7}}}, "out of range"),
        ({"methods": {"NA": 0.03}}, "mapping of settings"),
        ({"n_examples": 0}, "n_examples"),
        ({"simu_critical": 2.0}, "simu_critical"),
        ({"dtype": "float8"}, "Unknown dtype"),
    ],
)
def test_bad_input(tiny_llama, kwargs, match):
    with pytest.raises(ValueError, match=match):
        predict_memory(tiny_llama, **kwargs)


def test_not_a_model():
    with pytest.raises(TypeError, match="transformers config"):
        predict_memory("meta-llama/Meta-Llama-3-8B")


#: glibc returns every allocation above 128 KiB to the system when it is freed (a fixed mmap
#: threshold), so that the peak RSS of a step is not hidden by memory kept from an earlier one.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}

CHILD = textwrap.dedent(
    """
    import json, sys, tempfile
    from pathlib import Path
    sys.path.insert(0, {root!r})
    sys.path.insert(0, str(Path({root!r}) / "benchmarks"))
    import torch
    import mechunlearn as mu
    from memory import reset_peak_rss, status_mb
    from tests.tiny_models import make_char_tokenizer, make_tiny_llama
    from tests.unit.test_memory import F, R
    tok = make_char_tokenizer(Path(tempfile.mkdtemp()))
    model = make_tiny_llama(tok, n_layers=2, d_mlp=2048)
    mu.Lunar(layer=0).fit(model, F[:2], R[:2])  # warm-up: torch's own one-off allocations
    reset_peak_rss()
    base = status_mb("VmRSS")
    mu.Lunar(layer=1).fit(model, F, R)
    measured = (status_mb("VmHWM") - base) * 2**20
    predicted = mu.predict_memory(model, methods={{"LUNAR": {{"layer": 1}}}}, batch_size=16,
                                  seq_len=16).bytes("fit", "LUNAR")
    print(json.dumps({{"measured": measured, "predicted": predicted}}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux peak RSS only")
def test_lunar_fit_peak_within_20_percent():
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(root=root)],
        capture_output=True, text=True, timeout=300, cwd=root, env={**os.environ, **MALLOC},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = result["measured"] / result["predicted"]
    assert 0.8 <= ratio <= 1.2, result


def test_a_method_registered_outside_the_package_is_left_out_with_a_warning(tiny_llama):
    @mu.register_method("MemToy", fits_on="pre")
    class MemToy(mu.NeuronAdjust):
        pass

    try:
        with pytest.warns(UserWarning, match="no memory rule for 'MemToy'"):
            pred = predict_memory(tiny_llama, methods=["NA", "MemToy"])
        assert pred.bytes("state", "NA") > 0
        with pytest.raises(KeyError, match="MemToy"):
            pred.bytes("state", "MemToy")
    finally:
        unregister_method("MemToy")
