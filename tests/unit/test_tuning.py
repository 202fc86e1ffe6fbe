"""mechunlearn.tuning.tune: the one rule for choosing a hyperparameter on held-back probe data
under a floor (NA's ratio, a detector's fpr, ...), checked against a brute-force loop."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import mechunlearn as mu
from mechunlearn.evaluation import teacher_forced, watched_scores
from mechunlearn.interventions import EllipsoidDetector, NeuronAdjust
from mechunlearn.tuning import candidate_settings, rank_candidates, tune

RATIOS = [0.02, 0.1, 0.3, 0.6, 0.9, 1.0]


def greedy_skill(model, name: str, prompts: list[str]) -> mu.Skill:
    """Each prompt with the model's own greedy next character as its answer: the bare model
    scores 1 on it, so every intervention's relative score is a real number."""
    answers = []
    with torch.no_grad():
        for p in prompts:
            tokens = model.to_tokens(p)
            answers.append(model.tokenizer.decode([int(model(tokens)[0, -1].argmax())]))
    return mu.Skill.from_texts(name, prompts, answers)


@pytest.fixture(scope="module")
def setup(tiny_llama):
    model = tiny_llama
    forget = greedy_skill(model, "add", [f"{a}+{b}=" for a in range(5) for b in range(4)])
    keep = greedy_skill(model, "copy", [f"{a}{b}>" for a in range(5) for b in range(4)])
    probe_f, held_f = forget.split(0.5, seed=0)
    probe_r, held_r = keep.split(0.5, seed=0)
    stats_f = mu.collect(model, probe_f, quiet=True)
    stats_r = mu.collect(model, probe_r, quiet=True)
    keys_f = mu.collect_keys(model, probe_f, quiet=True)
    keys_r = mu.collect_keys(model, probe_r, quiet=True)
    return dict(
        model=model, held_f=held_f, held_r=held_r, stats=(stats_f, stats_r), keys=(keys_f, keys_r),
        probe=(probe_f, probe_r),
    )  # fmt: skip


def brute_force(model, estimators, forget, keep, floor):
    """The rule written out: the lowest relative forget score among the candidates whose every
    kept skill keeps ``floor`` of its base score (ties: the earlier), else the first."""
    base_f = teacher_forced(model, forget).score
    base_k = {n: teacher_forced(model, s).score for n, s in keep.items()}
    best, best_forget = None, math.inf
    for i, est in enumerate(estimators):
        kept = [teacher_forced(model, s, est).score / base_k[n] for n, s in keep.items()]
        f = teacher_forced(model, forget, est).score / base_f
        if all(k >= floor for k in kept) and f < best_forget:
            best, best_forget = i, f
    return 0 if best is None else best


@pytest.mark.parametrize("floor", [0.5, 0.95])
def test_neuron_adjust_ratio_matches_a_brute_force_loop(setup, floor):
    model, (sf, sr) = setup["model"], setup["stats"]
    keep = {"copy": setup["held_r"]}
    search = tune(
        "NA", {"ratio": RATIOS}, lambda na: na.fit(sf, sr), model=model, forget=setup["held_f"],
        keep=keep, floor=floor,
    )  # fmt: skip
    fitted = [NeuronAdjust(ratio=r).fit(sf, sr) for r in RATIOS]
    expected = brute_force(model, fitted, setup["held_f"], keep, floor)
    assert search.best_index_ == expected
    assert search.best_params_ == {"ratio": RATIOS[expected]}
    assert search.best_.ratio == RATIOS[expected]
    table = search.table_
    assert list(table.columns) == ["ratio", "forget", "copy", "meets_floor", "rank", "chosen"]
    assert table["chosen"].sum() == 1 and bool(table["chosen"].iloc[expected])
    assert sorted(table["rank"]) == list(range(1, len(RATIOS) + 1))


def test_tune_neuron_adjust_is_tune(setup):
    """The public NA helper is a thin call of tune: same choice, the same table less rank."""
    model, (sf, sr) = setup["model"], setup["stats"]
    keep = {"copy": setup["held_r"]}
    na = mu.tune_neuron_adjust(model, sf, sr, setup["held_f"], keep, ratios=RATIOS, floor=0.6)
    search = tune(
        NeuronAdjust, {"ratio": RATIOS}, lambda est: est.fit(sf, sr),
        lambda est: {"n_selected": sum(est.n_selected_), **search_scores(model, est, setup)},
        floor={"copy": 0.6},
    )  # fmt: skip
    assert na.ratio == search.best_.ratio
    pd.testing.assert_frame_equal(na.tuning_, search.table_.drop(columns="rank"))


def search_scores(model, est, setup):
    out = {}
    for name, skill in (("forget", setup["held_f"]), ("copy", setup["held_r"])):
        out[name] = teacher_forced(model, skill, est).score / teacher_forced(model, skill).score
    return out


def test_a_detectors_fpr_matches_a_brute_force_loop(setup):
    model, (kf, kr) = setup["model"], setup["keys"]
    keep = {"copy": setup["held_r"]}
    fprs = [0.001, 0.05, 0.3]
    search = tune(
        "Ellipsoid",
        {"fpr": fprs},
        lambda det: det.fit(kf, kr),
        model=model,
        forget=setup["held_f"],
        keep=keep,
        floor=0.8,
        seed=0,
        calibration="rank",
    )  # fmt: skip  (rank: a cap of 0.001 on a handful of negatives; conformal would refuse it)
    fitted = [EllipsoidDetector(fpr=f, seed=0, calibration="rank").fit(kf, kr) for f in fprs]
    assert search.best_index_ == brute_force(model, fitted, setup["held_f"], keep, 0.8)
    assert search.best_.fpr == search.best_params_["fpr"]


def test_a_detectors_candidates_share_one_key_pass_and_score_as_teacher_forced(setup, monkeypatch):
    """Detectors only watch: the default score reads each skill's key vectors once for every
    candidate of the same layers and reuses the bare results, with teacher_forced's values."""
    model, (kf, kr) = setup["model"], setup["keys"]
    fprs = (0.001, 0.3, 0.6)
    fitted = [EllipsoidDetector(fpr=f, seed=0, calibration="rank").fit(kf, kr) for f in fprs]
    expected = [search_scores(model, det, setup) for det in fitted]
    calls = {"teacher_forced": 0, "collect_keys": 0}
    for name in calls:
        real = getattr(mu.tuning, name)

        def counted(*a, real=real, name=name, **k):
            calls[name] += 1
            return real(*a, **k)

        monkeypatch.setattr(mu.tuning, name, counted)
    score = mu.tuning.relative_scorer(model, setup["held_f"], {"copy": setup["held_r"]})
    got = [score(det) for det in fitted]
    # the bare pass of both skills, then one key pass per skill for all three candidates
    assert calls == {"teacher_forced": 2, "collect_keys": 2}
    for g, e in zip(got, expected, strict=True):
        assert g == pytest.approx(e)
    assert got[-1]["forget"] < 1.0  # the loosest candidate abstains on some forget examples


def test_watched_scores_refuses_the_bare_scores_of_another_skill(setup):
    model, (kf, kr) = setup["model"], setup["keys"]
    det = EllipsoidDetector(fpr=0.3, seed=0, calibration="rank").fit(kf, kr)
    bare = teacher_forced(model, setup["probe"][0])  # 10 examples, not held_f's
    with pytest.raises(ValueError, match="same skill"):
        watched_scores(model, setup["held_f"][:3], det, bare)


def test_no_candidate_keeps_the_floor():
    def score(est):
        return {"forget": est.ratio, "keep": 0.5 - est.ratio}

    def search(fallback):
        return tune(
            NeuronAdjust, {"ratio": [0.1, 0.2, 0.05]}, lambda est: est, score,
            floor={"keep": 0.9}, fallback=fallback,
        )  # fmt: skip

    assert search("first").best_params_ == {"ratio": 0.1}  # the first candidate
    assert search("best").best_params_ == {"ratio": 0.05}  # the lowest forget
    assert not search("first").table_["meets_floor"].any()
    with pytest.raises(ValueError, match="no candidate keeps the floor"):
        search("raise")
    with pytest.raises(ValueError, match="fallback"):
        search("nearest")


def test_ranking_order_ties_and_nan():
    table = pd.DataFrame(
        {"x": [1, 2, 3, 4, 5], "keep": [1.0, 0.95, math.nan, 0.99, 0.5],
         "forget": [0.3, 0.2, 0.1, 0.2, 0.0], "sep": [1.0, 2.0, 3.0, 3.0, 9.0]}
    )  # fmt: skip
    ranked = rank_candidates(table, {"keep": 0.9}, ["forget", ("sep", False)])
    assert ranked["meets_floor"].tolist() == [True, True, False, True, False]  # NaN fails
    # keeping the floor first; forget ascending; sep descending breaks the 0.2 tie
    assert ranked.sort_values("rank")["x"].tolist() == [4, 2, 1, 5, 3]
    with pytest.raises(ValueError, match="no column 'missing'"):
        rank_candidates(table, {"missing": 0.9}, ["forget"])


def test_candidates_and_bad_input():
    grid = candidate_settings({"ratio": [0.1, 0.2], "mode": ["reflect", "map"]})
    assert grid == [
        {"ratio": 0.1, "mode": "reflect"}, {"ratio": 0.1, "mode": "map"},
        {"ratio": 0.2, "mode": "reflect"}, {"ratio": 0.2, "mode": "map"},
    ]  # fmt: skip
    with pytest.raises(ValueError, match="candidates is empty"):
        candidate_settings([])
    with pytest.raises(ValueError, match="no values for 'ratio'"):
        candidate_settings({"ratio": []})
    with pytest.raises(ValueError, match="give model, forget and keep"):
        tune("NA", {"ratio": [0.1]}, lambda est: est)
    with pytest.raises(ValueError, match="floor as"):
        tune("NA", {"ratio": [0.1]}, lambda est: est, lambda est: {"forget": 0.0}, floor=0.9)
    with pytest.raises(ValueError, match="a score is named 'ratio'"):
        tune(
            "NA", {"ratio": [0.1]}, lambda est: est, lambda est: {"ratio": 0.0},
            floor={"ratio": 0.0},
        )  # fmt: skip
    with pytest.raises(ValueError, match="Unknown method"):
        tune("nope", {"ratio": [0.1]}, lambda est: est, lambda est: {"f": 0.0}, floor={})


@pytest.mark.parametrize("name", ["SP", "LUNAR"])
def test_sp_ratio_and_lunar_layer_go_through_the_same_rule(setup, name):
    """Selective Pruning's ratio and LUNAR's layer: the same search, the same brute-force
    choice (each candidate made through the registry, as the pipeline makes it)."""
    model, keep = setup["model"], {"copy": setup["held_r"]}
    probe_f, probe_r = setup["probe"]
    if name == "SP":
        imp_f = mu.collect_importance(model, probe_f)
        imp_r = mu.collect_importance(model, probe_r)
        candidates, fit = {"ratio": [0.05, 0.3, 0.8]}, lambda sp: sp.fit(imp_f, imp_r)
    else:
        candidates, fit = {"layer": [0, 1, 2]}, lambda lunar: lunar.fit(model, probe_f, probe_r)
    search = tune(
        name, candidates, fit, model=model, forget=setup["held_f"], keep=keep, floor=0.8, seed=0
    )
    spec = mu.get_method(name)
    fitted = [fit(spec.make(s, seed=0)) for s in search.table_[list(candidates)].to_dict("records")]
    assert search.best_index_ == brute_force(model, fitted, setup["held_f"], keep, 0.8)


def test_relative_scorer_scores_the_bare_model_once_at_its_first_call(setup, monkeypatch):
    model, held_f, held_r = setup["model"], setup["held_f"], setup["held_r"]
    est = NeuronAdjust(ratio=0.3).fit(*setup["stats"])
    calls = []
    real = mu.tuning.teacher_forced
    monkeypatch.setattr(
        mu.tuning, "teacher_forced",
        lambda m, skill, *a, **k: calls.append(skill.name) or real(m, skill, *a, **k),
    )  # fmt: skip
    score = mu.tuning.relative_scorer(model, held_f, {"copy": held_r})
    assert calls == []  # nothing scored until asked (a resumed search never asks)
    first = score(est)
    assert len(calls) == 4  # the bare model on both skills, then the intervention
    assert score(est) == first and len(calls) == 6
    assert first["forget"] == pytest.approx(
        teacher_forced(model, held_f, est).score / teacher_forced(model, held_f).score
    )
