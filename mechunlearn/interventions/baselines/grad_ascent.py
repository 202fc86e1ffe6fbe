"""Gradient Ascent (GA): maximise the forget skill's answer loss.

The oldest unlearning baseline (Jang et al., 2023; ``GradAscent`` in open-unlearning,
``src/trainer/unlearn/grad_ascent.py``): minimise

    loss = -L_F

where ``L_F`` is the mean next-token cross-entropy of one forget batch's answer tokens
(:func:`~mechunlearn.interventions.training.mean_answer_loss`, prompt tokens not scored, as in
open-unlearning's labels). Nothing holds the retain skill in place; the retain loss ``L_R`` of
one retain batch per step is measured (without gradient) and logged only.

Training runs through the loop SIMU uses (:func:`~mechunlearn.interventions.training.train`)
with torch's AdamW. See :class:`GradAscent` for the defaults and where they come from.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from jaxtyping import Float
from torch import Tensor

from ...batching import EncodedBatch
from ..registry import register_method
from ..training import LossPart, mean_answer_loss, sum_parts
from .common import ForgetLossBaseline

__all__ = ["GradAscent", "grad_ascent_loss"]


def grad_ascent_loss(
    model, batch_f: EncodedBatch, batch_r: EncodedBatch, *, parts: bool = False
) -> tuple[Float[Tensor, ""], dict[str, Tensor]] | Iterator[LossPart]:
    """GA's loss ``-L_F`` of one step, and the logged terms (``L_R`` without gradient).

    With ``parts``, the loss as the training loop takes it
    (:data:`~mechunlearn.interventions.training.LossFn`): ``-L_F``, then a part that only logs
    ``L_R`` (computed without a graph).

    Example:
        >>> from mechunlearn.batching import iter_batches
        >>> batch_f = next(iter(iter_batches(model, forget.prompts, forget.answers)))
        >>> batch_r = next(iter(iter_batches(model, retain.prompts, retain.answers)))
        >>> loss, terms = grad_ascent_loss(model, batch_f, batch_r)
        >>> bool(loss == -terms["forget_loss"]), sorted(terms)
        (True, ['forget_loss', 'loss', 'retain_loss'])
    """

    def generate() -> Iterator[LossPart]:
        loss_f = mean_answer_loss(model, batch_f)
        yield -loss_f, {"forget_loss": loss_f}
        with torch.no_grad():
            loss_r = mean_answer_loss(model, batch_r)
        yield loss_r.new_zeros(()), {"retain_loss": loss_r}

    return generate() if parts else sum_parts(generate())


@register_method("GA", fits_on="model")
class GradAscent(ForgetLossBaseline):
    """Gradient Ascent baseline: minimise ``-L_F`` by AdamW (module docstring).

    Its settings, their defaults and its fitted attributes are those of every
    :class:`~.common.ForgetLossBaseline`: open-unlearning's ``GradAscent`` with its TOFU
    fine-tuning arguments (every parameter trained, AdamW), the learning rate and the bounded
    number of steps scaled to the 135M default model, and SIMU's early stop
    (``forget_loss_factor=3``; open-unlearning has none, and unchecked ascent destroys the
    model).

    Example:
        >>> ga = mu.GradAscent(max_steps=3, lr=1e-3).fit(model, forget, retain, quiet=True)
        >>> ga.n_updates_, sorted(ga.history_[0])
        (3, ['forget_loss', 'forget_loss_initial', 'loss', 'retain_loss'])
        >>> base = model(tokens)
        >>> with ga.apply_to_weights(model):
        ...     edited = model(tokens)
        >>> torch.equal(model(tokens), base), torch.equal(edited, base)
        (True, False)
    """

    _label = "GA"

    def _objective(self, model, items_f, items_r):
        _, early = self._forget_reference(model, items_f)
        return (lambda f, r: grad_ascent_loss(model, f, r, parts=True)), early
