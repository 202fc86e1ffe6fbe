"""The method registry: a method declared once takes part in every stage.

A toy method, defined here outside the package and registered with one call, runs through
``pipeline.run`` on the tiny model (fit, save, resume, evaluate, report) and through the
command line with ``--import``; nothing in the package names it.
"""

from __future__ import annotations

import json
import sys
import textwrap

import pandas as pd
import pytest
import torch

import mechunlearn as mu
from mechunlearn.cli import main, method_settings, parse_setting
from mechunlearn.interventions import (
    Detector,
    HookIntervention,
    Intervention,
    WeightIntervention,
    get_method,
    methods,
    register_method,
    spec_of,
    unregister_method,
)
from mechunlearn.interventions.registry import kind_of
from mechunlearn.pipeline import PipelineError, RunConfig, run
from mechunlearn.sites import hook_name

TOY = '''
import torch
from mechunlearn.interventions import HookIntervention, register_method
from mechunlearn.sites import hook_name


class ZeroTopNeurons(HookIntervention):
    """Zero the k hook_pre neurons per layer whose forget and retain means differ most."""

    _fitted_attrs = HookIntervention._fitted_attrs + ("selected_",)

    def __init__(self, k: int = 2, seed: int = 0):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        self.k = k
        self.seed = seed

    def fit(self, stats_f, stats_r):
        gap = (stats_f.mean - stats_r.mean).abs()
        self.selected_ = gap.topk(self.k, dim=-1).indices
        self.layers_ = list(stats_f.layers)
        self.d_mlp_ = int(stats_f.mean.shape[-1])
        self.meta_ = dict(stats_f.meta)
        self._clear_cache()
        return self

    def _hook_tensors(self):
        return self.selected_

    def _make_hooks(self, model=None):
        def make(i):
            def hook(activation, hook=None):
                index = self._on(activation.device)[i]
                out = activation.clone()
                out[..., index] = 0.0
                return out
            return hook
        return [(hook_name("pre", layer), make(i)) for i, layer in enumerate(self.layers_)]

    def _state(self):
        return {"selected": self.selected_}, {}

    def _set_state(self, tensors, info):
        self.selected_ = tensors["selected"].long()


register_method("Toy", fits_on="pre", full_name="ZeroTopNeurons", replace=True)(ZeroTopNeurons)
'''


@pytest.fixture
def toy_module(tmp_path, monkeypatch):
    """The toy method as an importable module outside the package, registered on import."""
    (tmp_path / "toy_plugin.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("toy_plugin", None)
    yield "toy_plugin"
    unregister_method("Toy")
    sys.modules.pop("toy_plugin", None)


@pytest.fixture
def skill_files(tmp_path):
    rows = {
        "arith": [(f"Q: {i}+{i + 3}=", f" {2 * i + 3}") for i in range(16)],
        "code": [(f"def f{i}(x):", f"\n  return x*{i}") for i in range(16)],
    }
    paths = {}
    for name, pairs in rows.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in pairs))
        paths[name] = str(path)
    return paths


def test_the_package_methods_are_registered_once_in_table_order():
    names = [spec.name for spec in methods()]
    assert names[:6] == ["NA", "KSD", "Ellipsoid", "SP", "LUNAR", "SIMU"]
    kinds = {spec.name: spec.kind for spec in methods()}
    assert kinds["NA"] == kinds["SP"] == kinds["LUNAR"] == "hooks"
    assert kinds["KSD"] == kinds["Ellipsoid"] == "detector" and kinds["SIMU"] == "weights"
    assert get_method("SIMU").settings()["max_steps"] == 10  # the run's budget, not the class's
    assert mu.Simu().max_steps == 30
    assert spec_of(mu.NeuronAdjust()).name == "NA" and spec_of(object()) is None


def test_kinds_are_types():
    assert issubclass(mu.KeySpaceDetector, Detector)
    assert issubclass(mu.Simu, WeightIntervention) and issubclass(mu.Lunar, HookIntervention)
    assert kind_of(mu.EllipsoidDetector) == "detector"
    with pytest.raises(TypeError, match="must derive from HookIntervention"):
        kind_of(Intervention)


def test_registration_errors_are_one_line():
    with pytest.raises(ValueError, match="taken by NeuronAdjust"):
        register_method("NA", fits_on="pre")(type("Other", (HookIntervention,), {}))
    with pytest.raises(ValueError, match="fits_on must be one of"):
        register_method("X", fits_on="logits")
    with pytest.raises(ValueError, match="letters, digits"):
        register_method("a b", fits_on="pre")
    with pytest.raises(TypeError, match="Intervention subclass"):
        register_method("X", fits_on="pre")(dict)
    with pytest.raises(ValueError, match="multi_retain applies to fits_on='model'"):
        register_method("X", fits_on="pre", multi_retain=True)
    with pytest.raises(ValueError, match="Unknown method 'nope': choose among NA, KSD"):
        get_method("nope")
    with pytest.raises(ValueError, match="NA has no setting 'ratoi'"):
        get_method("NA").make({"ratoi": 1})
    with pytest.raises(ValueError, match="NA: ratio must lie in"):
        get_method("NA").make({"ratio": 3.0})


def test_run_config_settings_and_old_configs():
    cfg = RunConfig(methods={"NA": {"ratio": 0.05}, "LUNAR": {"layer": 2}}, seed=3)
    assert cfg.make("NA").ratio == 0.05 and cfg.make("NA").seed == 3  # the run's seed
    assert cfg.settings()["methods"]["LUNAR"]["layer"] == 2
    assert RunConfig.from_json(cfg.to_json()) == cfg
    assert RunConfig.from_json(cfg.to_json()).key() == cfg.key()
    old = {"methods": ["NA", "KSD", "Ellipsoid"], "na_ratio": 0.05, "ksd_fpr": 0.01, "n": 8}
    new = RunConfig.from_json(old)
    assert new.methods == {"NA": {"ratio": 0.05}, "KSD": {"fpr": 0.01}, "Ellipsoid": {"fpr": 0.01}}
    assert RunConfig(methods=["NA"]).key() == RunConfig(methods={"NA": {"ratio": 0.03}}).key()


def test_cli_settings_parse():
    assert parse_setting("layers=[1, 2]") == ("layers", [1, 2])
    assert parse_setting("layer=auto") == ("layer", "auto")
    assert parse_setting("adjust_bos=true") == ("adjust_bos", True)
    with pytest.raises(PipelineError, match="NAME=VALUE"):
        parse_setting("ratio")
    assert method_settings(None, []) == {"NA": {}, "KSD": {}, "SP": {}}
    assert method_settings(None, [["LUNAR", "layer=8"]]) == {"LUNAR": {"layer": 8}}
    assert method_settings(["NA", "SP"], [["NA", "ratio=0.05"]]) == {
        "NA": {"ratio": 0.05},
        "SP": {},
    }


@pytest.mark.slow
def test_a_method_registered_outside_the_package_runs_through_every_stage(
    toy_module, skill_files, tiny_llama, tmp_path
):
    import importlib

    toy = importlib.import_module(toy_module)
    assert get_method("Toy").cls is toy.ZeroTopNeurons
    cfg = RunConfig(
        forget=skill_files["arith"], retain=(skill_files["code"],), general=None, n=6,
        methods={"Toy": {"k": 3}, "NA": {}}, quiet=True, device="cpu",
    )  # fmt: skip
    out = tmp_path / "report"
    result = run(cfg, out, model=tiny_llama)
    fitted = result.fitted["ZeroTopNeurons"]
    assert isinstance(fitted, toy.ZeroTopNeurons) and fitted.k == 3
    assert (out / "interventions/ZeroTopNeurons.safetensors").exists()
    table = pd.read_csv(out / "tables/evaluation.csv")
    assert {"base", "ZeroTopNeurons", "NeuronAdjust"} <= set(table["method"])
    assert "ZeroTopNeurons" in (out / "index.html").read_text()
    # The hooks change the model: its held-out scores are those of a brute-force run.
    forget = table[(table["method"] == "ZeroTopNeurons")]
    assert len(forget) == 2
    # A rerun resumes: the fitted method is read back, not refitted.
    before = (out / "interventions/ZeroTopNeurons.safetensors").stat().st_mtime_ns
    again = run(cfg, out, model=tiny_llama)
    assert (out / "interventions/ZeroTopNeurons.safetensors").stat().st_mtime_ns == before
    assert torch.equal(again.fitted["ZeroTopNeurons"].selected_, fitted.selected_)
    tokens = tiny_llama.to_tokens(["Q: 1+4="])
    with torch.no_grad():
        base = tiny_llama(tokens)
        hooked = tiny_llama.run_with_hooks(tokens, fwd_hooks=fitted.hooks(tiny_llama))
    assert not torch.allclose(base, hooked)
    assert "blocks.0.mlp.hook_pre" in [name for name, _ in fitted.hooks()]
    assert hook_name("pre", 0) == "blocks.0.mlp.hook_pre"


@pytest.mark.slow
def test_the_command_line_runs_a_registered_method(
    toy_module, skill_files, tiny_llama, tmp_path, monkeypatch, capsys
):
    import mechunlearn.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model_for", lambda config, folder=None: tiny_llama)

    def argv(out, *method):
        return [
            "unlearn", "--forget", skill_files["arith"], "--retain", skill_files["code"],
            "--general", "none", "--n", "6", "--out", str(out), "--quiet", "--device", "cpu",
            *method,
        ]  # fmt: skip

    out = tmp_path / "cli"
    assert main(argv(out, "--import", toy_module, "--method", "Toy", "k=2")) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["methods"] == {"Toy": {"k": 2}}
    assert (out / "interventions/ZeroTopNeurons.safetensors").exists()
    capsys.readouterr()
    assert main(argv(tmp_path / "bad", "--import", toy_module, "--method", "Toy", "k=0")) == 2
    assert "Toy: k must be a positive integer" in capsys.readouterr().err
    assert main(argv(tmp_path / "bad", "--import", "no_such_module_xyz")) == 2
    assert "--import no_such_module_xyz" in capsys.readouterr().err


def test_a_keys_method_that_is_not_a_detector_gets_the_negatives(tiny_llama):
    """fits_on="keys" hands every method the negatives; only a Detector whose settings fix its
    region (takes_negatives False) fits on the forget keys alone."""
    from mechunlearn import Skill, collect_keys
    from mechunlearn.pipeline import Probes, Skills, fit_method

    class KeysSeen(HookIntervention):
        def __init__(self, seed: int = 0):
            self.seed = seed

        def fit(self, keys_f, keys_r=None):
            self.got_ = (keys_f, keys_r)
            return self

    register_method("KeysSeen", fits_on="keys", replace=True)(KeysSeen)
    try:
        f = Skill.from_texts("f", ["Q: 1+2?", "Q: 2+3?"], [" 3", " 5"])
        r = Skill.from_texts("r", ["def a(x):", "def b(x):"], [" x", " y"])
        probes = Probes()
        probes.keys["forget"] = collect_keys(tiny_llama, f, quiet=True)
        probes.keys["retain:r"] = collect_keys(tiny_llama, r, quiet=True)
        skills = Skills(forget=(f, f), retain={"r": (r, r)})
        config = RunConfig(forget="f", retain=("r",), methods=["KeysSeen", "KSD"])
        seen = fit_method(config, "KeysSeen", tiny_llama, skills, probes)
        assert seen.got_[0] is probes.keys["forget"] and seen.got_[1] is not None
        fixed = RunConfig(forget="f", retain=("r",), methods={"KSD": {"h": 2.0}})
        cube = fit_method(fixed, "KSD", tiny_llama, skills, probes)
        assert cube.is_fitted and not cube.takes_negatives
    finally:
        unregister_method("KeysSeen")
