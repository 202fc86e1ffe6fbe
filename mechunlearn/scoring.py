"""Teacher-forced scoring: one pass over a skill with any hooks attached, per-example results.

A pass stops at the final residual stream and unembeds only the positions that are scored
(soft-capping the logits where the model does, as Gemma 2's forward does), turning them into
float64 for the log-softmax a few rows at a time (:data:`SCORE_CHUNK_VALUES`, so memory does not
grow with the vocabulary times the answer tokens; the scores are the same bit for bit).

The scoring core that :mod:`mechunlearn.evaluation` (scores, intervals, tables) and the
methods that choose a setting on held-back examples (LUNAR's layer sweep) share. It takes
hooks, not interventions: :func:`mechunlearn.evaluation.teacher_forced` applies an
intervention as its kind says and calls :func:`score_pass`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import distributed
from .batching import EncodedBatch, tokenize_examples
from .collect import run_pass
from .data import Skill
from .models import model_device
from .sites import hook_name

__all__ = ["ExampleScores", "choice_tokens", "score_pass"]


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
    def counted(self) -> np.ndarray:
        """Per example, the correct count with abstentions zeroed."""
        return np.where(self.abstained, 0.0, self.correct)

    @property
    def score(self) -> float:
        """Pooled accuracy; abstained examples count as wrong."""
        return float(self.counted.sum() / self.total.sum()) if self.total.sum() else math.nan

    @property
    def mean_nll(self) -> float:
        """Mean NLL per answer token over the examples that were answered."""
        keep = ~self.abstained & np.isfinite(self.nll)
        tokens = self.total[keep].sum()
        return float(self.nll[keep].sum() / tokens) if tokens else math.nan


def _final_site(model) -> str | None:
    """The hook point that holds the final residual stream just before the unembedding."""
    hook_dict = getattr(model, "hook_dict", {})
    for name in ("unembed.hook_in", "ln_final.hook_normalized"):
        if name in hook_dict:
            return name
    return None


def _unembed(model, resid: torch.Tensor) -> torch.Tensor:
    """Logits of final-residual rows ``[n, d_model] -> [n, vocab]``, as the model's forward
    gives them: soft-capped where the model caps its output logits (Gemma 2's
    ``final_logit_softcapping``, ``cfg.output_logits_soft_cap``: ``cap * tanh(logits / cap)``),
    which the model's forward does after its unembedding."""
    logits = model.unembed(resid.unsqueeze(0)).squeeze(0)
    cap = float(getattr(model.cfg, "output_logits_soft_cap", 0.0) or 0.0)
    if cap > 0.0:
        logits = cap * torch.tanh(logits / cap)
    return logits


#: Logits turned into float64 at a time by the scoring (``2**22`` values: 32 MiB): at Gemma's
#: vocabulary of 262,144, 16 answer tokens per chunk instead of every answer token of a batch.
SCORE_CHUNK_VALUES = 1 << 22


def _score_rows(
    logits: torch.Tensor, target: torch.Tensor, letters: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``logits`` ``[n, vocab]`` (model dtype): the float64 NLL of ``target`` and
    whether it is the top-1 (among ``letters`` where given).

    Rows go to float64 a chunk of :data:`SCORE_CHUNK_VALUES` values at a time: every operation
    is per row, so the results are those of converting all rows at once, bit for bit, while
    the float64 copies stay a chunk's size whatever the vocabulary.
    """
    n, vocab = logits.shape
    step = max(1, SCORE_CHUNK_VALUES // max(vocab, 1))
    nll = torch.empty(n, dtype=torch.float64, device=logits.device)
    hit = torch.empty(n, dtype=torch.bool, device=logits.device)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        chunk, tgt = logits[rows].double(), target[rows]
        nll[rows] = -chunk.log_softmax(-1).gather(-1, tgt[:, None]).squeeze(-1)
        if letters is None:
            hit[rows] = chunk.argmax(-1) == tgt
        else:
            hit[rows] = letters[chunk[:, letters].argmax(-1)] == tgt
    return nll, hit


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
    if any(ex.meta.get("answer_format", "letter") != "letter" for ex in skill):
        return None  # MMLU's text format: the choice's text is scored token by token
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


def score_pass(
    model,
    skill: Skill,
    fwd_hooks: Sequence,
    batch_size: int,
    quiet: bool,
    key_layers: Sequence[int] = (),
    max_batch_tokens: int | None = 8192,
) -> tuple[ExampleScores, torch.Tensor | None]:
    """One teacher-forced pass over ``skill`` with ``fwd_hooks`` attached (this rank's share,
    summed over ranks): top-1 accuracy and NLL of every answer token given the prompt (a
    multiple-choice skill in letter format: its letter among the choices).

    The pass (:func:`mechunlearn.collect.run_pass`) stops at the final residual stream and
    unembeds only the scored positions.

    Args:
        model: the model.
        skill: the skill to score (prompts and reference answers).
        fwd_hooks: hooks attached during the pass (an intervention's, or none).
        batch_size: examples per forward pass.
        quiet: hide the progress bar.
        key_layers: also read the key vectors at the last prompt token of these layers.
        max_batch_tokens: the most tokens (padding included) per batch.

    Returns:
        The scores (no abstentions) and, when ``key_layers`` are given, the key vectors read
        during the same pass (``[n, layers, d_mlp]``), else None.

    Example:
        >>> scores, keys = score_pass(model, forget, [], 16, True, key_layers=[2])
        >>> len(scores.correct), tuple(keys.shape)
        (30, (30, 1, 48))
    """
    n = len(skill)
    device = model_device(model)
    counts = torch.zeros((3, n), dtype=torch.float64, device=device)  # correct, total, nll
    keys = None
    if key_layers:
        keys = torch.zeros((n, len(key_layers), int(model.cfg.d_mlp)), device=device)
    choices = choice_tokens(model, skill)
    letters = torch.tensor(choices[1], device=device) if choices is not None else None
    final = _final_site(model)
    here: dict[str, torch.Tensor] = {}  # this batch's scored positions and final residuals

    def hooks(batch: EncodedBatch) -> list:
        out = list(fwd_hooks)
        if keys is not None:
            rows = torch.arange(batch.tokens.shape[0], device=device)

            def make_key_hook(col: int):
                def hook(activation, hook=None):
                    keys[batch.example_index, col] = activation[rows, batch.last_prompt].float()
                    return activation

                return hook

            out += [
                (hook_name("key", layer), make_key_hook(c)) for c, layer in enumerate(key_layers)
            ]
        # Position p predicts token p + 1: score answer tokens from the position before.
        mask = batch.answer_mask[:, 1:]
        if choices is not None:  # the letter token only
            mask = mask & (mask.cumsum(1) == choices[0] + 1)
        here["row"], here["pos"] = mask.nonzero(as_tuple=True)
        if final is not None:

            def capture(activation, hook=None):
                here["resid"] = activation[here["row"], here["pos"]]
                return activation

            out.append((final, capture))
        return out

    def score(batch: EncodedBatch, logits: torch.Tensor | None) -> None:
        row, pos = here.pop("row"), here.pop("pos")
        # Stopped at the final residual: unembed the scored rows only; else the full logits.
        scored = _unembed(model, here.pop("resid")) if logits is None else logits[row, pos]
        target = batch.tokens[row, pos + 1]
        tok_nll, hit = _score_rows(scored, target, letters)
        del scored
        g = batch.example_index[row]
        counts[0].index_add_(0, g, hit.double())
        counts[1].index_add_(0, g, torch.ones_like(tok_nll))
        counts[2].index_add_(0, g, tok_nll)

    run_pass(
        model, skill, hooks, final, then=score, batch_size=batch_size,
        max_batch_tokens=max_batch_tokens, shard=True, desc=f"score {skill.name}", quiet=quiet,
    )  # fmt: skip
    counts = distributed.all_reduce_sum(counts).cpu().numpy()
    if keys is not None:
        keys = distributed.all_reduce_sum(keys)
    if counts[1].sum() == 0:
        raise ValueError(
            f"Skill {skill.name!r} has no answer tokens: teacher-forced scoring needs answers."
        )
    nll = np.where(counts[1] > 0, counts[2], math.nan)
    return ExampleScores(counts[0], counts[1], nll, np.zeros(n, dtype=bool)), keys
