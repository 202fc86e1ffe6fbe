"""Selective Pruning (SP), the baseline: prune MLP neurons that matter more for the forget skill.

Pochinkov & Schoots, "Dissecting Language Models: Machine Unlearning via Selective Pruning"
(2024), as stated in docs/methods.md: the importance of neuron ``i`` on dataset ``D`` is
``I_D(i) = mean |x_i|`` over all tokens of D at site *key* (``blocks.{l}.mlp.hook_post``, the
input of ``W_out``; :func:`mechunlearn.collect_importance`); the score is
``S(i) = I_F(i) / (I_R(i) + eps)``; the global top fraction ``ratio`` is pruned, once, or
iteratively (:func:`mechunlearn.tuning.prune_iteratively`: prune ``step``, measure the
importances again on the pruned model, prune again). Pruning sets the neuron's key value to 0,
either with a hook (:meth:`SelectivePruning.hooks`) or by zeroing its ``W_out`` row
(:meth:`SelectivePruning.apply_to_weights`); both give the same logits.

Attention neurons (``hook_z``), which the SP paper can also prune, are not implemented.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..kernels.separation import top_neurons
from ..sites import hook_name
from ..stats import Importance, NeuronStats
from ..validation import check_compatible, check_forget_retain, check_type, model_keys
from .base import Hook, HookIntervention, check_fraction, check_positive, neuron_index
from .registry import register_method
from .weights import WeightEdit, edit_w_out


@register_method("SP", fits_on="importance")
class SelectivePruning(HookIntervention):
    """Selective Pruning of MLP neurons (the key site), as hooks or as a weight edit.

    Positions: the hooks zero the pruned neurons' key values at **every** position, BOS
    included, exactly as zeroing their ``W_out`` rows does (the two give the same logits).

    Args:
        ratio: fraction of all neurons (over the fitted layers) to prune, in (0, 1]
            (SP paper: 2 % per step; the skill-unlearning paper's baseline: 1.5 % and 0.01 %).
        eps: added to the retain importance in the score ``I_F / (I_R + eps)``.

    Attributes:
        layers_, d_mlp_, meta_: as for every intervention.
        scores_: ``[layers, d_mlp]`` scores of the last step (``-inf`` where pruned earlier).
        selected_: ``[layers, d_mlp]`` bool mask of the pruned neurons.
        n_selected_: pruned neurons per layer.
        history_: one dict per step: fraction pruned before it, ``I_F`` and ``I_R`` summed over
            all neurons as measured at that step.

    Example:
        >>> imp_f = mu.collect_importance(model, forget)   # or collect(..., what=("importance",))
        >>> imp_r = mu.collect_importance(model, retain)
        >>> sp = SelectivePruning(ratio=0.05).fit(imp_f, imp_r)
        >>> sum(sp.n_selected_)                          # round(0.05 * 3 * 48)
        7
        >>> logits = model.run_with_hooks(tokens, fwd_hooks=sp.hooks(model))
        >>> sp_it = mu.prune_iteratively(model, forget, retain, ratio=0.06, step=0.02)
        >>> len(sp_it.history_), sum(sp_it.n_selected_)  # 3 steps; round(0.06 * 144) neurons
        (3, 9)
    """

    _fitted_attrs = HookIntervention._fitted_attrs + ("selected_", "scores_")
    _index_tensors = ("selected",)
    _nonfinite_tensors = ("scores",)  # -inf where pruned earlier

    def __init__(self, ratio: float = 0.015, eps: float = 1e-6):
        self.ratio = check_fraction("ratio", ratio)
        self.eps = check_positive("eps", eps)

    # --------------------------------------------------------------------------------- fit
    def fit(
        self,
        importance_f: Importance,
        importance_r: Importance,
        *,
        pruned: SelectivePruning | None = None,
    ) -> SelectivePruning:
        """Choose the neurons to prune from importances collected beforehand.

        Args:
            importance_f: forget-skill importances (:func:`mechunlearn.collect_importance`,
                or ``collect(..., what=("importance",))``).
            importance_r: retain-skill importances (same model and layers).
            pruned: an earlier pruning of the same model whose neurons stay pruned; ``ratio``
                more are added (one step of iterative pruning: measure the importances on the
                model pruned by ``pruned``, see :func:`mechunlearn.tuning.prune_iteratively`).

        Returns:
            self.
        """
        for name, imp in (("importance_f", importance_f), ("importance_r", importance_r)):
            if isinstance(imp, NeuronStats):
                raise TypeError(
                    f"{name} is NeuronStats, which hold the mean of x, not of |x|: "
                    "use collect_importance(model, skill) for Selective Pruning."
                )
            check_type(imp, Importance, name, "Use mu.collect_importance(model, skill).")
        check_forget_retain(
            importance_f, importance_r, ("importance_f", "importance_r"), "importances"
        )
        check_compatible(importance_f.meta, importance_r.meta, ("n_layers", "d_mlp"), "importances")
        if list(importance_f.layers) != list(importance_r.layers):
            raise ValueError(
                f"importance_f holds layers {importance_f.layers}, importance_r "
                f"{importance_r.layers}: use the same layers."
            )
        self._start(importance_f)
        scores = self._scores(importance_f, importance_r)
        before = torch.zeros_like(scores, dtype=torch.bool)
        history: list[dict[str, float]] = []
        if pruned is not None:
            check_type(pruned, SelectivePruning, "pruned")
            pruned._check_fitted()
            if pruned.layers_ != self.layers_ or pruned.d_mlp_ != self.d_mlp_:
                raise ValueError(
                    f"pruned covers layers {pruned.layers_} (d_mlp {pruned.d_mlp_}), these "
                    f"importances {self.layers_} (d_mlp {self.d_mlp_}): use the same layers."
                )
            before = pruned.selected_.to(scores.device)
            history = [dict(h) for h in pruned.history_]
        scores = scores.masked_fill(before, -torch.inf)
        new = self._top(scores, ~before, ratio=self.ratio)
        if pruned is not None and not bool(new.any()):
            warnings.warn("No neuron left to prune: the pruning is unchanged.", stacklevel=2)
        self.selected_ = before | new
        self.scores_ = scores
        self.history_ = history + [self._history(importance_f, importance_r, before)]
        self._after_fit()
        return self

    def _start(self, importance: Importance) -> None:
        self.layers_ = [int(x) for x in importance.layers]
        self.d_mlp_ = int(importance.values.shape[1])
        self.meta_ = model_keys(importance.meta)

    def _scores(self, imp_f: Importance, imp_r: Importance) -> Tensor:
        return imp_f.values / (imp_r.values.to(imp_f.values.device) + self.eps)

    @staticmethod
    def _top(scores: Tensor, allowed: Tensor, ratio: float | None = None, k: int | None = None):
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
        self.n_selected_, self._index = neuron_index(self.selected_, self.layers_)
        self._clear_cache()

    # ------------------------------------------------------------------------------ hooks
    def _hook_tensors(self) -> dict[int, Tensor]:
        return self._index

    def _make_hooks(self, model=None) -> list[Hook]:
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
            ...     logits = model(tokens)
            >>> torch.equal(logits, model.run_with_hooks(tokens, fwd_hooks=sp.hooks(model)))
            True
        """
        self.check_model(model)
        return edit_w_out(
            model,
            {
                layer: lambda w, idx=idx: w.index_fill_(0, idx.to(w.device), 0.0)
                for layer, idx in self._index.items()
            },
        )

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
