"""Bad input at every public entry point, table-driven (in the spirit of scikit-learn's common
estimator checks): each case must fail with one line that names the problem and the fix, and
nothing may be converted silently."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import mechunlearn as mu
import mechunlearn.pipeline
from mechunlearn.pipeline import PipelineError
from tests.tiny_models import make_tiny_llama

S = mu.Skill.from_texts(
    "s", ["Q: 1+2=", "Q: 3+4=", "Q: 5+6=", "Q: 7+8="], [" 3", " 7", " 11", " 15"]
)
R = mu.Skill.from_texts(
    "r", ["def a():", "def b():", "def c():", "def d():"], [" 1", " 2", " 3", " 4"]
)


@pytest.fixture(scope="module")
def fitted(tiny_llama):
    m = tiny_llama
    pf = mu.collect(m, S, what=("pre", "keys", "importance"), quiet=True)
    pr = mu.collect(m, R, what=("pre", "keys", "importance"), quiet=True)
    return {
        "model": m,
        "stats": pf.pre,
        "keys": pf.keys,
        "na": mu.NeuronAdjust(ratio=0.1).fit(pf.pre, pr.pre),
        "ksd": mu.KeySpaceDetector(h=2.0).fit(pf.keys),
        "sp": mu.SelectivePruning(ratio=0.1).fit(pf.importance, pr.importance),
    }


CASES = [
    # (id, call(f), exception, message fragment)
    ("hf model", lambda f: mu.collect(f["model"].original_model, S), TypeError,
     "wrap it with mu.load_model(hf_model=model, tokenizer=tokenizer)"),
    ("skill name", lambda f: mu.collect(f["model"], "gsm8k"), TypeError,
     "use mu.load_skill('gsm8k')"),
    ("None text", lambda f: mu.collect(f["model"], [None]), TypeError, "not a str"),
    ("int text", lambda f: mu.Skill.from_texts("x", [1, None]), TypeError, "not a str"),
    ("no texts", lambda f: mu.collect(f["model"], []), ValueError, "has no examples"),
    ("float layer", lambda f: mu.collect(f["model"], S, layers=[1.7]), TypeError,
     "Layers must be integers"),
    ("layer out of range", lambda f: mu.collect(f["model"], S, layers=[7]), ValueError,
     "out of range: the model has 3 layers"),
    ("float batch", lambda f: mu.collect(f["model"], S, batch_size=2.5), TypeError,
     "batch_size must be an integer"),
    ("unknown what", lambda f: mu.collect(f["model"], S, what=("pre", "post")), ValueError,
     "Unknown item 'post' in what"),
    ("string ratio", lambda f: mu.NeuronAdjust(ratio="0.1"), TypeError, "ratio must be a number"),
    ("bool split", lambda f: f["keys"].split(True), TypeError, "test_size"),
    ("self merge", lambda f: f["stats"].merge(f["stats"]), ValueError, "count every token twice"),
    ("empty mmlu subjects", lambda f: mu.load_skill("mmlu:"), ValueError, "empty subject list"),
    ("string intervention", lambda f: mu.evaluate(f["model"], [S], {"x": "na"}, quiet=True),
     TypeError, "not an intervention"),
    ("bad role", lambda f: mu.evaluate(f["model"], {"s": S}, roles={"s": "keep"}, quiet=True),
     ValueError, "Choose one of ['forget', 'retain', 'general']"),
    ("no new tokens", lambda f: f["ksd"].generate(f["model"], ["Q: 1+2="], max_new_tokens=0),
     ValueError, "max_new_tokens must lie in [1, inf]"),
    ("empty table", lambda f: mu.relative_table(pd.DataFrame()), ValueError,
     "needs a non-empty table from mu.evaluate"),
    ("empty save path", lambda f: f["na"].save(""), ValueError, "give a file name"),
    ("unwritable path", lambda f: f["sp"].save("/proc/nowhere/x"), OSError,
     "Cannot write /proc/nowhere/x.safetensors"),
    ("lone surrogate", lambda f: mu.collect(f["model"], ["a\ud800b"]), ValueError,
     "lone surrogate"),
    ("no gpu", lambda f: mu.load_model(f["model"], device="cuda:7"), ValueError, "CUDA GPU"),
    ("unknown device", lambda f: mu.load_model(f["model"], device="tpu"), ValueError,
     "Unknown device 'tpu'"),
    ("ksd without negatives", lambda f: mu.KeySpaceDetector().fit(f["keys"]), ValueError,
     "mu.calibration_skill()"),
    ("stats for pruning", lambda f: mu.SelectivePruning().fit(f["stats"], f["stats"]), TypeError,
     "use collect_importance"),
    ("tuning: a kept skill named like a column",
     lambda f: mu.tune_neuron_adjust(f["model"], f["stats"], f["stats"], S, {"ratio": R}),
     ValueError, "column of the tuning table"),
    ("run config: bad SIMU gamma",
     lambda f: mu.pipeline.RunConfig(methods={"SIMU": {"gamma": float("nan")}}).validate(),
     PipelineError, "SIMU: gamma must be a finite number"),
    ("run config: bad LUNAR coef",
     lambda f: mu.pipeline.RunConfig(methods={"LUNAR": {"coef": 0.0}}).validate(),
     PipelineError, "LUNAR: coef must be a finite non-zero number"),
    ("run config: a setting the method does not take",
     lambda f: mu.pipeline.RunConfig(methods={"NA": {"ratoi": 0.1}}).validate(),
     PipelineError, "NA has no setting 'ratoi': choose among ratio"),
    ("run config: an unknown method",
     lambda f: mu.pipeline.RunConfig(methods=["NA", "XYZ"]).validate(),
     PipelineError, "Unknown method 'XYZ': choose among NA, KSD"),
    ("run config: settings that are not a mapping",
     lambda f: mu.pipeline.RunConfig(methods={"NA": 0.03}), PipelineError,
     "methods['NA'] must be a mapping of settings"),
]  # fmt: skip


@pytest.mark.parametrize("call, exc, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_named_in_one_line(fitted, call, exc, fragment):
    if fragment == "CUDA GPU" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(exc) as info:
        call(fitted)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message.strip(), message


def test_another_model_is_refused_by_every_intervention(fitted, char_tokenizer):
    other = make_tiny_llama(char_tokenizer, d_mlp=40)
    for name in ("na", "ksd", "sp"):
        with pytest.raises(ValueError, match="d_mlp=48, but this model .* has d_mlp=40"):
            fitted[name].hooks(other)


def test_a_file_loaded_onto_a_missing_device_is_not_called_damaged(fitted, tmp_path):
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    path = fitted["stats"].save(tmp_path / "stats")
    with pytest.raises((RuntimeError, AssertionError, ValueError)) as info:
        mu.NeuronStats.load(path, device="cuda:7")
    assert not isinstance(info.value, mu.DamagedFileError)
    assert "damaged" not in str(info.value)
    assert mu.NeuronStats.load(path).n_tokens == fitted["stats"].n_tokens


def test_a_generator_of_texts_is_read_once(fitted):
    stats = mu.collect(fitted["model"], (t for t in ["ab", "cd"]), quiet=True)
    assert stats.n_examples == 2
