"""The detectors' conformal calibration and share-of-layers rule (issue 25, item 5) against
brute-force references; files saved before it still load."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mechunlearn import KeyVectors, Skill, collect_keys
from mechunlearn.interventions import EllipsoidDetector, KeySpaceDetector
from mechunlearn.interventions.key_space.estimator import (
    DEFAULT_FPR,
    DEFAULT_RULE,
    conformal_rank,
    conformal_threshold,
    layers_needed,
)

F = Skill.from_texts("f", [f"Q: {i}+{i + 1}?" for i in range(12)])
R = Skill.from_texts("r", [f"def f{i}(x):" for i in range(12)] + [f"copy {c}:" for c in "abcdef"])
FIXTURES = Path(__file__).parents[1] / "fixtures" / "v0_1_0"


@pytest.fixture(scope="module")
def keys(tiny_llama):
    return collect_keys(tiny_llama, F, quiet=True), collect_keys(tiny_llama, R, quiet=True)


def _random_keys(n: int, seed: int, shift: float = 0.0, layers: int = 3, d: int = 8):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(n, layers, d, generator=gen, dtype=torch.float64) + shift
    return KeyVectors(values, list(range(layers)), {"n_layers": layers, "d_mlp": d})


# ------------------------------------------------------------------ the conformal bound
@pytest.mark.parametrize(
    ("n", "fpr"), [(568, 0.005), (504, 0.01), (199, 0.005), (999, 0.001), (19, 0.05), (30, 0.1)]
)
def test_conformal_rank_is_the_order_statistic(n, fpr):
    """``j = floor(fpr (n + 1))``: the ``ceil((n + 1)(1 - fpr))``-th order statistic from the
    top, and ``j / (n + 1) <= fpr < (j + 1) / (n + 1)`` (the largest rank the bound allows)."""
    j = conformal_rank(n, fpr)
    assert j == n + 1 - math.ceil((n + 1) * (1 - fpr) - 1e-9)
    assert j / (n + 1) <= fpr + 1e-12 < (j + 1) / (n + 1)
    assert j >= 1


def test_conformal_threshold_leaves_j_minus_1_inside_and_bounds_new_negatives():
    scores = torch.tensor([5.0, 1.0, 3.0, float("nan"), 2.0, 4.0], dtype=torch.float64)
    for j in range(1, 6):
        threshold, capping = conformal_threshold(scores, j)
        assert int((torch.nan_to_num(scores, nan=torch.inf) <= threshold).sum()) == j - 1
        assert capping == [int(torch.nonzero(scores == float(j)))]
    # Exchangeable draws: a new negative falls below the j-th smallest of n with probability
    # j / (n + 1) exactly; the Monte-Carlo rate stays within 4 standard errors of it.
    gen = torch.Generator().manual_seed(0)
    n, j, trials = 39, 2, 20000
    draws = torch.rand(trials, n + 1, generator=gen, dtype=torch.float64)
    kth = draws[:, :n].sort(-1).values[:, j - 1] * (1 - 1e-9)
    rate = float((draws[:, n] <= kth).double().mean())
    p = j / (n + 1)
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / trials)


def test_too_few_negatives_for_the_fpr_say_how_many():
    with pytest.raises(
        ValueError,
        match=r"fpr=0.001 needs at least 999 negatives for a conformal bound; got 284: ",
    ):
        conformal_rank(284, 0.001)
    keys_f = _random_keys(20, 0)
    few = _random_keys(50, 1, shift=4.0)
    for cls, need in ((KeySpaceDetector, "fpr=0.01 needs at least 99"), (EllipsoidDetector,
                      "fpr=0.005 needs at least 199")):  # fmt: skip
        with pytest.raises(ValueError, match=rf"{need} negatives for a conformal bound; got 50"):
            cls().fit(keys_f, few)
        assert cls(fpr=0.05).fit(keys_f, few).calibration_["rank"] == 2  # floor(0.05 * 51)
        cls(fpr=0.001, calibration="rank").fit(keys_f, few)  # the old rule: no bound, no error


# ------------------------------------------------------------------ the share-of-layers rule
def test_a_float_rule_is_a_share_of_the_layers():
    assert [layers_needed(r, 30) for r in ("any", "all", 2 / 3, 0.5, 0.01, 7)] == [
        1, 30, 20, 15, 1, 7,
    ]  # fmt: skip
    keys = _random_keys(40, 0)
    gen = torch.Generator().manual_seed(1)
    probe = KeyVectors(
        keys.values + torch.linspace(0.2, 1.5, 40).reshape(40, 1, 1)
        * torch.randn(40, 3, 8, generator=gen, dtype=torch.float64),
        [0, 1, 2], keys.meta,
    )  # fmt: skip
    counts = KeySpaceDetector(h=1.0).fit(keys).detect_keys(probe).fired.sum(1)
    for share, k in ((2 / 3, 2), (0.5, 2), (0.3, 1), (0.9, 3)):
        det = KeySpaceDetector(h=1.0, rule=share).fit(keys).detect_keys(probe)
        assert torch.equal(det.detected, counts >= k)
        assert det.rule == share
    for bad in (1.0, 0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="rule must be"):
            KeySpaceDetector(rule=bad)


def test_the_defaults():
    """issue 25 (analysis/detector_calibration.py): every layer and conformal calibration; the
    cube inside at two thirds of the layers at fpr 0.01, the ellipsoid at every layer at 0.005."""
    expected = {KeySpaceDetector: (2 / 3, 0.01), EllipsoidDetector: ("all", 0.005)}
    for cls, (rule, fpr) in expected.items():
        params = cls().get_params()
        assert (params["layers"], params["calibration"]) == (None, "conformal")
        assert (params["rule"], params["fpr"]) == (rule, fpr)
    assert (DEFAULT_RULE, DEFAULT_FPR) == (2 / 3, 0.01)


# ------------------------------------------------------------------ the fit, brute force
def _cube_distances(fit: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``[m, layer]`` max-normalised distances to the cube of ``fit`` (sigma floored)."""
    mu, sigma = fit.mean(0), fit.std(0, ddof=1)
    floor = np.maximum(np.median(sigma, axis=-1, keepdims=True) * 1e-6, 1e-12)
    sigma = np.maximum(sigma, floor)
    return (np.abs(x - mu) / sigma).max(-1)


@pytest.mark.parametrize("rule", ["all", 2 / 3, "any"])
def test_conformal_fit_matches_brute_force(keys, rule):
    keys_f, keys_r = keys
    fpr, seed = 0.1, 3
    ksd = KeySpaceDetector(rule=rule, fpr=fpr, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny model's held-out detection may be low
        ksd.fit(keys_f, keys_r)
    n_layers = len(ksd.layers_)
    k = {"all": n_layers, "any": 1}.get(rule) or math.ceil(rule * n_layers - 1e-9)
    fit_idx, held_idx = keys_f.split_indices(0.5, seed)
    vf = keys_f.values.double().cpu().numpy()
    vr = keys_r.values.double().cpu().numpy()
    fit, held = vf[fit_idx.numpy()], vf[held_idx.numpy()]
    k_min = _cube_distances(fit, fit).max(0)
    np.testing.assert_allclose(ksd.k_min_.cpu().numpy(), k_min, rtol=1e-9)
    s_neg = np.sort(_cube_distances(fit, vr) / k_min, -1)[:, k - 1]
    s_held = np.sort(_cube_distances(fit, held) / k_min, -1)[:, k - 1]
    n = len(vr)
    j = math.floor(fpr * (n + 1))
    h_max = np.sort(s_neg)[j - 1] * (1 - 1e-9)
    inside = s_held[s_held <= h_max]
    t_min = inside.max() if inside.size else h_max
    h = (t_min + h_max) / 2
    np.testing.assert_allclose(ksd.alpha_.cpu().numpy(), h * k_min, rtol=1e-9)
    cal = ksd.calibration_
    assert (cal["method"], cal["rank"], cal["n_negatives"]) == ("conformal", j, n)
    assert cal["bound"] == pytest.approx(j / (n + 1)) and cal["bound"] <= fpr
    # at most j - 1 negatives inside, and detection is the brute-force rule at alpha
    assert int((s_neg <= h).sum()) <= j - 1
    det = ksd.detect_keys(keys_r)
    margins = _cube_distances(fit, vr) / (h * k_min)
    assert det.detected.tolist() == (np.sort(margins, -1)[:, k - 1] <= 1).tolist()
    assert "conformal bound" in repr(ksd)


@pytest.mark.parametrize("cls", [KeySpaceDetector, EllipsoidDetector])
def test_conformal_keeps_hyperparameters_and_refits_the_same(keys, cls):
    keys_f, keys_r = keys
    det = cls(fpr=0.1)
    before = det.get_params()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det.fit(keys_f, keys_r)
        again = cls(fpr=0.1).fit(keys_f, keys_r)
    assert det.get_params() == before
    assert torch.equal(det.alpha_, again.alpha_)
    assert (det.alpha_ <= torch.tensor(det.calibration_["alpha_max"]) + 1e-12).all()


def test_a_layer_whose_fit_vectors_coincide_keeps_a_finite_alpha():
    """k_min 0 at a layer (every fit vector the same there, as at a tiny model's first layer):
    the layer's distances keep their own units, alpha stays finite and the file saves."""
    keys_f = _random_keys(20, 0)
    keys_f.values[:, 0] = 0.5  # layer 0: one point
    negatives = _random_keys(60, 1, shift=3.0)
    for cls in (KeySpaceDetector, EllipsoidDetector):
        det = cls(fpr=0.05).fit(keys_f, negatives)
        assert float(det.k_min_[0]) == 0.0 and torch.isfinite(det.alpha_).all()
        assert det.detect_keys(keys_f).detected.all() or det.rule != "all"
        assert float(det.alpha_[0]) == pytest.approx(det.calibration_["h"])


# ------------------------------------------------------------------ files from before
@pytest.mark.parametrize("name", ["KeySpaceDetector", "EllipsoidDetector"])
def test_a_detector_saved_before_the_conformal_default_loads_as_rank(name):
    cls = {"KeySpaceDetector": KeySpaceDetector, "EllipsoidDetector": EllipsoidDetector}[name]
    old = cls.load(FIXTURES / f"{name}.safetensors")
    assert old.calibration == "rank"  # how it was fitted, whatever the default now
    assert old.is_fitted and old.alpha_.shape == (len(old.layers_),)


def test_a_saved_conformal_detector_round_trips(keys, tmp_path):
    keys_f, keys_r = keys
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ksd = KeySpaceDetector(fpr=0.1).fit(keys_f, keys_r)
    same = KeySpaceDetector.load(ksd.save(tmp_path / "ksd"))
    assert same.get_params() == ksd.get_params() and same.calibration == "conformal"
    assert torch.equal(same.alpha_, ksd.alpha_)
    assert {k: v for k, v in same.calibration_.items() if k != "per_layer"} == {
        k: v for k, v in ksd.calibration_.items() if k != "per_layer"
    }  # per_layer's int keys come back as strings (JSON), as with the rank calibration
    assert torch.equal(same.detect_keys(keys_r).detected, ksd.detect_keys(keys_r).detected)
