"""The :class:`Lunar` estimator: checks its inputs, drives the passes, solves per layer and
applies the edit as hooks or in place. See :mod:`mechunlearn.interventions.lunar`."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ...data import Skill, calibration_skill
from ...generation import own_continuations
from ...models import d_mlp, model_device, model_meta
from ...sites import hook_name, mlp_output_hook
from ...validation import MAX_SEED, check_forget_retain, check_int, model_keys, resolve_layers
from ..base import Hook, HookIntervention, check_positive
from ..registry import register_method
from ..weights import WeightEdit, edit_w_out
from .layer import _sweep, choose_layer, every_third_layer
from .reference import reference_prompts
from .solver import _adam, _closed_form, _diagnostics, _Normal, _pass, _ridge_lambda

SOLVERS = ("closed_form", "adam")


def _check_skill(name: str, skill: Any, hint: str) -> Skill:
    if not isinstance(skill, Skill):
        raise TypeError(
            f"{name} must be a Skill, got {type(skill).__name__}: wrap plain prompts with "
            f"Skill.from_texts({name!r}, prompts)."
        )
    if len(skill) == 0:
        raise ValueError(f"The {name} skill {skill.name!r} is empty: {hint}")
    return skill


def _int_list(value: Any) -> list[int] | None:
    """``value`` as a list of ints if it is a non-empty sequence of integers, else None."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        return None
    if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in value):
        return None
    return [int(x) for x in value]


def _check_layer(layer: Any) -> str | int | list[int]:
    if layer == "auto" and isinstance(layer, str):
        return layer
    if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool):
        return int(layer)
    as_list = _int_list(layer)
    if as_list is None:
        raise ValueError(
            f"layer must be 'auto', an int or a non-empty list of ints, got {layer!r}."
        )
    return as_list


@register_method("LUNAR", fits_on="model", multi_retain=True)
class Lunar(HookIntervention):
    """LUNAR as a ``W_out`` edit, applied by hooks or in place (the method: the package docstring).

    Args:
        layer: the layer(s) whose ``W_out`` changes: an int, a list of ints (each layer is
            fitted independently on the unedited model, as the authors do), or ``"auto"``
            (chosen by a sweep on held-back examples; see :meth:`fit`). Negative counts from
            the end.
        coef: the redirection coefficient ``c`` (authors: 2.0); finite and non-zero.
        solver: ``"closed_form"`` (float64 normal equations) or ``"adam"`` (the authors'
            gradient route on the same objective).
        ridge: relative ridge: ``lam = ridge * trace(G) / d_mlp`` (> 0).
        epochs: epochs of the Adam route (authors: 20).
        lr: initial learning rate of the Adam route (authors: 0.01).
        seed: seed of the held-back split (``layer="auto"``) and of Adam's row order.
        candidates: the layers ``layer="auto"`` tries (None: every third layer,
            :func:`every_third_layer`; ``"all"`` is not a value: pass ``range(n_layers)``). The
            sweep costs two teacher-forced passes over the held-back examples per candidate
            (timings: ``docs/benchmarks.md``).

    Hooks: two per layer, sharing one slot. One records the key at
    ``blocks.{l}.mlp.hook_post``, the other adds ``key @ dW`` at ``blocks.{l}.mlp.hook_out``.
    They touch every position, BOS and padding included, exactly as the weight edit does. Any
    upstream change (e.g. Neuron Adjust at ``hook_pre``) is seen; list these hooks *after* any
    other hook that changes ``blocks.{l}.mlp.hook_post`` itself (e.g. Selective Pruning's), so
    that the recorded key is the one ``W_out`` multiplies.

    Attributes:
        layers_: the edited layers.
        d_mlp_: neurons per layer of the model it was fitted on.
        meta_: the model's name and shape, and the skills' names and sizes.
        direction_: ``{layer: r_l}``, float64 ``[d_model]`` (reference mean minus forget mean).
        delta_w_out_: ``{layer: dW}``, float32 ``[d_mlp, d_model]``: the edited weight is
            ``W_out + dW``.
        layer_sweep_: for ``layer="auto"``, one dict per candidate layer (``layer``,
            ``forget``/``retain`` accuracies with the redirection and ``*_base`` without, the
            NLLs, ``delta_norm``, ``eligible``); ``[]`` otherwise.
            ``pandas.DataFrame(lunar.layer_sweep_)`` makes it a table.
        fit_loss_: ``{layer: mean squared error after the edit}`` over all rows and
            ``d_model`` outputs.
        diagnostics_: one dict per edited layer: rows, ``ridge_lambda``, ``mse_before`` /
            ``mse_after``, ``forget_redirect`` (mean share of ``c r_l`` the forget rows
            receive; 1 is exact), ``objective`` (``mse_after`` plus the ridge penalty, what
            both solvers minimise), ``kept_shift`` (RMS change of the kept rows relative to
            ``|c r_l|``; 0 is exact), ``linear_check`` (``max |key @ W_out + b_out -
            mlp_out|`` relative; ~0 when the hooks reproduce the weight edit) and, for Adam,
            ``epoch_loss``.

    Example:
        >>> lunar = Lunar(layer=1).fit(model, forget, retain)
        >>> lunar.layers_, lunar.delta_w_out_[1].shape     # dW: [d_mlp, d_model]
        ([1], torch.Size([48, 32]))
        >>> logits = model.run_with_hooks(tokens, fwd_hooks=lunar.hooks(model))
    """

    _fitted_attrs = HookIntervention._fitted_attrs + ("direction_", "delta_w_out_")

    def __init__(
        self,
        layer: str | int | Sequence[int] = "auto",
        coef: float = 2.0,
        solver: str = "closed_form",
        ridge: float = 1e-4,
        epochs: int = 20,
        lr: float = 0.01,
        seed: int = 0,
        candidates: Sequence[int] | None = None,
    ):
        layer = _check_layer(layer)
        if isinstance(coef, bool) or not isinstance(coef, (int, float, np.number)):
            raise ValueError(f"coef must be a finite non-zero number, got {coef!r}.")
        if not math.isfinite(float(coef)) or float(coef) == 0.0:
            raise ValueError(f"coef must be a finite non-zero number, got {coef!r}.")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}.")
        check_positive("ridge", ridge)
        check_positive("lr", lr)
        self.layer = layer
        self.coef = float(coef)
        self.solver = solver
        self.ridge = float(ridge)
        self.epochs = check_int("epochs", epochs, min_val=1)
        self.lr = float(lr)
        self.seed = check_int("seed", seed, min_val=0, max_val=MAX_SEED)
        if candidates is not None:
            if layer != "auto":
                raise ValueError(
                    f"candidates only applies to layer='auto' (got layer={layer!r}): "
                    "drop candidates, or pass layer='auto'."
                )
            as_list = _int_list(candidates)
            if as_list is None:
                raise ValueError(
                    f"candidates must be None or a non-empty list of layers, got {candidates!r}."
                )
            candidates = as_list
        self.candidates = candidates

    # --------------------------------------------------------------------------------- fit
    def fit(
        self,
        model,
        forget: Skill,
        retain: Skill | Sequence[Skill],
        reference: Skill | None = None,
        *,
        batch_size: int = 16,
        held_out: float | int = 0.25,
        general: Skill | str | None = "shipped",
    ) -> Lunar:
        """Compute the direction(s) and solve for ``dW``; the model is never changed.

        Args:
            model: a TransformerBridge or HookedTransformer.
            forget: the skill to unlearn (its prompts; its answers too for ``layer="auto"``).
            retain: the skill to keep (likewise), or a list of skills to keep: every one
                enters the normal equations as "unchanged" rows, and ``layer="auto"`` keeps
                every one at or above its floor (``RETAIN_FLOOR`` of its base score) on its
                held-back examples.
            reference: prompts the model declines to answer; None for
                :func:`reference_prompts`.
            batch_size: prompts per forward pass.
            held_out: for ``layer="auto"``: the fraction (or number) of the forget and the
                retain examples held back to score the candidate layers (the others give the
                sweep's directions). Ignored for a fixed layer.
            general: for ``layer="auto"``, general text the chosen layer must also keep at
                its floor, beside every retain skill (it is scored, not fitted on):
                ``"shipped"`` (default) for :data:`GENERAL_QUESTIONS` of the shipped general
                questions (:func:`~mechunlearn.data.calibration_skill`) answered by the
                unedited model's own greedy continuation (:data:`GENERAL_TOKENS` tokens,
                :func:`~mechunlearn.generation.own_continuations`), so that the floor is on
                how much of what the model said it still says; a Skill with answers (e.g.
                MMLU) for that skill; None for no general floor (the pipeline passes None,
                and its general skill, if any, among ``retain``). Checked for every
                ``layer``; used by ``layer="auto"`` only.

        Returns:
            self.

        Raises:
            TypeError: a skill is not a Skill.
            ValueError: an empty skill, a layer out of range, too few examples to hold some
                back, or a zero direction.
        """
        forget = _check_skill("forget", forget, "pass the examples to unlearn.")
        retains = _retain_list(retain)
        for kept in retains:
            check_forget_retain(forget, kept, ("forget", "retain"), "examples")
        if reference is None:
            reference = reference_prompts()
        reference = _check_skill(
            "reference",
            reference,
            "pass prompts the model declines to answer, or reference=None for reference_prompts().",
        )
        check_int("batch_size", batch_size, min_val=1)
        general = _check_general(general, retains)
        width = d_mlp(model)
        candidates = self._candidates(model)
        if self.layer == "auto":
            fit_f, probe_f, halves_r = self._hold_out(forget, retains, held_out)
            floors = [probe for _, probe in halves_r] + _general_floor(model, general, batch_size)
        ref_mean = _pass(model, reference, batch_size, candidates) / len(reference)

        device = model_device(model)
        keep = self.solver == "adam"
        sweep: list[dict[str, Any]] = []
        if self.layer == "auto":
            sweep, sums = self._layer_sweep(
                model, candidates, ref_mean, fit_f, probe_f, halves_r, floors, batch_size
            )
            layers = [choose_layer(sweep)]
            rows = [candidates.index(layers[0])]
            sums, ref_mean = sums[rows], ref_mean[rows]
            normal = {layer: _Normal.empty(width, device) for layer in layers}
            _pass(model, forget, batch_size, (), normal, True, keep)
        else:
            layers = candidates
            normal = {layer: _Normal.empty(width, device) for layer in layers}
            sums = _pass(model, forget, batch_size, layers, normal, True, keep)
        directions = _directions(layers, ref_mean, sums, len(forget))
        for kept in retains:
            _pass(model, kept, batch_size, (), normal, False, keep)

        deltas, diagnostics, losses = {}, [], {}
        for layer in layers:
            deltas[layer], info = self._solve(layer, normal[layer], directions[layer])
            diagnostics.append(info)
            losses[layer] = info["mse_after"]
        _warn_nonlinear(diagnostics)

        # Everything is set at the end: an interrupted fit leaves the object as it was.
        self.layers_ = list(layers)
        self.d_mlp_ = width
        self.meta_ = {
            **model_keys(model_meta(model)),
            "forget": forget.name,
            "retain": ", ".join(kept.name for kept in retains),
            "reference": reference.name,
            "n_forget": len(forget),
            "n_retain": sum(len(kept) for kept in retains),
            "n_reference": len(reference),
            "general": None
            if self.layer != "auto" or general is None
            else (GENERAL_NAME if isinstance(general, str) else general.name),
        }
        self.direction_ = directions
        self.delta_w_out_ = deltas
        self.output_hooks_ = {layer: mlp_output_hook(model, layer) for layer in layers}
        self.layer_sweep_ = sweep
        self.fit_loss_ = losses
        self.diagnostics_ = diagnostics
        self._clear_cache()
        return self

    def _hold_out(
        self, forget: Skill, retains: list[Skill], held_out: float | int
    ) -> tuple[Skill, Skill, list[tuple[Skill, Skill]]]:
        """``layer="auto"``'s split of every skill into the part the sweep's edits are fitted on
        and the held-back part they are scored on: ``(fit_f, probe_f, [(fit_r, probe_r)])``."""
        for name, skill in (("forget", forget), *(("retain", kept) for kept in retains)):
            if not any(skill.answers):
                raise ValueError(
                    f"layer='auto' scores held-back {name} examples on their answers "
                    f"(teacher-forced), but the {name} skill {skill.name!r} has none: "
                    "give it answers, or pass a fixed layer=<int>."
                )
        fit_f, probe_f = _hold_out(forget, held_out, self.seed, "forget")
        halves_r = [_hold_out(kept, held_out, self.seed, "retain") for kept in retains]
        return fit_f, probe_f, halves_r

    def _layer_sweep(
        self,
        model,
        candidates: list[int],
        ref_mean: Float[Tensor, "candidate d_model"],
        fit_f: Skill,
        probe_f: Skill,
        halves_r: list[tuple[Skill, Skill]],
        floors: list[Skill],
        batch_size: int,
    ) -> tuple[list[dict[str, Any]], Float[Tensor, "candidate d_model"]]:
        """Each candidate's own closed-form edit, fitted on the fit parts and scored on the
        held-back forget part and on ``floors`` (the retain skills' held-back parts and the
        general text; a layer is chosen for what its edit does, to every skill): the sweep's
        rows, and the forget prompts' last-token residual sums per candidate over all of
        ``forget`` (the fit part's plus the held-back part's)."""
        trial = {layer: _Normal.empty(d_mlp(model), model_device(model)) for layer in candidates}
        sums_fit = _pass(model, fit_f, batch_size, candidates, trial, True)
        for fit_r, _ in halves_r:
            _pass(model, fit_r, batch_size, (), trial, False)
        sums_probe = _pass(model, probe_f, batch_size, candidates)
        sweep_dirs = ref_mean - sums_fit / len(fit_f)
        edits = {}
        for i, layer in enumerate(candidates):
            ne = trial.pop(layer)
            gram = ne.gram_f + ne.gram_k
            target = self.coef * sweep_dirs[i]
            edits[layer] = _closed_form(gram, ne.sum_f, target, _ridge_lambda(gram, self.ridge))
        sweep = _sweep(model, edits, probe_f, floors, batch_size)
        return sweep, sums_fit + sums_probe

    def _solve(
        self, layer: int, ne: _Normal, direction: Float[Tensor, " d_model"]
    ) -> tuple[Float[Tensor, "d_mlp d_model"], dict[str, Any]]:
        """One layer's ``dW`` (float32) by the chosen solver, and its diagnostics."""
        gram = ne.gram_f + ne.gram_k
        if not bool(torch.isfinite(gram).all()):
            raise ValueError(
                f"Non-finite key values at layer {layer}: check the model's dtype "
                "(float16 overflows) and inputs."
            )
        lam = _ridge_lambda(gram, self.ridge)
        if lam <= 0.0:
            raise ValueError(f"Every key vector at layer {layer} is zero: choose another layer.")
        target = self.coef * direction
        history = None
        if self.solver == "closed_form":
            delta = _closed_form(gram, ne.sum_f, target, lam)
        else:
            delta, history = _adam(ne, target, lam, self.epochs, self.lr, self.seed)
        info = {"layer": layer, **_diagnostics(ne, delta, target, lam)}
        info["linear_check"] = None if ne.linear_error is None else float(ne.linear_error)
        if history is not None:
            info["epoch_loss"] = history
        return delta.float(), info

    def _candidates(self, model) -> list[int]:
        if self.layer == "auto":
            if self.candidates is None:
                return every_third_layer(model)
            return resolve_layers(model, self.candidates)
        return resolve_layers(model, self.layer)

    # ------------------------------------------------------------------------------ hooks
    def _hook_tensors(self) -> dict[int, Tensor]:
        return self.delta_w_out_

    def _make_hooks(self, model=None) -> list[Hook]:
        """Two hooks per layer, sharing one slot: record ``hook_post``, add at the MLP's own
        output (:func:`~mechunlearn.sites.mlp_output_hook`: ``blocks.{l}.mlp.hook_out`` on a
        TransformerBridge, before any norm after the MLP, where ``W_out + dW`` acts; the hook
        point of the fitted model when ``model`` is not given).

        Positions: every position, BOS and padding included, exactly as the weight edit
        changes every position. The recorded key is ``hook_post`` after the hooks registered
        before this one at that site (and after any upstream change, such as Neuron Adjust at
        ``hook_pre``): list these hooks *after* any other hook that changes
        ``blocks.{l}.mlp.hook_post``, so that the key is the one ``W_out`` multiplies.
        """
        hooks: list[Hook] = []
        for layer in self.layers_:
            slot: dict[str, Tensor] = {}
            hooks.append((hook_name("key", layer), self._record(layer, slot)))
            if model is not None:
                out = mlp_output_hook(model, layer)
            else:
                out = getattr(self, "output_hooks_", {}).get(layer, hook_name("mlp_out", layer))
            hooks.append((out, self._add(layer, slot)))
        return hooks

    def _record(self, layer: int, slot: dict[str, Tensor]):
        name = hook_name("key", layer)

        def hook(activation: Float[Tensor, "... d_mlp"], hook=None) -> Tensor:
            self._check_width(activation, name)
            slot["key"] = activation
            return activation

        return hook

    def _add(self, layer: int, slot: dict[str, Tensor]):
        def hook(activation: Float[Tensor, "... d_model"], hook=None) -> Tensor:
            key = slot.pop("key", None)
            if key is None:
                raise RuntimeError(
                    f"Lunar's hook at the MLP output of layer {layer} ran without the key vector "
                    f"from {hook_name('key', layer)}: pass the whole list from hooks() together."
                )
            delta = self._on(activation.device, activation.dtype)[layer]
            return activation + key.to(activation.dtype) @ delta

        return hook

    # ----------------------------------------------------------------------- weight edit
    def apply_to_weights(self, model) -> WeightEdit:
        """Write ``W_out + dW`` into the model in place; returns the undo handle.

        Use it as a context manager: the original weights come back bit for bit when the
        block ends, even after an exception. Gives the same logits as :meth:`hooks`.

        Raises:
            ValueError: the model differs from the one this was fitted on.
            NotImplementedError: the model's ``W_out`` is not a view of its weight.

        Example:
            >>> base = model(tokens)
            >>> with lunar.apply_to_weights(model):
            ...     edited = model(tokens)
            >>> torch.equal(model(tokens), base), torch.equal(edited, base)   # undone on exit
            (True, False)
        """
        self.check_model(model)
        return edit_w_out(
            model,
            {
                layer: lambda w, d=self.delta_w_out_[layer]: w.add_(d.to(w.device, w.dtype))
                for layer in self.layers_
            },
        )

    # --------------------------------------------------------------------------- reports
    def _fitted_summary(self) -> str:
        return f"layers {self.layers_}, coef {self.coef}, solver {self.solver!r}"

    # ------------------------------------------------------------------------- save / load
    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {}
        for layer in self.layers_:
            tensors[f"direction.{layer}"] = self.direction_[layer]
            tensors[f"delta_w_out.{layer}"] = self.delta_w_out_[layer]
        info = {
            "layer_sweep": self.layer_sweep_,
            "fit_loss": {str(k): v for k, v in self.fit_loss_.items()},
            "diagnostics": self.diagnostics_,
            "output_hooks": {str(k): v for k, v in self.output_hooks_.items()},
        }
        return tensors, info

    def _set_state(self, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
        self.direction_ = {layer: tensors[f"direction.{layer}"] for layer in self.layers_}
        self.delta_w_out_ = {layer: tensors[f"delta_w_out.{layer}"] for layer in self.layers_}
        self.layer_sweep_ = list(info.get("layer_sweep", []))
        self.fit_loss_ = {int(k): float(v) for k, v in info.get("fit_loss", {}).items()}
        self.diagnostics_ = list(info.get("diagnostics", []))
        # Files saved before 0.3 name no hook point: blocks.L.hook_mlp_out, as then.
        hooks = info.get("output_hooks", {})
        self.output_hooks_ = {
            layer: hooks.get(str(layer), hook_name("mlp_out", layer)) for layer in self.layers_
        }


#: Shipped general questions ``Lunar.fit(general="shipped")`` holds at the sweep's floor.
GENERAL_QUESTIONS = 32
#: Tokens of the unedited model's greedy continuation that each general question is scored on.
GENERAL_TOKENS = 16
#: The name of ``general="shipped"``'s skill in the sweep's columns and ``meta_``.
GENERAL_NAME = "general-questions"


def _check_general(general: Any, retains: list[Skill]) -> Any:
    """``fit``'s ``general`` checked (for every ``layer``): None, ``"shipped"`` or a Skill with
    answers whose name no retain skill has."""
    if general is None:
        return None
    if isinstance(general, str):
        if general != "shipped":
            raise ValueError(f"general must be 'shipped', a Skill or None, got {general!r}.")
        name = GENERAL_NAME
    else:
        general = _check_skill("general", general, "pass general text with answers, or None.")
        if not any(general.answers):
            raise ValueError(
                f"The general skill {general.name!r} has no answers: layer='auto' scores it "
                "teacher-forced; pass general='shipped' or a skill with answers."
            )
        name = general.name
    if name in {kept.name for kept in retains}:
        raise ValueError(
            f"The general skill and a retain skill are both named {name!r}: the sweep's "
            "columns would mix them; rename one (Skill(name, examples))."
        )
    return general


def _general_floor(model, general: Any, batch_size: int) -> list[Skill]:
    """``layer="auto"``'s general text (a checked ``general``) as a list of zero or one skill."""
    if general is None:
        return []
    if not isinstance(general, str):
        return [general]
    questions = calibration_skill(n=GENERAL_QUESTIONS, formats=["plain"])
    try:
        return [own_continuations(model, questions.prompts, GENERAL_TOKENS, batch_size,
                                  name=GENERAL_NAME)]  # fmt: skip
    except ValueError as err:
        raise ValueError(f"{err} For LUNAR's general floor, pass general=None or a Skill with "
                         "answers.") from None  # fmt: skip


def _retain_list(retain: Any) -> list[Skill]:
    """The kept skills as a list: one Skill, or a non-empty list or tuple of them."""
    hint = "pass examples of a skill to keep (the edit must not move them)."
    if isinstance(retain, (list, tuple)):
        if not retain:
            raise ValueError(f"retain is an empty list: {hint}")
        kept = [_check_skill("retain", r, hint) for r in retain]
        names = [r.name for r in kept]
        if len(set(names)) != len(names):
            raise ValueError(f"retain names a skill twice: {names}.")
        return kept
    return [_check_skill("retain", retain, hint)]


def _hold_out(skill: Skill, held_out: float | int, seed: int, name: str) -> tuple[Skill, Skill]:
    try:
        return skill.split(held_out, seed=seed)
    except (TypeError, ValueError):
        raise ValueError(
            f"layer='auto' holds back held_out={held_out!r} of the {name} examples to choose "
            f"the layer, which does not split {len(skill)} examples into two non-empty parts: "
            "pass more examples, another held_out, or a fixed layer=<int>."
        ) from None


def _directions(
    layers: list[int],
    ref_mean: Float[Tensor, "layer d_model"],
    sums: Float[Tensor, "layer d_model"],
    n_forget: int,
) -> dict[int, Float[Tensor, " d_model"]]:
    """``{layer: r_l}``: the reference mean minus the forget mean, checked finite and non-zero."""
    directions = {layer: ref_mean[i] - sums[i] / n_forget for i, layer in enumerate(layers)}
    for layer, r in directions.items():
        if not bool(torch.isfinite(r).all()):
            raise ValueError(
                f"The direction at layer {layer} is not finite: check the model's dtype "
                "(float16 overflows) and inputs."
            )
        if float(r.abs().max()) == 0.0:
            raise ValueError(
                f"The direction at layer {layer} is zero: the reference prompts must differ "
                "from the forget prompts."
            )
    return directions


def _warn_nonlinear(diagnostics: list[dict[str, Any]]) -> None:
    bad = [d["layer"] for d in diagnostics if (d["linear_check"] or 0.0) > 1e-2]
    if bad:
        warnings.warn(
            f"At layers {bad}, the MLP's output is not hook_post @ W_out + b_out (a norm "
            "after the MLP?): Lunar.hooks() and apply_to_weights() will not agree there.",
            stacklevel=3,
        )
