"""Negative Preference Optimization (NPO): a bounded, reference-anchored forget loss.

Zhang, Lin, Bai and Mei, "Negative Preference Optimization: From Catastrophic Collapse to
Effective Unlearning" (COLM 2024; ``NPO`` in open-unlearning, ``src/trainer/unlearn/npo.py``).
With ``log pi(y|x)`` the summed log-probability of a forget example's answer tokens, and the
reference ``pi_ref`` the model before training (frozen), minimise

    L_NPO = -(2 / beta) * mean_examples log sigmoid(-beta * (log pi_theta(y|x) - log pi_ref(y|x)))

plus ``gamma * L_R`` (mean answer-token cross-entropy of a retain batch: open-unlearning's NPO
with ``retain_loss_type: NLL``). At the start the log-ratio is 0 and ``L_NPO = (2 / beta)
log 2``; as ``pi_theta(y|x)`` falls the loss flattens (it is bounded below by 0), which is what
keeps NPO from GA's collapse. As ``beta -> 0`` its gradient tends to GA's.

The reference log-probabilities are computed once, before training, in a pass over the forget
set (:func:`~mechunlearn.interventions.training.example_answer_nll`), instead of running a second,
frozen copy of the model at every step: the same numbers, without a second model in memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from ...batching import EncodedBatch, forward
from ...validation import check_layers, check_positive
from ..registry import register_method
from ..training import answer_nll, mean_answer_loss
from .common import TrainedBaseline, check_nonnegative

__all__ = ["NPO", "npo_loss"]


def npo_loss(
    model,
    batch_f: EncodedBatch,
    batch_r: EncodedBatch,
    reference_nll: Float[Tensor, " example"],
    beta: float = 0.1,
    gamma: float = 1.0,
) -> tuple[Float[Tensor, ""], dict[str, Tensor]]:
    """NPO's loss ``L_NPO + gamma * L_R`` of one step, and the logged terms.

    Args:
        model: the model being trained.
        batch_f, batch_r: a forget and a retain batch.
        reference_nll: per forget example (indexed by ``batch_f.example_index``), the summed
            answer-token cross-entropy of the reference model, i.e. ``-log pi_ref(y|x)``.
        beta: NPO's inverse temperature.
        gamma: weight of the retain loss.

    Returns:
        The loss and ``{"loss", "forget_loss" (L_F, mean answer-token cross-entropy),
        "retain_loss" (L_R), "npo_loss" (L_NPO)}``.

    Example:
        >>> import math
        >>> from mechunlearn.batching import iter_batches
        >>> from mechunlearn.interventions.training import answer_nll
        >>> batch_f = next(iter(iter_batches(model, forget.prompts, forget.answers)))
        >>> batch_r = next(iter(iter_batches(model, retain.prompts, retain.answers)))
        >>> with torch.no_grad():
        ...     ref = answer_nll(model(batch_f.tokens), batch_f)   # the model as reference
        ...     loss, terms = npo_loss(model, batch_f, batch_r, ref, beta=0.1)
        >>> round(float(terms["npo_loss"]), 4), round(2 / 0.1 * math.log(2), 4)  # log-ratio 0
        (13.8629, 13.8629)
    """
    nll = answer_nll(forward(model, batch_f), batch_f)
    count = batch_f.answer_mask[:, 1:].sum().clamp(min=1)
    loss_f = nll.sum() / count
    reference = reference_nll.to(device=nll.device, dtype=nll.dtype)[
        batch_f.example_index.to(nll.device)
    ]
    log_ratio = reference - nll  # log pi_theta(y|x) - log pi_ref(y|x)
    loss_npo = -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()
    loss_r = mean_answer_loss(model, batch_r)
    loss = loss_npo + gamma * loss_r
    return loss, {
        "loss": loss,
        "forget_loss": loss_f,
        "retain_loss": loss_r,
        "npo_loss": loss_npo,
    }


@register_method("NPO", fits_on="model")
class NPO(TrainedBaseline):
    """Negative Preference Optimization baseline: ``L_NPO + gamma * L_R`` by AdamW (module
    docstring).

    Defaults (the NPO paper and open-unlearning's ``NPO.yaml``: ``beta=0.1``, forget weight 1,
    retain weight ``alpha=1`` with the NLL retain loss, i.e. our ``gamma=1``; AdamW with
    ``weight_decay=0.01``, every parameter trained; the learning rate and the bounded number of
    steps scaled to the 135M default model, see docs/methods.md): ``beta=0.1``, ``gamma=1.0``,
    ``lr=1e-4``, ``weight_decay=0.01``, ``max_steps=30``, ``batch_size=8``, constant learning
    rate. Early stop as SIMU's, on the forget answer loss ``L_F`` (``forget_loss_factor=3``).

    Args:
        layers: blocks whose parameters are trained; None (the default) trains every parameter
            of the model, as open-unlearning does.
        beta: NPO's inverse temperature (> 0).
        gamma: weight of the retain loss (>= 0).
        lr: AdamW's learning rate.
        weight_decay: AdamW's decoupled weight decay.
        max_steps: optimizer steps at most.
        forget_loss_factor: stop once a step's forget loss ``L_F`` reaches this multiple (> 1)
            of the initial loss of the same examples; None to always run ``max_steps``.
        batch_size: examples per batch (one forget and one retain batch per step).
        max_length: truncate texts to this many tokens (default: the model's context).
        seed: seed of the batch order.

    Attributes:
        layers_, d_mlp_, meta_, deltas_, history_, n_updates_, stop_reason_: see
            :class:`~.common.TrainedBaseline`; ``history_`` also logs ``npo_loss``.
        forget_loss_initial_: the forget skill's mean answer-token loss before training.

    Example:
        >>> npo = mu.NPO(max_steps=3, lr=1e-3).fit(model, forget, retain, quiet=True)
        >>> round(npo.history_[0]["npo_loss"], 3)   # (2 / beta) log 2 before any update
        13.863
    """

    _label = "NPO"

    def __init__(
        self,
        layers: int | Sequence[int] | None = None,
        beta: float = 0.1,
        gamma: float = 1.0,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        max_steps: int = 30,
        forget_loss_factor: float | None = 3.0,
        batch_size: int = 8,
        max_length: int | None = None,
        seed: int = 0,
    ):
        layers = check_layers(layers)
        check_positive("beta", beta)
        check_nonnegative("gamma", gamma)
        self._check_training(
            lr, weight_decay, max_steps, batch_size, max_length, seed, forget_loss_factor
        )
        self.layers = layers
        self.beta = beta
        self.gamma = gamma
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_steps = max_steps
        self.forget_loss_factor = forget_loss_factor
        self.batch_size = batch_size
        self.max_length = max_length
        self.seed = seed

    def _objective(self, model, items_f, items_r):
        reference, early = self._forget_reference(model, items_f)
        beta, gamma = float(self.beta), float(self.gamma)

        def loss_fn(batch_f, batch_r):
            return npo_loss(model, batch_f, batch_r, reference, beta, gamma)

        return loss_fn, early
