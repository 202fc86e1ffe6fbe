"""Gradient Difference (GradDiff): ascend on the forget skill, descend on the retain skill.

Liu et al., 2022 (``GradDiff`` in open-unlearning, ``src/trainer/unlearn/grad_diff.py``, with
its ``retain_loss_type: NLL``): minimise

    loss = -L_F + gamma * L_R

with ``L_F`` and ``L_R`` the mean next-token cross-entropies of the answer tokens of one forget
and one retain batch per step. This is SIMU's objective without SIMU's neuron mask and
second-order optimizer: every parameter is trained (by default) with AdamW.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from jaxtyping import Float
from torch import Tensor

from ...batching import EncodedBatch
from ..registry import register_method
from ..training import LossPart, grad_diff_parts, sum_parts
from .common import ForgetLossBaseline, check_nonnegative

__all__ = ["GradDiff", "grad_diff_loss"]


def grad_diff_loss(
    model,
    batch_f: EncodedBatch,
    batch_r: EncodedBatch,
    gamma: float = 1.0,
    *,
    parts: bool = False,
) -> tuple[Float[Tensor, ""], dict[str, Tensor]] | Iterator[LossPart]:
    """GradDiff's loss ``-L_F + gamma * L_R`` of one step, and the logged terms.

    With ``parts``, the loss as the training loop takes it
    (:func:`~mechunlearn.interventions.training.grad_diff_parts`, which SIMU shares).

    Example:
        >>> from mechunlearn.batching import iter_batches
        >>> batch_f = next(iter(iter_batches(model, forget.prompts, forget.answers)))
        >>> batch_r = next(iter(iter_batches(model, retain.prompts, retain.answers)))
        >>> loss, terms = grad_diff_loss(model, batch_f, batch_r, gamma=2.0)
        >>> torch.allclose(loss, 2 * terms["retain_loss"] - terms["forget_loss"])
        True
    """
    generated = grad_diff_parts(model, batch_f, batch_r, gamma)
    return generated if parts else sum_parts(generated)


@register_method("GradDiff", fits_on="model")
class GradDiff(ForgetLossBaseline):
    """Gradient Difference baseline: minimise ``-L_F + gamma * L_R`` by AdamW (module docstring).

    Defaults (open-unlearning's ``GradDiff.yaml``: ``gamma=1`` on the forget term, ``alpha=1``
    on the retain term, i.e. our ``gamma=1``): ``gamma=1.0``. The other settings, their
    defaults (``lr=1e-4``, ``weight_decay=0.01``, ``max_steps=30``, ``batch_size=8``, constant
    learning rate, SIMU's early stop with ``forget_loss_factor=3``) and the fitted attributes
    are those of every :class:`~.common.ForgetLossBaseline`.

    Args:
        gamma: weight of the retain loss (>= 0).
        layers, lr, weight_decay, max_steps, forget_loss_factor, batch_size, max_length, seed:
            see :class:`~.common.ForgetLossBaseline`.

    Example:
        >>> gd = mu.GradDiff(layers=[1, 2], max_steps=3, lr=1e-3).fit(
        ...     model, forget, retain, quiet=True)
        >>> gd.layers_, gd.n_updates_, gd.stop_reason_
        ([1, 2], 3, 'max_steps')
    """

    _label = "GradDiff"

    def __init__(
        self,
        layers: int | Sequence[int] | None = None,
        gamma: float = 1.0,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        max_steps: int = 30,
        forget_loss_factor: float | None = 3.0,
        batch_size: int = 8,
        max_length: int | None = None,
        seed: int = 0,
    ):
        check_nonnegative("gamma", gamma)
        super().__init__(
            layers, lr, weight_decay, max_steps, forget_loss_factor, batch_size, max_length, seed
        )
        self.gamma = gamma

    def _objective(self, model, items_f, items_r):
        _, early = self._forget_reference(model, items_f)
        gamma = float(self.gamma)
        return (lambda batch_f, batch_r: grad_diff_parts(model, batch_f, batch_r, gamma)), early
