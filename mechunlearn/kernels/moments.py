"""Streaming moments and the reservoir's token keys.

* :func:`chan_merge` combines two sets of (count, mean, M2) exactly (Chan, Golub & LeVeque), the
  step behind every streaming statistic and every merge of shards.
* :func:`example_seeds` and :func:`token_keys` give each token a Uniform(0, 1) key that depends
  only on a seed, its example's text and its position in that text, so that a bottom-k
  reservoir of tokens does not depend on batching, padding, order or sharding.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from torch import Tensor


def chan_merge(
    count_a: Tensor, mean_a: Tensor, m2_a: Tensor, count_b: Tensor, mean_b: Tensor, m2_b: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Combine two sets of (count, mean, M2) exactly (Chan, Golub & LeVeque's formula)."""
    count = count_a + count_b
    safe = count.clamp(min=1).to(mean_a.dtype)
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b.to(mean_a.dtype) / safe)
    m2 = m2_a + m2_b + delta.square() * (count_a.to(mean_a.dtype) * count_b / safe)
    return count, mean, m2


def example_seeds(prompts: Sequence[str], answers: Sequence[str], seed: int) -> np.ndarray:
    """A 64-bit number per example from the seed and its text (stable across runs and shards)."""
    out = np.empty(len(prompts), dtype=np.uint64)
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        digest = hashlib.blake2b(
            f"{seed}\x00{p}\x00{a}".encode(), digest_size=8, usedforsecurity=False
        )
        out[i] = np.frombuffer(digest.digest(), dtype=np.uint64)[0]
    return out


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def token_keys(example_seed: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
    """Uniform(0, 1) keys, one per token, from each example's seed and the token's position."""
    with np.errstate(over="ignore"):
        mixed = _splitmix64(
            example_seed[:, None] ^ _splitmix64(position_ids.astype(np.uint64) + np.uint64(1))
        )
    return (mixed >> np.uint64(11)).astype(np.float64) / float(1 << 53)
