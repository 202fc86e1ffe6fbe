"""LUNAR's least-squares problem: the streaming pass that accumulates its sufficient statistics
(the last-token residual sums of the directions, the Gram matrices of the key vectors), and its
two solvers (the closed form and the authors' Adam route) with their diagnostics.

The method is described in :mod:`mechunlearn.interventions.lunar` (steps 1-3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ...batching import EncodedBatch
from ...collect import run_pass
from ...data import Skill
from ...models import model_device
from ...sites import hook_name, mlp_output_hook
from ..base import Hook
from ..weights import w_out

#: Rows per mini-batch of the Adam route (the authors' DataLoader batch size).
ADAM_BATCH_ROWS = 64
#: Learning-rate factor per epoch of the Adam route (the authors' ExponentialLR gamma).
ADAM_LR_DECAY = 0.9


# ------------------------------------------------------------------------------ streaming
@dataclass
class _Normal:
    """One layer's sufficient statistics of the least-squares problem (float64)."""

    gram_f: Tensor  # sum of k k^T over forget rows   [d_mlp, d_mlp]
    gram_k: Tensor  # sum of k k^T over kept rows      [d_mlp, d_mlp]
    sum_f: Tensor  # sum of k over forget rows         [d_mlp]
    n_f: int = 0
    n_k: int = 0
    rows_f: list[Tensor] = field(default_factory=list)  # float32 key rows, Adam route only
    rows_k: list[Tensor] = field(default_factory=list)
    linear_error: Tensor | None = None  # max |k W_out + b - mlp_out| / max |mlp_out|

    @classmethod
    def empty(cls, width: int, device: torch.device) -> _Normal:
        f64 = dict(dtype=torch.float64, device=device)
        return cls(
            torch.zeros((width, width), **f64),
            torch.zeros((width, width), **f64),
            torch.zeros(width, **f64),
        )


def _pass(
    model,
    skill: Skill,
    batch_size: int,
    resid_layers: Sequence[int] = (),
    normal: dict[int, _Normal] | None = None,
    forget: bool = False,
    keep_rows: bool = False,
) -> Float[Tensor, "layer d_model"]:
    """One streaming pass over the skill's prompts (no answers), batch by batch.

    * ``resid_layers``: returns the sum over the prompts of ``resid_post`` at the last prompt
      token, per layer (float64).
    * ``normal``: accumulates, per layer, the Gram matrices of the key vectors. Forget prompts:
      prompt tokens are forget rows and BOS is a kept row; retain prompts: every real token
      (BOS and prompt) is a kept row; padding never counts. On the first batch it also measures
      whether the MLP's output is ``key @ W_out + b_out`` (what the hooks rely on).

    Each forward (:func:`mechunlearn.collect.run_pass`) stops after the deepest hook it needs.
    """
    normal = normal or {}
    width = int(model.cfg.d_model)
    sums = torch.zeros((len(resid_layers), width), dtype=torch.float64, device=model_device(model))
    first = [True]

    def step(batch: EncodedBatch) -> list[Hook]:
        hooks: list[Hook] = []
        rows = torch.arange(batch.tokens.shape[0], device=batch.tokens.device)
        for i, layer in enumerate(resid_layers):

            def last_token(activation, hook=None, i=i):
                picked = activation[rows, batch.last_prompt]
                sums[i] += picked.sum(0, dtype=torch.float64).to(sums.device)
                return activation

            hooks.append((hook_name("resid_post", layer), last_token))
        if not normal:
            return hooks
        real = batch.attention_mask.bool()
        moved = batch.prompt_mask if forget else torch.zeros_like(real)
        idx_f = torch.nonzero((moved & real).flatten()).flatten()
        idx_k = torch.nonzero((real & ~moved).flatten()).flatten()
        n_f, n_k = int(idx_f.numel()), int(idx_k.numel())
        check, first[0] = first[0], False
        for layer, ne in normal.items():
            ne.n_f += n_f
            ne.n_k += n_k
            seen: dict[str, Tensor] = {}

            def record(activation, hook=None, ne=ne, seen=seen):
                flat = activation.reshape(-1, activation.shape[-1])
                keys_k = flat.index_select(0, idx_k)
                keys_k64 = keys_k.double()
                ne.gram_k.addmm_(keys_k64.T, keys_k64)
                if n_f:
                    keys_f = flat.index_select(0, idx_f)
                    keys_f64 = keys_f.double()
                    ne.gram_f.addmm_(keys_f64.T, keys_f64)
                    ne.sum_f += keys_f64.sum(0)
                    if keep_rows:
                        ne.rows_f.append(keys_f.float().clone())
                if keep_rows:
                    ne.rows_k.append(keys_k.float().clone())
                seen["key"] = activation
                return activation

            hooks.append((hook_name("key", layer), record))
            if check:
                hooks.append((mlp_output_hook(model, layer), _linear_check(model, layer, ne, seen)))
        return hooks

    # Within a block: hook_post, then the MLP's output, then hook_resid_post.
    depth = [(layer, 2) for layer in resid_layers] + [(layer, 1) for layer in normal]
    layer, kind = max(depth)
    stop = hook_name("resid_post", layer) if kind == 2 else mlp_output_hook(model, layer)
    run_pass(model, skill, step, stop, prompts_only=True, batch_size=batch_size)
    return sums


def _linear_check(model, layer: int, ne: _Normal, seen: dict[str, Tensor]):
    """A hook at the MLP's output that measures ``max |key @ W_out + b_out - mlp_out|``."""
    try:
        weight = w_out(model, layer)
    except NotImplementedError:
        return lambda activation, hook=None: activation
    bias = getattr(model.blocks[layer].mlp, "b_out", None)

    def hook(activation: Float[Tensor, "batch pos d_model"], hook=None) -> Tensor:
        key = seen["key"].float()
        expected = key @ weight.float()
        if bias is not None:
            expected = expected + bias.float()
        scale = activation.float().abs().amax().clamp(min=1e-30)
        ne.linear_error = ((expected - activation.float()).abs().amax() / scale).detach()
        return activation

    return hook


# -------------------------------------------------------------------------------- solvers
def _ridge_lambda(gram: Tensor, ridge: float) -> float:
    return float(ridge * torch.diagonal(gram).sum() / gram.shape[0])


def _closed_form(gram: Tensor, sum_f: Tensor, target: Tensor, lam: float) -> Tensor:
    """``dW = (G + lam I)^-1 s_F target^T`` in float64."""
    system = gram.clone()
    system.diagonal().add_(lam)
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) != 0:  # not positive definite in floating point: solve with pivoting
        u = torch.linalg.solve(system, sum_f)
    else:
        u = torch.cholesky_solve(sum_f[:, None], factor)[:, 0]
    return torch.outer(u, target)


def _adam(
    ne: _Normal, target: Tensor, lam: float, epochs: int, lr: float, seed: int
) -> tuple[Tensor, list[float]]:
    """The authors' gradient route on ``dW`` (see the module docstring); returns float64."""
    with torch.inference_mode(False), torch.enable_grad():
        # clone(): rows recorded under a caller's inference_mode cannot enter autograd.
        x = torch.cat(ne.rows_f + ne.rows_k).clone()
        n, width = x.shape
        goal = torch.zeros((n, target.numel()), dtype=torch.float32, device=x.device)
        goal[: ne.n_f] = target.float().to(x.device)
        delta = torch.zeros(
            (width, target.numel()), dtype=torch.float32, device=x.device, requires_grad=True
        )
        optimizer = torch.optim.AdamW([delta], lr=lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=ADAM_LR_DECAY)
        penalty = lam / (n * target.numel())
        gen = torch.Generator().manual_seed(seed)
        history = []
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen).to(x.device)
            total = torch.zeros((), dtype=torch.float64, device=x.device)
            for chunk in order.split(ADAM_BATCH_ROWS):
                mse = (x[chunk] @ delta - goal[chunk]).square().mean()
                loss = mse + penalty * delta.square().sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += mse.detach().double() * chunk.numel()
            schedule.step()
            history.append(float(total) / n)
    return delta.detach().double(), history


def _diagnostics(ne: _Normal, delta: Tensor, target: Tensor, lam: float) -> dict[str, Any]:
    """Loss and redirection measures of ``delta`` from the sufficient statistics (exact)."""
    gram = ne.gram_f + ne.gram_k
    n = ne.n_f + ne.n_k
    size = target.numel()
    tt = float(target @ target)
    quad = float(((gram @ delta) * delta).sum())
    cross = float(ne.sum_f @ delta @ target)
    kept = float(((ne.gram_k @ delta) * delta).sum())
    mse_after = max(quad - 2 * cross + ne.n_f * tt, 0.0) / (n * size)
    return {
        "n_forget_rows": ne.n_f,
        "n_kept_rows": ne.n_k,
        "ridge_lambda": lam,
        "mse_before": ne.n_f * tt / (n * size),
        "mse_after": mse_after,
        # what both solvers minimise: the mean squared error plus the ridge penalty
        "objective": mse_after + lam * float(delta.square().sum()) / (n * size),
        # mean over forget rows of <k dW, c r> / |c r|^2: 1 = fully redirected
        "forget_redirect": cross / (ne.n_f * tt),
        # RMS over kept rows of |k dW| / |c r|: 0 = untouched
        "kept_shift": math.sqrt(max(kept, 0.0) / max(ne.n_k, 1) / tt),
    }
