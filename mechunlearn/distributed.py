"""Several processes, several GPUs: examples sharded across ranks with ``torch.distributed``.

Under ``torchrun --nproc_per_node N`` (gloo on CPU, NCCL on GPU) every collector
(:mod:`mechunlearn.collect`) and :func:`mechunlearn.evaluate` (its teacher-forced scores;
generation is not sharded yet) runs each rank on every ``N``-th example and combines the
results with collectives, so that every rank ends with the result of one process over all
examples: moments by the exact parallel (Chan) merge, reservoir samples by their keys, key
vectors in the original example order, evaluation counts summed.
Rank 0 writes files; the others write nothing (:func:`is_main`).

A single process needs no ``torch.distributed`` at all: every function here is then the
identity. :func:`init_from_env` starts the process group from torchrun's environment with a
timeout (``$MECHUNLEARN_DIST_TIMEOUT`` seconds, default 600), so a rank that dies makes the
others fail instead of hang (torchrun also stops the other ranks when one fails).

Example:
    $ torchrun --nproc_per_node 2 -m mechunlearn.cli -- run --out report
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta

import torch
from torch import Tensor


def _dist():
    if not torch.distributed.is_available():
        return None
    return torch.distributed if torch.distributed.is_initialized() else None


def world() -> tuple[int, int]:
    """``(rank, world_size)``: ``(0, 1)`` without an initialised process group."""
    dist = _dist()
    if dist is None:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    return world()[0] == 0


def init_from_env(timeout_s: float | None = None) -> bool:
    """Start the process group when launched by torchrun (``WORLD_SIZE`` > 1).

    NCCL when CUDA is available (each rank on GPU ``LOCAL_RANK``), else gloo. Returns whether
    several processes run. Does nothing when the group is already initialised or when there is
    a single process.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not torch.distributed.is_available():
        return False
    if torch.distributed.is_initialized():
        return True
    if timeout_s is None:
        timeout_s = float(os.environ.get("MECHUNLEARN_DIST_TIMEOUT", "600"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True


def rank_device() -> str | None:
    """This rank's GPU (``cuda:LOCAL_RANK``) under torchrun with CUDA, else None."""
    if world()[1] > 1 and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return None


def shard(n: int) -> list[int]:
    """The example indices this rank handles: every ``world_size``-th, starting at its rank."""
    rank, size = world()
    return list(range(rank, n, size))


def _comm(tensor: Tensor) -> tuple[Tensor, torch.device]:
    """The tensor on the device the backend communicates on (CPU for gloo)."""
    dist = _dist()
    backend = dist.get_backend() if dist is not None else "gloo"
    target = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
    return tensor.to(target), tensor.device


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The elementwise sum of ``tensor`` over all ranks (a new tensor; the identity alone)."""
    if _dist() is None:
        return tensor
    out, home = _comm(tensor.clone())
    torch.distributed.all_reduce(out)
    return out.to(home)


def all_gather(tensor: Tensor) -> list[Tensor]:
    """``tensor`` of every rank, in rank order (same shape and dtype on every rank)."""
    if _dist() is None:
        return [tensor]
    out, home = _comm(tensor.contiguous())
    parts = [torch.empty_like(out) for _ in range(world()[1])]
    torch.distributed.all_gather(parts, out)
    return [p.to(home) for p in parts]


def all_gather_ints(values: Sequence[int]) -> list[list[int]]:
    """A few integers of every rank, in rank order."""
    parts = all_gather(torch.tensor(list(values), dtype=torch.int64))
    return [p.tolist() for p in parts]


def barrier() -> None:
    """Wait for every rank (nothing alone)."""
    if _dist() is not None:
        torch.distributed.barrier()
