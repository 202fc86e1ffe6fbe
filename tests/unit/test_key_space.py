"""KeySpaceDetector / EllipsoidDetector against brute-force references on tiny models."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from mechunlearn import KeyVectors, Skill, collect_keys
from mechunlearn.batching import tokenize_examples
from mechunlearn.generation import kv_cache_agrees
from mechunlearn.interventions import (
    REFUSAL,
    EllipsoidDetector,
    KeySpaceDetector,
)
from mechunlearn.kernels.regions import ledoit_wolf_shrinkage
from mechunlearn.sites import hook_name

F = Skill.from_texts("f", [f"Q: {i}+{i + 1}?" for i in range(12)])
R = Skill.from_texts("r", [f"def f{i}(x):" for i in range(12)])
MIXED = ["Q: 3+4?", "def g(y):", "Q: 10+11?", "hello there", "x"]


@pytest.fixture(scope="module")
def keys(llama_like):
    return collect_keys(llama_like, F, quiet=True), collect_keys(llama_like, R, quiet=True)


def brute_keys(model, prompts, layers):
    """Key vectors at the last prompt token, one unpadded prompt at a time."""
    out = np.zeros((len(prompts), len(layers), model.cfg.d_mlp))
    for i, (ids, _) in enumerate(tokenize_examples(model, prompts, [""] * len(prompts))):
        store = {}

        def keep(layer, store=store):
            def hook(act, hook):
                store[layer] = act[0, -1].detach().double().cpu().numpy()

            return hook

        tokens = torch.tensor([ids], device=next(model.parameters()).device)
        model.run_with_hooks(
            tokens, fwd_hooks=[(hook_name("key", layer), keep(layer)) for layer in layers]
        )
        out[i] = np.stack([store[layer] for layer in layers])
    return out


def test_detect_matches_brute_force_inclusion(llama_like, keys):
    keys_f, _ = keys
    ksd = KeySpaceDetector(h=1.3, layers=None, rule="all").fit(keys_f)
    fit = keys_f.values.double().cpu().numpy()  # [n, layer, d]
    mu, sigma = fit.mean(0), fit.std(0, ddof=1)
    floor = np.maximum(np.median(sigma, axis=-1, keepdims=True) * 1e-6, 1e-12)
    sigma = np.maximum(sigma, floor)
    k_min = (np.abs(fit - mu) / sigma).max(-1).max(0)
    np.testing.assert_allclose(ksd.k_min_.cpu().numpy(), k_min, rtol=1e-9)
    alpha = 1.3 * k_min
    prompts = F.prompts[:4] + MIXED
    x = brute_keys(llama_like, prompts, ksd.layers_)
    inside = (np.abs(x - mu) <= alpha[:, None] * sigma).all(-1)  # [n, layer]
    det = ksd.detect(llama_like, prompts, batch_size=3)
    assert det.fired.numpy().tolist() == inside.tolist()
    assert det.detected.numpy().tolist() == inside.all(-1).tolist()
    margin = (np.abs(x - mu) / sigma).max(-1) / alpha
    np.testing.assert_allclose(det.margin.numpy(), margin, rtol=1e-4)
    assert torch.equal(det.detected, det.score <= 1)
    assert all(not hp.fwd_hooks for hp in llama_like.hook_dict.values())  # stopped cleanly
    frame = det.to_frame()
    assert list(frame.columns[:3]) == ["detected", "score", "fired_layers"]
    assert len(frame) == len(prompts)


@pytest.mark.parametrize("cls", [KeySpaceDetector, EllipsoidDetector])
def test_every_fit_vector_inside_at_h1(llama_like, keys, cls):
    keys_f, _ = keys
    det = cls(h=1.0, layers=None, rule="all").fit(keys_f)
    assert det.detect_keys(keys_f).detected.all()
    # the model path reads the same vectors (same batches as collect_keys)
    assert det.detect(llama_like, F).detected.all()
    assert (det.detect_keys(keys_f).margin.amax(0) - 1).abs().max() < 1e-12


def test_rules_any_all_k():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(40, 3, 16, generator=gen)
    keys = KeyVectors(values, [0, 1, 2], {"n_layers": 3, "d_mlp": 16})
    scale = torch.linspace(0.2, 1.5, 40).reshape(40, 1, 1)
    probe = KeyVectors(values + scale * torch.randn(40, 3, 16, generator=gen), [0, 1, 2], keys.meta)
    fired = KeySpaceDetector(h=1.0, layers=None).fit(keys).detect_keys(probe).fired
    counts = fired.sum(1)
    assert set(counts.tolist()) == {0, 1, 2, 3}  # every outcome occurs
    for rule, expected in (("any", counts >= 1), ("all", counts == 3), (2, counts >= 2)):
        det = KeySpaceDetector(h=1.0, layers=None, rule=rule).fit(keys).detect_keys(probe)
        assert torch.equal(det.fired, fired)
        assert torch.equal(det.detected, expected)
    with pytest.raises(ValueError, match="asks for 4 layers"):
        KeySpaceDetector(h=1.0, layers=None, rule=4).fit(keys)
    last = KeySpaceDetector(h=1.0, layers=-1).fit(keys)  # the authors' last layer
    assert last.layers_ == [2]
    assert torch.equal(last.detect_keys(probe).detected, fired[:, 2])
    # The defaults (issue 25, analysis/detector_calibration.py): every collected layer, inside
    # at two thirds of them (here 2 of 3), fpr 0.01; the ellipsoid: every layer, 0.005.
    default = KeySpaceDetector(h=1.0).fit(keys)
    assert default.layers_ == [0, 1, 2] and default.rule == 2 / 3 and default.fpr == 0.01
    assert torch.equal(default.detect_keys(probe).detected, counts >= 2)
    params = EllipsoidDetector().get_params()
    assert (params["layers"], params["rule"], params["fpr"]) == (None, "all", 0.005)


def _count_forwards(model):
    calls = []

    def hook(act, hook):
        calls.append(tuple(act.shape[:2]))

    return calls, (hook_name("key", 0), hook)


def test_generate_refuses_detected_and_matches_greedy(llama_like, keys):
    model = llama_like
    keys_f, _ = keys
    ksd = KeySpaceDetector(h=1.5, layers=None, rule="all").fit(keys_f)
    prompts = MIXED
    detected = ksd.detect(model, prompts).detected.tolist()
    assert any(detected) and not all(detected)
    kv_cache_agrees(model)  # its once-per-model check runs here, not among the counted calls
    calls, counter = _count_forwards(model)
    with model.hooks(fwd_hooks=[counter]):
        texts, det = ksd.generate(model, prompts, max_new_tokens=6, return_detection=True)
    assert det.detected.tolist() == detected
    n_kept = len(prompts) - sum(detected)
    # one detection forward over every prompt, then generation steps over the kept ones only
    assert calls[0][0] == len(prompts)
    assert all(batch == n_kept for batch, _ in calls[1:]) and 1 <= len(calls[1:]) <= 6
    for prompt, text, hit in zip(prompts, texts, detected, strict=True):
        if hit:
            assert text == REFUSAL
            continue
        ids = tokenize_examples(model, [prompt], [""])[0][0]
        tokens = torch.tensor([ids], device=next(model.parameters()).device)
        ref = model.generate(tokens, max_new_tokens=6, do_sample=False, verbose=False)
        new = ref[0, len(ids) :].tolist()
        eos = model.tokenizer.eos_token_id
        new = new[: new.index(eos)] if eos in new else new
        assert text == model.tokenizer.decode(new)
    # all detected: the detection forward only
    calls.clear()
    with model.hooks(fwd_hooks=[counter]):
        assert ksd.generate(model, F.prompts[:3], max_new_tokens=6, refusal="no") == ["no"] * 3
    assert len(calls) == 1


def test_hooks_leave_logits_unchanged_and_record_on_device(llama_like, keys):
    model = llama_like
    ksd = KeySpaceDetector(h=1.5, layers=None, rule=2).fit(keys[0])
    ids = tokenize_examples(model, ["Q: 3+4?"], [""])[0][0]
    tokens = torch.tensor([ids], device=next(model.parameters()).device)
    base = model(tokens)
    logits = model.run_with_hooks(tokens, fwd_hooks=ksd.hooks(model))
    assert torch.equal(logits, base)
    record = ksd.record
    assert record.detected.device == base.device
    ref = ksd.detect(model, ["Q: 3+4?"])
    assert record.detected.cpu().tolist() == ref.detected.tolist()
    torch.testing.assert_close(record.margin.cpu(), ref.margin.to(record.margin.dtype))
    # during generation the record holds the latest step (batch of one, last position)
    with model.hooks(fwd_hooks=ksd.hooks()):
        model.generate(tokens, max_new_tokens=3, do_sample=False, verbose=False)
    assert ksd.record.margin.shape == (1, 3)


def test_automatic_alpha_meets_the_cap(keys):
    keys_f, keys_r = keys
    for rule in ("any", "all"):
        ksd = KeySpaceDetector(layers=None, rule=rule, fpr=0.2, seed=1).fit(keys_f, keys_r)
        cal = ksd.calibration_
        assert cal["fpr_r_cal"] <= 0.2
        assert 0.0 <= cal["detect_f"] <= 1.0 and set(cal["per_layer"]) == set(ksd.layers_)
        assert torch.isfinite(ksd.alpha_).all() and (ksd.alpha_ > 0).all()
        assert (ksd.alpha_ <= torch.tensor(cal["alpha_max"], dtype=ksd.alpha_.dtype)).all()
    with pytest.raises(ValueError, match="automatically"):
        KeySpaceDetector(h=2.0).fit(keys_f, keys_r)
    with pytest.raises(ValueError, match="fpr"):
        KeySpaceDetector(fpr=0.0)


@pytest.mark.parametrize("cls", [KeySpaceDetector, EllipsoidDetector])
def test_a_negative_inside_the_skill_caps_alpha_and_fit_names_it(cls):
    """One negative among the forget queries at every layer: with no false positive allowed
    (the rank calibration at fpr 0.001, the default before issue 25), every box stops short of
    it, held-out detection collapses, and fit warns with its row. The conformal calibration at
    an fpr that allows a few negatives inside lets it in and keeps detecting."""
    gen = torch.Generator().manual_seed(3)
    meta = {"n_layers": 2, "d_mlp": 8}
    keys_f = KeyVectors(torch.randn(40, 2, 8, generator=gen), [0, 1], meta)
    far = torch.randn(60, 2, 8, generator=gen) + 6.0
    clean = KeyVectors(far, [0, 1], meta)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean calibration does not warn
        ok = cls(fpr=0.001, calibration="rank").fit(keys_f, clean)
    assert ok.calibration_["detect_f"] >= 0.5
    cal_rows = clean.split_indices(0.5, 0)[0]
    intruder = int(cal_rows[-1])  # a row of the calibration part, not at its position there
    assert intruder != len(cal_rows) - 1
    values = far.clone()
    values[intruder] = 0.0  # the forget queries' centre, at every layer
    with pytest.warns(UserWarning, match=rf"detects only \d+% .* keys_r rows \[{intruder}\]"):
        capped = cls(fpr=0.001, calibration="rank").fit(keys_f, KeyVectors(values, [0, 1], meta))
    assert capped.calibration_["capping_negatives"] == [intruder]
    assert capped.calibration_["detect_f"] < 0.5
    assert capped.calibration_["fpr_r_cal"] == 0.0  # the cap itself still holds
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: held-out detection stays high
        conformal = cls(fpr=0.05).fit(keys_f, KeyVectors(values, [0, 1], meta))  # j = 3 of 60
    assert conformal.calibration_["rank"] == 3 and conformal.calibration_["detect_f"] >= 0.5


def test_split_indices_are_the_split():
    keys = KeyVectors(torch.arange(10.0).reshape(10, 1, 1), [0], {"n_layers": 1, "d_mlp": 1})
    fit_idx, test_idx = keys.split_indices(0.3, seed=4)
    fit, test = keys.split(0.3, seed=4)
    assert torch.equal(fit.values.flatten(), fit_idx.float())
    assert torch.equal(test.values.flatten(), test_idx.float())
    assert sorted(fit_idx.tolist() + test_idx.tolist()) == list(range(10)) and len(test_idx) == 3


def test_alpha_absolute_and_h():
    values = torch.randn(30, 1, 8, generator=torch.Generator().manual_seed(2))
    keys = KeyVectors(values, [0], {"n_layers": 1, "d_mlp": 8})
    a = KeySpaceDetector(alpha=3.0).fit(keys)
    assert a.alpha_.tolist() == [3.0]
    b = KeySpaceDetector(h=1.5).fit(keys)
    torch.testing.assert_close(b.alpha_, 1.5 * b.k_min_)
    torch.testing.assert_close(b.h_, torch.full_like(b.h_, 1.5))
    with pytest.raises(ValueError, match="false-positive rate nobody measured"):
        KeySpaceDetector().fit(keys)  # no negatives, no h: refused, with the call to make
    assert KeySpaceDetector(h=2.0).fit(keys).fpr_ is None  # uncalibrated, and it says so


def _sklearn_ledoit_wolf(x: np.ndarray) -> float:
    """scikit-learn's ledoit_wolf_shrinkage (assume_centered=False), written out in d x d."""
    n, d = x.shape
    x = x - x.mean(0)
    emp = x.T @ x / n
    mu = np.trace(emp) / d
    delta_ = ((x.T @ x) ** 2).sum() / n**2
    beta_ = ((x**2).T @ (x**2)).sum()
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2 * mu * np.trace(emp) + d * mu**2) / d
    beta = min(beta, delta)
    return 0.0 if beta == 0 else beta / delta


@pytest.mark.parametrize("n,d", [(12, 30), (60, 10)])
def test_ellipsoid_matches_dense_mahalanobis(n, d):
    gen = torch.Generator().manual_seed(n)
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64)
    values = torch.randn(n, 2, d, generator=gen, dtype=torch.float64) @ mix
    keys = KeyVectors(values.float(), [0, 1], {"n_layers": 2, "d_mlp": d})
    ell = EllipsoidDetector(h=1.0, layers=None).fit(keys)
    x_all = keys.values.double()
    probe = x_all[:5] + torch.randn(5, 2, d, generator=gen, dtype=torch.float64)
    for col in range(2):
        x = x_all[:, col].numpy()
        s = _sklearn_ledoit_wolf(x)
        assert float(ell.region_["shrinkage"][col]) == pytest.approx(s, rel=1e-8, abs=1e-12)
        emp = np.cov(x.T, bias=True)
        cov = (1 - s) * emp + s * np.trace(emp) / d * np.eye(d)
        prec = np.linalg.inv(cov)
        v = probe[:, col].numpy() - x.mean(0)
        ref = np.sqrt(np.einsum("md,de,me->m", v, prec, v))
        dist = ell._distance(probe, ell.region_)[:, col].numpy()
        np.testing.assert_allclose(dist, ref, rtol=1e-6)
    assert float(ledoit_wolf_shrinkage(x_all[:, 0])) == pytest.approx(
        _sklearn_ledoit_wolf(x_all[:, 0].numpy()), rel=1e-8
    )


def test_ellipsoid_interface(llama_like, keys):
    keys_f, keys_r = keys
    ell = EllipsoidDetector(h=1.2, layers=[-2, -1], rule="any").fit(keys_f)
    det = ell.detect(llama_like, F.prompts[:3] + R.prompts[:3])
    assert det.detected[:3].all()
    texts = ell.generate(llama_like, F.prompts[:2] + ["x"], max_new_tokens=2)
    assert texts[:2] == [REFUSAL, REFUSAL]
    auto = EllipsoidDetector(layers=None, fpr=0.2).fit(keys_f, keys_r)
    assert auto.calibration_["fpr_r_cal"] <= 0.2
    with pytest.raises(ValueError, match="shrinkage"):
        EllipsoidDetector(shrinkage=1.5)


class _GenerateWithoutMask:
    """A model whose ``generate`` takes neither a mask nor a padding side."""

    def __init__(self, model):
        self._model = model
        self.batch_sizes = []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def generate(self, input, max_new_tokens=10, **kwargs):
        self.batch_sizes.append(input.shape[0])
        return self._model.generate(input, max_new_tokens=max_new_tokens, **kwargs)


def test_generate_without_a_mask_falls_back_to_one_unpadded_prompt_at_a_time(llama_like, keys):
    ksd = KeySpaceDetector(h=1.5, layers=None, rule="all").fit(keys[0])
    batched = ksd.generate(llama_like, MIXED, max_new_tokens=6)
    wrapped = _GenerateWithoutMask(llama_like)
    alone = ksd.generate(wrapped, MIXED, max_new_tokens=6)
    assert alone == batched
    n_kept = len(MIXED) - int(ksd.detect(llama_like, MIXED).detected.sum())
    assert wrapped.batch_sizes == [1] * n_kept


def test_a_chat_formatted_skill_is_detected_as_it_was_collected(llama_like, keys):
    """Prompts marked ``special_tokens`` (chat variants) keep their real special tokens in
    detect() and generate(), as in collect_keys(); the same strings given as plain text are
    tokenised as characters and land elsewhere."""
    from mechunlearn import Example

    ksd = KeySpaceDetector(h=2.0, layers=None).fit(keys[0])
    marker = llama_like.tokenizer.eos_token
    texts = [f"{marker}Q: {i}+{i + 1}?{marker}" for i in range(4)]
    chat = Skill("chat", [Example(t, "", {"special_tokens": True}) for t in texts])
    collected = ksd.detect_keys(collect_keys(llama_like, chat, quiet=True)).margin
    torch.testing.assert_close(ksd.detect(llama_like, chat).margin, collected)
    assert not torch.allclose(ksd.detect(llama_like, texts).margin, collected)
    _, detection = ksd.generate(llama_like, chat, max_new_tokens=1, return_detection=True)
    torch.testing.assert_close(detection.margin, collected)
