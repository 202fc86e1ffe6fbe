"""collect()/collect_keys() against brute-force references on tiny float64 models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as sps

from mechunlearn import KeyVectors, NeuronStats, Skill, collect, collect_keys
from mechunlearn.batching import tokenize_examples
from mechunlearn.kernels.moments import example_seeds, token_keys
from mechunlearn.sites import hook_name
from tests.tiny_models import LEGACY, make_tiny_gpt2, make_tiny_legacy_llama, make_tiny_llama

PROMPTS = [
    "Question: 2+3?\nAnswer:",
    "def add(a, b):",
    "Q: capital of France?",
    "x",
    "Sum the list [1, 2, 3, 4] and print it.",
    "Why is the sky blue?",
    "hello world, hello world, hello world",
]
ANSWERS = [
    " 5",
    "\n    return a + b\n",
    " Paris",
    " y",
    "\nprint(sum([1,2,3,4]))",
    " Rayleigh",
    "!",
]


@pytest.fixture(scope="module", params=["llama", "gpt2"] + (["legacy"] if LEGACY else []))
def model64(request, char_tokenizer, device):
    make = {"llama": make_tiny_llama, "gpt2": make_tiny_gpt2, "legacy": make_tiny_legacy_llama}
    model = make[request.param](char_tokenizer, device)
    return model.to(torch.float64)


@pytest.fixture(scope="module")
def skill():
    return Skill.from_texts("toy", PROMPTS, ANSWERS)


def brute_force(model, site, positions, layers):
    """Every counted activation, one unpadded text at a time."""
    items = tokenize_examples(model, PROMPTS, ANSWERS)
    per_layer = {layer: [] for layer in layers}
    has_bos = model.tokenizer.bos_token_id is not None
    store = {}

    def keep(layer):
        def hook(act, hook):
            store[layer] = act[0].detach().double().cpu().numpy()

        return hook

    hooks = [(hook_name(site, layer), keep(layer)) for layer in layers]
    for ids, n_head in items:
        tokens = torch.tensor([ids], device=next(model.parameters()).device)
        model.run_with_hooks(tokens, fwd_hooks=hooks)
        idx = {
            "all": range(int(has_bos), len(ids)),
            "prompt": range(int(has_bos), n_head),
            "answer": range(n_head, len(ids)),
            "last": [n_head - 1],
        }[positions]
        for layer in layers:
            per_layer[layer].append(store[layer][list(idx)])
    return {layer: np.concatenate(v) for layer, v in per_layer.items()}


@pytest.mark.parametrize("site", ["pre", "key"])
@pytest.mark.parametrize("positions", ["all", "prompt", "answer", "last"])
def test_stats_equal_brute_force(model64, skill, site, positions):
    layers = [0, model64.cfg.n_layers - 1]
    stats = collect(model64, skill, site=site, positions=positions, layers=layers,
                    batch_size=3, quiet=True)  # fmt: skip
    ref = brute_force(model64, site, positions, layers)
    for row, layer in enumerate(layers):
        x = ref[layer]
        assert stats.count[row].cpu().numpy().tolist() == [x.shape[0]] * x.shape[1]
        np.testing.assert_allclose(stats.mean[row].cpu().numpy(), x.mean(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(
            stats.var[row].cpu().numpy(), x.var(0, ddof=1), rtol=1e-9, atol=1e-12
        )
        np.testing.assert_allclose(stats.min[row].cpu().numpy(), x.min(0), rtol=1e-12)
        np.testing.assert_allclose(stats.max[row].cpu().numpy(), x.max(0), rtol=1e-12)
    assert stats.n_tokens == ref[layers[0]].shape[0]
    assert stats.n_examples == len(PROMPTS)
    # A reservoir larger than the token count holds every token exactly once.
    got = np.sort(stats.sample_values(layers[0]).double().cpu().numpy(), axis=0)
    np.testing.assert_allclose(got, np.sort(ref[layers[0]], axis=0), rtol=1e-6, atol=1e-6)


def _assert_same_stats(a, b, rtol, atol):
    assert torch.equal(a.count, b.count)
    torch.testing.assert_close(a.mean, b.mean, rtol=rtol, atol=atol)
    torch.testing.assert_close(a.m2, b.m2, rtol=rtol, atol=atol)
    # Same tokens chosen for the reservoir, whatever the batching and padding.
    ka, ia = a.sample_keys.sort()
    kb, ib = b.sample_keys.sort()
    assert torch.equal(ka, kb)
    torch.testing.assert_close(a.samples[:, ia], b.samples[:, ib], rtol=1e-5, atol=1e-5)


def test_batching_does_not_change_anything(model64, skill):
    a = collect(model64, skill, batch_size=1, reservoir_size=16, quiet=True)
    for batch_size in (3, 7):
        b = collect(model64, skill, batch_size=batch_size, reservoir_size=16, quiet=True)
        _assert_same_stats(a, b, rtol=1e-9, atol=1e-10)


def test_left_and_right_padding_agree(tiny_model, skill):
    """Float32 models (float64 + left padding gives NaN in the bridge's attention mask;
    collect() reports such values rather than averaging them)."""
    a = collect(tiny_model, skill, batch_size=1, reservoir_size=16, quiet=True)
    for side in ("left", "right"):
        b = collect(tiny_model, skill, batch_size=4, padding_side=side, reservoir_size=16,
                    quiet=True)  # fmt: skip
        _assert_same_stats(a, b, rtol=1e-5, atol=1e-6)


def test_merge_equals_one_pass(model64, skill):
    whole = collect(model64, skill, reservoir_size=20, quiet=True)
    first = collect(model64, skill[:3], reservoir_size=20, quiet=True)
    second = collect(model64, skill[3:], reservoir_size=20, quiet=True)
    merged = first.merge(second)
    assert torch.equal(merged.count, whole.count)
    torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(merged.m2, whole.m2, rtol=1e-9, atol=1e-12)
    assert torch.equal(merged.min, whole.min) and torch.equal(merged.max, whole.max)
    assert merged.n_tokens == whole.n_tokens and merged.n_examples == whole.n_examples
    assert torch.equal(merged.sample_keys.sort().values, whole.sample_keys.sort().values)
    ia, ib = merged.sample_keys.argsort(), whole.sample_keys.argsort()
    torch.testing.assert_close(merged.samples[:, ia], whole.samples[:, ib])


def test_merge_refuses_different_sites(model64, skill):
    a = collect(model64, skill, site="pre", quiet=True)
    b = collect(model64, skill, site="key", quiet=True)
    with pytest.raises(ValueError, match="different site"):
        a.merge(b)


def test_reservoir_is_uniform():
    """Bottom-k sampling on the hashed keys picks each token with equal probability."""
    rng = np.random.default_rng(0)
    n_examples, length, size = 400, 50, 1000
    seeds = example_seeds([f"text {i}" for i in range(n_examples)], [""] * n_examples, seed=3)
    keys = token_keys(seeds, np.tile(np.arange(length), (n_examples, 1)))
    assert sps.kstest(keys.ravel(), "uniform").pvalue > 1e-3
    stats = NeuronStats.empty("pre", "all", [0], d_mlp=1, reservoir_size=size)
    order = rng.permutation(keys.size)  # stream order must not matter
    chosen_tokens = []
    for chunk in np.array_split(order, 37):
        slots, rows = stats.reservoir_plan(torch.from_numpy(keys.ravel()[chunk]))
        stats.update(0, torch.from_numpy(chunk.astype(np.float64))[:, None], slots, rows)
    chosen_tokens = stats.sample_values(0)[:, 0].long().numpy()
    assert len(set(chosen_tokens.tolist())) == size
    # The chosen tokens are exactly the `size` smallest keys...
    assert set(chosen_tokens.tolist()) == set(np.argsort(keys.ravel())[:size].tolist())
    # ...and spread evenly over positions and over examples.
    by_pos = np.bincount(chosen_tokens % length, minlength=length)
    by_ex = np.bincount(chosen_tokens // length // 40, minlength=n_examples // 40)
    assert sps.chisquare(by_pos).pvalue > 1e-3
    assert sps.chisquare(by_ex).pvalue > 1e-3


def test_nonfinite_values_are_counted_not_averaged(model64, skill):
    name = hook_name("pre", 0)

    def poison(act, hook):
        act = act.clone()
        act[..., 3] = float("nan")
        act[..., 5] = float("inf")
        return act

    model64.add_hook(name, poison)
    try:
        with pytest.warns(UserWarning, match="non-finite"):
            stats = collect(model64, skill, layers=[0], quiet=True)
    finally:
        model64.reset_hooks()
    assert int(stats.count[0, 3]) == 0 and int(stats.n_nonfinite[0, 3]) == stats.n_tokens
    assert int(stats.n_nonfinite[0, 5]) == stats.n_tokens
    assert torch.isnan(stats.std[0, 3])
    others = torch.ones(stats.d_mlp, dtype=torch.bool)
    others[[3, 5]] = False
    assert torch.isfinite(stats.mean[0, others]).all()
    assert (stats.n_nonfinite[0, others] == 0).all()


def test_save_load_round_trip(model64, skill, tmp_path):
    stats = collect(model64, skill, layers=[1], reservoir_size=8, quiet=True)
    path = stats.save(tmp_path / "stats")
    assert path.suffix == ".safetensors"
    back = NeuronStats.load(path)
    for name in ("count", "mean", "m2", "min", "max", "n_nonfinite", "samples", "sample_keys"):
        assert torch.equal(getattr(back, name), getattr(stats, name).cpu())
    assert back.layers == [1] and back.site == "pre" and back.meta["skill"] == "toy"
    assert back.meta["version"] and back.meta["model"] == stats.meta["model"]
    back.check_model(model64)


def test_stats_for_another_model_shape_raise(char_tokenizer, skill, tmp_path):
    llama, gpt2 = make_tiny_llama(char_tokenizer), make_tiny_gpt2(char_tokenizer)
    stats = collect(llama, skill, quiet=True)
    with pytest.raises(ValueError, match="collect them again"):
        stats.check_model(gpt2)
    keys = collect_keys(llama, skill, quiet=True)
    keys.save(tmp_path / "keys.safetensors")
    with pytest.raises(ValueError, match="n_layers=3, but this model"):
        KeyVectors.load(tmp_path / "keys.safetensors").check_model(gpt2)
    with pytest.raises(ValueError, match="holds KeyVectors, not NeuronStats"):
        NeuronStats.load(tmp_path / "keys.safetensors")


def test_collect_keys_equal_last_prompt_token(model64, skill, tmp_path):
    layers = list(range(model64.cfg.n_layers))
    keys = collect_keys(model64, skill, batch_size=3, quiet=True)
    assert keys.values.shape == (len(PROMPTS), len(layers), model64.cfg.d_mlp)
    ref = brute_force(model64, "key", "last", layers)
    for col, layer in enumerate(layers):
        np.testing.assert_allclose(keys.values[:, col].cpu().numpy(), ref[layer], rtol=1e-6)
    back = KeyVectors.load(keys.save(tmp_path / "k"))
    assert torch.equal(back.values, keys.values.float().cpu()) and back.layers == layers
    fit, held = keys.split(0.4, seed=1)
    assert len(fit) + len(held) == len(keys)


def test_bad_input_errors(tiny_llama, skill):
    with pytest.raises(ValueError, match="no examples"):
        collect(tiny_llama, [], quiet=True)
    with pytest.raises(ValueError, match="empty"):
        collect(tiny_llama, Skill.from_texts("empty", []), quiet=True)
    with pytest.raises(ValueError, match="Unknown site 'mlp'"):
        collect(tiny_llama, skill, site="mlp", quiet=True)
    with pytest.raises(ValueError, match="Unknown positions"):
        collect(tiny_llama, skill, positions="first", quiet=True)
    with pytest.raises(ValueError, match="out of range: the model has 3 layers"):
        collect(tiny_llama, skill, layers=[5], quiet=True)
    with pytest.raises(TypeError, match="load_skill"):
        collect(tiny_llama, "gsm8k", quiet=True)
    with pytest.raises(ValueError, match="longer than the model's context"):
        collect(tiny_llama, Skill.from_texts("long", ["a" * 400]), quiet=True)
    with pytest.raises(ValueError, match=r"longer than max_length \(8\)"):
        collect(tiny_llama, Skill.from_texts("long", ["a" * 20]), max_length=8, quiet=True)
    with pytest.warns(UserWarning, match="truncated from the right"):
        stats = collect(tiny_llama, Skill.from_texts("long", ["a" * 10], ["b" * 400]), quiet=True)
    assert stats.n_tokens == tiny_llama.cfg.n_ctx - 1  # BOS not counted
    with pytest.raises(ValueError, match="No tokens"):
        collect(tiny_llama, Skill.from_texts("noans", ["abc"]), positions="answer", quiet=True)


def test_negative_layers_and_select(tiny_llama, skill):
    stats = collect(tiny_llama, skill, layers=[-1, 0], quiet=True)
    assert stats.layers == [0, 2]
    sub = stats.select_layers([2])
    assert torch.equal(sub.mean[0], stats.mean[1])


def test_batches_respect_the_token_budget(tiny_llama):
    from mechunlearn.batching import iter_batches

    prompts = ["a" * 200] + ["b" * 10] * 9
    batches = list(iter_batches(tiny_llama, prompts, batch_size=8, max_batch_tokens=100))
    assert batches[0].tokens.shape[0] == 1  # the long text alone
    assert all(b.tokens.numel() <= 100 or b.tokens.shape[0] == 1 for b in batches)
    assert all(b.tokens.shape[0] <= 8 for b in batches)
    seen = sorted(int(i) for b in batches for i in b.example_index)
    assert seen == list(range(10))
    with pytest.raises(ValueError, match="max_batch_tokens"):
        next(iter_batches(tiny_llama, prompts, max_batch_tokens=0))


def test_forward_until_stops_after_the_hook_point_and_detaches(tiny_model):
    from mechunlearn.batching import forward_until, iter_batches

    model = tiny_model
    batch = next(iter_batches(model, ["Q: 1+1?"], [" 2"]))
    stop = hook_name("pre", 0)
    later = hook_name("key", model.cfg.n_layers - 1)
    seen = []

    def record(activation, hook):
        seen.append(tuple(activation.shape))
        return activation

    def late(activation, hook):
        seen.append("late")
        return activation

    forward_until(model, batch, [(stop, record), (later, late)], stop)
    assert len(seen) == 1 and "late" not in seen  # nothing after the stop point ran
    assert not model.hook_dict[stop].fwd_hooks and not model.hook_dict[later].fwd_hooks

    def boom(activation, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):  # other errors propagate, hooks detached
        forward_until(model, batch, [(stop, boom)], later)
    assert not model.hook_dict[stop].fwd_hooks and not model.hook_dict[later].fwd_hooks


def test_bfloat16_statistics_are_float64_from_the_first_subtraction(char_tokenizer, device):
    """A bf16 model's statistics equal float64 references on the very same bf16 activations: a
    two-pass one and a single-pass (Welford) one, to 1e-10 relative. Deviations squared in bf16
    (the old way) miss by orders of magnitude more."""
    from mechunlearn.batching import iter_batches

    model = make_tiny_llama(char_tokenizer, device).to(torch.bfloat16)
    skill = Skill.from_texts("toy", PROMPTS, ANSWERS)
    layers = [0, 2]
    stats = collect(model, skill, layers=layers, batch_size=16, quiet=True)
    (batch,) = list(iter_batches(model, PROMPTS, ANSWERS, batch_size=16))
    seen = {}

    def keep(layer):
        def hook(act, hook):
            seen[layer] = act.detach()

        return hook

    with torch.inference_mode():
        model.run_with_hooks(
            batch.tokens,
            attention_mask=batch.attention_mask,
            fwd_hooks=[(hook_name("pre", layer), keep(layer)) for layer in layers],
        )
    mask = batch.mask("all").cpu()
    for row, layer in enumerate(layers):
        x16 = seen[layer].cpu()[mask]  # the same bf16 values collect saw
        assert x16.dtype == torch.bfloat16
        x = x16.double()
        mean = x.mean(0)
        m2 = (x - mean).square().sum(0)
        torch.testing.assert_close(stats.mean[row].cpu(), mean, rtol=1e-10, atol=0)
        torch.testing.assert_close(stats.m2[row].cpu(), m2, rtol=1e-10, atol=0)
        w_mean, w_m2 = torch.zeros_like(mean), torch.zeros_like(mean)
        for k, value in enumerate(x, start=1):  # Welford, one token at a time
            delta = value - w_mean
            w_mean += delta / k
            w_m2 += delta * (value - w_mean)
        torch.testing.assert_close(stats.mean[row].cpu(), w_mean, rtol=1e-10, atol=0)
        torch.testing.assert_close(stats.m2[row].cpu(), w_m2, rtol=1e-10, atol=0)
        old = (x16 - x16.double().mean(0).to(torch.bfloat16)).square().sum(0, dtype=torch.float64)
        assert ((old - m2).abs() / m2).max() > 1e-4  # what float64-after-the-fact would give


def test_collect_keys_mean_pool_equals_brute_force(model64, skill):
    """pool="mean": every prompt token's key vector averaged by hand, one unpadded text at a
    time with run_with_cache (BOS excluded), whatever the batching and token budget."""
    layers = list(range(model64.cfg.n_layers))
    has_bos = model64.tokenizer.bos_token_id is not None
    device = next(model64.parameters()).device
    ref = np.zeros((len(PROMPTS), len(layers), model64.cfg.d_mlp))
    for i, (ids, n_head) in enumerate(tokenize_examples(model64, PROMPTS, [""] * len(PROMPTS))):
        _, cache = model64.run_with_cache(torch.tensor([ids], device=device))
        for col, layer in enumerate(layers):
            act = cache[hook_name("key", layer)][0].double().cpu().numpy()
            ref[i, col] = act[int(has_bos) : n_head].mean(0)
    for batch_size, budget in ((1, 8192), (3, 8192), (16, 40)):
        keys = collect_keys(
            model64, skill, batch_size=batch_size, max_batch_tokens=budget, pool="mean", quiet=True
        )
        assert keys.values.dtype == torch.float32 and keys.meta["pool"] == "mean"
        np.testing.assert_allclose(keys.values.cpu().numpy(), ref, rtol=1e-5, atol=1e-6)
    last = collect_keys(model64, skill, quiet=True)
    assert last.meta["pool"] == "last"
    assert not torch.allclose(last.values, keys.values)  # the two pools differ


def test_mean_pool_left_and_right_padding_agree(tiny_model, skill):
    """Float32 models (float64 + left padding gives NaN in the bridge's attention mask)."""
    a = collect_keys(tiny_model, skill, batch_size=1, pool="mean", quiet=True)
    for side in ("left", "right"):
        b = collect_keys(
            tiny_model, skill, batch_size=4, padding_side=side, pool="mean", quiet=True
        )
        torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-6)


def test_collect_gathers_both_pools_in_one_pass(model64, skill):
    probe = collect(model64, skill, what=("keys", "mean_keys", "importance"), quiet=True)
    alone = collect_keys(model64, skill, pool="mean", quiet=True)
    # The pass also held the answers (importance), which prompt tokens cannot see.
    torch.testing.assert_close(probe.mean_keys.values, alone.values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        probe.keys.values, collect_keys(model64, skill, quiet=True).values, rtol=1e-5, atol=1e-6
    )
    assert probe["mean_keys"].meta["pool"] == "mean" and probe.keys.meta["pool"] == "last"


def test_collect_keys_pool_errors(tiny_llama, skill):
    with pytest.raises(ValueError, match="Unknown pool 'max'"):
        collect_keys(tiny_llama, skill, pool="max", quiet=True)
    with pytest.raises(ValueError, match="Example 1 has an empty prompt"):
        collect_keys(tiny_llama, Skill.from_texts("e", ["ab", ""]), pool="mean", quiet=True)
