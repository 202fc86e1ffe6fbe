"""Skill scores before and after an intervention, and the relative-performance table.

Two metric families (METHODS.md §5):

* ``metric="teacher_forced"`` (default): top-1 next-token accuracy on the reference answer's
  tokens given the prompt, pooled over every answer token of the skill, and the mean negative
  log-likelihood of those tokens. The metric of the Selective Pruning paper, and the one that
  means something for small models, which cannot solve GSM8K or MBPP.
* ``metric="generation"``: the paper's protocols, chosen from the skill's name:
  GSM8K 8-shot chain of thought, the number after "The answer is"; MBPP and HumanEval pass@1,
  the task's tests run in a subprocess with a time limit; XQuAD/MLQA, the gold answer is a
  substring of a greedy 24-token answer; MMLU 5-shot, the letter with the highest logit.

An intervention that abstains (it has a ``detect(model, prompts)`` method, like
:class:`~mechunlearn.interventions.KeySpaceDetector`) scores 0 on each abstained example:
its answer tokens count as wrong, and abstained examples are left out of the NLL (reported
with the abstention rate beside it). Relative performance is ``score after / score before``.

A detector's hooks only watch (``changes_outputs = False``): every prompt it lets through gets
the bare model's answer. :func:`evaluate` therefore scores it as the bare model's per-example
results with its abstentions zeroed, at the cost of one prompt-only detection pass (one pass in
all, collecting the key vectors, when several detectors are compared).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .collect import collect_keys
from .data import Skill, gsm8k_few_shot_prompts, mmlu_few_shot_prompts
from .sites import iter_batches, tokenize_examples

METRICS = ("teacher_forced", "generation")
BASE = "base"


@dataclass
class ExampleScores:
    """Per-example results of one skill under one method.

    Attributes:
        correct: per example, answer tokens predicted right (teacher-forced) or 1/0
            (generation).
        total: per example, answer tokens (teacher-forced) or 1 (generation).
        nll: per example, summed NLL of the answer tokens (teacher-forced; NaN otherwise).
        abstained: per example, whether the method abstained.
    """

    correct: np.ndarray
    total: np.ndarray
    nll: np.ndarray
    abstained: np.ndarray

    @property
    def score(self) -> float:
        """Pooled accuracy; abstained examples count as wrong."""
        correct = np.where(self.abstained, 0, self.correct)
        return float(correct.sum() / self.total.sum()) if self.total.sum() else math.nan

    @property
    def mean_nll(self) -> float:
        """Mean NLL per answer token over the examples that were answered."""
        keep = ~self.abstained & np.isfinite(self.nll)
        tokens = self.total[keep].sum()
        return float(self.nll[keep].sum() / tokens) if tokens else math.nan


def _as_skills(skills: Skill | Sequence[Skill] | Mapping[str, Skill]) -> dict[str, Skill]:
    if isinstance(skills, Skill):
        skills = [skills]
    if isinstance(skills, Mapping):
        out = dict(skills)
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


def abstentions(model, intervention, prompts: Sequence[str], batch_size: int = 16) -> np.ndarray:
    """Which prompts ``intervention`` abstains on (all False for one that never abstains)."""
    if intervention is None or not hasattr(intervention, "detect"):
        return np.zeros(len(prompts), dtype=bool)
    detection = intervention.detect(model, list(prompts), batch_size=batch_size)
    return detection.detected.cpu().numpy().astype(bool)


def _changes_outputs(intervention) -> bool:
    return intervention is not None and getattr(intervention, "changes_outputs", True)


def _hooks(intervention, model) -> list:
    if not _changes_outputs(intervention):
        return []  # nothing, or hooks that only watch: the bare forward gives the same scores
    return list(intervention.hooks(model))


def choice_tokens(model, skill: Skill) -> tuple[int, list[int]] | None:
    """Where a multiple-choice skill's answer letter is decided, and by which tokens.

    A skill is multiple-choice when every example has ``meta["choices"]`` and ``meta["label"]``
    (MMLU's do) and its answers are the label's letter (``" B"``). The letters' answers are
    tokenised after the first prompt; the first answer token at which they all differ is the
    letter token (the first one for real tokenizers, the second for a character-level one that
    splits off the space).

    Returns:
        ``(offset, ids)``: the letter token's index within the answer, and each letter's token
        id there; None when the skill is not multiple-choice.
    """
    if not all("choices" in ex.meta and "label" in ex.meta for ex in skill):
        return None
    first = skill[0]
    letters = "ABCDEFGHIJ"[: len(first.meta["choices"])]
    letter = letters[int(first.meta["label"])]
    if not first.answer.endswith(letter):
        return None
    answers = [first.answer[: -len(letter)] + c for c in letters]
    items = tokenize_examples(model, [first.prompt] * len(letters), answers)
    tails = [ids[n_head:] for ids, n_head in items]
    for offset in range(min(len(t) for t in tails)):
        ids = [t[offset] for t in tails]
        if len(set(ids)) == len(ids):
            return offset, ids
    return None


def teacher_forced(
    model, skill: Skill, intervention=None, batch_size: int = 16, quiet: bool = True
) -> ExampleScores:
    """Top-1 accuracy and NLL of the reference answer tokens given each prompt.

    Every answer token counts: correct when it is the argmax over the vocabulary at the
    position before it. A multiple-choice skill (MMLU) is scored on its letter instead: correct
    when the answer letter has the highest logit among the choice letters (zero-shot letter
    accuracy; a 135M model rarely puts a letter first over the whole vocabulary), with the NLL
    of that letter token.

    Example:
        >>> s = teacher_forced(model, mu.load_skill("gsm8k", n=50))
        >>> s.score, s.mean_nll
    """
    n = len(skill)
    correct, total = np.zeros(n), np.zeros(n)
    nll = np.full(n, math.nan)
    abstained = abstentions(model, intervention, skill.prompts, batch_size)
    hooks = _hooks(intervention, model)
    choices = choice_tokens(model, skill)
    bar = tqdm(total=n, desc=f"score {skill.name}", unit="ex", disable=quiet, leave=False)
    with torch.inference_mode():
        for batch in iter_batches(model, skill.prompts, skill.answers, batch_size=batch_size):
            logits = model.run_with_hooks(
                batch.tokens, fwd_hooks=hooks, attention_mask=batch.attention_mask
            )
            # Position p predicts token p + 1: score answer tokens from the position before.
            mask = batch.answer_mask[:, 1:]
            if choices is not None:  # the letter token only
                mask = mask & (mask.cumsum(1) == choices[0] + 1)
            row, pos = mask.nonzero(as_tuple=True)
            scored = logits[row, pos].double()  # [answer tokens, vocab], nothing else
            target = batch.tokens[row, pos + 1]
            tok_nll = -scored.log_softmax(-1).gather(-1, target[:, None]).squeeze(-1)
            if choices is None:
                hit = scored.argmax(-1) == target
            else:
                letters = torch.tensor(choices[1], device=scored.device)
                hit = letters[scored[:, letters].argmax(-1)] == target
            b = len(batch.tokens)
            per_row = torch.zeros((3, b), dtype=torch.float64, device=scored.device)
            per_row[0].index_add_(0, row, hit.double())
            per_row[1].index_add_(0, row, torch.ones_like(tok_nll))
            per_row[2].index_add_(0, row, tok_nll)
            rows = batch.example_index.cpu().numpy()
            correct[rows], total[rows], nll[rows] = per_row.cpu().numpy()
            bar.update(len(rows))
    bar.close()
    if total.sum() == 0:
        raise ValueError(
            f"Skill {skill.name!r} has no answer tokens: teacher-forced scoring needs answers."
        )
    return ExampleScores(correct, total, nll, abstained)


# ----------------------------------------------------------------------------- generation
def protocol(skill: Skill) -> str:
    """The generation protocol for a skill, from its name (``gsm8k``, ``mmlu:...``, ...)."""
    base = skill.name.split(":")[0].split("[")[0].lower()
    if base in ("gsm8k", "mbpp", "humaneval", "mmlu", "xquad", "mlqa"):
        return base
    raise ValueError(
        f"No generation protocol for skill {skill.name!r}: generation scoring knows gsm8k, "
        "mbpp, humaneval, mmlu, xquad and mlqa. Use metric='teacher_forced' for other skills."
    )


def greedy_generate(
    model,
    prompts: Sequence[str],
    max_new_tokens: int,
    fwd_hooks: Sequence = (),
    batch_size: int = 8,
) -> list[str]:
    """Greedy continuations of ``prompts`` (text after the prompt), hooks attached throughout."""
    out: list[str] = []
    with torch.inference_mode(), model.hooks(fwd_hooks=list(fwd_hooks)):
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            tokens = model.generate(
                chunk if len(chunk) > 1 else chunk[0],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                return_type="tokens",
                padding_side="left",
                verbose=False,
            )
            width = model.to_tokens(chunk, padding_side="left").shape[1]
            new = tokens[:, width:] if tokens.ndim == 2 else tokens[width:].unsqueeze(0)
            out.extend(model.tokenizer.batch_decode(new, skip_special_tokens=True))
    return out


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
    hooks = _hooks(intervention, model)
    examples = [skill[int(i)] for i in keep]
    sub = Skill(skill.name, examples, skill.source) if examples else None
    if sub is not None and kind == "mmlu":
        prompts = mmlu_few_shot_prompts(sub)
        choices = choice_tokens(model, sub)
        if choices is None or choices[0] != 0:
            raise ValueError(
                f"MMLU 5-shot scoring of {skill.name!r} needs examples with choices and a "
                "label, and a tokenizer whose letter answers (' A', ' B', ...) begin with "
                "distinct tokens."
            )
        letters = choices[1]
        with torch.inference_mode():
            batches = iter_batches(model, prompts, None, batch_size=batch_size)
            for batch in batches:
                logits = model.run_with_hooks(
                    batch.tokens, fwd_hooks=hooks, attention_mask=batch.attention_mask
                )
                rows = torch.arange(len(batch.tokens), device=logits.device)
                last = logits[rows, batch.last_prompt][:, letters].argmax(-1).cpu().numpy()
                for j, ex_i in enumerate(batch.example_index.cpu().numpy()):
                    correct[keep[ex_i]] = float(last[j] == int(examples[ex_i].meta["label"]))
    elif sub is not None:
        if kind == "gsm8k":
            prompts, budget = gsm8k_few_shot_prompts(sub), max_new_tokens or 256
        elif kind in ("xquad", "mlqa"):
            prompts, budget = sub.prompts, max_new_tokens or 24
        else:
            prompts, budget = sub.prompts, max_new_tokens or 256
        texts = greedy_generate(model, prompts, budget, hooks, batch_size=max(1, batch_size // 2))
        for j, (ex, text) in enumerate(
            tqdm(
                list(zip(examples, texts, strict=True)),
                desc=f"check {skill.name}",
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
    return ExampleScores(correct, np.ones(n), np.full(n, math.nan), abstained)


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
    if metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}. Choose one of {list(METRICS)}.")
    if metric == "teacher_forced":
        return teacher_forced(model, skill, intervention, batch_size, quiet)
    return _generation_scores(model, skill, intervention, batch_size, quiet, max_new_tokens)


def evaluate(
    model,
    skills: Skill | Sequence[Skill] | Mapping[str, Skill],
    interventions: Mapping[str, Any] | None = None,
    metric: str = "teacher_forced",
    batch_size: int = 16,
    quiet: bool = False,
    max_new_tokens: int | None = None,
) -> pd.DataFrame:
    """Score every skill with the bare model and with each intervention.

    Args:
        model: a TransformerBridge or HookedTransformer.
        skills: held-out skills to score (never the probe texts the interventions were fit on).
        interventions: ``{name: intervention}``; each has ``hooks()`` and may have ``detect``.
        metric: ``"teacher_forced"`` (default) or ``"generation"``.
        batch_size: examples per forward pass.
        quiet: hide progress bars.
        max_new_tokens: generation budget (default per protocol).

    Returns:
        One row per skill x method (``"base"`` first): ``skill, method, score, relative,
        nll, abstention_rate, n, metric``. ``relative`` = score / the base score of the skill.

    Example:
        >>> table = mu.evaluate(model, [forget_test, retain_test], {"NA": na, "KSD": ksd})
        >>> table.pivot(index="skill", columns="method", values="relative")
    """
    named = _as_skills(skills)
    methods: dict[str, Any] = {BASE: None, **dict(interventions or {})}
    if BASE in (interventions or {}):
        raise ValueError(f"{BASE!r} names the bare model: give the intervention another name.")
    # Detectors only watch: each is scored as the bare model with its abstentions zeroed.
    # Several of them share one pass that collects the key vectors they all read.
    detectors = {
        m: iv
        for m, iv in methods.items()
        if m != BASE and not _changes_outputs(iv) and hasattr(iv, "detect_keys")
    }
    for iv in detectors.values():
        iv.check_model(model)
    key_layers = sorted({layer for iv in detectors.values() for layer in iv.layers_})
    rows = []
    bar = tqdm(total=len(named) * len(methods), desc="evaluate", disable=quiet)
    for skill_name, skill in named.items():
        base = base_score = None
        keys = None
        if len(detectors) > 1:
            keys = collect_keys(model, skill, key_layers, batch_size=batch_size, quiet=True)
        for method, iv in methods.items():
            bar.set_postfix_str(f"{skill_name} / {method}")
            if method != BASE and not _changes_outputs(iv):
                if keys is not None and method in detectors:
                    abstained = iv.detect_keys(keys).detected.cpu().numpy().astype(bool)
                else:
                    abstained = abstentions(model, iv, skill.prompts, batch_size)
                s = replace(base, abstained=abstained)
            else:
                s = score_skill(model, skill, iv, metric, batch_size, True, max_new_tokens)
            if method == BASE:
                base, base_score = s, s.score
            rel = s.score / base_score if base_score else math.nan
            rows.append(
                {
                    "skill": skill_name,
                    "method": method,
                    "score": s.score,
                    "relative": rel,
                    "nll": s.mean_nll,
                    "abstention_rate": float(s.abstained.mean()),
                    "n": len(skill),
                    "metric": metric,
                }
            )
            bar.update()
    bar.close()
    return pd.DataFrame(rows)


def relative_table(results: pd.DataFrame) -> pd.DataFrame:
    """Skills as rows, methods as columns, relative performance as values."""
    table = results.pivot(index="skill", columns="method", values="relative")
    order = [m for m in dict.fromkeys(results["method"]) if m in table.columns]
    return table[order]


__all__ = [
    "ExampleScores",
    "choice_tokens",
    "evaluate",
    "greedy_generate",
    "gsm8k_correct",
    "protocol",
    "relative_table",
    "run_tests",
    "score_skill",
    "teacher_forced",
]
