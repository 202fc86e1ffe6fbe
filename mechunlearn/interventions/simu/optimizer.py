"""SIMU's optimizer: SophiaH that updates only the masked entries. The method is described in
:mod:`mechunlearn.interventions.simu` (step 2)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
from pytorch_optimizer import SophiaH
from torch import Tensor


class MaskedSophiaH(SophiaH):
    """``pytorch_optimizer.SophiaH`` that changes only the unmasked entries of each parameter.

    The mask is applied to the gradient (before the Hutchinson Hessian-vector product), to the
    Hessian estimate, to both moments (``momentum``, ``hessian_moment``) and to the parameter
    (masked entries are written back from a copy after every step, so they stay bit-identical
    whatever the options, weight decay included). Gradients with a graph
    (``create_graph=True``) keep it through the masking, as the Hessian estimate needs.

    Args:
        params: the parameters (one group).
        masks: per parameter, a bool tensor of its shape (True = may change) or None (all).
        **kwargs: SophiaH's arguments (``lr``, ``betas``, ``p``, ``update_period``,
            ``num_samples``, ``weight_decay``, ``eps``, ...); ``hessian_distribution`` must be
            ``'gaussian'``.

    Example:
        >>> w = torch.nn.Parameter(torch.arange(12.0).reshape(4, 3) / 10)
        >>> rows = torch.tensor([True, False, True, False])   # only rows 0 and 2 may change
        >>> opt = MaskedSophiaH([w], [rows[:, None].expand_as(w)], lr=1e-2)
        >>> before = w.detach().clone()
        >>> loss = (w**3).sum()
        >>> loss.backward(create_graph=True); opt.step(); opt.zero_grad(set_to_none=True)
        >>> torch.equal(w[~rows], before[~rows]), torch.equal(w[rows], before[rows])
        (True, False)
    """

    def __init__(self, params: Sequence[Tensor], masks: Sequence[Tensor | None], **kwargs):
        params, masks = list(params), list(masks)
        if len(params) != len(masks):
            raise ValueError(f"{len(params)} parameters but {len(masks)} masks.")
        if kwargs.get("hessian_distribution", "gaussian") != "gaussian":
            raise ValueError(
                "MaskedSophiaH uses Gaussian Hutchinson probes only: drop hessian_distribution."
            )
        for p, m in zip(params, masks, strict=True):
            if m is not None and (m.shape != p.shape or m.dtype != torch.bool):
                raise ValueError(
                    f"A mask must be a bool tensor of its parameter's shape {tuple(p.shape)}, "
                    f"got {m.dtype} {tuple(m.shape)}."
                )
        super().__init__(params, **kwargs)
        self._order = [
            m if m is None else m.to(p.device) for p, m in zip(params, masks, strict=True)
        ]
        self._masked = [
            (p, m.to(p.device), p.detach().clone())
            for p, m in zip(params, masks, strict=True)
            if m is not None
        ]

    def _mask_state(self, keys: Sequence[str]) -> None:
        with torch.no_grad():
            for p, m, _ in self._masked:
                state = self.state.get(p, {})
                for key in keys:
                    if key in state:
                        state[key].masked_fill_(~m, 0.0)

    def compute_hutchinson_hessian(
        self, param_groups, state, num_samples: int = 1, alpha: float = 1.0, distribution="gaussian"
    ) -> None:
        """SophiaH's Hutchinson estimate, then zero at the masked entries."""
        SophiaH.compute_hutchinson_hessian(
            param_groups, state, num_samples=num_samples, alpha=alpha, distribution=distribution
        )
        self._mask_state(("hessian",))

    def step(self, closure=None, hessian: list[Tensor] | None = None):
        """Mask the gradients, take SophiaH's step, then re-mask the state and the parameters."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p, m, _ in self._masked:
            if p.grad is not None:
                p.grad = torch.where(m, p.grad, 0.0)
        if hessian is not None:
            hessian = [
                h if m is None else torch.where(m, h, 0.0)
                for h, m in zip(hessian, self._order, strict=True)
            ]
        super().step(None, hessian)
        self._mask_state(("momentum", "hessian_moment", "hessian"))
        with torch.no_grad():
            for p, m, original in self._masked:
                p.copy_(torch.where(m, p, original))
        return loss


def check_sophia_kwargs(optimizer_kwargs: dict[str, Any] | None, lr: float) -> dict[str, Any]:
    """``optimizer_kwargs`` of :class:`~mechunlearn.interventions.simu.Simu` checked against
    ``pytorch_optimizer.SophiaH`` (finite values, known arguments, Gaussian probes, and the
    optimizer built once with them), as a new dict.

    Raises:
        ValueError: not a dict, a non-finite value, ``lr`` or ``params`` (Simu sets them), an
            argument SophiaH does not take, Rademacher probes, or one SophiaH rejects.
    """
    if optimizer_kwargs is not None and not isinstance(optimizer_kwargs, dict):
        raise ValueError(f"optimizer_kwargs must be a dict or None, got {optimizer_kwargs!r}.")
    kwargs = dict(optimizer_kwargs or {})
    for key, value in kwargs.items():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(
                    f"optimizer_kwargs[{key!r}] must be finite, got {value!r}: pass a finite "
                    "number (or leave it out for SophiaH's default)."
                )
    for bad, why in (("lr", "use Simu(lr=...)"), ("params", "SIMU chooses them")):
        if bad in kwargs:
            raise ValueError(f"optimizer_kwargs must not hold {bad!r}: {why}.")
    allowed = sorted(
        name
        for name, par in inspect.signature(SophiaH.__init__).parameters.items()
        if name not in ("self", "params", "lr") and par.kind is not par.VAR_KEYWORD
    )
    unknown = sorted(set(kwargs) - set(allowed) - {"params", "lr"})
    if unknown:
        raise ValueError(
            f"optimizer_kwargs has unknown SophiaH arguments {unknown}; it takes {allowed}."
        )
    if kwargs.get("hessian_distribution", "gaussian") != "gaussian":
        raise ValueError(
            "optimizer_kwargs['hessian_distribution'] must be 'gaussian' (SIMU does not use "
            "Rademacher probes)."
        )
    try:  # let SophiaH validate its own arguments now, not after the attribution
        SophiaH([torch.zeros(1, requires_grad=True)], lr=float(lr), **kwargs)
    except Exception as err:  # noqa: BLE001 - the library raises its own error types
        raise ValueError(f"SophiaH rejects optimizer_kwargs {kwargs}: {err}") from None
    return kwargs
