"""Skill scores before and after an intervention, relative performance, and its uncertainty.

Two metric families (docs/methods.md, "Evaluation"):

* ``metric="teacher_forced"`` (default): top-1 next-token accuracy on the reference answer's
  tokens given the prompt, pooled over every answer token of the skill, and the mean negative
  log-likelihood of those tokens. The metric of the Selective Pruning paper, and the one that
  means something for small models, which cannot solve GSM8K or MBPP. A multiple-choice skill
  whose answers are letters (MMLU's letter format) is scored on the letter among the choices;
  with MMLU's ``answer_format="text"`` the correct choice's text is scored token by token.
* ``metric="generation"``: the paper's protocols, chosen from the skill's name:
  GSM8K 8-shot chain of thought, the number after "The answer is"; MBPP and HumanEval pass@1,
  the task's tests run in a subprocess with a time limit; XQuAD/MLQA, the gold answer is a
  substring of a greedy 24-token answer; MMLU 5-shot, the letter with the highest logit.

**No work twice.** :func:`evaluate` runs each skill's bare forward once and each
output-changing method's forward once; a pass stops at the final residual stream and unembeds
only the positions that are scored (soft-capping the logits where the model does, as Gemma 2's
forward does), turning them into float64 for the log-softmax a few rows at a time
(:data:`mechunlearn.scoring.SCORE_CHUNK_VALUES`, so memory does not grow with the vocabulary
times the answer tokens; the scores are the same bit for bit). Detectors
(:class:`~mechunlearn.interventions.Detector`) only watch: every prompt they let through gets
the bare model's answer, so each is scored as the bare model's per-example results with its
abstentions zeroed, its key vectors read during the bare pass (at the last prompt token, no
extra pass). An abstained example scores 0 (its answer tokens count as wrong) and is left out
of the NLL. Methods that edit weights (:class:`~mechunlearn.interventions.WeightIntervention`,
e.g. SIMU) are scored inside their ``apply_to_weights`` context.

**Uncertainty.** Every score and every relative performance (after / before) carries a 95 %
interval from a paired bootstrap over examples (:mod:`mechunlearn.kernels.bootstrap`: after and
before resampled together, seeded, 2,000 resamples). Each skill's **chance level** is reported
beside its base score (``1 / k`` for a ``k``-way letter choice, ``1 / vocabulary`` for
teacher-forced tokens, ``1 / k`` for MMLU's 5-shot generated letter, 0 for the other generation
protocols), and the skill is flagged ``informative`` only when the
lower end of its base score's interval lies above it.

Under ``torchrun`` the teacher-forced examples are sharded across processes and the per-example
counts summed (:mod:`mechunlearn.distributed`); every rank returns the whole table. Generation
scores are not sharded yet: every rank generates every example.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import distributed
from .batching import EncodedBatch, check_batching
from .collect import as_skill, run_pass
from .data import Skill, gsm8k_few_shot_prompts, mmlu_few_shot_prompts, special_token_flags
from .generation import greedy_generate
from .interventions.base import Detector, WeightIntervention
from .kernels.bootstrap import N_BOOT, paired_ratio_interval, ratio_interval
from .models import check_model
from .scoring import ExampleScores, choice_tokens, score_pass
from .stats import KeyVectors
from .validation import check_choice, check_int, check_probability

METRICS = ("teacher_forced", "generation")
BASE = "base"
ROLES = ("forget", "retain", "general")
"""The roles a scored skill plays: the skill to unlearn, a skill to keep, general knowledge."""


def _as_skills(skills: Skill | Sequence[Skill] | Mapping[str, Skill]) -> dict[str, Skill]:
    if isinstance(skills, Skill):
        skills = [skills]
    if isinstance(skills, Mapping):
        out = dict(skills)
        for name, s in out.items():
            if not isinstance(s, Skill):
                raise TypeError(
                    f"evaluate() takes Skill objects, got {type(s).__name__} for {name!r}."
                )
    else:
        out = {}
        for s in skills:
            if not isinstance(s, Skill):
                raise TypeError(f"evaluate() takes Skill objects, got {type(s).__name__}.")
            if s.name in out:
                raise ValueError(f"Two skills are named {s.name!r}: pass a dict to name them.")
            out[s.name] = s
    if not out:
        raise ValueError("No skills to evaluate.")
    for name, s in out.items():
        if len(s) == 0:
            raise ValueError(f"Skill {name!r} has no examples.")
    return out


def _check_intervention(name: str, iv: Any) -> None:
    if isinstance(iv, type):
        raise TypeError(
            f"Intervention {name!r} is the class {iv.__name__}, not a fitted instance: pass "
            f"mu.{iv.__name__}(...).fit(...) (or {iv.__name__}.load(path))."
        )
    ok = iv is not None and (
        callable(getattr(iv, "hooks", None))
        or callable(getattr(iv, "detect", None))
        or callable(getattr(iv, "apply_to_weights", None))
    )
    if not ok:
        raise TypeError(
            f"Intervention {name!r} is a {type(iv).__name__}, not an intervention: pass fitted "
            "objects such as mu.NeuronAdjust(...).fit(stats_f, stats_r)."
        )


def abstentions(model, intervention, prompts: Sequence[str], batch_size: int = 16) -> np.ndarray:
    """Which prompts ``intervention`` abstains on (all False for one that never abstains)."""
    if not isinstance(intervention, Detector):
        return np.zeros(len(prompts), dtype=bool)
    detection = intervention.detect(model, list(prompts), batch_size=batch_size)
    return detection.detected.cpu().numpy().astype(bool)


def _changes_outputs(intervention) -> bool:
    return intervention is not None and not isinstance(intervention, Detector)


@contextlib.contextmanager
def applied(model, intervention):
    """Run the block with ``intervention`` applied; yields the hooks to pass to each forward.

    Hooks for most methods (yielded, not attached); a weight edit for a
    :class:`~mechunlearn.interventions.WeightIntervention`, undone on exit even after an
    exception; nothing for detectors, whose hooks only watch.
    """
    if not _changes_outputs(intervention):
        yield []
    elif isinstance(intervention, WeightIntervention):
        with intervention.apply_to_weights(model):
            yield []
    else:
        yield list(intervention.hooks(model))


def teacher_forced(
    model, skill: Skill, intervention=None, batch_size: int = 16, quiet: bool = True
) -> ExampleScores:
    """Top-1 accuracy and NLL of the reference answer tokens given each prompt.

    Every answer token counts: correct when it is the argmax over the vocabulary at the
    position before it. A multiple-choice skill whose answers are letters (MMLU's letter
    format) is scored on its letter instead: correct when the answer letter has the highest
    logit among the choice letters, with the NLL of that letter token.

    Example:
        >>> s = teacher_forced(model, forget)
        >>> len(s.correct), int(s.total.sum())      # 30 examples, one answer token each
        (30, 30)
        >>> 0 <= s.score <= 1, s.mean_nll > 0
        (True, True)
    """
    check_model(model)
    check_batching(batch_size)
    skill = as_skill(skill)
    abstained = abstentions(model, intervention, skill.prompts, batch_size)
    with applied(model, intervention) as hooks:
        scores, _ = score_pass(model, skill, hooks, batch_size, quiet)
    return replace(scores, abstained=abstained)


def chance_level(model, skill: Skill, metric: str = "teacher_forced") -> float:
    """The score of guessing: ``1 / k`` for a ``k``-way letter choice (MMLU letters, MMLU
    5-shot), ``1 / vocabulary`` for teacher-forced tokens, 0 for other generation protocols."""
    if metric == "generation":
        return 1.0 / len(skill[0].meta["choices"]) if protocol(skill) == "mmlu" else 0.0
    choices = choice_tokens(model, skill)
    if choices is not None:
        return 1.0 / len(choices[1])
    return 1.0 / int(model.cfg.d_vocab)


def protocol(skill: Skill) -> str:
    """The generation protocol for a skill, from its name (``gsm8k``, ``mmlu:...``, ...)."""
    base = skill.name.split(":")[0].split("[")[0].lower()
    if base in ("gsm8k", "mbpp", "humaneval", "mmlu", "xquad", "mlqa"):
        return base
    raise ValueError(
        f"No generation protocol for skill {skill.name!r}: generation scoring knows gsm8k, "
        "mbpp, humaneval, mmlu, xquad and mlqa. Use metric='teacher_forced' for other skills."
    )


_ANSWER_RE = re.compile(r"The answer is\s*\$?\s*(-?[\d,]*\.?\d+)")


def gsm8k_correct(completion: str, final: str) -> bool:
    """Whether the number after the first "The answer is" equals the reference."""
    m = _ANSWER_RE.search(completion)
    if not m:
        return False
    try:
        return float(m.group(1).replace(",", "")) == float(str(final).replace(",", ""))
    except ValueError:
        return False


def run_tests(program: str, timeout: float = 10.0) -> bool:
    """Run ``program`` in a fresh Python subprocess; True when it exits 0 within ``timeout``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "candidate.py")
        with open(path, "w") as f:
            f.write(program)
        try:
            done = subprocess.run(
                [sys.executable, path], cwd=tmp, capture_output=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0


def _code_from(completion: str) -> str:
    fence = re.search(r"```(?:python)?\n(.*?)(```|$)", completion, re.S)
    return fence.group(1) if fence else completion


def _generation_scores(model, skill, intervention, batch_size, quiet, max_new_tokens):
    kind = protocol(skill)
    n = len(skill)
    abstained = abstentions(model, intervention, skill.prompts, batch_size)
    correct = np.zeros(n)
    keep = np.flatnonzero(~abstained)
    examples = [skill[int(i)] for i in keep]
    sub = Skill(skill.name, examples, skill.source) if examples else None
    with applied(model, intervention) as hooks:
        _generation_correct(
            model, sub, kind, keep, examples, hooks, correct, batch_size, quiet, max_new_tokens
        )
    return ExampleScores(correct, np.ones(n), np.full(n, math.nan), abstained)


def _generation_correct(
    model, sub, kind, keep, examples, hooks, correct, batch_size, quiet, max_new_tokens
) -> None:
    if sub is not None and kind == "mmlu":
        prompts = mmlu_few_shot_prompts(sub)
        choices = choice_tokens(model, sub)
        if choices is None or choices[0] != 0:
            raise ValueError(
                f"MMLU 5-shot scoring of {sub.name!r} needs letter-format examples "
                "(load_skill(..., answer_format='letter')) with choices and a label, and a "
                "tokenizer whose letter answers (' A', ' B', ...) begin with distinct tokens."
            )
        letters = choices[1]

        def read(batch: EncodedBatch, logits: Tensor) -> None:  # the letter after each prompt
            rows = torch.arange(len(batch.tokens), device=logits.device)
            last = logits[rows, batch.last_prompt][:, letters].argmax(-1).cpu().numpy()
            for j, ex_i in enumerate(batch.example_index.cpu().numpy()):
                correct[keep[ex_i]] = float(last[j] == int(examples[ex_i].meta["label"]))

        run_pass(
            model, prompts, lambda batch: hooks, None, then=read, prompts_only=True,
            batch_size=batch_size,
        )  # fmt: skip
    elif sub is not None:
        flags = special_token_flags(sub)
        if kind == "gsm8k":  # a few-shot text prompt around each question
            prompts, budget, flags = gsm8k_few_shot_prompts(sub), max_new_tokens or 256, False
        elif kind in ("xquad", "mlqa"):
            prompts, budget = sub.prompts, max_new_tokens or 24
        else:
            prompts, budget = sub.prompts, max_new_tokens or 256
        texts = greedy_generate(
            model, prompts, budget, hooks, batch_size=max(1, batch_size // 2), special_tokens=flags
        )
        for j, (ex, text) in enumerate(
            tqdm(
                list(zip(examples, texts, strict=True)),
                desc=f"check {sub.name}",
                disable=quiet,
                leave=False,
            )
        ):
            if kind == "gsm8k":
                ok = gsm8k_correct(text, ex.meta["final"])
            elif kind in ("xquad", "mlqa"):
                ok = any(a.strip() and a.strip() in text for a in ex.meta["answers"])
            elif kind == "mbpp":
                setup = ex.meta.get("test_setup_code", "") or ""
                tests = "\n".join(ex.meta["test_list"])
                ok = run_tests(f"{setup}\n{_code_from(text)}\n{tests}\n")
            else:  # humaneval
                program = ex.prompt + text + "\n" + ex.meta["test"]
                ok = run_tests(f"{program}\ncheck({ex.meta['entry_point']})\n")
            correct[keep[j]] = float(ok)


def score_skill(
    model,
    skill: Skill,
    intervention=None,
    metric: str = "teacher_forced",
    batch_size: int = 16,
    quiet: bool = True,
    max_new_tokens: int | None = None,
) -> ExampleScores:
    """Per-example scores of ``skill`` with ``intervention`` (None for the bare model)."""
    check_choice(metric, METRICS, "metric")
    if metric == "teacher_forced":
        return teacher_forced(model, skill, intervention, batch_size, quiet)
    return _generation_scores(model, skill, intervention, batch_size, quiet, max_new_tokens)


def _describe(iv: Any) -> tuple[str, str]:
    """``(kind, params as JSON)`` of an intervention (its class and hyperparameters)."""
    if iv is None:
        return BASE, "{}"
    params = iv.get_params() if callable(getattr(iv, "get_params", None)) else {}
    return type(iv).__name__, json.dumps(params, sort_keys=True, default=str)


def evaluate(
    model,
    skills: Skill | Sequence[Skill] | Mapping[str, Skill],
    interventions: Mapping[str, Any] | None = None,
    metric: str = "teacher_forced",
    batch_size: int = 16,
    quiet: bool = False,
    max_new_tokens: int | None = None,
    roles: Mapping[str, str] | None = None,
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """Score every skill with the bare model and with each intervention, with intervals.

    Args:
        model: a TransformerBridge or HookedTransformer.
        skills: held-out skills to score (never the probe texts the interventions were fit on):
            a Skill, a list (named by ``Skill.name``) or a dict ``{name: Skill}``.
        interventions: ``{method name: intervention}``; each has ``hooks()`` and may have
            ``detect``, or applies by editing weights (``apply_to_weights``).
        metric: ``"teacher_forced"`` (default) or ``"generation"``.
        batch_size: examples per forward pass.
        quiet: hide progress bars.
        max_new_tokens: generation budget (default per protocol).
        roles: ``{skill name: "forget" | "retain" | "general"}`` (default: no role).
        n_boot: bootstrap resamples for the intervals.
        seed: seed of the bootstrap.
        level: coverage of the intervals.

    Returns:
        One row per skill x method (``"base"`` first): ``skill, role, method, kind, params,
        score, score_low, score_high, relative, relative_low, relative_high, chance,
        informative, nll, abstention_rate, n, metric``. ``relative`` = score / the base score
        of the skill; ``*_low``/``*_high`` the paired-bootstrap interval; ``informative``
        whether the base score's interval lies above ``chance``.

    Example:
        >>> forget_fit, forget_test = forget.split(0.5)   # fit on one half, score the other
        >>> ksd = mu.KeySpaceDetector(h=2.0).fit(mu.collect_keys(model, forget_fit, quiet=True))
        >>> table = mu.evaluate(model, [forget_test, retain], {"KSD": ksd},
        ...                     roles={"add": "forget", "copy": "retain"}, quiet=True)
        >>> table.shape, list(table["method"])         # a row per skill x method
        ((4, 17), ['base', 'KSD', 'base', 'KSD'])
        >>> mu.relative_table(table)                   # score after / score before
        method  base  KSD
        skill
        add      1.0  0.0
        copy     1.0  1.0
    """
    check_model(model)
    check_choice(metric, METRICS, "metric")
    check_batching(batch_size)
    check_int("n_boot", n_boot, min_val=1)
    check_probability("level", level)
    named = _as_skills(skills)
    roles = _checked_roles(roles, named)
    methods, detectors = _checked_methods(model, interventions)
    key_layers = sorted({layer for iv in detectors.values() for layer in iv.key_layers()})
    rows = []
    bar = tqdm(
        total=len(named) * len(methods), desc="evaluate",
        disable=quiet or not distributed.is_main(),
    )  # fmt: skip
    for skill_name, skill in named.items():
        base: ExampleScores | None = None
        keys = None
        for method, iv in methods.items():
            bar.set_postfix_str(f"{skill_name} / {method}")
            if method == BASE and metric == "teacher_forced":
                s, values = score_pass(model, skill, [], batch_size, True, key_layers)
                if values is not None:
                    keys = KeyVectors(values, key_layers, {"skill": skill.name})
            elif method != BASE and not _changes_outputs(iv):
                watched = keys if method in detectors else None
                s = watched_scores(model, skill, iv, base, watched, batch_size)
            else:
                s = score_skill(model, skill, iv, metric, batch_size, True, max_new_tokens)
            if method == BASE:
                base = s
            rows.append(
                _row(skill_name, roles.get(skill_name), method, iv, s, base, len(skill), metric,
                     n_boot, seed, level)
            )  # fmt: skip
            bar.update()
        _add_chance(rows, skill_name, chance_level(model, skill, metric))
    bar.close()
    columns = [
        "skill", "role", "method", "kind", "params", "score", "score_low", "score_high",
        "relative", "relative_low", "relative_high", "chance", "informative", "nll",
        "abstention_rate", "n", "metric",
    ]  # fmt: skip
    return pd.DataFrame(rows)[columns]


def _checked_roles(roles: Mapping[str, str] | None, named: Mapping[str, Skill]) -> dict[str, str]:
    """:func:`evaluate`'s ``roles``, each naming one of the skills and a known role."""
    roles = dict(roles or {})
    for name, role in roles.items():
        if name not in named:
            raise ValueError(f"roles names {name!r}, which is not among the skills {list(named)}.")
        check_choice(role, ROLES, f"role of {name!r}")
    return roles


def _checked_methods(
    model, interventions: Mapping[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Detector]]:
    """The methods to score, ``{name: intervention}`` with the bare model first (``BASE``:
    None), and the detectors among them, ``{name: detector}``; each intervention checked.

    Detectors only watch: each is scored as the bare model with its abstentions zeroed, from
    key vectors read during the bare pass.
    """
    interventions = dict(interventions or {})
    if BASE in interventions:
        raise ValueError(f"{BASE!r} names the bare model: give the intervention another name.")
    for name, iv in interventions.items():
        _check_intervention(name, iv)
    detectors = {
        m: iv
        for m, iv in interventions.items()
        if isinstance(iv, Detector) and iv.key_layers() is not None
    }
    for iv in detectors.values():
        iv.check_model(model)
    return {BASE: None, **interventions}, detectors


def watched_scores(
    model,
    skill: Skill,
    intervention: Detector,
    base: ExampleScores,
    keys: KeyVectors | None = None,
    batch_size: int = 16,
) -> ExampleScores:
    """The scores of a detector, which only watches (abstains, output unchanged): the bare
    model's per-example scores ``base`` with the examples it abstains on zeroed.

    Args:
        model: the model.
        skill: the skill ``base`` scored.
        intervention: the detector.
        base: the bare model's scores of ``skill`` (:func:`teacher_forced` without
            intervention).
        keys: the skill's key vectors at the detector's layers (last prompt token, e.g. read
            during the bare pass): abstentions from them without a model run; None: from a
            detection pass of the detector's own.
        batch_size: examples per forward pass of that detection pass.

    Example:
        >>> bare = teacher_forced(model, forget)
        >>> watched = watched_scores(model, forget, ksd, bare)
        >>> watched.score == teacher_forced(model, forget, ksd).score
        True
    """
    if keys is not None:
        abstained = intervention.detect_keys(keys).detected.cpu().numpy().astype(bool)
    else:
        abstained = abstentions(model, intervention, skill.prompts, batch_size)
    if len(abstained) != len(base.correct):
        raise ValueError(
            f"base scores {len(base.correct)} examples but the detector decided on "
            f"{len(abstained)}: give the bare scores of the same skill."
        )
    return replace(base, abstained=abstained)


def _row(
    skill_name: str,
    role: str | None,
    method: str,
    iv: Any,
    s: ExampleScores,
    base: ExampleScores,
    n: int,
    metric: str,
    n_boot: int,
    seed: int,
    level: float,
) -> dict[str, Any]:
    """One row of :func:`evaluate`'s table (``chance`` and ``informative`` come later, from
    :func:`_add_chance`)."""
    kind, params = _describe(iv)
    low, high = ratio_interval(s.counted, s.total, n_boot, seed, level)
    rel_low, rel_high = paired_ratio_interval(
        s.counted, base.counted, base.total, n_boot, seed, level
    )
    return {
        "skill": skill_name,
        "role": role,
        "method": method,
        "kind": kind,
        "params": params,
        "score": s.score,
        "score_low": low,
        "score_high": high,
        "relative": s.score / base.score if base.score else math.nan,
        "relative_low": rel_low,
        "relative_high": rel_high,
        "nll": s.mean_nll,
        "abstention_rate": float(s.abstained.mean()),
        "n": n,
        "metric": metric,
    }


def _add_chance(rows: list[dict[str, Any]], skill_name: str, chance: float) -> None:
    """Add the skill's chance level to its rows, and whether its base score's interval lies
    above it (``informative``)."""
    for row in rows:
        if row["skill"] == skill_name:
            row["chance"] = chance
            base_low = next(
                r["score_low"] for r in rows if r["skill"] == skill_name and r["method"] == BASE
            )
            row["informative"] = bool(base_low > chance)


def relative_table(results: pd.DataFrame, interval: bool = False) -> pd.DataFrame:
    """Skills as rows, methods as columns, relative performance as values.

    Args:
        results: a table from :func:`evaluate`.
        interval: cells as text ``"0.55 [0.41, 0.68]"`` instead of numbers.

    Raises:
        ValueError: not a table from :func:`evaluate` (columns missing), an empty one, or one
            with several rows for a skill and method (tables of several seeds stacked: pass
            one at a time, or average them first).

    Example:
        >>> table = mu.evaluate(model, [forget, retain], {"KSD": ksd}, quiet=True)
        >>> relative_table(table, interval=True)   # after / before [95 % paired bootstrap]
        method               base                KSD
        skill
        add     1.00 [1.00, 1.00]  0.00 [0.00, 0.00]
        copy    1.00 [1.00, 1.00]  1.00 [1.00, 1.00]
    """
    needed = {"skill", "method", "relative"} | (
        {"relative_low", "relative_high"} if interval else set()
    )
    missing = sorted(needed - set(results.columns))
    if missing or results.empty:
        raise ValueError(
            f"relative_table needs a non-empty table from mu.evaluate(...) (missing columns: "
            f"{missing or 'none, but it has no rows'})."
        )
    repeated = results.duplicated(["skill", "method"], keep=False)
    if repeated.any():
        first = results.loc[repeated].iloc[0]
        count = int(
            ((results["skill"] == first["skill"]) & (results["method"] == first["method"])).sum()
        )
        raise ValueError(
            f"relative_table got {count} rows for skill {first['skill']!r} and method "
            f"{first['method']!r} (tables of several seeds or runs stacked): pass one seed's "
            "table at a time, or average first, e.g. results.groupby(['skill', 'method'], "
            "as_index=False)['relative'].mean()."
        )
    order = list(dict.fromkeys(results["method"]))
    skills = list(dict.fromkeys(results["skill"]))
    if interval:
        cells = results.assign(
            cell=[
                format_interval(r, lo, hi)
                for r, lo, hi in zip(
                    results["relative"],
                    results["relative_low"],
                    results["relative_high"],
                    strict=True,
                )
            ]
        )
        table = cells.pivot(index="skill", columns="method", values="cell")
    else:
        table = results.pivot(index="skill", columns="method", values="relative")
    return table.loc[skills, [m for m in order if m in table.columns]]


def format_interval(value: float, low: float, high: float, digits: int = 2) -> str:
    """``"0.55 [0.41, 0.68]"`` (``"—"`` for NaN)."""
    if value is None or not np.isfinite(value):
        return "—"
    if not (np.isfinite(low) and np.isfinite(high)):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


__all__ = [
    "BASE",
    "ExampleScores",
    "ROLES",
    "applied",
    "chance_level",
    "choice_tokens",
    "evaluate",
    "format_interval",
    "gsm8k_correct",
    "protocol",
    "relative_table",
    "run_tests",
    "score_skill",
    "teacher_forced",
    "watched_scores",
]
