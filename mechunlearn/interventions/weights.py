"""In-place weight edits that can be undone exactly (Selective Pruning, LUNAR, SIMU).

A :class:`WeightEdit` remembers the original values of every tensor it changes and writes them
back, bit for bit, on :meth:`~WeightEdit.undo` or when its ``with`` block ends, even after an
exception, and whatever the order in which several edits of the same weights are undone.
:func:`w_out` and :func:`w_out_owner` find a layer's ``W_out`` and the parameter that holds it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


def w_out(model, layer: int) -> Tensor:
    """Layer ``layer``'s ``W_out`` as ``[d_mlp, d_model]``, sharing storage with the parameter.

    On a TransformerBridge ``blocks[l].mlp.W_out`` is a (transposed) view of the wrapped module's
    weight; on a legacy HookedTransformer it is the parameter itself.

    Raises:
        NotImplementedError: the block's MLP has no ``W_out``.
    """
    mlp = model.blocks[layer].mlp
    weight = getattr(mlp, "W_out", None)
    if weight is None:
        raise NotImplementedError(f"blocks[{layer}].mlp has no W_out: cannot edit its weights.")
    return weight


def w_out_owner(model, layer: int) -> tuple[Tensor, Tensor]:
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
        "its rows cannot be trained."
    )


@dataclass(eq=False)
class _Change:
    """One in-place change: the tensor (the model's weight or a view of it), the change, and the
    values the tensor held just before it."""

    tensor: Tensor
    change: Callable[[Tensor], object]
    before: Tensor


#: Per storage (the address of the memory a weight lives in), the changes still applied to it,
#: oldest first: what lets an edit be undone exactly whatever the order.
_APPLIED: dict[int, list[_Change]] = {}


def _storage(tensor: Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _revert(done: _Change) -> None:
    """Take ``done`` out of its tensor exactly, keeping every later change to the same memory.

    The later changes are rolled back newest first (each from its own saved values), ``done``
    is rolled back, and the later changes are made again, oldest first, each saving the values
    it now starts from. The memory ends bit for bit as if ``done`` had never been made, and
    undoing the later ones afterwards gives back the values from before ``done``.
    """
    stack = _APPLIED.get(_storage(done.tensor), [])
    at = next((i for i, c in enumerate(stack) if c is done), None)
    later = [] if at is None else stack[at + 1 :]
    for change in reversed(later):
        change.tensor.copy_(change.before)
    done.tensor.copy_(done.before)
    for change in later:
        change.before = change.tensor.detach().clone()
        change.change(change.tensor)
    if at is not None:
        del stack[at]
        if not stack:
            _APPLIED.pop(_storage(done.tensor), None)


class WeightEdit:
    """Tensors edited in place, with their original values kept for :meth:`undo`.

    Undoing is exact whatever the order: two edits of the same weight (``e1``, then ``e2``)
    can be undone as ``e2, e1`` (nested ``with`` blocks) or as ``e1, e2``; undoing ``e1`` first
    leaves exactly ``e2``'s change in place, and undoing both gives the original weights back
    bit for bit. A handle is used once: after :meth:`undo` (the end of its ``with`` block) it
    cannot be entered or applied again.

    Example:
        >>> base = model(tokens)
        >>> idx = torch.tensor([0, 5, 7])      # neurons of layer 1 to silence
        >>> edit = WeightEdit(model)
        >>> with edit:
        ...     edit.apply(w_out(model, 1), lambda w: w.index_fill_(0, idx, 0.0))
        ...     edited = model(tokens)          # edited
        >>> torch.equal(model(tokens), base), torch.equal(edited, base)   # restored on exit
        (True, False)
    """

    def __init__(self, model=None):
        self.model = model
        self._saved: list[_Change] | None = []

    @property
    def active(self) -> bool:
        """Whether the weights are still edited."""
        return self._saved is not None

    def apply(self, tensor: Tensor, edit: Callable[[Tensor], object]) -> None:
        """Save ``tensor``'s values, then run ``edit(tensor)`` (an in-place change), without
        autograd. Pass the model's own weight or a view of it: an edit of a copy reaches nothing
        (callers check, e.g. by reading the weight again, as Selective Pruning does).

        ``edit`` may run again later, on the values of that moment, when an older edit of the
        same weight is undone first (see the class docstring): make it a pure in-place change.

        Raises:
            RuntimeError: this edit was undone already.
        """
        if self._saved is None:
            raise RuntimeError(
                "This weight edit was undone already: call apply_to_weights(model) again for a "
                "new one."
            )
        with torch.no_grad():
            done = _Change(tensor, edit, tensor.detach().clone())
            self._saved.append(done)
            _APPLIED.setdefault(_storage(tensor), []).append(done)
            edit(tensor)

    def undo(self) -> None:
        """Write every original value back (a second call does nothing).

        Edits of the same weight made after this one stay in place (see the class docstring).
        """
        if self._saved is None:
            return
        with torch.no_grad():
            for done in reversed(self._saved):
                _revert(done)
        self._saved = None

    def __enter__(self) -> WeightEdit:
        if self._saved is None:
            raise RuntimeError(
                "This weight edit was undone already (its with block ended): a second `with` "
                "would run the unedited model. Call apply_to_weights(model) again for a new edit."
            )
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def edit_w_out(model, changes: Mapping[int, Callable[[Tensor], object]]) -> WeightEdit:
    """Run ``changes[layer](W_out)`` (an in-place change) on each layer's ``W_out``.

    Every change is checked by reading ``W_out`` again; if one does not land in the model (a
    ``W_out`` that is a copy) or anything fails, every layer already changed is restored before
    the error propagates.

    Returns:
        The :class:`WeightEdit` that undoes all of them.

    Raises:
        NotImplementedError: ``W_out`` is not a view of the model's weight.
    """
    edit = WeightEdit(model)
    try:
        for layer, change in changes.items():
            weight = w_out(model, layer)
            edit.apply(weight, change)
            if not torch.equal(w_out(model, layer), weight):
                raise NotImplementedError(
                    f"blocks[{layer}].mlp.W_out is not a view of the model's weight here, "
                    "so it cannot be edited in place: use hooks() instead."
                )
    except BaseException:
        edit.undo()
        raise
    return edit
