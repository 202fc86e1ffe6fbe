"""Access to a :class:`~mechunlearn.stats.NeuronStats` reservoir as host arrays, and a
layer-parallel runner, shared by the analyses that work on samples (normality tests,
KS/AUROC, the Gaussian decision rule)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from ..stats import NeuronStats

#: Elements (neurons x samples) handled per block: a few MB, so each pass stays in the cache.
BLOCK_ELEMENTS = 1 << 19


def filled_rows(stats: NeuronStats, max_rows: int | None = None) -> Tensor:
    """Indices of the filled reservoir rows (ascending), or of the ``max_rows`` with the smallest
    keys (a uniform subsample: the keys are independent of the values)."""
    keys = stats.sample_keys
    rows = torch.nonzero(torch.isfinite(keys)).flatten()
    if max_rows is not None and rows.numel() > max_rows:
        order = torch.argsort(keys[rows], stable=True)[:max_rows]
        rows = rows[order].sort().values
    return rows


def layer_samples(stats: NeuronStats, row: int, rows: Tensor) -> np.ndarray:
    """Reservoir values of layer row ``row`` as a host array ``[d_mlp, n]`` (one neuron a row).

    ``rows``: ascending distinct reservoir rows (from :func:`filled_rows`).

    float64 samples stay float64; anything else becomes float32 (exact for float32, bf16, f16).
    """
    x = stats.samples[row]
    if rows.numel() != x.shape[0]:  # rows are ascending and distinct: all rows, or a subset
        x = x.index_select(0, rows.to(x.device))
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.detach().to("cpu", dtype).t().contiguous().numpy()  # torch transposes in blocks


def sorted_groups(block: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Sort each row of ``block`` without its non-finite values.

    Yields ``(rows, sorted)`` per distinct number of finite values: ``sorted`` is ``[len(rows),
    n]`` with every value finite. Usually there is a single group (no non-finite values).
    """
    finite = np.isfinite(block)
    n_valid = np.count_nonzero(finite, axis=1)
    n = block.shape[1]
    if n_valid.min(initial=n) == n:
        yield np.arange(block.shape[0]), np.sort(block, axis=1)
        return
    x = np.where(finite, block, np.inf).astype(block.dtype, copy=False)
    x.sort(axis=1)
    for u in np.unique(n_valid):
        rows = np.flatnonzero(n_valid == u)
        yield rows, x[rows, : int(u)]


def sorted_blocks(
    stats: NeuronStats, row: int, rows: Tensor
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Layer row ``row``'s neurons in blocks of about :data:`BLOCK_ELEMENTS` reservoir values
    (rows ``rows``, see :func:`layer_samples`), each block through :func:`sorted_groups`.

    Yields ``(neurons, sorted)``: the neurons' indices within the layer, and their sorted finite
    values ``[len(neurons), n]``.
    """
    xt = layer_samples(stats, row, rows)
    step = max(1, BLOCK_ELEMENTS // int(rows.numel()))
    for start in range(0, xt.shape[0], step):
        for sub, xs in sorted_groups(xt[start : start + step]):
            yield start + sub, xs


def run_layers(job, n_layers: int, workers: int | None = None) -> None:
    """Call ``job(row)`` for every layer row, on up to ``workers`` threads (default: torch's
    intra-op thread count). NumPy's sort and array loops release the GIL, so layers run in
    parallel; each job writes disjoint outputs, so the result does not depend on the order."""
    workers = torch.get_num_threads() if workers is None else int(workers)
    workers = max(1, min(workers, n_layers))
    if workers == 1:
        for row in range(n_layers):
            job(row)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(job, range(n_layers)))


def neuron_samples(stats: NeuronStats, layer: int, neuron: int) -> np.ndarray:
    """Finite reservoir values of neuron ``neuron`` of model layer ``layer`` (float64)."""
    row = stats.layer_index(layer)
    if not 0 <= neuron < stats.d_mlp:
        raise ValueError(f"Neuron {neuron} out of range [0, {stats.d_mlp}).")
    rows = filled_rows(stats)
    x = stats.samples[row, rows.to(stats.samples.device), neuron]
    x = x.detach().to("cpu", torch.float64).numpy()
    return x[np.isfinite(x)]
