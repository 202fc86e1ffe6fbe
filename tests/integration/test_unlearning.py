"""The stable parts of the unlearning results on the real default model, with margins.

Forget GSM8K, retain MBPP, general MMLU (`analysis/unlearning_study.py` gives the full table).
Key Space Detection fitted on probe halves must abstain on nearly every held-out GSM8K question
and on almost none of the held-out MBPP or MMLU prompts. Its hooks never change the logits, so
its teacher-forced score is the bare model's with the abstained examples zeroed.
"""

from __future__ import annotations

import numpy as np
import pytest

import mechunlearn as mu
from mechunlearn.evaluation import teacher_forced

pytestmark = pytest.mark.integration

N = 24  # probe examples per skill; as many again are held out


@pytest.fixture(scope="module")
def halves(data_dir):
    """``{skill: (probe, held_out)}``, disjoint, as `mechunlearn run` splits them."""
    out = {}
    for name in ("gsm8k", "mbpp", "mmlu"):
        skill = mu.load_skill(name, n=2 * N, seed=0, data_dir=data_dir)
        out[name] = skill.split(0.5, seed=0)
    return out


@pytest.fixture(scope="module")
def ksd(default_model, halves):
    keys = {
        name: mu.collect_keys(default_model, probe, quiet=True)
        for name, (probe, _) in halves.items()
    }
    # As `mechunlearn run` fits it: alpha under a 5 % false-positive cap on the other skills.
    others = keys["mbpp"].concat(keys["mmlu"])
    return mu.KeySpaceDetector(layers=-1, fpr=0.05, seed=0).fit(keys["gsm8k"], others)


def test_probe_and_held_out_never_overlap(halves):
    for probe, held in halves.values():
        assert not set(probe.prompts) & set(held.prompts)


def test_ksd_abstains_on_the_forget_skill_only(default_model, halves, ksd):
    rate = {
        name: float(ksd.detect(default_model, held.prompts).detected.float().mean())
        for name, (_, held) in halves.items()
    }
    # Targets of the issue: relative performance <= 0.10 on forget, >= 0.95 elsewhere.
    assert rate["gsm8k"] >= 0.90, rate
    assert rate["mbpp"] <= 0.05, rate
    assert rate["mmlu"] <= 0.05, rate


def test_ksd_hooks_only_watch_and_its_score_zeroes_the_abstentions(default_model, halves, ksd):
    for name, target in (("gsm8k", lambda r: r <= 0.10), ("mbpp", lambda r: r >= 0.95)):
        held = halves[name][1]
        base = teacher_forced(default_model, held)
        with default_model.hooks(fwd_hooks=ksd.hooks(default_model)):
            watched = teacher_forced(default_model, held)
        # The hooks record detections and change nothing: the same tokens are predicted.
        np.testing.assert_array_equal(watched.correct, base.correct)
        np.testing.assert_allclose(watched.nll, base.nll, rtol=1e-5)
        table = mu.evaluate(default_model, held, {"KSD": ksd}, quiet=True).set_index("method")
        low, high = table.loc["KSD", ["relative_low", "relative_high"]]
        assert low <= table.loc["KSD", "relative"] <= high  # the interval holds the estimate
        detected = ksd.detect(default_model, held.prompts).detected.cpu().numpy()
        kept = np.where(detected, 0, base.correct).sum() / base.total.sum()
        assert table.loc["KSD", "score"] == pytest.approx(kept, abs=1e-12)
        assert table.loc["KSD", "abstention_rate"] == pytest.approx(detected.mean())
        relative = table.loc["KSD", "relative"]
        assert target(relative), (name, relative)
