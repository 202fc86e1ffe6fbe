"""Selective Pruning (SP), the baseline: prune MLP neurons that matter more for the forget skill.

Pochinkov & Schoots, "Dissecting Language Models: Machine Unlearning via Selective Pruning"
(2024), as stated in METHODS.md section 3: the importance of neuron ``i`` on dataset ``D`` is
``I_D(i) = mean |x_i|`` over all tokens of D at site *key* (``blocks.{l}.mlp.hook_post``, the
input of ``W_out``); the score is ``S(i) = I_F(i) / (I_R(i) + eps)``; the global top fraction
``ratio`` is pruned, once or iteratively (prune ``step``, recollect the importances on the
pruned model, prune again, until ``ratio`` is pruned in all). Pruning sets the neuron's key value
to 0, either with a hook (:meth:`SelectivePruning.hooks`) or by zeroing its ``W_out`` row
(:meth:`SelectivePruning.apply_to_weights`); both give the same logits.

Why a separate collection (:func:`collect_importance`) rather than :func:`mechunlearn.collect`:
:class:`~mechunlearn.collect.NeuronStats` holds the mean and M2 of ``x``, and ``mean |x|`` cannot
be recovered from them. ``collect_importance`` streams ``sum |x|`` in float64 over the same
tokens as ``collect(..., positions="all")`` (BOS and padding excluded), with no reservoir, and
takes extra hooks to run alongside (the pruning hooks, for iterative pruning).

Attention neurons (``hook_z``), which the SP paper can also prune, are not implemented.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .. import __version__
from ..collect import NeuronStats, _check_compatible, _model_meta, _skill_texts, check_same_model
from ..io import load_tensors, save_tensors
from ..sites import (
    d_mlp,
    forward_until,
    hook_name,
    iter_batches,
    model_device,
    resolve_layers,
)
from .base import Hook, Intervention, check_fraction, check_positive


@dataclass
class Importance:
    """Mean absolute key value per neuron over every token of a skill.

    Attributes:
        values: ``[layers, d_mlp]`` float64, ``mean |x|`` at ``hook_post``.
        layers: the model layers, in order.
        n_tokens: tokens counted (BOS and padding excluded).
        meta: model shape and skill name.
    """

    values: Float[Tensor, "layer d_mlp"]
    layers: list[int]
    n_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"Importance(skill={self.meta.get('skill')!r}, layers={len(self.layers)}, "
            f"d_mlp={self.values.shape[1]}, tokens={self.n_tokens})"
        )

    def to(self, device: torch.device | str) -> Importance:
        """A copy on ``device``."""
        return Importance(self.values.to(device), list(self.layers), self.n_tokens, dict(self.meta))

    def check_model(self, model) -> None:
        """Raise if ``model`` has a different shape from the one these importances came from."""
        check_same_model(self.meta, model, "These importances")

    def save(self, path: str | Path) -> Path:
        """Write to a safetensors file with the metadata as JSON in its header."""
        info = {
            "kind": "Importance",
            "layers": self.layers,
            "n_tokens": self.n_tokens,
            "meta": self.meta,
        }
        return save_tensors(path, {"values": self.values}, info)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> Importance:
        """Read importances written by :meth:`save`."""
        tensors, info = load_tensors(path, "Importance", device)
        return cls(
            tensors["values"], list(info["layers"]), int(info["n_tokens"]), dict(info["meta"])
        )


def collect_importance(
    model,
    skill,
    layers: int | Sequence[int] | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    fwd_hooks: Sequence[Hook] = (),
) -> Importance:
    """Stream ``mean |x|`` of every neuron at ``hook_post`` over all tokens of a skill.

    Args:
        model: a TransformerBridge or HookedTransformer.
        skill: a :class:`~mechunlearn.data.Skill` or a list of texts.
        layers: layer indices (negative from the end); None for all.
        batch_size: examples per forward pass.
        max_length: truncate texts to this many tokens.
        fwd_hooks: hooks to run as well, before the importance hooks at the same site (e.g. a
            pruning's hooks, to measure the pruned model).

    Returns:
        Importance on the model's device.

    Example:
        >>> imp = collect_importance(model, mu.load_skill("gsm8k", n=100))
        >>> imp.values.shape  # (n_layers, d_mlp)
    """
    name, prompts, answers = _skill_texts(skill)
    layers = resolve_layers(model, layers)
    device = model_device(model)
    sums = torch.zeros((len(layers), d_mlp(model)), dtype=torch.float64, device=device)
    n_tokens = torch.zeros((), dtype=torch.long, device=device)
    last = hook_name("key", max(layers))

    def make_hook(row: int, rows: Tensor):
        def hook(activation: Float[Tensor, "batch pos d_mlp"], hook=None):
            values = activation.reshape(-1, activation.shape[-1]).index_select(0, rows)
            sums[row] += values.to(torch.float64).abs().sum(0)
            return activation

        return hook

    batches = iter_batches(model, prompts, answers, batch_size=batch_size, max_length=max_length)
    with torch.inference_mode():
        for batch in batches:
            rows = torch.nonzero(batch.mask("all").flatten()).flatten()
            n_tokens += rows.numel()
            hooks = list(fwd_hooks) + [
                (hook_name("key", layer), make_hook(i, rows)) for i, layer in enumerate(layers)
            ]
            forward_until(model, batch, hooks, last)
    count = int(n_tokens)
    if count == 0:
        raise ValueError(f"Skill {name!r} has no tokens to measure.")
    meta = {**_model_meta(model), "skill": name, "version": __version__}
    return Importance(sums / count, layers, count, meta)


class WeightEdit:
    """Zeroed ``W_out`` rows that can be restored: ``undo()``, or use as a context manager.

    Example:
        >>> with sp.apply_to_weights(model):
        ...     logits = model(tokens)          # pruned
        >>> logits = model(tokens)              # restored
    """

    def __init__(self, model, saved: list[tuple[int, Tensor, Tensor]]):
        self.model = model
        self._saved = saved

    @property
    def active(self) -> bool:
        """Whether the weights are still edited."""
        return self._saved is not None

    def undo(self) -> None:
        """Write the original ``W_out`` rows back (a second call does nothing)."""
        if self._saved is None:
            return
        with torch.no_grad():
            for layer, idx, rows in self._saved:
                _w_out(self.model, layer)[idx] = rows
        self._saved = None

    def __enter__(self) -> WeightEdit:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def _w_out(model, layer: int) -> Tensor:
    """Layer ``layer``'s ``W_out`` as ``[d_mlp, d_model]``, sharing storage with the parameter."""
    mlp = model.blocks[layer].mlp
    weight = getattr(mlp, "W_out", None)
    if weight is None:
        raise NotImplementedError(f"blocks[{layer}].mlp has no W_out: cannot edit its weights.")
    return weight


class SelectivePruning(Intervention):
    """Selective Pruning of MLP neurons (the key site), as hooks or as a weight edit.

    Args:
        ratio: total fraction of all neurons (over the fitted layers) to prune, in (0, 1]
            (SP paper: 2 % per step; the skill-unlearning paper's baseline: 1.5 % and 0.01 %).
        iterative: prune ``step`` at a time, recollecting importances on the pruned model
            between steps (needs ``fit(model=..., forget=..., retain=...)``).
        step: fraction pruned per iterative step, in (0, 1].
        eps: added to the retain importance in the score ``I_F / (I_R + eps)``.

    Attributes:
        layers_, d_mlp_, meta_: as for every intervention.
        scores_: ``[layers, d_mlp]`` scores of the last step (``-inf`` where pruned earlier).
        selected_: ``[layers, d_mlp]`` bool mask of the pruned neurons.
        n_selected_: pruned neurons per layer.
        history_: one dict per step: fraction pruned, ``I_F`` and ``I_R`` summed over all
            neurons as measured at that step (before its pruning).

    Example:
        >>> imp_f = collect_importance(model, forget)
        >>> imp_r = collect_importance(model, retain)
        >>> sp = SelectivePruning(ratio=0.015).fit(imp_f, imp_r)
        >>> logits = model.run_with_hooks(tokens, fwd_hooks=sp.hooks(model))
        >>> sp_it = SelectivePruning(ratio=0.06, iterative=True, step=0.02)
        >>> sp_it.fit(model=model, forget=forget, retain=retain)
    """

    _fitted_attrs = Intervention._fitted_attrs + ("selected_", "scores_")

    def __init__(
        self,
        ratio: float = 0.015,
        iterative: bool = False,
        step: float = 0.02,
        eps: float = 1e-6,
    ):
        check_fraction("ratio", ratio)
        check_fraction("step", step)
        check_positive("eps", eps)
        if not isinstance(iterative, bool):
            raise ValueError(f"iterative must be True or False, got {iterative!r}.")
        self.ratio = ratio
        self.iterative = iterative
        self.step = step
        self.eps = eps

    # --------------------------------------------------------------------------------- fit
    def fit(
        self,
        importance_f: Importance | None = None,
        importance_r: Importance | None = None,
        *,
        model=None,
        forget=None,
        retain=None,
        layers: int | Sequence[int] | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
    ) -> SelectivePruning:
        """Choose the neurons to prune.

        Either from importances measured beforehand (one-shot pruning only)::

            sp.fit(collect_importance(model, forget), collect_importance(model, retain))

        or from a model and the two skills (collects the importances; required when
        ``iterative=True``, which recollects them on the pruned model at every step)::

            sp.fit(model=model, forget=forget, retain=retain)

        Returns:
            self.
        """
        if importance_f is not None or importance_r is not None:
            if importance_f is None or importance_r is None:
                raise ValueError("Pass both importance_f and importance_r, or neither.")
            for name, imp in (("importance_f", importance_f), ("importance_r", importance_r)):
                if isinstance(imp, NeuronStats):
                    raise TypeError(
                        f"{name} is NeuronStats, which hold the mean of x, not of |x|: "
                        "use collect_importance(model, skill) for Selective Pruning."
                    )
                if not isinstance(imp, Importance):
                    raise TypeError(f"{name} must be an Importance, got {type(imp).__name__}.")
            if self.iterative:
                raise ValueError(
                    "iterative=True recollects importances on the pruned model at every step: "
                    "call fit(model=..., forget=..., retain=...) instead."
                )
            if model is not None or forget is not None or retain is not None:
                raise ValueError("Pass importances or model/forget/retain, not both.")
            _check_compatible(
                importance_f.meta, importance_r.meta, ("n_layers", "d_mlp"), "importances"
            )
            if list(importance_f.layers) != list(importance_r.layers):
                raise ValueError(
                    f"importance_f holds layers {importance_f.layers}, importance_r "
                    f"{importance_r.layers}: use the same layers."
                )
            self._start(importance_f)
            scores = self._scores(importance_f, importance_r)
            self.selected_ = self._top(
                scores, torch.ones_like(scores, dtype=bool), ratio=self.ratio
            )
            self.scores_ = scores
            self.history_ = [self._history(importance_f, importance_r)]
            self._after_fit()
            return self
        if model is None or forget is None or retain is None:
            raise ValueError(
                "fit needs importances (fit(importance_f, importance_r)) or a model and both "
                "skills (fit(model=..., forget=..., retain=...))."
            )
        layers = resolve_layers(model, layers)
        kw = dict(layers=layers, batch_size=batch_size, max_length=max_length)
        if not self.iterative:
            return self.fit(
                collect_importance(model, forget, **kw), collect_importance(model, retain, **kw)
            )

        total = len(layers) * d_mlp(model)
        target = max(1, round(self.ratio * total))
        per_step = max(1, round(self.step * total))
        n_steps = math.ceil(target / per_step)
        pruned = torch.zeros(
            (len(layers), d_mlp(model)), dtype=torch.bool, device=model_device(model)
        )
        self.layers_, self.d_mlp_, self.meta_ = list(layers), d_mlp(model), _model_meta(model)
        self.history_ = []
        for _ in range(n_steps):
            self.selected_ = pruned
            self._after_fit()
            hooks = self._make_hooks()
            imp_f = collect_importance(model, forget, fwd_hooks=hooks, **kw)
            imp_r = collect_importance(model, retain, fwd_hooks=hooks, **kw)
            self.history_.append(self._history(imp_f, imp_r, pruned))
            scores = self._scores(imp_f, imp_r).masked_fill(pruned, -torch.inf)
            k = min(per_step, target - int(pruned.sum()))
            new = self._top(scores, ~pruned, k=k)
            self.scores_ = scores
            if not bool(new.any()):
                warnings.warn(
                    f"Iterative pruning stopped early at {int(pruned.sum())} of {target} "
                    "neurons: no neuron left to prune.",
                    stacklevel=2,
                )
                break
            pruned = pruned | new
        self.selected_ = pruned
        self._after_fit()
        return self

    def _start(self, importance: Importance) -> None:
        self.layers_ = [int(x) for x in importance.layers]
        self.d_mlp_ = int(importance.values.shape[1])
        self.meta_ = {
            k: importance.meta[k]
            for k in ("model", "n_layers", "d_mlp", "d_model")
            if k in importance.meta
        }

    def _scores(self, imp_f: Importance, imp_r: Importance) -> Tensor:
        return imp_f.values / (imp_r.values.to(imp_f.values.device) + self.eps)

    @staticmethod
    def _top(scores: Tensor, allowed: Tensor, ratio: float | None = None, k: int | None = None):
        from ..analysis.separation import top_neurons

        scores = torch.where(allowed & ~torch.isnan(scores), scores, -torch.inf)
        return top_neurons(scores, ratio=ratio, k=k).to(scores.device) & allowed

    def _history(self, imp_f: Importance, imp_r: Importance, pruned: Tensor | None = None):
        done = 0 if pruned is None else int(pruned.sum())
        return {
            "pruned_fraction": done / imp_f.values.numel(),
            "importance_f": float(imp_f.values.sum()),
            "importance_r": float(imp_r.values.sum()),
        }

    def _after_fit(self) -> None:
        self.n_selected_ = [int(v) for v in self.selected_.sum(1).tolist()]
        self._index = {
            layer: torch.nonzero(self.selected_[row]).flatten()
            for row, layer in enumerate(self.layers_)
            if self.n_selected_[row]
        }
        self._clear_cache()

    # ------------------------------------------------------------------------------ hooks
    def _hook_tensors(self) -> dict[int, Tensor]:
        return self._index

    def _make_hooks(self) -> list[Hook]:
        return [(hook_name("key", layer), self._hook(layer)) for layer in self._index]

    def _hook(self, layer: int):
        name = hook_name("key", layer)

        def hook(activation: Float[Tensor, "... d_mlp"], hook=None) -> Tensor:
            self._check_width(activation, name)
            idx = self._on(activation.device)[layer]
            return activation.index_fill(-1, idx, 0.0)

        return hook

    # ----------------------------------------------------------------------- weight edit
    def apply_to_weights(self, model) -> WeightEdit:
        """Zero the ``W_out`` rows of the pruned neurons in place; returns an undo handle.

        Works on a TransformerBridge (``blocks[l].mlp.W_out`` is a view of the wrapped
        module's weight, transposed where the module stores ``[d_model, d_mlp]``) and on a
        HookedTransformer (``W_out`` is the parameter itself). The edit is checked by reading
        ``W_out`` again; a model whose ``W_out`` is a copy raises NotImplementedError.

        Example:
            >>> with sp.apply_to_weights(model):
            ...     logits = model(tokens)  # same logits as run_with_hooks(..., sp.hooks())
        """
        self.check_model(model)
        saved: list[tuple[int, Tensor, Tensor]] = []
        edit = WeightEdit(model, saved)
        with torch.no_grad():
            for layer, idx in self._index.items():
                weight = _w_out(model, layer)
                idx = idx.to(weight.device)
                saved.append((layer, idx, weight[idx].clone()))
                weight[idx] = 0
                if bool(_w_out(model, layer)[idx].any()):
                    edit.undo()
                    raise NotImplementedError(
                        f"blocks[{layer}].mlp.W_out is not a view of the model's weight here, "
                        "so it cannot be edited in place: use hooks() instead."
                    )
        return edit

    # --------------------------------------------------------------------------- reports
    def _fitted_summary(self) -> str:
        used = sum(1 for n in self.n_selected_ if n)
        return f"{sum(self.n_selected_)} neurons pruned in {used} of {len(self.layers_)} layers"

    # ------------------------------------------------------------------------- save / load
    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {"selected": self.selected_, "scores": self.scores_}, {"history": self.history_}

    def _set_state(self, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
        self.selected_ = tensors["selected"].bool()
        self.scores_ = tensors["scores"]
        self.history_ = list(info.get("history", []))
        self._after_fit()
