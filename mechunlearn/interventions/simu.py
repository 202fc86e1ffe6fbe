"""SIMU: attribute the forget skill to MLP neurons, then unlearn with masked second-order steps.

Agarwal, Pamnani & Hakkani-Tür, "SIMU: Selective Influence Machine Unlearning" (2025; no public
code), as stated in docs/methods.md ("SIMU"):

1. **Attribution** (:func:`neuron_attribution`). Integrated gradients of every MLP neuron's key
   value ``beta`` (site *key*, ``blocks.{l}.mlp.hook_post``, the input of ``W_out``) along the
   straight path from 0 to ``beta`` in ``steps`` (``m``) right-Riemann steps ``alpha = j / m``,
   ``j = 1..m`` (as in Dai et al.'s knowledge neurons, which SIMU's ``Att(w_l^k)`` follows)::

       Att(l, k) = 1/m  sum_j  sum_tokens  beta_lk * d logL / d a_lk  at  a = alpha_j * beta

   where ``logL`` is the mean log-likelihood of the skill's answer tokens (teacher-forced,
   every answer token predicted from the position before it), i.e. minus the forget loss
   ``L_F``. Two precision choices:

   * **Sign.** ``Att`` is the attribution of ``-L_F``, so ``Att > 0`` means the neuron's
     activation *supports* the forget answers (it lowers ``L_F``), as in Dai et al., whose
     attribution is that of the answer's probability. The issue writes ``beta * dL/da``; with
     ``L`` the loss itself, ``Att > t * max`` would select the neurons that work *against* the
     forget answers, which is not what "neurons that encode the forget set" means.
   * **All chosen layers at once.** At step ``j`` the key of *every* chosen layer is replaced by
     ``alpha_j * beta_l`` (``beta_l`` recorded in a clean forward pass first), and one backward
     pass gives ``dlogL/da`` for every neuron of every chosen layer. This is integrated gradients
     of the function ``logL(a_1, ..., a_L)`` of all chosen layers' keys along the straight path
     from all-zero keys to the clean keys, so completeness holds over all chosen neurons
     together: ``sum_{l,k} Att(l, k) -> logL(beta) - logL(0)`` as ``m`` grows. It costs
     ``m + 1`` passes per batch instead of the ``L * (m + 1)`` of the per-layer path (scale one
     layer, leave the others live), which for the 30-layer default model is 30 times cheaper.
     With one chosen layer (``layers=[l]``) the two paths are the same.
   * **Tokens.** ``sum_tokens`` runs over every prompt and answer token (BOS and padding
     excluded, as ``positions="all"`` in :mod:`mechunlearn.sites`); only those keys are scaled,
     BOS and padding keep their clean keys. A neuron's key at a prompt position reaches the
     answer through attention, so summing over the answer-predicting positions alone would drop
     part of its influence (and break completeness).

   A neuron is *critical* where ``Att(l, k) > t * max_k Att(l, .)`` (``threshold`` ``t``; a
   layer whose largest attribution is not positive has none). By default (``dual=False``,
   "forget-only" neurons) a neuron that is also critical for the retain skill (same rule on
   ``Att_R``) is left out; ``dual=True`` keeps these "dual" neurons (and skips the retain
   attribution).

2. **Masked second-order unlearning** (:class:`MaskedSophiaH`). GradDiff loss
   ``-L_F + gamma * L_R`` (mean answer-token cross-entropy of one forget and one retain batch
   per step), updating only (a) every parameter of the chosen layers' attention blocks except
   normalisation weights: the ``W_Q, W_K, W_V, W_O`` projections and their biases where the
   model has them, and (b) the critical neurons' rows of ``W_out``. Every other parameter has
   ``requires_grad=False`` during training. The mask is applied to the gradients (before the
   Hessian estimate), to the Hutchinson Hessian estimate, to both optimizer moments, and to the
   parameters (masked entries written back after every step), so masked entries stay
   bit-identical.

   The optimizer is ``pytorch_optimizer.SophiaH`` (pytorch-optimizer 4.x): per entry, with
   ``g`` the masked gradient, ``m <- beta1 m + (1 - beta1) g``; every ``update_period`` steps
   a Hutchinson estimate ``h = z * (H z)`` of the Hessian diagonal (``z ~ N(0, I)``, one
   Hessian-vector product by double backward, hence ``create_graph=True``), ``v <- beta2 v +
   (1 - beta2) h``; then ``w <- w - lr * clip(m / max(v, eps), -p, p)`` (no bias correction;
   library defaults ``betas=(0.96, 0.99)``, ``p=0.01``, ``update_period=10``, ``eps=1e-12``).
   **How it differs from the paper's Sophia.** SIMU uses Sophia (Liu et al., 2023) as in SOUL,
   whose Hessian diagonal is the Gauss-Newton-Bartlett estimate: labels resampled from the
   model's own softmax, ``h = B * g_hat ** 2`` (one extra ordinary backward, always >= 0, a
   Gauss-Newton approximation). Hutchinson instead estimates the diagonal of the true Hessian
   of the GradDiff loss, unbiased but noisy and possibly negative: the ascent term ``-L_F`` has
   mostly negative curvature, and where ``v <= eps`` the step is the clipped sign of the
   momentum, ``lr * p``, i.e. sign descent. It needs a double backward (about twice the memory
   of a step) on the Hessian steps only. The ``'rademacher'`` probe distribution is refused.
   ``optimizer_kwargs`` passes the other SophiaH arguments (``betas``, ``p``,
   ``update_period``, ``num_samples``, ``weight_decay``, ``eps``). SophiaH reads the graph of
   ``p.grad`` for its Hessian-vector product; :meth:`Simu.fit` computes the gradients with
   ``torch.autograd.grad(loss, params, create_graph=True)`` on the Hessian steps (plain
   gradients otherwise) and assigns them to ``p.grad``, which is what
   ``loss.backward(create_graph=True)`` does without its parameter-gradient reference cycle.

   Training runs ``max_steps`` steps at most and stops early once a step's forget loss reaches
   ``forget_loss_factor`` times the initial loss of the same examples (measured before
   training, in the attribution pass). A non-finite loss, or an update that makes a trained
   weight non-finite, stops it with a FloatingPointError that names the step (``non-finite at
   step k``). On any exit (finished, error, KeyboardInterrupt) the model's weights
   and ``requires_grad`` flags are restored bit-identically: :meth:`Simu.fit` leaves the model
   exactly as it found it and keeps the result as weight deltas.

3. **Result.** ``deltas_``: per trained attention parameter, ``new - old``; per layer with
   critical neurons, the change of their ``W_out`` rows. :meth:`Simu.apply_to_weights` adds
   them in place and restores the weights on exit (even after an exception). The attention
   deltas have no cheap hook form, so :meth:`Simu.hooks` raises NotImplementedError;
   :meth:`Simu.mlp_hooks` gives the exact hook form of the ``W_out`` part alone (``key @
   dW_out`` added at ``hook_mlp_out``), for analysis.

The training loop (batching, frozen parameters, progress bar, early stop, the NaN and
explosion stops, deltas, restoring the model) is :func:`mechunlearn.interventions.training.train`,
shared with the trained baselines (GA, GradDiff, NPO, RMU); SIMU gives it its loss, its masked
optimizer, its trained parameters and the second-order steps.

Randomness: the batch order (a permutation of each set per pass) and the Hutchinson probes
come from ``seed``; the global RNG state is left as it was (``torch.random.fork_rng``).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from pytorch_optimizer import SophiaH
from torch import Tensor

from .._version import __version__
from ..batching import EncodedBatch, forward
from ..collect import run_pass
from ..data import Skill
from ..models import d_mlp, model_device, model_meta
from ..sites import hook_name
from ..validation import (
    check_forget_retain,
    check_int,
    check_layers,
    check_seed,
    model_keys,
    resolve_layers,
)
from .base import Hook, WeightIntervention, check_positive
from .registry import register_method
from .training import (
    STOP_REASONS,
    EarlyStop,
    answer_nll,
    check_answer_skill,
    frozen,
    mean_answer_loss,
    tokenize_answers,
    train,
)
from .weights import WeightEdit, w_out

__all__ = [
    "STOP_REASONS",
    "Attribution",
    "MaskedSophiaH",
    "Simu",
    "answer_nll",
    "critical_neurons",
    "neuron_attribution",
]


# ------------------------------------------------------------------------------ attribution
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


# ------------------------------------------------------------------------------- optimizer
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


# ------------------------------------------------------------------------------------ SIMU
def _attention_parameters(model, layer: int) -> list[tuple[str, Tensor]]:
    """Layer ``layer``'s attention parameters except normalisation weights, named relative to
    ``blocks[layer].attn``."""
    attn = model.blocks[layer].attn
    return [(name, p) for name, p in attn.named_parameters() if "norm" not in name.lower()]


def _w_out_owner(model, layer: int) -> tuple[Tensor, Tensor]:
    """The parameter that holds layer ``layer``'s ``W_out``, and ``W_out`` as its view."""
    view = w_out(model, layer)
    for p in model.parameters():
        if (
            p.untyped_storage().data_ptr() == view.untyped_storage().data_ptr()
            and p.storage_offset() == view.storage_offset()
            and p.numel() == view.numel()
        ):
            return p, view
    raise NotImplementedError(
        f"blocks[{layer}].mlp.W_out is not a view of one of the model's parameters here, so "
        "SIMU cannot train its rows."
    )


def _row_mask(param: Tensor, view: Tensor, rows: Tensor) -> Tensor:
    """A bool mask of ``param``'s shape that is True exactly on ``view[rows]``."""
    mask = torch.zeros_like(param, dtype=torch.bool)
    if mask.stride() != param.stride():
        raise NotImplementedError("W_out's parameter is not dense: SIMU cannot mask its rows.")
    offset = view.storage_offset() - param.storage_offset()
    mask.as_strided(view.shape, view.stride(), offset)[rows] = True
    return mask


@register_method("SIMU", fits_on="model", defaults={"max_steps": 10})
class Simu(WeightIntervention):
    """SIMU: neuron attribution, then masked SophiaH GradDiff unlearning (module docstring).

    Args:
        layers: layers whose MLP neurons are attributed and whose attention and critical
            ``W_out`` rows are trained (negative from the end); None for all.
        steps: integrated-gradients Riemann steps ``m`` (paper: 5).
        threshold: ``t`` in ``[0, 1)``: critical where ``Att > t * max`` of the layer (paper:
            0.3).
        dual: keep neurons that are also critical for the retain skill ("dual" neurons);
            False drops them (and needs the retain attribution).
        gamma: weight of the retain loss in ``-L_F + gamma * L_R`` (>= 0).
        lr: SophiaH's learning rate (each entry moves at most ``lr * p`` per step, ``p`` =
            0.01 by default).
        max_steps: optimizer steps at most.
        forget_loss_factor: stop once a step's forget loss reaches this multiple (> 1) of the
            initial loss of the same examples; None to always run ``max_steps``.
        batch_size: examples per batch (attribution and each of the two training batches).
        max_length: truncate texts to this many tokens (default: the model's context).
        seed: seed of the batch order and of the Hutchinson probes.
        optimizer_kwargs: other ``pytorch_optimizer.SophiaH`` arguments (``betas``, ``p``,
            ``update_period``, ``num_samples``, ``weight_decay``, ``eps``).

    Attributes:
        layers_, d_mlp_, meta_: as for every intervention.
        attribution_: ``[layers, d_mlp]`` float32 forget-skill attribution ``Att``.
        attribution_retain_: the same for the retain skill (None when ``dual=True``).
        critical_: ``[layers, d_mlp]`` bool mask of the trained ``W_out`` rows.
        n_critical_: critical neurons per layer.
        deltas_: ``{name: delta}``; ``"blocks.{l}.attn.{param}"`` (the attention parameter's
            change, its own shape) and ``"blocks.{l}.mlp.W_out"`` (``[n_critical, d_model]``,
            the change of the critical rows, in the order of ``critical_[l]``).
        history_: one dict per step: ``forget_loss``, ``retain_loss`` (measured before that
            step's update) and ``forget_loss_initial`` (the same examples, before training).
        n_updates_: optimizer updates applied.
        stop_reason_: ``"max_steps"`` or ``"forget_loss_target"``.
        forget_loss_initial_: the forget skill's mean answer-token loss before training.

    Example:
        >>> from mechunlearn.evaluation import teacher_forced
        >>> forget_fit, forget_test = forget.split(0.5)
        >>> simu = mu.Simu(max_steps=5).fit(model, forget_fit, retain, quiet=True)
        >>> simu.n_updates_, simu.stop_reason_
        (5, 'max_steps')
        >>> with simu.apply_to_weights(model):
        ...     scores = teacher_forced(model, forget_test)
    """

    _fitted_attrs = WeightIntervention._fitted_attrs + ("attribution_", "critical_", "deltas_")
    _index_tensors = ("critical",)

    def __init__(
        self,
        layers: int | Sequence[int] | None = None,
        steps: int = 5,
        threshold: float = 0.3,
        dual: bool = False,
        gamma: float = 2.0,
        lr: float = 0.02,
        max_steps: int = 30,
        forget_loss_factor: float | None = 3.0,
        batch_size: int = 8,
        max_length: int | None = None,
        seed: int = 0,
        optimizer_kwargs: dict[str, Any] | None = None,
    ):
        layers = check_layers(layers)
        check_int("steps", steps, min_val=1)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise ValueError(f"threshold must be a number in [0, 1), got {threshold!r}.")
        if not 0.0 <= float(threshold) < 1.0:
            raise ValueError(f"threshold must lie in [0, 1) (a fraction of the maximum), got "
                             f"{threshold!r}.")  # fmt: skip
        if not isinstance(dual, bool):
            raise ValueError(f"dual must be True or False, got {dual!r}.")
        if (
            isinstance(gamma, bool)
            or not isinstance(gamma, (int, float))
            or not (0.0 <= float(gamma) < math.inf)
        ):
            raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}.")
        check_positive("lr", lr)
        check_int("max_steps", max_steps, min_val=1)
        if forget_loss_factor is not None:
            check_positive("forget_loss_factor", forget_loss_factor)
            if float(forget_loss_factor) <= 1.0:
                raise ValueError(
                    "forget_loss_factor must be > 1 (a multiple of the initial forget loss) or "
                    f"None, got {forget_loss_factor!r}."
                )
        check_int("batch_size", batch_size, min_val=1)
        if max_length is not None:
            check_int("max_length", max_length, min_val=2)
        check_seed(seed)
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
        self.layers = layers
        self.steps = steps
        self.threshold = threshold
        self.dual = dual
        self.gamma = gamma
        self.lr = lr
        self.max_steps = max_steps
        self.forget_loss_factor = forget_loss_factor
        self.batch_size = batch_size
        self.max_length = max_length
        self.seed = seed
        self.optimizer_kwargs = optimizer_kwargs

    # --------------------------------------------------------------------------------- fit
    def fit(self, model, forget: Skill, retain: Skill, quiet: bool = False) -> Simu:
        """Attribute, select the critical neurons, unlearn, and keep the result as deltas.

        The model is left exactly as it was (weights and ``requires_grad`` flags), also when
        training fails or is interrupted.

        Args:
            model: a TransformerBridge or HookedTransformer.
            forget: the skill to unlearn (its answers are the forget loss).
            retain: the skill to keep.
            quiet: hide the progress bars.

        Returns:
            self.

        Raises:
            TypeError: a skill is not a Skill.
            ValueError: an empty skill, one without answer tokens, or a layer out of range.
            FloatingPointError: the loss, or a trained weight after an update, became NaN or
                infinite (the step is named; the model's weights are restored).
        """
        forget = check_answer_skill(forget, "forget", "SIMU")
        retain = check_answer_skill(retain, "retain", "SIMU")
        check_forget_retain(forget, retain, ("forget", "retain"), "examples")
        layers = resolve_layers(model, self.layers)
        kw = dict(
            layers=layers, steps=self.steps, batch_size=self.batch_size,
            max_length=self.max_length, quiet=quiet,
        )  # fmt: skip
        # Check the retain set's answers before the (long) forget attribution.
        tokenize_answers(model, retain, self.max_length, "retain", "SIMU")
        att_f = neuron_attribution(model, forget, **kw)
        critical = critical_neurons(att_f.values, self.threshold)
        att_r = None
        if not self.dual:
            att_r = neuron_attribution(model, retain, **kw)
            critical &= ~critical_neurons(att_r.values, self.threshold)
        if not bool(critical.any()):
            warnings.warn(
                "No MLP neuron is critical for the forget skill (with these layers, threshold "
                "and dual setting): SIMU trains the attention projections only.",
                stacklevel=2,
            )
        deltas, history, reason = self._unlearn(model, layers, critical, forget, retain, att_f,
                                                quiet)  # fmt: skip
        self.layers_ = list(layers)
        self.d_mlp_ = d_mlp(model)
        self.meta_ = {**model_keys(model_meta(model)), "forget": forget.name, "retain": retain.name}
        self.attribution_ = att_f.values.float()
        self.attribution_retain_ = None if att_r is None else att_r.values.float()
        self.critical_ = critical
        self.deltas_ = deltas
        self.history_ = history
        self.stop_reason_ = reason
        self.n_updates_ = len(history) - (reason == "forget_loss_target")
        self.forget_loss_initial_ = att_f.loss
        self._after_fit()
        return self

    def _unlearn(self, model, layers, critical, forget, retain, att_f, quiet):
        """Stage 2: masked SophiaH GradDiff through the shared loop
        (:func:`~.training.train`); returns (deltas, history, stop reason)."""
        items_f = tokenize_answers(model, forget, self.max_length, "forget", "SIMU")
        items_r = tokenize_answers(model, retain, self.max_length, "retain", "SIMU")
        candidates = [
            (f"blocks.{layer}.attn.{name}", p)
            for layer in layers
            for name, p in _attention_parameters(model, layer)
        ]
        if not candidates:
            raise NotImplementedError("The model's attention blocks have no parameters to train.")
        rows: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # layer -> (owner, mask, idx)
        for row, layer in enumerate(layers):
            idx = torch.nonzero(critical[row]).flatten()
            if idx.numel():
                owner, view = _w_out_owner(model, layer)
                idx = idx.to(view.device)
                rows[layer] = (owner, _row_mask(owner, view, idx), idx)
        candidates += [
            (f"blocks.{layer}.mlp.W_out", owner) for layer, (owner, _, _) in rows.items()
        ]
        masks = {id(owner): mask for owner, mask, _ in rows.values()}
        old_rows = {layer: w_out(model, layer).detach()[idx].clone() for layer, (_, _, idx)
                    in rows.items()}  # fmt: skip
        kwargs = dict(self.optimizer_kwargs or {})
        period = int(kwargs.get("update_period", 10))
        gamma = float(self.gamma)

        def loss_fn(batch_f, batch_r):
            loss_f = mean_answer_loss(model, batch_f)
            loss_r = mean_answer_loss(model, batch_r)
            return gamma * loss_r - loss_f, {"forget_loss": loss_f, "retain_loss": loss_r}

        def make_optimizer(trained):
            return MaskedSophiaH(
                [p for _, p in trained],
                [masks.get(id(p)) for _, p in trained],
                lr=float(self.lr),
                **kwargs,
            )

        def hessian_step(opt) -> bool:
            return opt is None or opt.param_groups[0]["step"] % period == 0

        def finish(deltas):
            out = {name: d for name, d in deltas.items() if not name.endswith(".mlp.W_out")}
            for layer, (_, _, idx) in rows.items():
                out[f"blocks.{layer}.mlp.W_out"] = (
                    w_out(model, layer).detach()[idx] - old_rows[layer]
                )
            return out

        early = EarlyStop(
            self.forget_loss_factor,
            att_f.example_nll.cpu().tolist(),
            att_f.example_tokens.cpu().tolist(),
        )
        result = train(
            model, candidates, loss_fn, make_optimizer, items_f, items_r,
            max_steps=self.max_steps, batch_size=self.batch_size, seed=self.seed, name="SIMU",
            hint=f"lower lr (now {self.lr}) or optimizer_kwargs['p']", early_stop=early,
            second_order=hessian_step, finish=finish, quiet=quiet,
        )  # fmt: skip
        return result.deltas, result.history, result.stop_reason

    def _after_fit(self) -> None:
        self.n_critical_ = [int(v) for v in self.critical_.sum(1).tolist()]
        self._index = {
            layer: torch.nonzero(self.critical_[row]).flatten()
            for row, layer in enumerate(self.layers_)
            if self.n_critical_[row]
        }
        self._clear_cache()

    # ----------------------------------------------------------------------------- apply
    def apply_to_weights(self, model) -> WeightEdit:
        """Add the deltas to the model's weights in place; returns an undo handle.

        Attention deltas go to the parameters they were trained on (``blocks[l].attn``'s own
        parameters, so a Simu fitted on a TransformerBridge applies to bridges of the same
        architecture, one fitted on a HookedTransformer to HookedTransformers); ``W_out`` row
        deltas go through ``blocks[l].mlp.W_out`` (a view of the weight on a bridge). The
        result equals the trained weights up to float rounding (``old + (new - old)``).

        Example:
            >>> base = model(tokens)
            >>> with simu.apply_to_weights(model):
            ...     logits = model(tokens)   # unlearned
            >>> torch.equal(model(tokens), base), torch.equal(logits, base)  # restored exactly
            (True, False)
        """
        self.check_model(model)
        targets = []
        for name, delta in self.deltas_.items():
            layer = int(name.split(".")[1])
            if name.endswith(".mlp.W_out"):
                tensor = w_out(model, layer)
            else:
                local = name.split(".", 3)[3]
                try:
                    tensor = model.blocks[layer].attn.get_parameter(local)
                except AttributeError:
                    raise ValueError(
                        f"This Simu holds a delta for {name}, a parameter this model does not "
                        "have: it was fitted on another kind of model (TransformerBridge or "
                        "HookedTransformer, or another architecture); fit it again on this model."
                    ) from None
            if name.endswith(".mlp.W_out"):
                expected = (len(self._index[layer]), tensor.shape[1])
            else:
                expected = tuple(tensor.shape)
            if tuple(delta.shape) != expected:
                raise ValueError(
                    f"The delta for {name} has shape {tuple(delta.shape)}, but this model needs "
                    f"{expected}: fit the Simu again on this model."
                )
            targets.append((name, layer, tensor, delta))
        edit = WeightEdit(model)
        try:
            for name, layer, tensor, delta in targets:
                delta = delta.to(device=tensor.device, dtype=tensor.dtype)
                if name.endswith(".mlp.W_out"):
                    idx = self._index[layer].to(tensor.device)
                    expected = tensor.detach()[idx] + delta
                    edit.apply(tensor, lambda w, idx=idx, delta=delta: w.index_add_(0, idx, delta))
                    if not torch.equal(w_out(model, layer).detach()[idx], expected):
                        raise NotImplementedError(
                            f"blocks[{layer}].mlp.W_out is not a view of the model's weight "
                            "here, so it cannot be edited in place."
                        )
                else:
                    edit.apply(tensor, lambda w, delta=delta: w.add_(delta))
        except BaseException:
            edit.undo()
            raise
        return edit

    # ------------------------------------------------------------------------------ hooks
    def _make_hooks(self, model=None) -> list[Hook]:
        raise NotImplementedError(
            "Simu changes the attention projections (W_Q, W_K, W_V, W_O), which no cheap "
            "forward hook reproduces: run the model inside `with simu.apply_to_weights(model):` "
            "instead (simu.mlp_hooks() gives the exact hooks of the W_out part alone)."
        )

    def _hook_tensors(self) -> dict[int, tuple[Tensor, Tensor]]:
        return {
            layer: (idx, self.deltas_[f"blocks.{layer}.mlp.W_out"])
            for layer, idx in self._index.items()
        }

    def mlp_hooks(self, model=None) -> list[Hook]:
        """Exact hooks for the ``W_out`` row deltas alone (not the attention deltas).

        ``blocks.{l}.mlp.hook_post`` keeps the key vector and ``blocks.{l}.hook_mlp_out`` adds
        ``key[..., critical] @ dW_out`` to the MLP's output: the same as adding the row deltas
        to ``W_out``. For analysis (the MLP part's share of the effect); SIMU itself needs
        :meth:`apply_to_weights`.

        Example:
            >>> logits = model.run_with_hooks(tokens, fwd_hooks=simu.mlp_hooks(model))
            >>> logits.shape
            torch.Size([2, 10, 101])
        """
        self._check_fitted()
        if model is not None:
            self.check_model(model)
        hooks: list[Hook] = []
        for layer in self._index:
            keys: dict[str, Tensor] = {}
            name = hook_name("key", layer)

            def keep(activation, hook=None, keys=keys, name=name):
                self._check_width(activation, name)
                keys["key"] = activation
                return activation

            def add(activation, hook=None, keys=keys, layer=layer):
                idx, delta = self._on(activation.device, activation.dtype)[layer]
                key = keys.pop("key")
                return activation + key.index_select(-1, idx) @ delta

            hooks += [(name, keep), (f"blocks.{layer}.hook_mlp_out", add)]
        return hooks

    # --------------------------------------------------------------------------- reports
    def _fitted_summary(self) -> str:
        used = sum(1 for n in self.n_critical_ if n)
        return (
            f"{sum(self.n_critical_)} critical neurons in {used} of {len(self.layers_)} layers, "
            f"{self.n_updates_} updates ({self.stop_reason_})"
        )

    # ------------------------------------------------------------------------- save / load
    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {"attribution": self.attribution_, "critical": self.critical_}
        if self.attribution_retain_ is not None:
            tensors["attribution_retain"] = self.attribution_retain_
        tensors.update({f"delta:{name}": d for name, d in self.deltas_.items()})
        info = {
            "history": self.history_,
            "stop_reason": self.stop_reason_,
            "n_updates": self.n_updates_,
            "forget_loss_initial": self.forget_loss_initial_,
        }
        return tensors, info

    def _set_state(self, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
        self.attribution_ = tensors["attribution"]
        self.attribution_retain_ = tensors.get("attribution_retain")
        self.critical_ = tensors["critical"].bool()
        self.deltas_ = {k.split(":", 1)[1]: v for k, v in tensors.items() if k.startswith("delta:")}
        self.history_ = list(info["history"])
        self.stop_reason_ = str(info["stop_reason"])
        self.n_updates_ = int(info["n_updates"])
        self.forget_loss_initial_ = float(info["forget_loss_initial"])
        self._after_fit()
