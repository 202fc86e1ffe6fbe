"""What the trained baselines share: validation, the fit through the shared loop, the weight
deltas applied by parameter name, save and load.

Each baseline (:mod:`.grad_ascent`, :mod:`.grad_diff`, :mod:`.npo`, :mod:`.rmu`) is a
:class:`TrainedBaseline` that says which parameters it trains (:meth:`~TrainedBaseline.
_parameters`) and what it minimises (:meth:`~TrainedBaseline._objective`); the loop is
:func:`mechunlearn.interventions.training.train`, the one SIMU uses, with torch's AdamW.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...data import Skill
from ...models import d_mlp, model_meta
from ...validation import (
    check_forget_retain,
    check_int,
    check_layers,
    check_positive,
    check_scalar,
    check_seed,
    model_keys,
    resolve_layers,
)
from ..base import WeightIntervention
from ..training import (
    EarlyStop,
    LossFn,
    check_answer_skill,
    example_answer_nll,
    tokenize_answers,
    train,
)
from ..weights import WeightEdit

__all__ = ["TrainedBaseline", "block_parameters", "check_nonnegative"]


def check_nonnegative(name: str, value: Any) -> float:
    """A finite number >= 0, as a float, or a one-line error.

    Example:
        >>> check_nonnegative("gamma", 1)
        1.0
    """
    out = float(check_scalar(value, name, numbers.Real, min_val=0))
    if math.isinf(out):
        raise ValueError(f"{name} must be finite, got {value!r}.")
    return out


def block_parameters(model, layers: Sequence[int] | None) -> list[tuple[str, Tensor]]:
    """The model's named parameters: all of them (``layers=None``, full fine-tuning), or those
    of the blocks ``layers`` (attention, MLP and normalisation weights), in the model's order.

    Example:
        >>> names = [n for n, _ in block_parameters(model, [2])]
        >>> len(names), all(".layers.2." in n for n in names)
        (9, True)
    """
    named = list(model.named_parameters())
    if layers is None:
        return named
    ids = {id(p) for layer in layers for p in model.blocks[layer].parameters()}
    return [(n, p) for n, p in named if id(p) in ids]


class TrainedBaseline(WeightIntervention):
    """A baseline trained by the shared loop on a forget and a retain skill (see the module
    docstring); subclasses give the parameters and the objective.

    Fitted attributes common to the baselines:

    Attributes:
        layers_: the layers whose parameters are trained (all layers for full fine-tuning).
        d_mlp_, meta_: as for every intervention.
        deltas_: ``{parameter name: trained - original}`` (names of ``model.named_parameters()``,
            each delta of its parameter's shape).
        history_: one dict per step: the logged terms (``loss``, ``forget_loss``,
            ``retain_loss``, and the method's own), measured before that step's update.
        n_updates_: optimizer updates applied.
        stop_reason_: ``"max_steps"`` or ``"forget_loss_target"``.
    """

    _fitted_attrs = WeightIntervention._fitted_attrs + ("deltas_", "history_")
    _index_tensors: ClassVar[tuple[str, ...]] = ()
    _nonfinite_tensors: ClassVar[tuple[str, ...]] = ()
    #: The short name in messages and on the progress bar.
    _label: ClassVar[str] = "baseline"

    # ------------------------------------------------------------------ validation helpers
    @staticmethod
    def _check_training(
        lr: Any,
        weight_decay: Any,
        max_steps: Any,
        batch_size: Any,
        max_length: Any,
        seed: Any,
        forget_loss_factor: Any = None,
    ) -> None:
        check_positive("lr", lr)
        check_nonnegative("weight_decay", weight_decay)
        check_int("max_steps", max_steps, min_val=1)
        check_int("batch_size", batch_size, min_val=1)
        if max_length is not None:
            check_int("max_length", max_length, min_val=2)
        check_seed(seed)
        if forget_loss_factor is not None:
            check_positive("forget_loss_factor", forget_loss_factor)
            if float(forget_loss_factor) <= 1.0:
                raise ValueError(
                    "forget_loss_factor must be > 1 (a multiple of the initial forget loss) or "
                    f"None, got {forget_loss_factor!r}."
                )

    # ------------------------------------------------------------------- subclass hooks
    def _layers(self, model) -> list[int]:
        """The layers whose parameters are trained."""
        return resolve_layers(model, check_layers(getattr(self, "layers", None)))

    def _parameters(self, model, layers: list[int]) -> list[tuple[str, Tensor]]:
        """The parameters that may be trained."""
        return block_parameters(model, None if self.layers is None else layers)

    def _objective(self, model, items_f, items_r) -> tuple[LossFn, EarlyStop | None]:
        """The loss of one step, and the early stop (computed on the untrained model)."""
        raise NotImplementedError

    def _forget_reference(self, model, items_f) -> tuple[Tensor, EarlyStop]:
        """Per forget example, its summed answer loss before training (float32), and the
        early stop on the forget loss built from it."""
        nll, n_tokens = example_answer_nll(model, items_f, self.batch_size)
        early = EarlyStop(self.forget_loss_factor, nll.double().cpu().tolist(), n_tokens)
        return nll, early

    # --------------------------------------------------------------------------------- fit
    def fit(self, model, forget: Skill, retain: Skill, quiet: bool = False):
        """Train on the forget and retain skills; keep the result as weight deltas.

        The model is left exactly as it was (weights and ``requires_grad`` flags), also when
        training fails or is interrupted.

        Args:
            model: a TransformerBridge or HookedTransformer.
            forget: the skill to unlearn.
            retain: the skill to keep.
            quiet: hide the progress bar.

        Returns:
            self.

        Raises:
            TypeError: a skill is not a Skill.
            ValueError: an empty skill, one without answer tokens, or a layer out of range.
            FloatingPointError: the loss, or a trained weight after an update, became NaN or
                infinite (the step is named; the model's weights are restored).
        """
        name = self._label
        forget = check_answer_skill(forget, "forget", name)
        retain = check_answer_skill(retain, "retain", name)
        check_forget_retain(forget, retain, ("forget", "retain"), "examples")
        layers = self._layers(model)
        items_f = tokenize_answers(model, forget, self.max_length, "forget", name)
        items_r = tokenize_answers(model, retain, self.max_length, "retain", name)
        params = self._parameters(model, layers)
        loss_fn, early = self._objective(model, items_f, items_r)
        lr, decay = float(self.lr), float(self.weight_decay)

        def make_optimizer(trained):
            return torch.optim.AdamW([p for _, p in trained], lr=lr, weight_decay=decay)

        result = train(
            model, params, loss_fn, make_optimizer, items_f, items_r,
            max_steps=self.max_steps, batch_size=self.batch_size, seed=self.seed, name=name,
            hint=f"lower lr (now {self.lr})", early_stop=early, quiet=quiet,
        )  # fmt: skip
        self.layers_ = list(layers)
        self.d_mlp_ = d_mlp(model)
        self.meta_ = {**model_keys(model_meta(model)), "forget": forget.name, "retain": retain.name}
        self.deltas_ = result.deltas
        self.history_ = result.history
        self.stop_reason_ = result.stop_reason
        self.n_updates_ = result.n_updates
        if early is not None:
            self.forget_loss_initial_ = early.initial(range(len(items_f)))
        self._clear_cache()
        return self

    # ------------------------------------------------------------------------------ apply
    def apply_to_weights(self, model) -> WeightEdit:
        """Add the deltas to the model's parameters in place; returns an undo handle.

        Parameters are found by their names in ``model.named_parameters()``, so an estimator
        fitted on a TransformerBridge applies to bridges of the same architecture. The result
        equals the trained weights up to float rounding (``old + (new - old)``).

        Raises:
            NotFittedError: not fitted.
            ValueError: another model (shape), or a delta for a parameter this model lacks.
        """
        self.check_model(model)
        named = dict(model.named_parameters())
        targets = []
        for name, delta in self.deltas_.items():
            tensor = named.get(name)
            if tensor is None:
                raise ValueError(
                    f"This {type(self).__name__} holds a delta for {name}, a parameter this model "
                    "does not have: it was fitted on another kind of model (TransformerBridge or "
                    "HookedTransformer, or another architecture); fit it again on this model."
                )
            if tuple(delta.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"The delta for {name} has shape {tuple(delta.shape)}, but this model needs "
                    f"{tuple(tensor.shape)}: fit the {type(self).__name__} again on this model."
                )
            targets.append((tensor, delta))
        edit = WeightEdit(model)
        try:
            for tensor, delta in targets:
                delta = delta.to(device=tensor.device, dtype=tensor.dtype)
                edit.apply(tensor, lambda w, delta=delta: w.add_(delta))
        except BaseException:
            edit.undo()
            raise
        return edit

    # --------------------------------------------------------------------------- reports
    def _fitted_summary(self) -> str:
        return (
            f"{len(self.deltas_)} parameters trained in {len(self.layers_)} layers, "
            f"{self.n_updates_} updates ({self.stop_reason_})"
        )

    # ------------------------------------------------------------------------- save / load
    def _extra_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {}, {}

    def _set_extra_state(self, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
        return None

    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors, info = self._extra_state()
        tensors = {**tensors, **{f"delta:{name}": d for name, d in self.deltas_.items()}}
        info = {
            **info,
            "history": self.history_,
            "stop_reason": self.stop_reason_,
            "n_updates": self.n_updates_,
        }
        if hasattr(self, "forget_loss_initial_"):
            info["forget_loss_initial"] = self.forget_loss_initial_
        return tensors, info

    def _set_state(self, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
        self.deltas_ = {k.split(":", 1)[1]: v for k, v in tensors.items() if k.startswith("delta:")}
        self.history_ = [dict(h) for h in info["history"]]
        self.stop_reason_ = str(info["stop_reason"])
        self.n_updates_ = int(info["n_updates"])
        if info.get("forget_loss_initial") is not None:
            self.forget_loss_initial_ = float(info["forget_loss_initial"])
        self._set_extra_state(tensors, info)
        self._clear_cache()
