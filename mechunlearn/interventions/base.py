"""The contract every intervention follows (scikit-learn's estimator conventions).

* The constructor only stores (and validates) hyperparameters.
* ``fit(...)`` learns the fitted state, whose attribute names end in ``_``, and returns ``self``.
* Using an unfitted intervention raises :class:`NotFittedError`.
* ``hooks(model=None)`` returns TransformerLens forward hooks ``[(hook_name, fn), ...]`` with
  plain ``fn(activation, hook) -> activation``, for ``model.run_with_hooks(tokens,
  fwd_hooks=iv.hooks())`` or ``with model.hooks(fwd_hooks=iv.hooks()): model.generate(...)``.
* ``save(path)`` / ``cls.load(path)`` round-trip the hyperparameters and the fitted state through
  one safetensors file (:mod:`mechunlearn.io`).

Every method is one of three **kinds**, each a base class that evaluation, the pipeline and
the attacks dispatch on with ``isinstance``:

* :class:`HookIntervention`: forward hooks that change the outputs (Neuron Adjust, Selective
  Pruning, LUNAR);
* :class:`WeightIntervention`: a weight edit, ``with est.apply_to_weights(model): ...``, undone
  on exit (SIMU and the trained baselines); its ``hooks()`` raises;
* :class:`Detector`: hooks that only watch, and abstention (``detect``, ``generate``): the key
  space detectors.

Hooks follow three rules, so that they cost little on a GPU and work in any batch:

1. They never read a tensor's value on the host (no ``.item()``, ``bool(tensor)``,
   ``nonzero``): everything they compute stays on the activation's device.
2. Fitted tensors are moved to the activation's device (and dtype) on first use and cached per
   ``(device, dtype)`` (:meth:`Intervention._on`); ``fit``/``load`` clear the cache.
3. They bind their layer in a closure and never parse ``hook.name`` (a TransformerBridge hook
   reports the name of its alias target, e.g. ``blocks.1.mlp.gate.hook_out`` for
   ``blocks.1.mlp.hook_pre``). The only check inside a hook is on the activation's *shape*
   (host-side metadata, no synchronisation): a last dimension other than the fitted ``d_mlp``
   raises a ValueError.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Bool
from torch import Tensor

from ..io import DamagedFileError, load_tensors, save_tensors
from ..models import check_same_model, n_layers
from ..validation import check_fraction, check_positive

__all__ = [
    "Detector",
    "Hook",
    "HookIntervention",
    "Intervention",
    "WeightIntervention",
    "NotFittedError",
    "BosGuard",
    "check_fraction",
    "check_positive",
    "compute_dtype",
    "neuron_index",
]

Hook = tuple[str, Callable[[Tensor, Any], Tensor]]


class NotFittedError(ValueError, AttributeError):
    """An intervention was used before ``fit(...)`` (or ``load(...)``).

    Subclasses both ValueError and AttributeError, as scikit-learn's does.
    """


class Intervention:
    """Base class: hyperparameters, fitted state, hooks, model checks, save/load.

    Subclasses implement :meth:`fit`, :meth:`_make_hooks` (the hooks of a fitted object),
    :meth:`_state` / :meth:`_set_state` (the fitted state as tensors plus JSON-able info), and
    list in ``_fitted_attrs`` the attributes that ``fit`` sets.

    Fitted state common to all interventions:

    Attributes:
        layers_: the model layers the intervention hooks into.
        d_mlp_: neurons per layer of the model it was fitted on.
        meta_: the model's name and shape (from the statistics it was fitted on), for
            :meth:`check_model`.
    """

    _fitted_attrs: ClassVar[tuple[str, ...]] = ("layers_", "d_mlp_", "meta_")
    #: Saved tensors that hold indices or masks: a file must store them as bool or integers.
    _index_tensors: ClassVar[tuple[str, ...]] = ()
    #: Saved floating tensors that may hold NaN or inf (e.g. ``-inf`` scores of excluded
    #: neurons); every other floating tensor must be finite, or finite where the mask named in
    #: :attr:`_finite_where` is True (see :meth:`load`).
    _nonfinite_tensors: ClassVar[tuple[str, ...]] = ()
    _finite_where: ClassVar[dict[str, str]] = {}

    # ------------------------------------------------------------------ hyperparameters
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [
            p.name
            for p in sig.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]

    def get_params(self) -> dict[str, Any]:
        """The constructor's arguments, as stored (scikit-learn's ``get_params``)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        text = f"{type(self).__name__}({params})"
        if self.is_fitted:
            summary = self._fitted_summary()
            text += f"  # fitted: {summary}" if summary else "  # fitted"
        return text

    def _fitted_summary(self) -> str:
        return f"layers {self.layers_}"

    # ------------------------------------------------------------------------ fitted state
    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` (or :meth:`load`) has run."""
        return all(hasattr(self, name) for name in self._fitted_attrs)

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            name = type(self).__name__
            raise NotFittedError(
                f"This {name} is not fitted yet: call fit(...) first, or {name}.load(path)."
            )

    def _clear_cache(self) -> None:
        self._cache: dict[tuple, Any] = {}

    def _on(self, device: torch.device, dtype: torch.dtype | None = None) -> Any:
        """The hook-side tensors (:meth:`_hook_tensors`) on ``device``, cached per device/dtype.

        The first call per device copies them (host to device); later calls are a dict lookup.
        The copies are made outside inference mode: a first call under a caller's
        ``torch.inference_mode()`` (generation, evaluation) would otherwise cache inference
        tensors, which a later forward with autograd on cannot save for backward.
        """
        cache = self.__dict__.setdefault("_cache", {})
        key = (str(device), dtype)
        hit = cache.get(key)
        if hit is None:
            with torch.inference_mode(False):
                hit = _move(self._hook_tensors(), device, dtype)
            cache[key] = hit
        return hit

    def _hook_tensors(self) -> Any:
        """Fitted tensors the hooks read (a nested list/tuple/dict of tensors)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------ model checks
    def check_model(self, model) -> None:
        """Raise a ValueError if ``model`` does not match the model this was fitted on.

        A different number of layers or ``d_mlp`` raises; a different model name with the same
        shape only warns (a fine-tuned copy is a fair use).
        """
        self._check_fitted()
        check_same_model(self.meta_, model, f"This {type(self).__name__}'s fitted statistics")
        total = n_layers(model)
        if self.layers_ and max(self.layers_) >= total:
            raise ValueError(
                f"This {type(self).__name__} hooks layers {self.layers_}, but the model has "
                f"only {total} layers."
            )
        width = getattr(model.cfg, "d_mlp", None)
        if width is not None and int(width) != self.d_mlp_:
            raise ValueError(
                f"This {type(self).__name__} was fitted with d_mlp={self.d_mlp_}, but the model "
                f"has d_mlp={int(width)}: fit it again on this model."
            )

    def _check_width(self, activation: Tensor, name: str) -> None:
        """Shape check inside a hook (metadata only: no host-device synchronisation)."""
        if activation.shape[-1] != self.d_mlp_:
            raise ValueError(
                f"{type(self).__name__} hook at {name} got an activation of width "
                f"{activation.shape[-1]}, but was fitted with d_mlp={self.d_mlp_}: "
                "it was fitted on a different model."
            )

    # ------------------------------------------------------------------------------ hooks
    def hooks(self, model=None) -> list[Hook]:
        """Forward hooks ``[(hook_name, fn), ...]`` that apply this intervention.

        Args:
            model: if given, checked against the model this was fitted on
                (:meth:`check_model`); the hooks themselves check the activation's width.

        Example:
            >>> logits = model.run_with_hooks(tokens, fwd_hooks=sp.hooks(model))
            >>> with model.hooks(fwd_hooks=sp.hooks()):
            ...     text = model.generate("3+4=", max_new_tokens=4, do_sample=False, verbose=False)
            >>> isinstance(text, str)
            True
        """
        self._check_fitted()
        if model is not None:
            self.check_model(model)
        return self._make_hooks(model)

    def _make_hooks(self, model=None) -> list[Hook]:
        raise NotImplementedError

    # ------------------------------------------------------------------------- save / load
    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Fitted state as (tensors, JSON-able info)."""
        raise NotImplementedError

    def _set_state(self, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        """Write hyperparameters and fitted state to a safetensors file; returns its path.

        Example:
            >>> path = na.save("na_add")            # a NeuronAdjust
            >>> path
            PosixPath('na_add.safetensors')
            >>> same = type(na).load(path)
            >>> same.get_params() == na.get_params(), torch.equal(same.selected_, na.selected_)
            (True, True)
        """
        self._check_fitted()
        tensors, info = self._state()
        info = {
            "kind": type(self).__name__,
            "params": self.get_params(),
            "layers": list(self.layers_),
            "d_mlp": int(self.d_mlp_),
            "meta": dict(self.meta_),
            **info,
        }
        return save_tensors(path, tensors, info)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu"):
        """Read an object written by :meth:`save` (tensors placed on ``device``).

        Hyperparameters the class no longer takes (a file from an older mechunlearn) are
        dropped with a warning; a damaged or inconsistent file raises
        :class:`~mechunlearn.io.DamagedFileError` naming it.
        """
        tensors, info = load_tensors(path, cls.__name__, device)
        cls._check_loaded(path, tensors)
        for key in ("params", "layers", "d_mlp", "meta"):
            if key not in info:
                raise DamagedFileError(f"{path} lacks the metadata {key!r}: it is damaged.")
        params = dict(info["params"])
        known = set(cls._param_names())
        for key in sorted(set(params) - known):
            warnings.warn(
                f"{path}: hyperparameter {key}={params.pop(key)!r} is not one of "
                f"{cls.__name__}'s any more (a file from an older mechunlearn); dropped.",
                stacklevel=2,
            )
        try:
            obj = cls(**params)
            obj.layers_ = [int(x) for x in info["layers"]]
            obj.d_mlp_ = int(info["d_mlp"])
            obj.meta_ = dict(info["meta"])
            obj._set_state(tensors, info)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
            if isinstance(err, DamagedFileError):
                raise
            raise DamagedFileError(
                f"{path} does not hold a valid {cls.__name__} ({type(err).__name__}: {err})."
            ) from None
        obj._clear_cache()
        return obj

    @classmethod
    def _check_loaded(cls, path: str | Path, tensors: dict[str, Tensor]) -> None:
        """Refuse a file whose index tensors are not integers or whose values are not finite.

        Every intervention's file passes through here: a NaN in a fitted tensor (LUNAR's
        ``dW``, a detector's alpha, Neuron Adjust's Gaussians) would give NaN logits or a
        detector that never fires, without a word.

        Raises:
            DamagedFileError: naming the file and the tensor.
        """
        for name in cls._index_tensors:
            t = tensors.get(name)
            if t is not None and (t.is_floating_point() or t.is_complex()):
                raise DamagedFileError(
                    f"{path}: tensor {name!r} holds indices but is {t.dtype}, not bool or "
                    f"integer: the file is damaged; fit the {cls.__name__} again and save it."
                )
        for name, t in tensors.items():
            if not t.is_floating_point() or name in cls._nonfinite_tensors:
                continue
            bad = ~torch.isfinite(t)
            where = cls._finite_where.get(name)
            if where is not None and where in tensors and tensors[where].shape == t.shape:
                bad &= tensors[where].bool()
            if bool(bad.any()):
                raise DamagedFileError(
                    f"{path}: tensor {name!r} holds {int(bad.sum())} NaN or infinite values: the "
                    f"file is damaged; fit the {cls.__name__} again and save it."
                )


class HookIntervention(Intervention):
    """An intervention applied by forward hooks that change the model's outputs.

    ``model.run_with_hooks(tokens, fwd_hooks=est.hooks(model))``, or
    ``with model.hooks(fwd_hooks=est.hooks(model)): ...``.
    """


class WeightIntervention(Intervention):
    """An intervention applied by editing the model's weights, undone on exit.

    ``with est.apply_to_weights(model): ...`` (a :class:`~.weights.WeightEdit` that restores
    every edited tensor bit for bit, even after an exception). For methods whose change no cheap
    forward hook reproduces (SIMU's attention deltas, the trained baselines): :meth:`hooks`
    raises, saying so.
    """

    def apply_to_weights(self, model):
        """Edit ``model``'s weights in place; returns the edit, a context manager that undoes
        it on exit."""
        raise NotImplementedError

    def _make_hooks(self, model=None) -> list[Hook]:
        name = type(self).__name__
        raise NotImplementedError(
            f"{name} changes the model's weights, which no cheap forward hook reproduces: run "
            f"the model inside `with {name.lower()}.apply_to_weights(model):` instead."
        )


class Detector(Intervention):
    """An intervention that watches and abstains: its hooks record detections and return the
    activations untouched, so the model's outputs are unchanged where it lets a prompt through.

    Subclasses give ``detect(model, prompts)`` (which prompts it abstains on; its result has a
    boolean ``detected`` tensor) and ``generate`` (answers or the refusal); a detector that
    decides from MLP key vectors at the last prompt token also gives ``detect_keys(keys)`` and
    names its layers in :meth:`key_layers`, so that evaluation reads the keys during the bare
    pass instead of running ``detect``. Evaluation scores a detector as the bare model with its
    abstentions counted wrong.
    """

    @property
    def takes_negatives(self) -> bool:
        """Whether ``fit`` takes negatives (the run passes every other skill's key vectors):
        True unless the detector's region is fixed by its settings."""
        return True

    def detect(self, model, prompts, batch_size: int = 16):
        """Which prompts the detector abstains on (``.detected``: a bool tensor)."""
        raise NotImplementedError

    def key_layers(self) -> list[int] | None:
        """Layers whose last-prompt-token key vectors :meth:`detect_keys` reads; None (the
        default) when detection needs :meth:`detect`'s own pass."""
        return None

    def detect_keys(self, keys):
        """Detection from collected :class:`~mechunlearn.stats.KeyVectors`."""
        raise NotImplementedError


def _move(obj: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    if isinstance(obj, Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device=device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device, dtype) for k, v in obj.items()}
    return obj


def neuron_index(
    mask: Bool[Tensor, "layer d_mlp"], layers: Sequence[int]
) -> tuple[list[int], dict[int, Tensor]]:
    """The neurons a per-layer mask selects: how many in each row of ``mask``, and
    ``{layer: their indices}`` for every layer (``layers[row]``) with at least one.

    Example:
        >>> mask = torch.tensor([[True, False, True], [False, False, False]])
        >>> neuron_index(mask, [4, 5])
        ([2, 0], {4: tensor([0, 2])})
    """
    counts = [int(v) for v in mask.sum(1).tolist()]
    index = {
        layer: torch.nonzero(mask[row]).flatten() for row, layer in enumerate(layers) if counts[row]
    }
    return counts, index


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 activations, else float32 (densities never in half precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class BosGuard:
    """Which positions of the current forward pass hold the BOS token, for hooks that must leave
    them alone (Neuron Adjust: its statistics never saw BOS, whose activations are outliers of
    their own, and changing them damages every continuation).

    :meth:`hooks` returns the hooks to put first in a hook list: they run before any block's
    other hooks and record a ``[batch, pos]`` mask on the device (no host synchronisation). On a
    TransformerBridge the mask is read from the token ids (``embed.hook_in``). A legacy
    HookedTransformer has no token-id hook that every pass runs (its ``generate`` embeds the
    tokens itself and enters the blocks at ``start_at_layer=0``, past ``hook_embed``), so the
    mask compares block 0's input (``blocks.0.hook_resid_pre``) with the BOS row of ``W_E``, plus
    the pass's own positional embedding (``hook_pos_embed``, recorded first) where the model adds
    one to the residual stream: the same operands and operation as the model's, so the comparison
    is exact. Positions holding the BOS id anywhere (a prepended BOS, or a pad token where the
    tokenizer pads with its BOS id) are marked. Padding with another id is not marked: it is
    masked out of attention, so no hook's change there can reach an output.

    Args:
        bos_id: the BOS token id (None: no BOS, nothing is marked).
        model: the model the hooks will run on (needed for a legacy HookedTransformer).

    Example:
        >>> from mechunlearn.interventions.base import BosGuard
        >>> guard = BosGuard(model.tokenizer.bos_token_id, model)
        >>> [name for name, _ in guard.hooks()]
        ['embed.hook_in']
        >>> _ = model.run_with_hooks(tokens, fwd_hooks=guard.hooks())
        >>> bool(guard.mask[0, 0]), guard.mask.shape == tokens.shape
        (True, True)
    """

    def __init__(self, bos_id: int | None, model=None):
        self.bos_id = None if bos_id is None else int(bos_id)
        self.mask: Bool[Tensor, "batch pos"] | None = None
        self._embedding: Tensor | None = None
        self._pos_embed: Tensor | None = None
        self._adds_pos_embed = False
        self.hook_point = "embed.hook_in"
        hook_dict = getattr(model, "hook_dict", None)
        if model is not None and self.bos_id is not None and "embed.hook_in" not in hook_dict:
            self.hook_point = "blocks.0.hook_resid_pre"
            self._embedding = model.W_E[self.bos_id].detach()
            self._adds_pos_embed = model.cfg.positional_embedding_type == "standard"

    def hooks(self) -> list[Hook]:
        """The recording hooks ``[(hook point, fn), ...]``, to run in this order."""

        def record_pos_embed(activation: Tensor, hook=None) -> Tensor:
            self._pos_embed = activation
            return activation

        def record(activation: Tensor, hook=None) -> Tensor:
            if self.bos_id is None:
                self.mask = None
            elif self._embedding is None:
                self.mask = activation == self.bos_id
            else:
                bos = self._embedding.to(activation.device, activation.dtype)
                if self._adds_pos_embed:
                    # generate() computes the positional embedding of the whole sequence and
                    # feeds only the new positions: the last ones are this pass's.
                    pos = self._pos_embed
                    if pos is None or pos.shape[1] < activation.shape[1]:
                        self.mask = None
                        return activation
                    bos = bos + pos[:, pos.shape[1] - activation.shape[1] :]
                    self._pos_embed = None
                self.mask = (activation == bos).all(-1)
            return activation

        if self._adds_pos_embed:
            return [("hook_pos_embed", record_pos_embed), (self.hook_point, record)]
        return [(self.hook_point, record)]

    def keep(self, new: Tensor, old: Tensor) -> Tensor:
        """``new`` with ``old``'s values at the BOS positions (``[batch, pos, k]`` tensors)."""
        mask = self.mask
        if mask is None or mask.shape != new.shape[:-1]:
            if mask is None and self.bos_id is None:
                return new
            raise RuntimeError(
                "The BOS-position hook did not run before this hook in this forward pass: use "
                "the whole list that hooks() returns, in order."
            )
        return torch.where(mask.unsqueeze(-1), old, new)
