"""Neuron Adjust (NA): move forget-skill activations of selected neurons onto the retain skill.

Li, Sun & Weng, "Effective Skill Unlearning through Intervention and Abstention" (NAACL 2025),
as stated in docs/methods.md ("Neuron Adjust"):

1. Model every neuron's pre-activation (site ``"pre"``, ``blocks.{l}.mlp.hook_pre``) on the
   forget skill F and the retain skill R as Gaussians ``N(mu_F, sigma_F)`` and
   ``N(mu_R, sigma_R)`` (:class:`~mechunlearn.collect.NeuronStats`, float64).
2. Score every neuron (default: the signed mean difference ``mu_F - mu_R``, the authors'
   choice) and keep the global top fraction ``ratio`` across all layers
   (:func:`mechunlearn.analysis.separation.top_neurons`).
3. At inference, for each selected element value ``x`` (every token position but BOS): if
   ``p_F(x) >= p_R(x)``, then with probability ``p_F / (p_F + p_R)`` replace ``x`` by
   ``mu_R - (x - mu_F) * sigma_R / sigma_F`` (``mode="reflect"``, the authors' rule) or by
   ``mu_R + (x - mu_F) * sigma_R / sigma_F`` (``mode="map"``); otherwise leave it.

**Positions.** The hooks adjust only the positions the statistics describe: every token but
BOS (the statistics exclude it: its activations are outliers of their own, and a value
reflected there can land 30 sigma_R away and damage every continuation, whatever the skill).
Positions holding the BOS token id are found in each forward pass by first hooks before
block 0 (:class:`~mechunlearn.interventions.base.BosGuard`). Padding is masked out of
attention, so no change there reaches an output. ``adjust_bos=True`` adjusts BOS too, the
authors' behaviour (their hook changes every position); fitting it on statistics that exclude
BOS warns.

**Models without BOS.** "Never BOS" concerns the BOS that mechunlearn prepends, and it prepends
one only where the model does (:func:`~mechunlearn.models.model_bos_id`: the tokenizer's BOS id
where TransformerLens's ``cfg.default_prepend_bos`` holds). TransformerLens turns that off for
Qwen2, Qwen3 and GPT-NeoX (Pythia), whose tokenizers add no BOS: their texts start with the
first prompt token, ``bos_token_id_`` is None, nothing is guarded, and NA (fit on statistics
that counted position 0 like any other token) adjusts every position, the first included.

**Several retain skills.** ``fit(stats_f, [stats_r1, stats_r2, ...])`` (or a dict): a neuron's
score is its separation from the *closest* retain skill (the minimum over retain skills), and a
selected neuron is adjusted toward the Gaussian of that closest retain skill.

Where we deviate from the authors' code (``Trustworthy-ML-Lab/effective_skill_unlearning``),
on purpose:

* BOS positions are left alone by default (see above).

* sigma is the standard deviation; their code stores the variance where it uses sigma.
* sigma_F comes from the F data; their code builds it from mu_F, so neurons with mu_F < 0 are
  never adjusted.
* One independent uniform draw per element (token x neuron); their code shares one draw across
  all tokens and neurons of a layer.
* Densities are computed in log space in float32 (float64 for float64 activations); their code
  uses bf16.
* Neurons whose standard deviation is 0 or undefined (fewer than two values) on either side are
  never selected: their Gaussian is a point mass, ``sigma_R / sigma_F`` is undefined and the
  densities would be NaN or infinite. Their scores are set to ``-inf`` before the top-fraction
  selection, so the selection takes the next-best neurons instead.

Randomness: every call to :meth:`NeuronAdjust.hooks` creates fresh ``torch.Generator`` objects,
one per layer and device, seeded with :func:`layer_seed` ``(seed, layer)``. So the same
``seed``, the same input and a fresh ``hooks()`` give identical outputs; reusing one hooks list
for several forwards continues each layer's stream (new draws each forward, as sampling should).
Each hook draws ``torch.rand(x.shape)`` for the selected columns ``x = activation[...,
selected]`` of its layer (in the compute dtype, on the activation's device).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ..kernels.separation import METRICS, separation_scores, top_neurons
from ..models import model_bos_id
from ..sites import hook_name
from ..stats import NeuronStats
from ..validation import (
    MAX_SEED,
    check_bool,
    check_choice,
    check_compatible,
    check_forget_retain,
    check_int,
    model_keys,
)
from .base import BosGuard, Hook, HookIntervention, check_fraction, compute_dtype
from .registry import register_method

MODES = ("reflect", "map")


def layer_seed(seed: int, layer: int) -> int:
    """The seed of ``layer``'s generator: 63 bits from ``numpy.random.SeedSequence([seed, layer])``.

    Example:
        >>> g = torch.Generator().manual_seed(layer_seed(0, 3))  # what NA's layer-3 hook uses
    """
    state = np.random.SeedSequence([int(seed), int(layer)]).generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 1


def _valid_neurons(stats: NeuronStats) -> Tensor:
    std = stats.std
    return torch.isfinite(stats.mean) & torch.isfinite(std) & (std > 0)


@register_method("NA", fits_on="pre")
class NeuronAdjust(HookIntervention):
    """Neuron Adjust as TransformerLens hooks (see the module docstring for the method).

    Args:
        ratio: fraction of all neurons (over the fitted layers) to adjust, in (0, 1]
            (paper: 0.005, 0.015, 0.03). :func:`mechunlearn.tune_neuron_adjust` chooses it on
            held-back probe data.
        score: separation metric for the selection, a metric name of
            :func:`mechunlearn.analysis.separation.separation_scores`; ``"mean_diff"`` is the
            signed ``mu_F - mu_R`` (the authors' choice: only neurons higher on F).
        mode: ``"reflect"`` (``mu_R - (x - mu_F) sigma_R / sigma_F``, the authors' rule) or
            ``"map"`` (``mu_R + (x - mu_F) sigma_R / sigma_F``).
        seed: seed of the per-element draws (non-negative int; see :func:`layer_seed`).
        adjust_bos: also adjust the BOS positions (the authors' behaviour; the statistics never
            saw BOS). Default False: BOS is left alone.

    Attributes:
        site_: hook site of the statistics (``"pre"`` in the paper).
        layers_: layers of the statistics (the hooks attach to those with a selected neuron).
        d_mlp_: neurons per layer.
        meta_: model name and shape.
        scores_: ``[layers, d_mlp]`` float64 separation scores (``-inf`` for degenerate
            neurons).
        selected_: ``[layers, d_mlp]`` bool mask of the adjusted neurons.
        n_selected_: number of selected neurons per fitted layer.
        mu_f_, sigma_f_, mu_r_, sigma_r_: ``[layers, d_mlp]`` float64 Gaussian parameters
            (sigma is the sample standard deviation); with several retain skills, ``mu_r_`` and
            ``sigma_r_`` are those of each neuron's closest retain skill.
        retain_index_: ``[layers, d_mlp]`` int64, which retain skill each neuron is compared
            with (0 with a single retain skill).
        retain_skills_: the retain skills' names.
        bos_token_id_: the BOS id of the statistics' model (None if it prepends none).

    Example:
        >>> stats_f = mu.collect(model, forget, site="pre", quiet=True)
        >>> stats_r = mu.collect(model, retain, site="pre", quiet=True)
        >>> na = NeuronAdjust(ratio=0.05).fit(stats_f, stats_r)
        >>> sum(na.n_selected_)           # round(0.05 * 3 layers * 48 neurons)
        7
        >>> logits = model.run_with_hooks(tokens, fwd_hooks=na.hooks(model))
        >>> logits.shape
        torch.Size([2, 10, 101])
    """

    _fitted_attrs = HookIntervention._fitted_attrs + ("site_", "selected_", "mu_f_")
    _index_tensors = ("selected", "retain_index")
    _nonfinite_tensors = ("scores",)  # -inf where a neuron cannot be scored
    # An unselected neuron's Gaussian may be undefined (no finite value seen); the hooks read
    # only the selected ones'.
    _finite_where = {name: "selected" for name in ("mu_f", "sigma_f", "mu_r", "sigma_r")}

    def __init__(
        self,
        ratio: float = 0.03,
        score: str = "mean_diff",
        mode: str = "reflect",
        seed: int = 0,
        adjust_bos: bool = False,
    ):
        self.ratio = check_fraction("ratio", ratio)
        self.score = check_choice(score, METRICS, "score (a separation metric)")
        self.mode = check_choice(mode, MODES, "mode")
        self.seed = check_int("seed", seed, max_val=MAX_SEED)
        self.adjust_bos = check_bool("adjust_bos", adjust_bos)

    # --------------------------------------------------------------------------------- fit
    def fit(
        self,
        stats_f: NeuronStats,
        stats_r: NeuronStats | Sequence[NeuronStats] | Mapping[str, NeuronStats],
    ) -> NeuronAdjust:
        """Select neurons and store both skills' Gaussians.

        Args:
            stats_f: statistics of the forget skill (site ``"pre"`` in the paper, every token).
            stats_r: statistics of the retain skill, same model, site and layers; or several
                (a list or a dict): each neuron is then scored against its closest retain skill
                and adjusted toward that skill's Gaussian.

        Returns:
            self.

        Raises:
            TypeError: the statistics are not NeuronStats.
            ValueError: they differ in model, site or layers, or no neuron can be selected.
        """
        retain = _retain_list(stats_r)
        for name, s in [("stats_f", stats_f)] + [(f"stats_r[{n}]", r) for n, r in retain]:
            if not isinstance(s, NeuronStats):
                raise TypeError(
                    f"{name} must be NeuronStats (from mechunlearn.collect), "
                    f"got {type(s).__name__}."
                )
        for name, r in retain:
            label = "stats_r" if len(retain) == 1 else f"stats_r[{name!r}]"
            check_forget_retain(stats_f, r, ("stats_f", label), "statistics")
            check_compatible(stats_f.meta, r.meta, ("n_layers", "d_mlp", "d_model"), "stats")
            if stats_f.site != r.site:
                raise ValueError(
                    f"stats_f is of site {stats_f.site!r} but {name} of {r.site!r}: "
                    "collect both at the same site ('pre' in the paper)."
                )
            if list(stats_f.layers) != list(r.layers):
                raise ValueError(
                    f"stats_f holds layers {stats_f.layers} but {name} {r.layers}: "
                    "use the same layers (NeuronStats.select_layers)."
                )
        device = stats_f.mean.device
        rs = [r.to(device) for _, r in retain]
        valid_f = _valid_neurons(stats_f)
        # [retain, layers, d_mlp]: each retain skill's score, -inf where undefined.
        per_retain = torch.stack(
            [
                torch.where(
                    valid_f
                    & _valid_neurons(r)
                    & ~torch.isnan(sc := _score(stats_f, r, self.score)),
                    sc,
                    -torch.inf,
                )
                for r in rs
            ]
        )
        scores, nearest = per_retain.min(0)  # separation from the closest retain skill
        valid = torch.isfinite(scores)
        if not bool(valid.any()):
            raise ValueError(
                "No neuron can be selected: every neuron has an undefined or zero standard "
                "deviation on one of the skills (collect more tokens)."
            )
        selected = top_neurons(scores, ratio=self.ratio).to(device) & valid
        self.site_ = stats_f.site
        self.layers_ = [int(x) for x in stats_f.layers]
        self.d_mlp_ = stats_f.d_mlp
        self.meta_ = model_keys(stats_f.meta)
        self.meta_.update(forget=stats_f.meta.get("skill"), retain=[n for n, _ in retain])
        self.retain_skills_ = [str(r.meta.get("skill", n)) for n, r in retain]
        self.bos_token_id_ = stats_f.meta.get("bos_token_id")
        self._bos_known = "bos_token_id" in stats_f.meta
        self.scores_ = scores
        self.selected_ = selected
        self.retain_index_ = nearest
        self.mu_f_, self.sigma_f_ = stats_f.mean.clone(), stats_f.std
        mu_r = torch.stack([r.mean for r in rs])
        sd_r = torch.stack([r.std for r in rs])
        self.mu_r_ = mu_r.gather(0, nearest.unsqueeze(0)).squeeze(0)
        self.sigma_r_ = sd_r.gather(0, nearest.unsqueeze(0)).squeeze(0)
        if self.adjust_bos and stats_f.meta.get("bos_token_id") is not None:
            warnings.warn(
                "adjust_bos=True adjusts the BOS positions, which these statistics exclude: "
                "its values there are outliers that no fitted Gaussian describes (the authors' "
                "behaviour; it damages every continuation).",
                stacklevel=2,
            )
        self._after_fit()
        return self

    def _after_fit(self) -> None:
        self.n_selected_ = [int(v) for v in self.selected_.sum(1).tolist()]
        # Per-layer packed parameters for the hooks, built here so that hooks never call
        # nonzero() (a host synchronisation).
        self._packed: dict[int, tuple[Tensor, Tensor]] = {}
        sign = -1.0 if self.mode == "reflect" else 1.0
        for row, layer in enumerate(self.layers_):
            idx = torch.nonzero(self.selected_[row]).flatten()
            if idx.numel() == 0:
                continue
            mf, sf = self.mu_f_[row, idx], self.sigma_f_[row, idx]
            mr, sr = self.mu_r_[row, idx], self.sigma_r_[row, idx]
            slope = sign * sr / sf
            params = torch.stack(
                [-mf / sf, 1 / sf, -mr / sr, 1 / sr, torch.log(sr / sf), slope, mr - mf * slope]
            )
            self._packed[layer] = (idx, params)
        self._clear_cache()

    # ------------------------------------------------------------------------------ hooks
    def _hook_tensors(self) -> dict[int, tuple[Tensor, Tensor]]:
        return self._packed

    def hooks(self, model=None) -> list[Hook]:
        """Forward hooks ``[(hook_name, fn), ...]`` that apply Neuron Adjust.

        Unless ``adjust_bos``, the list starts with the hooks that mark the BOS positions of
        each forward pass, before block 0 (use the list whole and in order). Pass ``model`` on a
        legacy HookedTransformer (which has no token-id hook: the marking compares embeddings).
        Which positions change: every token but BOS; padding is masked out of attention.

        Example:
            >>> [name for name, _ in na.hooks(model)][:2]   # BOS marking first
            ['embed.hook_in', 'blocks.0.mlp.hook_pre']
            >>> logits = model.run_with_hooks(tokens, fwd_hooks=na.hooks(model))
        """
        return super().hooks(model)

    def _make_hooks(self, model=None) -> list[Hook]:
        guard = None
        out: list[Hook] = []
        if not self.adjust_bos:
            if model is not None:
                bos = model_bos_id(model)
            elif self._bos_known:
                bos = self.bos_token_id_
            else:
                raise ValueError(
                    "This NeuronAdjust does not know the model's BOS token (fitted on statistics "
                    "from an older mechunlearn): pass the model, na.hooks(model)."
                )
            if bos is not None:  # a model without BOS needs no marking
                guard = BosGuard(bos, model)
                out += guard.hooks()
        out += [(hook_name(self.site_, layer), self._hook(layer, guard)) for layer in self._packed]
        return out

    def _hook(self, layer: int, guard: BosGuard | None = None) -> Callable[[Tensor, Any], Tensor]:
        name = hook_name(self.site_, layer)
        generators: dict[str, torch.Generator] = {}
        seed = layer_seed(self.seed, layer)

        def hook(activation: Float[Tensor, "... d_mlp"], hook=None) -> Tensor:
            self._check_width(activation, name)
            device = activation.device
            dtype = compute_dtype(activation.dtype)
            idx, params = self._on(device, dtype)[layer]
            gen = generators.get(str(device))
            if gen is None:
                gen = generators[str(device)] = torch.Generator(device=device).manual_seed(seed)
            x = activation.index_select(-1, idx).to(dtype)
            u = torch.rand(x.shape, generator=gen, device=device, dtype=dtype)
            new = adjust(x, params, u)
            if guard is not None:
                new = guard.keep(new, x)
            return activation.index_copy(-1, idx, new.to(activation.dtype))

        return hook

    # --------------------------------------------------------------------------- reports
    def _fitted_summary(self) -> str:
        total = sum(self.n_selected_)
        used = sum(1 for n in self.n_selected_ if n)
        return f"{total} neurons in {used} of {len(self.layers_)} layers at site {self.site_!r}"

    def selected_neurons(self):
        """The selected neurons as a DataFrame (layer, neuron, score, mu/sigma of F and R).

        Example:
            >>> table = na.selected_neurons()
            >>> len(table), list(table.columns)
            (7, ['layer', 'neuron', 'score', 'mu_f', 'sigma_f', 'mu_r', 'sigma_r'])
            >>> per_layer = table.groupby("layer").size()   # selected neurons per layer
        """
        import pandas as pd

        self._check_fitted()
        rows, cols = torch.nonzero(self.selected_.cpu(), as_tuple=True)
        get = {
            "score": self.scores_,
            "mu_f": self.mu_f_,
            "sigma_f": self.sigma_f_,
            "mu_r": self.mu_r_,
            "sigma_r": self.sigma_r_,
        }
        frame = {
            "layer": [self.layers_[r] for r in rows.tolist()],
            "neuron": cols.tolist(),
            **{k: v.cpu()[rows, cols].double().numpy() for k, v in get.items()},
        }
        return pd.DataFrame(frame).sort_values("score", ascending=False, ignore_index=True)

    # ------------------------------------------------------------------------- save / load
    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {
            "scores": self.scores_,
            "selected": self.selected_,
            "mu_f": self.mu_f_,
            "sigma_f": self.sigma_f_,
            "mu_r": self.mu_r_,
            "sigma_r": self.sigma_r_,
        }
        tensors["retain_index"] = self.retain_index_
        info = {"site": self.site_, "retain_skills": self.retain_skills_}
        if self._bos_known:
            info["bos_token_id"] = self.bos_token_id_
        if getattr(self, "tuning_", None) is not None:  # set by mechunlearn.tune_neuron_adjust
            info["tuning"] = self.tuning_.to_dict(orient="records")
        return tensors, info

    def _set_state(self, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
        self.site_ = info["site"]
        self.scores_ = tensors["scores"]
        self.selected_ = tensors["selected"].bool()
        self.mu_f_, self.sigma_f_ = tensors["mu_f"], tensors["sigma_f"]
        self.mu_r_, self.sigma_r_ = tensors["mu_r"], tensors["sigma_r"]
        shape = tuple(self.scores_.shape)
        if shape != (len(self.layers_), self.d_mlp_):
            raise ValueError(f"scores have shape {list(shape)}, expected [layers, d_mlp].")
        for name in ("selected", "mu_f", "sigma_f", "mu_r", "sigma_r"):
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"tensor {name!r} has shape {list(tensors[name].shape)}.")
        # Files from mechunlearn 0.1.0: one retain skill, no recorded BOS id.
        self.retain_index_ = tensors.get("retain_index", torch.zeros(shape, dtype=torch.long))
        self.retain_skills_ = list(info.get("retain_skills") or [self.meta_.get("retain")])
        self.bos_token_id_ = info.get("bos_token_id")
        self._bos_known = "bos_token_id" in info
        if info.get("tuning"):
            import pandas as pd

            self.tuning_ = pd.DataFrame(info["tuning"])
        self._after_fit()


def _retain_list(stats_r: Any) -> list[tuple[str, Any]]:
    """``[(name, stats), ...]`` from one NeuronStats, a sequence or a mapping of them."""
    if isinstance(stats_r, Mapping):
        items = [(str(k), v) for k, v in stats_r.items()]
    elif isinstance(stats_r, Sequence) and not isinstance(stats_r, (str, bytes)):
        items = [(str(getattr(v, "meta", {}).get("skill", i)), v) for i, v in enumerate(stats_r)]
    else:
        items = [(str(getattr(stats_r, "meta", {}).get("skill", "retain")), stats_r)]
    if not items:
        raise ValueError("No retain statistics given: pass stats_r (one, a list or a dict).")
    return items


def _score(stats_f: NeuronStats, stats_r: NeuronStats, metric: str) -> Tensor:
    device = stats_f.mean.device
    return separation_scores(stats_f, stats_r, metric).to(device, torch.float64)


def adjust(
    x: Float[Tensor, "... k"], params: Float[Tensor, "7 k"], u: Float[Tensor, "... k"]
) -> Float[Tensor, "... k"]:
    """NA's stochastic replacement of the selected values ``x`` given uniform draws ``u``.

    ``params`` rows (per selected neuron): ``-mu_F/sigma_F, 1/sigma_F, -mu_R/sigma_R,
    1/sigma_R, log(sigma_R/sigma_F), s, mu_R - mu_F * s`` with the slope ``s = -+sigma_R/sigma_F``
    (minus for ``"reflect"``). ``x`` is replaced by ``mu_R + (x - mu_F) * s`` where
    ``log p_F - log p_R >= 0`` and ``u < p_F / (p_F + p_R) = sigmoid(log p_F - log p_R)``.
    The log-density ratio is ``(z_R - z_F)(z_R + z_F)/2 + log(sigma_R/sigma_F)`` with the
    standardised values ``z`` (no cancellation of large squares); written with ``addcmul`` so
    that a hook launches few kernels.
    """
    a_f, inv_sf, a_r, inv_sr, log_sr_sf, slope, offset = params
    zf = torch.addcmul(a_f, x, inv_sf)  # (x - mu_F) / sigma_F
    zr = torch.addcmul(a_r, x, inv_sr)
    # log p_F - log p_R; the -log(sqrt(2 pi)) terms cancel.
    log_ratio = torch.addcmul(log_sr_sf, zr - zf, zr + zf, value=0.5)
    replace = (log_ratio >= 0) & (u < torch.sigmoid(log_ratio))
    return torch.where(replace, torch.addcmul(offset, x, slope), x)


def sweep_ratio(
    stats_f: NeuronStats,
    stats_r: NeuronStats,
    ratios: Sequence[float],
    score_fn: Callable[[NeuronAdjust], float | dict[str, float]],
    **params: Any,
):
    """Fit NA at each ratio and score it: the forget/retain trade-off as a table.

    Args:
        stats_f, stats_r: as for :meth:`NeuronAdjust.fit`.
        ratios: the ratios to try.
        score_fn: called with each fitted NeuronAdjust; returns a number or a dict of numbers
            (e.g. relative performance on the forget and the retain skill from
            :mod:`mechunlearn.evaluation`).
        **params: other NeuronAdjust hyperparameters (score, mode, seed).

    Returns:
        A DataFrame with a ``ratio`` column, ``n_selected`` and the score(s); choose from it
        (e.g. the largest ratio whose retain score stays above 0.9).

    Example:
        >>> from mechunlearn.evaluation import teacher_forced
        >>> def score(na):
        ...     return {"forget": teacher_forced(model, forget, na).score,
        ...             "retain": teacher_forced(model, retain, na).score}
        >>> table = sweep_ratio(stats_f, stats_r, [0.01, 0.03, 0.05], score)
        >>> list(table.columns), table["n_selected"].tolist()
        (['ratio', 'n_selected', 'forget', 'retain'], [1, 4, 7])
    """
    import pandas as pd

    rows = []
    for ratio in ratios:
        na = NeuronAdjust(ratio=ratio, **params).fit(stats_f, stats_r)
        result = score_fn(na)
        row = {"ratio": float(ratio), "n_selected": sum(na.n_selected_)}
        row.update(result if isinstance(result, dict) else {"score": float(result)})
        rows.append(row)
    return pd.DataFrame(rows)
