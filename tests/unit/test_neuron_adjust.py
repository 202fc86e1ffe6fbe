"""NeuronAdjust against brute-force per-element references, on synthetic stats and tiny models."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from mechunlearn import NeuronStats, Skill, collect
from mechunlearn.interventions import NeuronAdjust, layer_seed, sweep_ratio
from mechunlearn.interventions.base import BosGuard
from mechunlearn.kernels.separation import separation_scores, top_neurons
from mechunlearn.sites import hook_name
from tests.tiny_models import LEGACY, make_tiny_legacy_gpt2

F = Skill.from_texts(
    "f", [f"Q: {i}+{i + 1}?" for i in range(10)], [f" {2 * i + 1}" for i in range(10)]
)
R = Skill.from_texts(
    "r", [f"def f{i}(x):" for i in range(10)], [f"\n  return x*{i}" for i in range(10)]
)


def make_stats(mean, std, count=100, site="pre", device="cpu") -> NeuronStats:
    """NeuronStats with given per-neuron mean and std (``count`` may be a tensor), of a model that
    prepends no BOS (so the hooks act on every position)."""
    mean = torch.as_tensor(mean, dtype=torch.float64)
    layers, width = mean.shape
    meta = {"model": "toy", "n_layers": layers, "d_mlp": width, "d_model": 8, "bos_token_id": None}
    stats = NeuronStats.empty(site, "all", list(range(layers)), width, 0, device, meta)
    count = torch.as_tensor(count, dtype=torch.long).expand(layers, width)
    stats.count[:] = count
    stats.mean[:] = mean
    std = torch.as_tensor(std, dtype=torch.float64).expand(layers, width)
    stats.m2[:] = std.square() * (count - 1).clamp(min=0)
    return stats


def brute_force(x: torch.Tensor, na: NeuronAdjust, row: int, seed: int) -> torch.Tensor:
    """NA on one layer's activation, element by element, with the hook's generator draws."""
    idx = torch.nonzero(na.selected_[row]).flatten().tolist()
    layer = na.layers_[row]
    gen = torch.Generator(device=x.device).manual_seed(layer_seed(seed, layer))
    shape = (*x.shape[:-1], len(idx))
    u = torch.rand(shape, generator=gen, device=x.device, dtype=x.dtype).reshape(-1, len(idx))
    flat = x.reshape(-1, x.shape[-1])
    out = flat.clone()
    for t in range(flat.shape[0]):
        for j, n in enumerate(idx):
            xv = float(flat[t, n])
            mf, sf = float(na.mu_f_[row, n]), float(na.sigma_f_[row, n])
            mr, sr = float(na.mu_r_[row, n]), float(na.sigma_r_[row, n])
            pf = math.exp(-0.5 * ((xv - mf) / sf) ** 2) / (sf * math.sqrt(2 * math.pi))
            pr = math.exp(-0.5 * ((xv - mr) / sr) ** 2) / (sr * math.sqrt(2 * math.pi))
            if pf >= pr and float(u[t, j]) < pf / (pf + pr):
                sign = -1.0 if na.mode == "reflect" else 1.0
                out[t, n] = mr + sign * (xv - mf) * sr / sf
    return out.reshape(x.shape)


@pytest.fixture()
def toy(device):
    gen = torch.Generator().manual_seed(1)
    mean_f = torch.randn(2, 8, generator=gen, dtype=torch.float64)
    mean_r = torch.randn(2, 8, generator=gen, dtype=torch.float64)
    std_f = 0.5 + torch.rand(2, 8, generator=gen, dtype=torch.float64)
    std_r = 0.5 + torch.rand(2, 8, generator=gen, dtype=torch.float64)
    return make_stats(mean_f, std_f, device=device), make_stats(mean_r, std_r, device=device)


@pytest.mark.parametrize("mode", ["reflect", "map"])
def test_hook_matches_brute_force(toy, device, mode):
    stats_f, stats_r = toy
    na = NeuronAdjust(ratio=0.5, mode=mode, seed=3).fit(stats_f, stats_r)
    hooks = dict(na.hooks())
    gen = torch.Generator(device=device).manual_seed(0)
    for row, layer in enumerate(na.layers_):
        # values around both skills' means, so both branches (p_F >= p_R or not) occur
        x = 2 * torch.randn(3, 7, 8, generator=gen, device=device, dtype=torch.float64)
        out = hooks[hook_name("pre", layer)](x, None)
        ref = brute_force(x, na, row, seed=3)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        changed = (out != x).any((0, 1))
        assert not changed[~na.selected_[row]].any()  # only selected neurons change
        assert changed.any()


def test_equal_gaussians_reflect_with_probability_half(device):
    # mu_F = mu_R and sigma_F = sigma_R: p_F >= p_R everywhere, probability 1/2,
    # x' = 2 mu - x (reflect) or x (map).
    mean = torch.full((1, 4), 0.3, dtype=torch.float64)
    std = torch.full((1, 4), 0.7, dtype=torch.float64)
    stats = make_stats(mean, std, device=device)
    # another count: the same Gaussians, but not the same statistics (which fit refuses)
    na = NeuronAdjust(ratio=1.0, seed=5).fit(stats, make_stats(mean, std, 101, device=device))
    ((name, fn),) = na.hooks()
    x = torch.randn(4, 50, 4, device=device, dtype=torch.float64)
    out = fn(x, None)
    gen = torch.Generator(device=device).manual_seed(layer_seed(5, 0))
    u = torch.rand(x.shape, generator=gen, device=device, dtype=torch.float64)
    expected = torch.where(u < 0.5, 2 * 0.3 - x, x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_replacement_probability(device):
    # mu_F=1, mu_R=0, sigma=1: at x=1.5, log p_F - log p_R = 1, probability sigmoid(1).
    stats_f = make_stats([[1.0]], [[1.0]], device=device)
    stats_r = make_stats([[0.0]], [[1.0]], device=device)
    for mode, value in (("reflect", -0.5), ("map", 0.5)):
        na = NeuronAdjust(ratio=1.0, mode=mode).fit(stats_f, stats_r)
        ((_, fn),) = na.hooks()
        x = torch.full((400, 500, 1), 1.5, device=device)
        out = fn(x, None)
        replaced = out != 1.5
        assert torch.allclose(out[replaced], torch.tensor(value, device=device))
        p = 1 / (1 + math.exp(-1.0))
        n = x.numel()
        assert abs(float(replaced.float().mean()) - p) < 5 * math.sqrt(p * (1 - p) / n)
        # where p_F < p_R nothing changes
        low = torch.full((100, 1), -1.0, device=device)
        assert torch.equal(fn(low, None), low)


def test_reproducible_given_seed_and_seeds_differ(toy, device):
    stats_f, stats_r = toy
    x = torch.randn(2, 9, 8, device=device)
    a = NeuronAdjust(ratio=0.5, seed=0).fit(stats_f, stats_r)
    b = NeuronAdjust(ratio=0.5, seed=1).fit(stats_f, stats_r)
    name, fn = a.hooks()[0]
    out1, out2 = fn(x, None), fn(x, None)  # one hooks list: the stream continues
    assert not torch.equal(out1, out2)
    assert torch.equal(a.hooks()[0][1](x, None), out1)  # fresh hooks: re-seeded
    assert not torch.equal(dict(b.hooks())[name](x, None), out1)


def test_degenerate_neurons_never_selected_and_no_nan(device):
    mean_f = torch.tensor([[5.0, 4.0, 1.0, 0.5, 0.2, 0.1]])
    std_f = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0, 1.0]])  # neuron 0: constant on F
    count_f = torch.tensor([[100, 1, 100, 100, 100, 100]])  # neuron 1: undefined std
    std_r = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0, 1.0]])  # neuron 2: constant on R
    stats_f = make_stats(mean_f, std_f, count=count_f, device=device)
    stats_r = make_stats(torch.zeros(1, 6), std_r, device=device)
    na = NeuronAdjust(ratio=0.5).fit(stats_f, stats_r)
    assert na.selected_.tolist() == [[False, False, False, True, True, True]]
    assert torch.isinf(na.scores_[0, :3]).all()
    ((_, fn),) = na.hooks()
    x = torch.randn(3, 5, 6, device=device) * 3
    assert torch.isfinite(fn(x, None)).all()
    bad = make_stats(mean_f[:, :3], std_f[:, :3] * 0, device=device)
    with pytest.raises(ValueError, match="No neuron can be selected"):
        NeuronAdjust(ratio=1.0).fit(bad, make_stats(torch.zeros(1, 3), [[1.0]], device=device))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_activations(toy, device, dtype):
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("float16 arithmetic on the CPU is not needed")
    na = NeuronAdjust(ratio=0.5).fit(*toy)
    _, fn = na.hooks()[0]
    x = torch.randn(2, 4, 8, device=device).to(dtype)
    out = fn(x, None)
    assert out.dtype == dtype and out.shape == x.shape and torch.isfinite(out).all()


def test_selection_uses_separation_top_fraction(toy):
    stats_f, stats_r = toy
    na = NeuronAdjust(ratio=0.25).fit(stats_f, stats_r)
    scores = separation_scores(stats_f, stats_r, "mean_diff")
    torch.testing.assert_close(na.scores_, scores)
    assert torch.equal(na.selected_, top_neurons(scores, ratio=0.25))
    assert na.n_selected_ == na.selected_.sum(1).tolist()
    frame = na.selected_neurons()
    assert len(frame) == int(na.selected_.sum()) and (frame["score"].diff().dropna() <= 0).all()


def test_fit_checks_inputs(toy):
    stats_f, stats_r = toy
    with pytest.raises(TypeError, match="NeuronStats"):
        NeuronAdjust().fit(stats_f, "r")
    key = make_stats(stats_r.mean, stats_r.std, site="key")
    with pytest.raises(ValueError, match="same site"):
        NeuronAdjust().fit(stats_f, key)
    with pytest.raises(ValueError, match="same layers"):
        NeuronAdjust().fit(stats_f, stats_r.select_layers([0]))


@pytest.fixture(scope="module")
def model_stats(llama_like):
    return (
        collect(llama_like, F, site="pre", quiet=True),
        collect(llama_like, R, site="pre", quiet=True),
    )


def test_on_model_only_selected_neurons_change(llama_like, model_stats):
    model = llama_like
    na = NeuronAdjust(ratio=0.05).fit(*model_stats)
    tokens = model.to_tokens(["Q: 3+4?", "def g(y):"])
    for row, layer in enumerate(na.layers_):
        if not na.n_selected_[row]:
            continue
        name = hook_name("pre", layer)
        seen = {}

        def keep(tag, seen=seen):
            def hook(act, hook):
                seen[tag] = act.detach().clone()

            return hook

        model.run_with_hooks(tokens, fwd_hooks=[(name, keep("clean"))])
        hooks = na.hooks(model)
        own = hooks[:1] + [h for h in hooks[1:] if h[0] == name]  # BOS marker + this layer
        model.run_with_hooks(tokens, fwd_hooks=own + [(name, keep("na"))])
        changed = (seen["clean"] != seen["na"]).any(0).any(0)
        assert not changed[~na.selected_[row].to(changed.device)].any()
        assert changed.any()
        # BOS (position 0 of every row here) is never adjusted: its statistics were never seen
        assert torch.equal(seen["clean"][:, 0], seen["na"][:, 0])
    base = model(tokens)
    with torch.no_grad():
        a = model.run_with_hooks(tokens, fwd_hooks=na.hooks(model))
        b = model.run_with_hooks(tokens, fwd_hooks=na.hooks(model))
    assert torch.equal(a, b) and not torch.equal(a, base)


def test_hooks_in_generation(llama_like, model_stats):
    model = llama_like
    na = NeuronAdjust(ratio=0.05).fit(*model_stats)
    tokens = model.to_tokens("Q: 3+4?")
    with model.hooks(fwd_hooks=na.hooks(model)):
        out = model.generate(tokens, max_new_tokens=4, do_sample=False, verbose=False)
    assert out.shape == (1, tokens.shape[1] + 4)
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


@pytest.fixture(params=["bridge", "legacy", "legacy_gpt2"] if LEGACY else ["bridge"])
def guarded_model(request, char_tokenizer, device):
    """The tiny Llama bridge; where this TransformerLens has a legacy HookedTransformer, also the
    tiny legacy Llama (rotary: block 0's input is the embedding) and a legacy GPT-2 (learned
    positional embeddings added to the residual stream)."""
    if request.param == "bridge":
        return request.getfixturevalue("tiny_llama")
    if request.param == "legacy":
        return request.getfixturevalue("tiny_legacy")
    return make_tiny_legacy_gpt2(char_tokenizer, device)


def test_bos_guard_marks_bos_in_forward_and_in_each_generation_step(guarded_model):
    model = guarded_model
    bos = model.tokenizer.bos_token_id
    guard = BosGuard(bos, model)
    masks = []

    def spy(act, hook):
        masks.append(guard.mask.clone())

    spied = [*guard.hooks(), ("blocks.0.mlp.hook_post", spy)]
    # BOS first, and again mid-sequence (the positional embedding differs there)
    tokens = model.to_tokens("Q: 3+4?")
    tokens = torch.cat([tokens[:, :3], tokens[:, :1], tokens[:, 3:]], dim=1)
    want = tokens == bos
    assert want.sum() == 2
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=spied)
    assert torch.equal(masks.pop(), want)
    with model.hooks(fwd_hooks=spied):
        out = model.generate(tokens, max_new_tokens=3, do_sample=False, verbose=False)
    # the prompt pass, then one pass per new token (cached)
    assert len(masks) == 3
    assert torch.equal(masks[0], want)
    for step, mask in enumerate(masks[1:], start=1):
        new = out[:, tokens.shape[1] + step - 1 : tokens.shape[1] + step]
        assert torch.equal(mask, new == bos)


def test_sweep_ratio(toy):
    table = sweep_ratio(*toy, [0.1, 0.25, 0.5], lambda na: {"n": sum(na.n_selected_)}, mode="map")
    assert isinstance(table, pd.DataFrame)
    assert table["ratio"].tolist() == [0.1, 0.25, 0.5]
    assert (table["n"] == table["n_selected"]).all() and table["n"].is_monotonic_increasing


def test_several_retain_skills_use_the_closest_one():
    f = make_stats([[4.0, 0.0, 2.0, 1.0]], [[1.0, 1.0, 1.0, 1.0]])
    r1 = make_stats([[0.0, 0.0, 1.9, 0.0]], [[1.0, 2.0, 1.0, 1.0]])
    r2 = make_stats([[3.0, -2.0, 0.0, 0.0]], [[2.0, 1.0, 1.0, 3.0]])
    both = NeuronAdjust(ratio=0.5).fit(f, [r1, r2])
    s1 = separation_scores(f, r1, "mean_diff")
    s2 = separation_scores(f, r2, "mean_diff")
    torch.testing.assert_close(both.scores_, torch.minimum(s1, s2))
    nearest = torch.where(s1 <= s2, 0, 1)
    assert torch.equal(both.retain_index_, nearest)
    want_mu = torch.where(nearest == 0, r1.mean, r2.mean)
    torch.testing.assert_close(both.mu_r_, want_mu)
    torch.testing.assert_close(both.sigma_r_, torch.where(nearest == 0, r1.std, r2.std))
    # min scores [1, 0, 0.1, 1]: neurons 1 and 2 are close to r1 (alone they would rank
    # against r2 at 2 and 2), so the top half is neurons 0 and 3
    assert both.selected_.tolist() == [[True, False, False, True]]
    assert NeuronAdjust(ratio=0.5).fit(f, r2).selected_.tolist() == [[False, True, True, False]]
    named = NeuronAdjust(ratio=0.5).fit(f, {"a": r1, "b": r2})
    assert torch.equal(named.selected_, both.selected_) and named.retain_skills_ == ["a", "b"]
    one = NeuronAdjust(ratio=0.5).fit(f, [r1])
    alone = NeuronAdjust(ratio=0.5).fit(f, r1)
    assert torch.equal(one.selected_, alone.selected_)
    with pytest.raises(ValueError, match="No retain statistics"):
        NeuronAdjust().fit(f, [])


def test_adjust_bos_is_the_authors_behaviour_and_warns(llama_like, model_stats):
    with pytest.warns(UserWarning, match="adjust_bos=True adjusts the BOS positions"):
        authors = NeuronAdjust(ratio=0.05, adjust_bos=True).fit(*model_stats)
    ours = NeuronAdjust(ratio=0.05).fit(*model_stats)
    tokens = llama_like.to_tokens(["Q: 3+4?", "def g(y):"])
    row = max(range(len(ours.layers_)), key=lambda i: ours.n_selected_[i])
    name = hook_name("pre", ours.layers_[row])
    seen = {}

    def keep(tag):
        def hook(act, hook):
            seen[tag] = act.detach().clone()

        return hook

    with torch.no_grad():
        llama_like.run_with_hooks(tokens, fwd_hooks=[(name, keep("clean"))])
        llama_like.run_with_hooks(tokens, fwd_hooks=[*ours.hooks(llama_like), (name, keep("ours"))])
        llama_like.run_with_hooks(
            tokens, fwd_hooks=[*authors.hooks(llama_like), (name, keep("authors"))]
        )
    assert torch.equal(seen["clean"][:, 0], seen["ours"][:, 0])
    assert not torch.equal(seen["clean"][:, 0], seen["authors"][:, 0])
    # every other position sees the same draws, so the two agree there
    assert torch.equal(seen["ours"][:, 1:], seen["authors"][:, 1:])


def test_tuned_ratio_keeps_the_floor_and_is_saved(llama_like, model_stats, tmp_path):
    from mechunlearn import tune_neuron_adjust

    na = tune_neuron_adjust(
        llama_like, *model_stats, F[:4], {"r": R[:4]}, ratios=[0.01, 0.05, 0.2], floor=0.5
    )
    table = na.tuning_
    assert table["ratio"].tolist() == [0.01, 0.05, 0.2] and table["chosen"].sum() == 1
    chosen = table[table["chosen"]].iloc[0]
    assert na.ratio == chosen["ratio"]
    ok = table[table["meets_floor"]]
    if len(ok):
        assert chosen["forget"] == ok["forget"].min() and chosen["meets_floor"]
    back = NeuronAdjust.load(na.save(tmp_path / "na"))
    assert back.tuning_["ratio"].tolist() == table["ratio"].tolist()
    with pytest.raises(ValueError, match="keep is empty"):
        tune_neuron_adjust(llama_like, *model_stats, F[:4], {})


def test_fit_never_changes_a_hyperparameter(llama_like, model_stats):
    """The automatic choice is a search outside the estimator (tune_neuron_adjust), not a fit
    that rewrites the estimator's settings (NeuronAdjust.fit_auto is gone)."""
    na = NeuronAdjust(ratio=0.05, score="cohens_d")
    params = na.get_params()
    na.fit(*model_stats)
    assert na.get_params() == params
    assert not hasattr(NeuronAdjust, "fit_auto")
