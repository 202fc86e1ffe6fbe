"""LUNAR on the real default model: the W_out edit lowers GSM8K's held-out teacher-forced
accuracy more than MBPP's, and hooks == weight edit there.

Measured once (SmolLM2-135M-Instruct, 8 + 8 fit examples, 8 + 8 held out, closed form): at
layer 16 GSM8K keeps 0.25 of its accuracy and MBPP 0.75; at layer 24, 0.54 and 0.92.
"""

from __future__ import annotations

import pytest
import torch

import mechunlearn as mu
from mechunlearn.evaluation import teacher_forced

pytestmark = pytest.mark.integration

LAYER = 16
N = 8


@pytest.fixture(scope="module")
def halves(data_dir):
    """``{skill: (fit, held_out)}``, disjoint."""
    return {
        name: mu.load_skill(name, n=2 * N, seed=0, data_dir=data_dir).split(0.5, seed=0)
        for name in ("gsm8k", "mbpp")
    }


@pytest.fixture(scope="module")
def lunar(default_model, halves):
    return mu.Lunar(layer=LAYER).fit(default_model, halves["gsm8k"][0], halves["mbpp"][0])


def test_lunar_lowers_the_forget_skill_on_held_out_examples(default_model, halves, lunar):
    info = lunar.diagnostics_[0]
    assert info["linear_check"] < 1e-5  # hook_mlp_out is hook_post @ W_out here
    assert info["forget_redirect"] > 0.95 and info["kept_shift"] < 0.05
    relative = {}
    for name, (_, held) in halves.items():
        base = teacher_forced(default_model, held)
        after = teacher_forced(default_model, held, lunar)
        relative[name] = after.score / base.score
        if name == "gsm8k":
            assert after.mean_nll > base.mean_nll + 1.0
    assert relative["gsm8k"] <= 0.5, relative
    assert relative["gsm8k"] < relative["mbpp"] - 0.2, relative


def test_hooks_equal_weight_edit_on_the_default_model(default_model, halves, lunar):
    model = default_model
    tokens = model.to_tokens([halves["gsm8k"][1][0].prompt])
    before = model.blocks[LAYER].mlp.W_out.detach().clone()
    with torch.no_grad():
        hooked = model.run_with_hooks(tokens, fwd_hooks=lunar.hooks(model))
        with lunar.apply_to_weights(model):
            edited = model(tokens)
    torch.testing.assert_close(hooked, edited, rtol=1e-4, atol=1e-4)
    assert torch.equal(model.blocks[LAYER].mlp.W_out, before)
