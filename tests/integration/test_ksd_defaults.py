"""Key Space Detection with its defaults on the real default model (issues 16 and 25).

A user with only a forget skill fits ``Detector().fit(keys_f, collect_keys(model,
mu.calibration_skill()))``: the detector must catch unseen forget questions and let ordinary
questions of other domains through. ``analysis/ksd_defaults.py`` chose the defaults and
measured them on held-out data (``results/ksd_defaults/summary.md``); this test guards the
result with margins, on fewer questions (60 to fit instead of 100), in GSM8K's own prompt
format (``"Question: ...\\nAnswer:"``, the format ``load_skill`` gives).
"""

from __future__ import annotations

import pytest

import mechunlearn as mu
from mechunlearn.data import make_variant

pytestmark = pytest.mark.integration

N = 60  # GSM8K questions to fit on; as many again held out, and 60 per other domain


@pytest.fixture(scope="module")
def keys(default_model, data_dir):
    gsm8k = mu.load_skill("gsm8k", n=2 * N, seed=0, data_dir=data_dir)
    probe, held_out = gsm8k.split(N, seed=0)
    mmlu = mu.load_skill("mmlu:-math", answer_format="text", data_dir=data_dir)
    mmlu = mmlu[[i for i, ex in enumerate(mmlu) if len(ex.prompt) <= 300]].subsample(N, seed=1)
    mbpp = mu.load_skill("mbpp", data_dir=data_dir).subsample(N, seed=1)
    tasks = [ex.prompt.split("\nYour code should pass these tests:")[0].strip() for ex in mbpp]
    mbpp = make_variant(mu.Skill.from_texts("mbpp-tasks", tasks), "question_prefix")
    skills = {
        "probe": probe,
        "held_out": held_out,
        "calibration": mu.calibration_skill(),  # plain and "Question: ...\nAnswer:"
        "mmlu": mmlu,  # already "Question: ...\nAnswer:"
        "mbpp": mbpp,
    }
    return {name: mu.collect_keys(default_model, s, quiet=True) for name, s in skills.items()}


@pytest.mark.parametrize("cls", [mu.KeySpaceDetector, mu.EllipsoidDetector])
def test_defaults_detect_the_skill_and_let_other_questions_through(keys, cls):
    det = cls().fit(keys["probe"], keys["calibration"])
    # issue 25 (analysis/detector_calibration.py): conformal; the cube at rule 2/3 and fpr 0.01,
    # the ellipsoid at rule "all" and 0.005 (504 negatives bound both)
    fpr, rule = cls().fpr, cls().rule
    assert (fpr, rule) in ((0.01, 2 / 3), (0.005, "all")) and det.layers_ == list(range(30))
    assert det.fpr_ == fpr and det.calibration_["bound"] <= fpr
    found = det.detect_keys(keys["held_out"])
    assert found.fpr == fpr  # the calibrated rate travels with every Detection
    rate = {name: det.detect_keys(keys[name]).rate for name in ("held_out", "mmlu", "mbpp")}
    # The study (100 fit questions) detected 0.93 [0.86, 0.97] (cube) and 0.99 [0.95, 1.00]
    # (ellipsoid) of 100 held-out questions in this format (here: 0.93 and 0.98 of 60); 0.85
    # leaves room for the smaller fit set and another sample.
    assert rate["held_out"] >= 0.85, rate
    # The study measured 0 of 30 MMLU and 0 of 30 MBPP test questions in this format for both
    # defaults (pooled over five domains: <= 0.01 [0.00, 0.05]); on this test's sample they
    # refused 3 (box) and 2 (ellipsoid) of 60 MMLU, 0 of 60 MBPP. 0.10 (6 of 60) would be
    # exceeded by a true rate of 5 % only about 4 % of the time (binomial), yet catches the
    # over-blocking of issue 16 (0.37-0.50 of MMLU questions in this format without negatives).
    assert rate["mmlu"] <= 0.10, rate
    assert rate["mbpp"] <= 0.10, rate


def test_fitting_on_the_forget_skill_alone_is_refused(keys):
    with pytest.raises(ValueError, match=r"mu\.calibration_skill\(\)"):
        mu.KeySpaceDetector().fit(keys["probe"])
