"""Bad input at every public entry point, table-driven (in the spirit of scikit-learn's common
estimator checks): each case must fail with one line that names the problem and the fix, and
nothing may be converted silently."""

from __future__ import annotations

import tempfile

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
        "stats_r": pr.pre,
        "keys": pf.keys,
        "keys_r": pr.keys,
        "imp": pf.importance,
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
    # issue #28 item 2: fits against themselves, meta tensors
    ("na: retain is forget", lambda f: mu.NeuronAdjust().fit(f["stats"], f["stats"]), ValueError,
     "stats_r is the same object as stats_f: pass the statistics of a skill to keep"),
    ("na: retain equals forget", lambda f: mu.NeuronAdjust().fit(f["stats"], f["stats"].to("cpu")),
     ValueError, "stats_r holds exactly the same statistics as stats_f"),
    ("sp: retain is forget", lambda f: mu.SelectivePruning().fit(f["imp"], f["imp"]), ValueError,
     "importance_r is the same object as importance_f"),
    ("ksd: negatives are the forget keys",
     lambda f: mu.KeySpaceDetector().fit(f["keys"], f["keys"]), ValueError,
     "keys_r is the same object as keys_f"),
    ("lunar: retain is forget", lambda f: mu.Lunar(layer=0).fit(f["model"], S, S), ValueError,
     "retain is the same object as forget"),
    ("simu: retain equals forget",
     lambda f: mu.Simu().fit(f["model"], S, mu.Skill("r", S.examples), quiet=True), ValueError,
     "retain holds exactly the same examples as forget"),
    ("stats on meta", lambda f: mu.NeuronAdjust().fit(f["stats"].to("meta"), f["stats_r"]),
     ValueError, "stats_f is on the 'meta' device (shapes, no values): collect it again"),
    ("prune step above ratio",
     lambda f: mu.prune_iteratively(f["model"], S, R, ratio=0.02, step=0.05), ValueError,
     "step=0.05 is larger than ratio=0.02"),
    # constructors
    ("ksd: negative test_size", lambda f: mu.KeySpaceDetector(test_size=-1), ValueError,
     "test_size must be a fraction in (0, 1), e.g. 0.5, or a count >= 1"),
    ("ksd: zero test_size", lambda f: mu.KeySpaceDetector(test_size=0), ValueError,
     "or a count >= 1 of held-out items, got 0"),
    ("ksd: test_size 2.5", lambda f: mu.KeySpaceDetector(test_size=2.5), ValueError,
     "test_size must be a fraction in (0, 1)"),
    ("ksd: NaN test_size", lambda f: mu.KeySpaceDetector(test_size=float("nan")), ValueError,
     "got nan"),
    ("ksd: repeated layers", lambda f: mu.KeySpaceDetector(layers=[0, 0]), ValueError,
     "layers [0, 0] repeat a layer: give each layer once"),
    ("simu: bool layers", lambda f: mu.Simu(layers=True), TypeError,
     "layers must be None, an int or a list of ints, got True (bool)"),
    ("simu: NaN optimizer p", lambda f: mu.Simu(optimizer_kwargs={"p": float("nan")}), ValueError,
     "optimizer_kwargs['p'] must be finite"),
    ("simu: huge seed", lambda f: mu.Simu(seed=2**70), ValueError,
     "larger than 2**64 - 1, the largest seed torch takes"),
    ("load onto a missing GPU",
     lambda f: mu.NeuronAdjust.load(f["na"].save(tempfile.mkdtemp() + "/na"), device="cuda:7"),
     ValueError, "CUDA GPU"),
    # data
    ("dict to load_skill", lambda f: mu.load_skill({"2+2=": " 4"}), TypeError,
     "not a dict (its keys would become the texts)"),
    ("dict to from_texts", lambda f: mu.Skill.from_texts("x", {"2+2=": " 4"}), TypeError,
     "Skill.from_texts(name, list(d), list(d.values()))"),
    ("dict to collect", lambda f: mu.collect(f["model"], {"2+2=": " 4"}), TypeError,
     "not a dict"),
    # evaluation (issue #29 items 7-8)
    ("intervention class", lambda f: mu.evaluate(f["model"], [S], {"NA": mu.NeuronAdjust},
                                                 quiet=True),
     TypeError, "'NA' is the class NeuronAdjust, not a fitted instance"),
    ("stacked seeds", lambda f: mu.relative_table(pd.concat([_TABLE, _TABLE])), ValueError,
     "pass one seed's table at a time, or average first"),
    ("detect None", lambda f: f["ksd"].detect(f["model"], [None]), TypeError,
     "prompts[0] is NoneType None, not a str"),
    ("detect int", lambda f: f["ksd"].detect(f["model"], [123]), TypeError,
     "prompts[0] is int 123, not a str"),
    ("detect bytes", lambda f: f["ksd"].detect(f["model"], [b"x"]), TypeError,
     "prompts[0] is bytes b'x', not a str"),
]  # fmt: skip

_TABLE = pd.DataFrame({"skill": ["s", "r"], "method": ["NA", "NA"], "relative": [0.5, 1.0]})


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
