"""What the trained baselines share: validation, the fit through the shared loop, the weight
deltas applied by parameter name, save and load.

Each baseline (:mod:`.grad_ascent`, :mod:`.grad_diff`, :mod:`.npo`, :mod:`.rmu`) is a
:class:`TrainedBaseline` that says which parameters it trains (:meth:`~TrainedBaseline.
_parameters`) and what it minimises (:meth:`~TrainedBaseline._objective`); the loop is
:func:`mechunlearn.interventions.training.train`, the one SIMU uses, with torch's AdamW. GA,
GradDiff and NPO, whose losses are on the answer tokens, share their constructor, its settings
and their defaults through :class:`ForgetLossBaseline`; every baseline keeps its AdamW and loop
settings with :meth:`TrainedBaseline._set_training`.
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
    check_layers,
    check_positive,
    check_scalar,
    model_keys,
    resolve_layers,
)
from ..base import WeightIntervention
from ..training import (
    EarlyStop,
    LossFn,
    check_forget_loss_factor,
    check_loop_settings,
    check_skills,
    example_answer_nll,
    tokenize_answers,
    train,
)
from ..weights import WeightEdit

__all__ = ["ForgetLossBaseline", "TrainedBaseline", "block_parameters", "check_nonnegative"]


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

    # ------------------------------------------------------------------------- settings
    def _set_training(
        self,
        lr: Any,
        weight_decay: Any,
        max_steps: Any,
        batch_size: Any,
        max_length: Any,
        seed: Any,
    ) -> None:
        """Check the AdamW and loop settings every baseline's constructor takes, and keep them
        (as attributes of their own names).

        Raises:
            ValueError: a setting out of range (the message names it).
        """
        check_positive("lr", lr)
        check_nonnegative("weight_decay", weight_decay)
        check_loop_settings(max_steps, batch_size, max_length, seed)
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_steps = max_steps
        self.batch_size = batch_size
        self.max_length = max_length
        self.seed = seed

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
        forget, retain = check_skills(forget, retain, name)
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


class ForgetLossBaseline(TrainedBaseline):
    """A baseline whose loss is on the answer tokens, with SIMU's early stop on the forget
    answer loss (GA, GradDiff, NPO): the constructor they share, and its settings.

    Defaults (open-unlearning's TOFU fine-tuning arguments, AdamW with ``weight_decay=0.01``,
    every parameter trained; the learning rate and the bounded number of steps scaled to the
    135M default model, see docs/methods.md): ``lr=1e-4``, ``weight_decay=0.01``,
    ``max_steps=30``, ``batch_size=8`` (open-unlearning: 32 per step), constant learning rate
    (no warm-up: the runs are too short for one). Early stop as SIMU's: once a step's forget
    loss reaches ``forget_loss_factor`` (3) times the initial loss of the same examples
    (open-unlearning has none; unchecked ascent destroys the model).

    Args:
        layers: blocks whose parameters (attention, MLP, normalisation) are trained; None (the
            default) trains every parameter of the model, embeddings included, as
            open-unlearning does.
        lr: AdamW's learning rate.
        weight_decay: AdamW's decoupled weight decay.
        max_steps: optimizer steps at most.
        forget_loss_factor: stop once a step's forget loss (the mean answer-token
            cross-entropy ``L_F`` of its forget batch) reaches this multiple (> 1) of the
            initial loss of the same examples; None to always run ``max_steps``.
        batch_size: examples per batch (one forget and one retain batch per step).
        max_length: truncate texts to this many tokens (default: the model's context).
        seed: seed of the batch order.

    Attributes:
        layers_, d_mlp_, meta_, deltas_, history_, n_updates_, stop_reason_: see
            :class:`TrainedBaseline`.
        forget_loss_initial_: the forget skill's mean answer-token loss before training.
    """

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
        check_forget_loss_factor(forget_loss_factor)
        self._set_training(lr, weight_decay, max_steps, batch_size, max_length, seed)
        self.layers = layers
        self.forget_loss_factor = forget_loss_factor
