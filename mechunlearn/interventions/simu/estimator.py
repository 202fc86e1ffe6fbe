"""The :class:`Simu` estimator: attribution, then masked second-order unlearning, kept as weight
deltas. The method is described in :mod:`mechunlearn.interventions.simu`."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ...data import Skill
from ...models import d_mlp, model_meta
from ...sites import hook_name
from ...validation import check_int, check_layers, model_keys, resolve_layers
from ..base import Hook, WeightIntervention, check_positive, neuron_index
from ..registry import register_method
from ..training import (
    EarlyStop,
    check_forget_loss_factor,
    check_loop_settings,
    check_skills,
    grad_diff_parts,
    tokenize_answers,
    train,
)
from ..weights import WeightEdit, w_out, w_out_owner
from .attribution import critical_neurons, neuron_attribution
from .optimizer import MaskedSophiaH, check_sophia_kwargs


def _attention_parameters(model, layer: int) -> list[tuple[str, Tensor]]:
    """Layer ``layer``'s attention parameters except normalisation weights, named relative to
    ``blocks[layer].attn``."""
    attn = model.blocks[layer].attn
    return [(name, p) for name, p in attn.named_parameters() if "norm" not in name.lower()]


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
        history_: one dict per step: ``loss``, ``forget_loss``, ``retain_loss`` (measured
            before that step's update) and ``forget_loss_initial`` (the same examples, before
            training).
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
        check_loop_settings(max_steps, batch_size, max_length, seed)
        check_forget_loss_factor(forget_loss_factor)
        check_sophia_kwargs(optimizer_kwargs, lr)
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
        forget, retain = check_skills(forget, retain, "SIMU")
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
                owner, view = w_out_owner(model, layer)
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

        def loss_fn(batch_f, batch_r):  # GradDiff's loss; the mask is in the optimizer
            return grad_diff_parts(model, batch_f, batch_r, gamma)

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
        self.n_critical_, self._index = neuron_index(self.critical_, self.layers_)
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
