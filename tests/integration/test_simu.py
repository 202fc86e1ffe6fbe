"""SIMU on the real default model: unlearning 8 GSM8K examples (retaining 8 MBPP ones) lowers
the teacher-forced accuracy on held-out GSM8K questions, and fit leaves the model as it was.

Kept small for a CPU: the shortest examples, the last 6 layers, 2 integrated-gradients steps,
no retain attribution (``dual=True``) and 3 SophiaH steps. The fit time and peak memory are
printed (``pytest -s``).
"""

from __future__ import annotations

import resource
import time

import pytest
import torch

import mechunlearn as mu
from mechunlearn.evaluation import teacher_forced

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def shortest(skill: mu.Skill, n: int, skip: int = 0) -> mu.Skill:
    """The ``n`` examples with the shortest texts after the ``skip`` shortest."""
    order = sorted(range(len(skill)), key=lambda i: (len(skill[i].text), i))
    return skill[order[skip : skip + n]]


def _peak_mb(device) -> float:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def test_simu_lowers_held_out_gsm8k_accuracy(default_model, data_dir, device):
    model = default_model
    gsm8k = mu.load_skill("gsm8k", data_dir=data_dir)
    forget, held_out = shortest(gsm8k, 8), shortest(gsm8k, 16, skip=8)
    retain = shortest(mu.load_skill("mbpp", data_dir=data_dir), 8)
    assert not set(forget.prompts) & set(held_out.prompts)
    base = teacher_forced(model, held_out)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    peak_before = _peak_mb(device)
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    simu = mu.Simu(
        layers=list(range(-6, 0)), steps=2, dual=True, lr=0.1, max_steps=3,
        forget_loss_factor=None, batch_size=8,
    ).fit(model, forget, retain, quiet=True)  # fmt: skip
    seconds = time.perf_counter() - start
    print(
        f"\nSIMU fit on {device}: {seconds:.1f} s, peak memory {_peak_mb(device):.0f} MiB "
        f"(before fit {peak_before:.0f} MiB); {sum(simu.n_critical_)} critical neurons; "
        f"history {simu.history_}"
    )

    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert simu.n_updates_ == 3 and sum(simu.n_critical_) > 0
    assert simu.history_[-1]["forget_loss"] > simu.history_[0]["forget_loss"]
    with simu.apply_to_weights(model):
        after = teacher_forced(model, held_out)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    print(f"held-out GSM8K accuracy {base.score:.3f} -> {after.score:.3f}, "
          f"NLL {base.mean_nll:.3f} -> {after.mean_nll:.3f}")  # fmt: skip
    assert after.score < base.score - 0.05
    assert after.mean_nll > base.mean_nll
