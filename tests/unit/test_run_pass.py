"""The one batch loop, :func:`mechunlearn.run_pass`: its own contract (coverage, batch bounds,
stopping, hooks detached, modes, sharding) on the tiny models."""

from __future__ import annotations

import pytest
import torch

from mechunlearn import Skill, distributed, run_pass
from mechunlearn.batching import forward
from mechunlearn.sites import hook_name

# Lengths from 2 to 40 characters, out of order, so that sorting and the token bound both matter.
PROMPTS = [f"{'x' * (7 * i % 37)}q{i}?" for i in range(23)]
ANSWERS = [f" a{i}" for i in range(23)]
SKILL = Skill.from_texts("toy", PROMPTS, ANSWERS)


def no_hooks_left(model) -> bool:
    return all(not hp.fwd_hooks for hp in model.hook_dict.values())


def test_every_example_once_in_length_sorted_bounded_batches(tiny_model):
    seen, widths, calls = [], [], []

    def hooks(batch):
        seen.extend(batch.example_index.tolist())
        widths.append(batch.tokens.shape[1])
        assert batch.tokens.shape[0] <= 5
        assert batch.tokens.numel() <= 60 or batch.tokens.shape[0] == 1
        assert batch.answer_mask.any(1).all()  # answers included
        return []

    run_pass(
        tiny_model, SKILL, hooks, hook_name("pre", 0),
        then=lambda batch, logits: calls.append(logits), batch_size=5, max_batch_tokens=60,
    )  # fmt: skip
    assert sorted(seen) == list(range(len(SKILL)))
    assert widths == sorted(widths, reverse=True) and len(widths) > len(SKILL) // 5
    assert len(calls) == len(widths) and all(logits is None for logits in calls)


def test_stop_after_is_honoured_and_none_gives_the_logits(tiny_model):
    fired = []

    def hooks(batch):
        def mark(name):
            def hook(activation, hook=None):
                fired.append(name)
                return activation

            return hook

        return [(name, mark(name)) for name in (hook_name("key", 0), hook_name("pre", 1))]

    run_pass(tiny_model, SKILL, hooks, hook_name("key", 0), batch_size=8)
    assert fired and set(fired) == {hook_name("key", 0)}  # the later hook never ran

    got = {}

    def keep(batch, logits):
        got["logits"], got["ref"] = logits, forward(tiny_model, batch)

    run_pass(tiny_model, SKILL[:3], lambda batch: [], None, then=keep)
    assert got["logits"].shape[-1] == got["ref"].shape[-1]
    assert torch.equal(got["logits"], got["ref"])


@pytest.mark.parametrize("where", ["hook", "then"])
def test_hooks_are_removed_after_an_exception(tiny_model, where):
    def boom(activation, hook=None):
        raise RuntimeError("boom")

    def quiet(activation, hook=None):
        return activation

    def then(batch, logits):
        assert no_hooks_left(tiny_model)  # detached as soon as the forward ended
        raise RuntimeError("boom")

    hooks = [
        (hook_name("pre", 0), boom if where == "hook" else quiet),
        (hook_name("key", 1), quiet),
    ]
    with pytest.raises(RuntimeError, match="boom"):
        run_pass(
            tiny_model, SKILL, lambda batch: hooks, hook_name("key", 1),
            then=then if where == "then" else None,
        )  # fmt: skip
    assert no_hooks_left(tiny_model)
    assert not torch.is_inference_mode_enabled()


def test_prompts_only_and_the_autograd_mode(tiny_llama):
    modes = []

    def hooks(batch):
        assert not batch.answer_mask.any()
        modes.append(torch.is_inference_mode_enabled())
        return []

    run_pass(tiny_llama, SKILL, hooks, hook_name("pre", 0), prompts_only=True)
    assert modes and all(modes)  # inference_mode by default

    grads = []

    def then(batch, logits):
        grads.append(logits.requires_grad)

    with torch.enable_grad():
        run_pass(tiny_llama, SKILL[:4], lambda b: [], None, then=then, inference=False)
    assert grads == [True]  # the caller's autograd mode: the logits have a graph


def test_a_shard_holds_this_rank_s_examples_with_their_skill_indices(tiny_llama, monkeypatch):
    monkeypatch.setattr(distributed, "world", lambda: (1, 3))
    seen = []
    run_pass(
        tiny_llama, SKILL, lambda b: seen.extend(b.example_index.tolist()) or [],
        hook_name("pre", 0), shard=True, batch_size=4,
    )  # fmt: skip
    assert sorted(seen) == list(range(1, len(SKILL), 3))
    seen.clear()
    run_pass(tiny_llama, SKILL, lambda b: seen.extend(b.example_index.tolist()) or [], None)
    assert sorted(seen) == list(range(len(SKILL)))  # shard=False: every example


def test_bad_batching_is_refused_before_any_work(tiny_llama):
    with pytest.raises(ValueError, match="batch_size"):
        run_pass(tiny_llama, SKILL, lambda b: [], None, batch_size=0)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        run_pass(tiny_llama, SKILL, lambda b: [], None, max_batch_tokens=0)
