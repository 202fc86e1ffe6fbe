"""In-place weight edits that can be undone exactly (Selective Pruning, LUNAR, SIMU).

A :class:`WeightEdit` remembers the original values of every tensor it changes and writes them
back, bit for bit, on :meth:`~WeightEdit.undo` or when its ``with`` block ends, even after an
exception.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

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


class WeightEdit:
    """Tensors edited in place, with their original values kept for :meth:`undo`.

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
        self._saved: list[tuple[Tensor, Tensor]] | None = []

    @property
    def active(self) -> bool:
        """Whether the weights are still edited."""
        return self._saved is not None

    def apply(self, tensor: Tensor, edit: Callable[[Tensor], object]) -> None:
        """Save ``tensor``'s values, then run ``edit(tensor)`` (an in-place change), without
        autograd. Pass the model's own weight or a view of it: an edit of a copy reaches nothing
        (callers check, e.g. by reading the weight again, as Selective Pruning does).
        """
        if self._saved is None:
            raise RuntimeError("This WeightEdit was undone already: make a new one.")
        with torch.no_grad():
            before = tensor.detach().clone()
            self._saved.append((tensor, before))
            edit(tensor)

    def undo(self) -> None:
        """Write every original value back (a second call does nothing)."""
        if self._saved is None:
            return
        with torch.no_grad():
            for tensor, before in reversed(self._saved):
                tensor.copy_(before)
        self._saved = None

    def __enter__(self) -> WeightEdit:
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
