"""SIMU's attribution: integrated gradients of every MLP neuron's key value on a skill's
answers, and the critical neurons it selects. The method is described in
:mod:`mechunlearn.interventions.simu` (step 1)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..._version import __version__
from ...batching import EncodedBatch, forward
from ...collect import run_pass
from ...data import Skill
from ...models import d_mlp, model_device, model_meta
from ...sites import hook_name
from ...validation import check_int, model_keys, resolve_layers
from ..base import Hook
from ..training import answer_nll, check_answer_skill, frozen


@dataclass
class Attribution:
    """Integrated-gradients attribution of a skill's answer log-likelihood to MLP neurons.

    Attributes:
        values: ``[layers, d_mlp]`` float64 ``Att(l, k)`` (see the module docstring).
        layers: the model layers, in order.
        steps: Riemann steps ``m``.
        example_nll: per example, the summed cross-entropy of its answer tokens on the clean
            model (float64, the ``alpha = 1`` pass).
        example_tokens: per example, its number of answer tokens.
        meta: model shape and skill name.
    """

    values: Float[Tensor, "layer d_mlp"]
    layers: list[int]
    steps: int
    example_nll: Float[Tensor, " example"]
    example_tokens: Int[Tensor, " example"]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        """The skill's mean answer-token cross-entropy on the clean model."""
        return float(self.example_nll.sum() / self.example_tokens.sum())

    def __repr__(self) -> str:
        return (
            f"Attribution(skill={self.meta.get('skill')!r}, layers={len(self.layers)}, "
            f"d_mlp={self.values.shape[1]}, steps={self.steps}, loss={self.loss:.4f})"
        )


def neuron_attribution(
    model,
    skill: Skill,
    layers: int | Sequence[int] | None = None,
    steps: int = 5,
    batch_size: int = 8,
    max_length: int | None = None,
    quiet: bool = True,
) -> Attribution:
    """Integrated gradients of a skill's answer log-likelihood for every MLP neuron.

    All chosen layers are scaled together (see the module docstring for the path, the sign and
    the tokens that count). Per batch: one clean forward pass (stopped after the deepest chosen
    layer) records the keys ``beta``; then ``steps`` forward and backward passes with every
    chosen layer's key replaced by ``alpha * beta`` at the counted positions. Sums are float64.

    Args:
        model: a TransformerBridge or HookedTransformer.
        skill: the skill (its answers are scored).
        layers: layer indices (negative from the end); None for all.
        steps: Riemann steps ``m`` (``alpha = 1/m, 2/m, ..., 1``).
        batch_size: examples per forward pass.
        max_length: truncate texts to this many tokens.
        quiet: hide the progress bar.

    Returns:
        Attribution on the model's device.

    Example:
        >>> att = neuron_attribution(model, forget, steps=5)
        >>> att.values.shape   # (layers, d_mlp)
        torch.Size([3, 48])
    """
    skill = check_answer_skill(skill, "attributed", "SIMU")
    layers = resolve_layers(model, layers)
    steps = check_int("steps", steps, min_val=1)
    batch_size = check_int("batch_size", batch_size, min_val=1)
    device = model_device(model)
    width = d_mlp(model)
    total = torch.zeros((len(layers), width), dtype=torch.float64, device=device)
    nll = torch.zeros(len(skill), dtype=torch.float64, device=device)
    n_tok = torch.zeros(len(skill), dtype=torch.long, device=device)
    names = [hook_name("key", layer) for layer in layers]
    alphas = [(j + 1) / steps for j in range(steps)]
    beta: dict[int, Tensor] = {}

    def record(batch: EncodedBatch) -> list[Hook]:  # the clean pass records the keys beta
        return [(n, _recorder(beta, i)) for i, n in enumerate(names)]

    def integrate(batch: EncodedBatch, _) -> None:  # then `steps` scaled passes with gradients
        counted = batch.mask("all")[..., None]
        for alpha in alphas:
            leaves: dict[int, Tensor] = {}
            scaled = [(n, _scaler(beta, leaves, counted, i, alpha)) for i, n in enumerate(names)]
            with torch.enable_grad():
                logits = forward(model, batch, scaled)
                example_nll = answer_nll(logits, batch)
                grads = torch.autograd.grad(
                    -example_nll.sum(), [leaves[i] for i in range(len(names))],
                    allow_unused=True,
                )  # fmt: skip
            del logits
            for i, grad in enumerate(grads):
                if grad is not None:
                    total[i] += (grad * beta[i] * counted).sum(dim=(0, 1), dtype=torch.float64)
            if alpha == 1.0:
                index = batch.example_index.to(device)
                nll[index] = example_nll.detach().to(torch.float64)
                n_tok[index] = batch.answer_mask[:, 1:].sum(1)

    with frozen(model), torch.no_grad():
        run_pass(
            model, skill, record, names[-1], then=integrate, batch_size=batch_size,
            max_length=max_length, inference=False, desc=f"SIMU attribution {skill.name}",
            quiet=quiet,
        )  # fmt: skip
    count = int(n_tok.sum())
    if count == 0:
        raise ValueError(
            f"Skill {skill.name!r} has no answer tokens: SIMU needs examples with answers."
        )
    meta = {**model_keys(model_meta(model)), "skill": skill.name, "version": __version__}
    return Attribution(total / (steps * count), list(layers), steps, nll, n_tok, meta)


def _recorder(store: dict[int, Tensor], row: int):
    """A hook that keeps its activation in ``store[row]``."""

    def hook(activation: Float[Tensor, "batch pos d_mlp"], hook=None) -> Tensor:
        store[row] = activation.detach()
        return activation

    return hook


def _scaler(
    clean: dict[int, Tensor], leaves: dict[int, Tensor], counted: Tensor, row: int, alpha: float
):
    """A hook that replaces its activation by ``alpha * clean[row]`` at the counted positions
    (the clean value elsewhere), as a new leaf tensor kept in ``leaves[row]``."""

    def hook(activation: Float[Tensor, "batch pos d_mlp"], hook=None) -> Tensor:
        beta = clean[row]
        leaf = torch.where(counted, beta * alpha, beta).requires_grad_(True)
        leaves[row] = leaf
        return leaf

    return hook


def critical_neurons(
    values: Float[Tensor, "layer d_mlp"], threshold: float
) -> Bool[Tensor, "layer d_mlp"]:
    """``values > threshold * (each layer's maximum)``, and nothing in a layer whose maximum is
    not positive.

    Example:
        >>> critical_neurons(torch.tensor([[1.0, 0.5, 0.2], [-1.0, -2.0, -0.5]]), 0.3)
        tensor([[ True,  True, False],
                [False, False, False]])
    """
    top = values.max(dim=1, keepdim=True).values
    return (values > threshold * top) & (top > 0)
