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

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ...batching import EncodedBatch
from ...validation import check_layers
from ..registry import register_method
from ..training import mean_answer_loss
from .common import TrainedBaseline

__all__ = ["GradAscent", "grad_ascent_loss"]


def grad_ascent_loss(
    model, batch_f: EncodedBatch, batch_r: EncodedBatch
) -> tuple[Float[Tensor, ""], dict[str, Tensor]]:
    """GA's loss ``-L_F`` of one step, and the logged terms (``L_R`` without gradient).

    Example:
        >>> from mechunlearn.batching import iter_batches
        >>> batch_f = next(iter(iter_batches(model, forget.prompts, forget.answers)))
        >>> batch_r = next(iter(iter_batches(model, retain.prompts, retain.answers)))
        >>> loss, terms = grad_ascent_loss(model, batch_f, batch_r)
        >>> bool(loss == -terms["forget_loss"]), sorted(terms)
        (True, ['forget_loss', 'loss', 'retain_loss'])
    """
    loss_f = mean_answer_loss(model, batch_f)
    with torch.no_grad():
        loss_r = mean_answer_loss(model, batch_r)
    loss = -loss_f
    return loss, {"loss": loss, "forget_loss": loss_f, "retain_loss": loss_r}


@register_method("GA", fits_on="model")
class GradAscent(TrainedBaseline):
    """Gradient Ascent baseline: minimise ``-L_F`` by AdamW (module docstring).

    Defaults (open-unlearning's ``GradAscent`` with its TOFU fine-tuning arguments, AdamW with
    ``weight_decay=0.01``, every parameter trained; the learning rate and the bounded number of
    steps scaled to the 135M default model, see docs/methods.md): ``lr=1e-4``,
    ``weight_decay=0.01``, ``max_steps=30``, ``batch_size=8`` (open-unlearning: 32 per step),
    constant learning rate (no warm-up: the runs are too short for one). Early stop as SIMU's:
    once a step's forget loss reaches ``forget_loss_factor`` (3) times the initial loss of the
    same examples (open-unlearning has none; unchecked ascent destroys the model).

    Args:
        layers: blocks whose parameters (attention, MLP, normalisation) are trained; None (the
            default) trains every parameter of the model, embeddings included, as
            open-unlearning does.
        lr: AdamW's learning rate.
        weight_decay: AdamW's decoupled weight decay.
        max_steps: optimizer steps at most.
        forget_loss_factor: stop once a step's forget loss reaches this multiple (> 1) of the
            initial loss of the same examples; None to always run ``max_steps``.
        batch_size: examples per batch (one forget and one retain batch per step).
        max_length: truncate texts to this many tokens (default: the model's context).
        seed: seed of the batch order.

    Attributes:
        layers_, d_mlp_, meta_, deltas_, history_, n_updates_, stop_reason_: see
            :class:`~.common.TrainedBaseline`.
        forget_loss_initial_: the forget skill's mean answer-token loss before training.

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

    def __init__(
        self,
        layers: int | Sequence[int] | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        max_steps: int = 30,
        forget_loss_factor: float | None = 3.0,
        batch_size: int = 8,
        max_length: int | None = None,
        seed: int = 0,
    ):
        layers = check_layers(layers)
        self._check_training(
            lr, weight_decay, max_steps, batch_size, max_length, seed, forget_loss_factor
        )
        self.layers = layers
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_steps = max_steps
        self.forget_loss_factor = forget_loss_factor
        self.batch_size = batch_size
        self.max_length = max_length
        self.seed = seed

    def _objective(self, model, items_f, items_r):
        _, early = self._forget_reference(model, items_f)
        return (lambda batch_f, batch_r: grad_ascent_loss(model, batch_f, batch_r)), early
