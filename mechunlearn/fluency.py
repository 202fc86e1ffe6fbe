"""Fluency: what an unlearned model writes on general prompts, beside what it still scores.

Teacher-forced accuracy says whether the model still predicts a skill's reference answers; it
does not say whether the model still writes sensible text (unlearning by gradient ascent is
known to leave "gibberish"; open-unlearning reports a gibberish rate, and its users ask for a
fluency score). Two measures of the greedy continuations of general prompts, with the method
applied as its kind says (hooks, a weight edit, or a detector that answers or abstains):

* **perplexity under the base model**: ``exp`` of the base model's mean negative log-likelihood
  of the continuation's tokens given the prompt (no intervention while scoring). Text the base
  model finds likely reads as fluent to it; a low value can also mean dull repetition, hence:
* **repeated n-grams**: the share of the continuation's token n-grams (n = 3) that repeat an
  earlier one (``1 - unique / total``): 0 for text without repetition, near 1 for a loop.

Example:
    >>> table = fluency_table(model, ["The sun is", "My favourite food is"], {"NA": na},
    ...                       max_new_tokens=8)
    >>> list(table.index), list(table.columns)[:2]
    (['base', 'NA'], ['perplexity', 'repeated_ngrams'])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .batching import check_batching
from .data import Example, Skill
from .evaluation import BASE, applied
from .generation import greedy_generate
from .interventions.base import Detector
from .models import check_model
from .scoring import score_pass
from .validation import check_int, check_texts

__all__ = ["Fluency", "fluency", "fluency_table", "repeated_ngram_share"]


@dataclass
class Fluency:
    """Per-prompt fluency of one model state.

    Attributes:
        texts: each prompt's continuation (a detector's refusal where it abstained).
        nll: per prompt, the base model's summed NLL of the continuation's tokens.
        tokens: per prompt, the continuation's token count as the base model reads it.
        repeated: per prompt, the share of repeated token n-grams (NaN when the continuation
            has fewer than ``n`` tokens).
    """

    texts: list[str]
    nll: np.ndarray
    tokens: np.ndarray
    repeated: np.ndarray

    @property
    def perplexity(self) -> float:
        """``exp`` of the mean NLL per continuation token, pooled over prompts."""
        total = self.tokens.sum()
        return float(math.exp(self.nll[self.tokens > 0].sum() / total)) if total else math.nan

    @property
    def repeated_ngrams(self) -> float:
        """Mean share of repeated n-grams over the prompts whose continuation has any."""
        values = self.repeated[np.isfinite(self.repeated)]
        return float(values.mean()) if len(values) else math.nan


def repeated_ngram_share(ids: Sequence[int], n: int = 3) -> float:
    """``1 - unique / total`` over the ``n``-grams of ``ids`` (NaN for fewer than ``n`` ids).

    Example:
        >>> repeated_ngram_share([1, 2, 3, 1, 2, 3, 1, 2, 3])   # 7 trigrams, 3 unique
        0.5714285714285714
        >>> repeated_ngram_share([1, 2, 3, 4])
        0.0
    """
    check_int("n", n, min_val=1)
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else math.nan


def fluency(
    model,
    prompts: Sequence[str],
    intervention: Any = None,
    max_new_tokens: int = 32,
    n: int = 3,
    batch_size: int = 8,
) -> Fluency:
    """Greedy continuations of ``prompts`` with ``intervention`` applied, scored by the bare
    model (perplexity) and for repetition (n-grams of the continuation's tokens).

    Args:
        model: the model (left unchanged: hooks are removed, weight edits undone).
        prompts: general prompts (not the forget skill's).
        intervention: a fitted method, or None for the bare model.
        max_new_tokens: continuation length (greedy; cut at the first end-of-sequence token).
        n: the n of the repeated n-grams.
        batch_size: prompts per generation call and per scoring pass.

    Returns:
        A :class:`Fluency`.

    Example:
        >>> f = fluency(model, ["The sun is", "copy a:"], max_new_tokens=6)
        >>> len(f.texts), f.perplexity > 1, 0 <= f.repeated_ngrams <= 1
        (2, True, True)
    """
    check_model(model)
    prompts = check_texts(prompts, "prompts")
    check_int("max_new_tokens", max_new_tokens, min_val=1)
    check_batching(batch_size)
    if isinstance(intervention, Detector):
        texts = intervention.generate(model, prompts, max_new_tokens, batch_size=batch_size)
    else:
        with applied(model, intervention) as hooks:
            texts = greedy_generate(model, prompts, max_new_tokens, hooks, batch_size)
    tokenizer = model.tokenizer
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    repeated = np.array([repeated_ngram_share(i, n) for i in ids], dtype=float)
    nll = np.zeros(len(texts))
    tokens = np.zeros(len(texts))
    scored = [j for j, i in enumerate(ids) if i]
    if scored:
        skill = Skill("fluency", [Example(prompts[j], texts[j]) for j in scored])
        result, _ = score_pass(model, skill, [], batch_size, quiet=True)
        nll[scored] = np.nan_to_num(result.nll, nan=0.0)
        tokens[scored] = result.total
    return Fluency(list(texts), nll, tokens, repeated)


def fluency_table(
    model,
    prompts: Sequence[str],
    interventions: Mapping[str, Any],
    max_new_tokens: int = 32,
    n: int = 3,
    batch_size: int = 8,
) -> pd.DataFrame:
    """:func:`fluency` of the bare model and of each method, one row each.

    Returns:
        Rows ``base`` and each method's name; columns ``perplexity`` (under the base model),
        ``repeated_ngrams``, ``perplexity_ratio`` and ``repeated_ngrams_diff`` (the method's
        against the bare model's).
    """
    if BASE in interventions:
        raise ValueError(f"{BASE!r} names the bare model: give the intervention another name.")
    rows = {}
    for name, iv in {BASE: None, **interventions}.items():
        f = fluency(model, prompts, iv, max_new_tokens, n, batch_size)
        rows[name] = {"perplexity": f.perplexity, "repeated_ngrams": f.repeated_ngrams}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table["perplexity_ratio"] = table["perplexity"] / table.loc[BASE, "perplexity"]
    table["repeated_ngrams_diff"] = table["repeated_ngrams"] - table.loc[BASE, "repeated_ngrams"]
    return table
