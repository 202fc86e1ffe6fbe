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

from collections.abc import Iterator, Sequence

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from ...batching import EncodedBatch, forward
from ...validation import check_positive
from ..registry import register_method
from ..training import LossPart, answer_nll, mean_answer_loss, sum_parts
from .common import ForgetLossBaseline, check_nonnegative

__all__ = ["NPO", "npo_loss"]


def npo_loss(
    model,
    batch_f: EncodedBatch,
    batch_r: EncodedBatch,
    reference_nll: Float[Tensor, " example"],
    beta: float = 0.1,
    gamma: float = 1.0,
    *,
    parts: bool = False,
) -> tuple[Float[Tensor, ""], dict[str, Tensor]] | Iterator[LossPart]:
    """NPO's loss ``L_NPO + gamma * L_R`` of one step, and the logged terms.

    Args:
        model: the model being trained.
        batch_f, batch_r: a forget and a retain batch.
        reference_nll: per forget example (indexed by ``batch_f.example_index``), the summed
            answer-token cross-entropy of the reference model, i.e. ``-log pi_ref(y|x)``.
        beta: NPO's inverse temperature.
        gamma: weight of the retain loss.
        parts: return the loss as the training loop takes it
            (:data:`~mechunlearn.interventions.training.LossFn`): ``L_NPO`` (logging
            ``forget_loss`` and ``npo_loss``), then ``gamma * L_R``, computed one after the
            other.

    Returns:
        The loss and ``{"loss", "forget_loss" (L_F, mean answer-token cross-entropy),
        "retain_loss" (L_R), "npo_loss" (L_NPO)}``; with ``parts``, its two parts.

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

    def generate() -> Iterator[LossPart]:
        nll = answer_nll(forward(model, batch_f), batch_f)
        count = batch_f.answer_mask[:, 1:].sum().clamp(min=1)
        loss_f = nll.sum() / count
        reference = reference_nll.to(device=nll.device, dtype=nll.dtype)[
            batch_f.example_index.to(nll.device)
        ]
        log_ratio = reference - nll  # log pi_theta(y|x) - log pi_ref(y|x)
        loss_npo = -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()
        yield loss_npo, {"forget_loss": loss_f, "npo_loss": loss_npo}
        loss_r = mean_answer_loss(model, batch_r)
        yield gamma * loss_r, {"retain_loss": loss_r}

    return generate() if parts else sum_parts(generate())


@register_method("NPO", fits_on="model")
class NPO(ForgetLossBaseline):
    """Negative Preference Optimization baseline: ``L_NPO + gamma * L_R`` by AdamW (module
    docstring).

    Defaults (the NPO paper and open-unlearning's ``NPO.yaml``: ``beta=0.1``, forget weight 1,
    retain weight ``alpha=1`` with the NLL retain loss, i.e. our ``gamma=1``): ``beta=0.1``,
    ``gamma=1.0``. The other settings, their defaults (``lr=1e-4``, ``weight_decay=0.01``,
    ``max_steps=30``, ``batch_size=8``, constant learning rate) and the fitted attributes are
    those of every :class:`~.common.ForgetLossBaseline`; the early stop is SIMU's, on the
    forget answer loss ``L_F`` (``forget_loss_factor=3``), not on ``L_NPO``, and ``history_``
    also logs ``npo_loss``.

    Args:
        beta: NPO's inverse temperature (> 0).
        gamma: weight of the retain loss (>= 0).
        layers, lr, weight_decay, max_steps, forget_loss_factor, batch_size, max_length, seed:
            see :class:`~.common.ForgetLossBaseline`.

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
        check_positive("beta", beta)
        check_nonnegative("gamma", gamma)
        super().__init__(
            layers, lr, weight_decay, max_steps, forget_loss_factor, batch_size, max_length, seed
        )
        self.beta = beta
        self.gamma = gamma

    def _objective(self, model, items_f, items_r):
        reference, early = self._forget_reference(model, items_f)
        beta, gamma = float(self.beta), float(self.gamma)

        def loss_fn(batch_f, batch_r):
            return npo_loss(model, batch_f, batch_r, reference, beta, gamma, parts=True)

        return loss_fn, early
