"""Streaming per-neuron statistics and last-prompt-token key vectors.

:func:`collect` runs a model over a skill's texts and updates, inside each hook, per-layer and
per-neuron running moments (count, mean, M2 in float64, merged batch by batch with Chan's
parallel formula), min, max, a count of non-finite values, and a fixed-size uniform sample of
token values (a bottom-k reservoir). The hook returns the activation untouched and nothing of
size tokens x layers x d_mlp is kept, so memory stays flat as the number of tokens grows.

The reservoir gives each token a pseudo-random key that depends only on the seed, the text of
its example and its position in that text, and keeps the tokens with the smallest keys. So the
sample does not depend on batching, padding or order, and :meth:`NeuronStats.merge` of shards
equals one pass over their union, reservoir included.

:func:`collect_keys` keeps the key vector (``hook_post``) at the last prompt token of every
example, for every chosen layer: the input of Key Space Detection.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from . import __version__
from .data import Skill
from .io import load_tensors, save_tensors
from .sites import (
    EncodedBatch,
    check_positions,
    check_site,
    d_mlp,
    forward_until,
    hook_name,
    iter_batches,
    model_device,
    model_name,
    n_layers,
    resolve_layers,
)


def _model_meta(model) -> dict[str, Any]:
    return {
        "model": model_name(model),
        "n_layers": n_layers(model),
        "d_mlp": d_mlp(model),
        "d_model": int(model.cfg.d_model),
    }


def check_same_model(meta: dict[str, Any], model, what: str = "These statistics") -> None:
    """Raise a ValueError if ``model``'s shape differs from the one recorded in ``meta``.

    A different model name with the same shape only warns: a fine-tuned copy is a fair use.
    """
    here = _model_meta(model)
    for key in ("n_layers", "d_mlp", "d_model"):
        if key in meta and int(meta[key]) != here[key]:
            raise ValueError(
                f"{what} come from {meta.get('model')!r} with {key}={meta[key]}, but this model "
                f"({here['model']!r}) has {key}={here[key]}: collect them again on this model."
            )
    if meta.get("model") not in (None, here["model"]):
        warnings.warn(
            f"{what} come from {meta['model']!r}, applied to {here['model']!r} of the same shape.",
            stacklevel=3,
        )


def _check_compatible(a: dict[str, Any], b: dict[str, Any], keys: Sequence[str], what: str):
    for key in keys:
        if a.get(key) != b.get(key):
            raise ValueError(
                f"Cannot combine {what} with different {key}: {a.get(key)!r} vs {b.get(key)!r}."
            )


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


@dataclass
class NeuronStats:
    """Per-layer, per-neuron statistics of one hook site over one skill.

    Index ``[i, n]`` is neuron ``n`` of layer ``layers[i]``. Non-finite values (NaN, inf) are
    counted in ``n_nonfinite`` and left out of the moments, min and max; the reservoir keeps the
    sampled tokens' values as they were (the analyses drop non-finite ones per neuron). The
    reservoir is float32 whatever the model's dtype; the moments are float64.

    Attributes:
        site: ``"pre"`` or ``"key"``.
        positions: which tokens were counted (see :mod:`mechunlearn.sites`).
        layers: the model layers, in order.
        count: number of finite values per neuron.
        mean: running mean (float64).
        m2: running sum of squared deviations from the mean (float64).
        min: smallest finite value (``+inf`` where none).
        max: largest finite value (``-inf`` where none).
        n_nonfinite: number of NaN or inf values seen.
        samples: the reservoir: values of up to ``reservoir_size`` uniformly drawn tokens
            (the same tokens for every neuron and layer); only the first ``n_samples`` rows
            hold data.
        sample_keys: each reservoir row's key (``inf`` for empty rows).
        n_tokens: tokens counted.
        n_examples: examples run.
        meta: model, skill, seed and package version.

    Example:
        >>> stats = collect(model, load_skill("gsm8k", n=64), site="pre")
        >>> stats.std.shape  # (layers, d_mlp)
    """

    site: str
    positions: str
    layers: list[int]
    count: Int[Tensor, "layer d_mlp"]
    mean: Float[Tensor, "layer d_mlp"]
    m2: Float[Tensor, "layer d_mlp"]
    min: Float[Tensor, "layer d_mlp"]
    max: Float[Tensor, "layer d_mlp"]
    n_nonfinite: Int[Tensor, "layer d_mlp"]
    samples: Float[Tensor, "layer sample d_mlp"]
    sample_keys: Float[Tensor, " sample"]
    n_tokens: int = 0
    n_examples: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    # ----------------------------------------------------------------------------- creation
    @classmethod
    def empty(
        cls,
        site: str,
        positions: str,
        layers: Sequence[int],
        d_mlp: int,
        reservoir_size: int = 1024,
        device: torch.device | str = "cpu",
        meta: dict[str, Any] | None = None,
    ) -> NeuronStats:
        """Statistics of nothing, ready to be updated."""
        if reservoir_size < 0:
            raise ValueError(f"reservoir_size must be >= 0, got {reservoir_size}.")
        shape = (len(layers), d_mlp)
        f64 = dict(dtype=torch.float64, device=device)
        return cls(
            site=check_site(site),
            positions=check_positions(positions),
            layers=list(layers),
            count=torch.zeros(shape, dtype=torch.long, device=device),
            mean=torch.zeros(shape, **f64),
            m2=torch.zeros(shape, **f64),
            min=torch.full(shape, float("inf"), **f64),
            max=torch.full(shape, float("-inf"), **f64),
            n_nonfinite=torch.zeros(shape, dtype=torch.long, device=device),
            samples=torch.zeros(
                (len(layers), reservoir_size, d_mlp), dtype=torch.float32, device=device
            ),  # fmt: skip
            sample_keys=torch.full((reservoir_size,), float("inf"), **f64),
            meta=dict(meta or {}),
        )

    # ------------------------------------------------------------------------------ derived
    @property
    def d_mlp(self) -> int:
        """Neurons per layer."""
        return int(self.mean.shape[1])

    @property
    def reservoir_size(self) -> int:
        """Capacity of the reservoir."""
        return int(self.sample_keys.shape[0])

    @property
    def n_samples(self) -> int:
        """Reservoir rows that hold data."""
        return int(torch.isfinite(self.sample_keys).sum())

    @property
    def var(self) -> Float[Tensor, "layer d_mlp"]:
        """Sample variance (``M2 / (count - 1)``; NaN where fewer than two values)."""
        denom = (self.count - 1).to(torch.float64)
        return torch.where(denom > 0, self.m2 / denom.clamp(min=1), torch.nan)

    @property
    def std(self) -> Float[Tensor, "layer d_mlp"]:
        """Sample standard deviation (NaN where fewer than two values)."""
        return self.var.sqrt()

    def layer_index(self, layer: int) -> int:
        """Row of ``layer`` in these statistics."""
        try:
            return self.layers.index(layer)
        except ValueError:
            raise ValueError(
                f"Layer {layer} was not collected; these statistics hold layers {self.layers}."
            ) from None

    def sample_values(self, layer: int | None = None) -> Tensor:
        """Filled reservoir rows: ``[n_samples, d_mlp]`` for one layer, or all layers."""
        keep = torch.isfinite(self.sample_keys)
        if layer is None:
            return self.samples[:, keep]
        return self.samples[self.layer_index(layer), keep]

    def select_layers(self, layers: Sequence[int]) -> NeuronStats:
        """These statistics restricted to ``layers``."""
        rows = [self.layer_index(layer) for layer in layers]
        idx = torch.as_tensor(rows, device=self.mean.device)
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("count", "mean", "m2", "min", "max", "n_nonfinite", "samples"):
            kw[name] = kw[name].index_select(0, idx)
        kw["layers"] = list(layers)
        kw["meta"] = dict(self.meta)
        return NeuronStats(**kw)

    def to(self, device: torch.device | str) -> NeuronStats:
        """A copy on ``device``."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in kw.items():
            if isinstance(value, Tensor):
                kw[name] = value.to(device)
        kw["layers"], kw["meta"] = list(self.layers), dict(self.meta)
        return NeuronStats(**kw)

    def __repr__(self) -> str:
        return (
            f"NeuronStats(site={self.site!r}, positions={self.positions!r}, "
            f"skill={self.meta.get('skill')!r}, model={self.meta.get('model')!r}, "
            f"layers={len(self.layers)}, d_mlp={self.d_mlp}, tokens={self.n_tokens}, "
            f"samples={self.n_samples}/{self.reservoir_size})"
        )

    # ------------------------------------------------------------------------------ updates
    def update(
        self,
        row: int,
        values: Float[Tensor, "token d_mlp"],
        sample_slots: Int[Tensor, " new"] | None = None,
        sample_rows: Int[Tensor, " new"] | None = None,
    ) -> None:
        """Fold ``values`` (one layer's counted tokens) into layer row ``row``.

        ``sample_slots``/``sample_rows`` write ``values[sample_rows]`` into those reservoir
        slots (chosen beforehand by :meth:`reservoir_plan`). Never synchronises with the host.
        """
        if values.shape[0] == 0:  # shapes are host metadata: no synchronisation
            return
        # Batch moments from the activation's own dtype, summed into float64. Non-finite
        # values are replaced by the batch mean, which leaves the deviations, min and max of
        # the finite values unchanged; they are counted separately.
        finite = torch.isfinite(values)
        n_b = finite.sum(0)
        total = torch.where(finite, values, 0.0).sum(0, dtype=torch.float64)
        mean_b = total / n_b.clamp(min=1)
        filled = torch.where(finite, values, mean_b.to(values.dtype))
        m2_b = (filled - mean_b.to(values.dtype)).square().sum(0, dtype=torch.float64)
        lo, hi = torch.aminmax(filled, dim=0)
        has = n_b > 0
        count, mean, m2 = chan_merge(
            self.count[row], self.mean[row], self.m2[row], n_b, mean_b, m2_b
        )
        self.count[row], self.mean[row], self.m2[row] = count, mean, m2
        self.min[row] = torch.where(has, torch.minimum(self.min[row], lo.double()), self.min[row])
        self.max[row] = torch.where(has, torch.maximum(self.max[row], hi.double()), self.max[row])
        self.n_nonfinite[row] += values.shape[0] - n_b
        if sample_slots is not None and sample_slots.numel():
            self.samples[row, sample_slots] = values[sample_rows].to(self.samples.dtype)

    def reservoir_plan(self, keys: Float[Tensor, " token"]) -> tuple[Tensor, Tensor]:
        """Admit tokens with ``keys`` to the reservoir.

        Updates ``sample_keys`` and returns ``(slots, rows)``: token ``rows[j]`` goes into slot
        ``slots[j]``. The same plan applies to every layer.
        """
        size = self.reservoir_size
        if size == 0 or keys.numel() == 0:
            empty = torch.zeros(0, dtype=torch.long, device=keys.device)
            return empty, empty
        keys = keys.to(self.sample_keys.device, torch.float64)
        pool = torch.cat([self.sample_keys, keys])
        chosen = torch.topk(pool, size, largest=False, sorted=False).indices
        rows = chosen[chosen >= size] - size
        kept = torch.zeros(size, dtype=torch.bool, device=pool.device)
        kept[chosen[chosen < size]] = True
        slots = torch.nonzero(~kept).flatten()[: rows.numel()]
        self.sample_keys[slots] = keys[rows]
        return slots, rows

    # ------------------------------------------------------------------------------ merging
    def merge(self, other: NeuronStats) -> NeuronStats:
        """Combine two shards exactly: the result equals one pass over both.

        Raises:
            ValueError: the shards differ in model shape, site, positions, layers, reservoir
                size or seed.
        """
        if not isinstance(other, NeuronStats):
            raise TypeError(f"Can only merge NeuronStats, got {type(other).__name__}.")
        what = "NeuronStats"
        _check_compatible(
            self.meta, other.meta, ("model", "n_layers", "d_mlp", "d_model", "seed"), what
        )
        _check_compatible(
            {"site": self.site, "positions": self.positions, "layers": self.layers},
            {"site": other.site, "positions": other.positions, "layers": other.layers},
            ("site", "positions", "layers"),
            what,
        )
        if self.reservoir_size != other.reservoir_size:
            raise ValueError(
                f"Cannot merge reservoirs of different sizes ({self.reservoir_size} vs "
                f"{other.reservoir_size}): collect both with the same reservoir_size."
            )
        other = other.to(self.mean.device)
        count, mean, m2 = chan_merge(
            self.count, self.mean, self.m2, other.count, other.mean, other.m2
        )
        pool_keys = torch.cat([self.sample_keys, other.sample_keys])
        pool = torch.cat([self.samples, other.samples], dim=1)
        chosen = torch.topk(pool_keys, self.reservoir_size, largest=False, sorted=True).indices
        meta = dict(self.meta)
        names = [n for n in (self.meta.get("skill"), other.meta.get("skill")) if n]
        meta["skill"] = "+".join(dict.fromkeys("+".join(names).split("+"))) if names else None
        return NeuronStats(
            site=self.site,
            positions=self.positions,
            layers=list(self.layers),
            count=count,
            mean=mean,
            m2=m2,
            min=torch.minimum(self.min, other.min),
            max=torch.maximum(self.max, other.max),
            n_nonfinite=self.n_nonfinite + other.n_nonfinite,
            samples=pool[:, chosen],
            sample_keys=pool_keys[chosen],
            n_tokens=self.n_tokens + other.n_tokens,
            n_examples=self.n_examples + other.n_examples,
            meta=meta,
        )

    @staticmethod
    def merge_all(shards: Sequence[NeuronStats]) -> NeuronStats:
        """Merge any number of shards (see :meth:`merge`)."""
        if not shards:
            raise ValueError("No shards to merge.")
        out = shards[0]
        for shard in shards[1:]:
            out = out.merge(shard)
        return out

    # --------------------------------------------------------------------------- save / load
    def check_model(self, model) -> None:
        """Raise if ``model`` has a different shape from the one these statistics came from."""
        check_same_model(self.meta, model, "These NeuronStats")

    def save(self, path: str | Path) -> Path:
        """Write to a safetensors file with the metadata as JSON in its header."""
        tensors = {
            name: getattr(self, name).contiguous().cpu()
            for name in ("count", "mean", "m2", "min", "max", "n_nonfinite", "samples")
        }
        tensors["sample_keys"] = self.sample_keys.contiguous().cpu()
        info = {
            "kind": "NeuronStats",
            "site": self.site,
            "positions": self.positions,
            "layers": self.layers,
            "n_tokens": self.n_tokens,
            "n_examples": self.n_examples,
            "meta": self.meta,
        }
        return save_tensors(path, tensors, info)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> NeuronStats:
        """Read statistics written by :meth:`save`."""
        tensors, info = load_tensors(path, "NeuronStats", device)
        return cls(
            site=info["site"],
            positions=info["positions"],
            layers=list(info["layers"]),
            n_tokens=int(info["n_tokens"]),
            n_examples=int(info["n_examples"]),
            meta=dict(info["meta"]),
            **tensors,
        )


@dataclass
class KeyVectors:
    """Key vectors (``hook_post``) at the last prompt token of each example, per layer.

    Attributes:
        values: ``[n_examples, layers, d_mlp]`` float32, row ``i`` is example ``i`` of the skill.
        layers: the model layers, in order.
        meta: model, skill and package version.

    Example:
        >>> keys = collect_keys(model, load_skill("gsm8k", n=100))
        >>> keys.layer(-1).shape  # (100, d_mlp) for the last layer
    """

    values: Float[Tensor, "example layer d_mlp"]
    layers: list[int]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def d_mlp(self) -> int:
        """Neurons per layer."""
        return int(self.values.shape[2])

    def layer_index(self, layer: int) -> int:
        """Column of ``layer`` in ``values`` (negative counts from the last collected layer)."""
        if layer < 0 and -layer <= len(self.layers):
            return len(self.layers) + layer
        try:
            return self.layers.index(layer)
        except ValueError:
            raise ValueError(
                f"Layer {layer} was not collected; these key vectors hold layers {self.layers}."
            ) from None

    def layer(self, layer: int) -> Float[Tensor, "example d_mlp"]:
        """All examples' key vectors at ``layer``."""
        return self.values[:, self.layer_index(layer)]

    def subset(self, index: Sequence[int] | Tensor) -> KeyVectors:
        """The key vectors of the examples at ``index``."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.values.device)
        return KeyVectors(self.values.index_select(0, idx), list(self.layers), dict(self.meta))

    def split(self, test_size: float | int = 0.5, seed: int = 0) -> tuple[KeyVectors, KeyVectors]:
        """Random disjoint (fit, held-out) parts; ``test_size`` is a fraction or a count."""
        n = len(self)
        n_test = int(round(test_size * n)) if isinstance(test_size, float) else int(test_size)
        if not 0 < n_test < n:
            raise ValueError(
                f"test_size={test_size} leaves an empty part of {n} key vectors: "
                "both parts need at least one."
            )
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return self.subset(perm[n_test:].sort().values), self.subset(perm[:n_test].sort().values)

    def concat(self, other: KeyVectors) -> KeyVectors:
        """Rows of both (same model and layers)."""
        _check_compatible(self.meta, other.meta, ("model", "n_layers", "d_mlp"), "KeyVectors")
        if self.layers != other.layers:
            raise ValueError(
                f"Cannot concat key vectors of layers {self.layers} and {other.layers}."
            )
        meta = dict(self.meta)
        meta["skill"] = f"{self.meta.get('skill')}+{other.meta.get('skill')}"
        values = torch.cat([self.values, other.values.to(self.values.device)])
        return KeyVectors(values, list(self.layers), meta)

    def to(self, device: torch.device | str) -> KeyVectors:
        """A copy on ``device``."""
        return KeyVectors(self.values.to(device), list(self.layers), dict(self.meta))

    def check_model(self, model) -> None:
        """Raise if ``model`` has a different shape from the one these vectors came from."""
        check_same_model(self.meta, model, "These KeyVectors")

    def __repr__(self) -> str:
        return (
            f"KeyVectors(skill={self.meta.get('skill')!r}, model={self.meta.get('model')!r}, "
            f"n={len(self)}, layers={len(self.layers)}, d_mlp={self.d_mlp})"
        )

    def save(self, path: str | Path) -> Path:
        """Write to a safetensors file with the metadata as JSON in its header."""
        info = {"kind": "KeyVectors", "layers": self.layers, "meta": self.meta}
        return save_tensors(path, {"values": self.values.contiguous().cpu()}, info)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> KeyVectors:
        """Read key vectors written by :meth:`save`."""
        tensors, info = load_tensors(path, "KeyVectors", device)
        return cls(tensors["values"], list(info["layers"]), dict(info["meta"]))


def _skill_texts(skill) -> tuple[str, list[str], list[str]]:
    if isinstance(skill, Skill):
        name, prompts, answers = skill.name, skill.prompts, skill.answers
    elif isinstance(skill, str):
        raise TypeError(
            "collect() takes a Skill (or a list of texts), not a name: "
            f"use collect(model, load_skill({skill!r}))."
        )
    else:
        name, prompts, answers = "texts", [str(t) for t in skill], [""] * len(skill)
    if len(prompts) == 0:
        raise ValueError(f"Skill {name!r} has no examples: nothing to collect.")
    return name, list(prompts), list(answers)


def _run_batches(
    model, skill, site, layers, batch_size, max_length, padding_side, desc, quiet, step
):
    """Drive the model over a skill's batches, calling ``step(batch) -> fwd_hooks``; each
    forward stops after the deepest layer's ``site``."""
    name, prompts, answers = _skill_texts(skill)
    batches = list(
        iter_batches(
            model,
            prompts,
            answers,
            batch_size=batch_size,
            max_length=max_length,
            padding_side=padding_side,
        )
    )
    last = hook_name(site, max(layers))
    bar = tqdm(total=len(prompts), desc=desc, unit="ex", disable=quiet, leave=False)
    with torch.inference_mode():
        for batch in batches:
            forward_until(model, batch, step(batch, prompts, answers), last)
            bar.update(int(batch.tokens.shape[0]))
    bar.close()
    return name, prompts


def collect(
    model,
    skill: Skill | Sequence[str],
    site: str = "pre",
    positions: str = "all",
    layers: int | Sequence[int] | None = None,
    batch_size: int = 16,
    reservoir_size: int = 1024,
    seed: int = 0,
    max_length: int | None = None,
    padding_side: str = "right",
    quiet: bool = False,
) -> NeuronStats:
    """Stream per-neuron statistics of ``site`` over a skill's texts.

    Each example runs as ``[BOS] + prompt + answer``; BOS and padding are never counted.

    Args:
        model: a TransformerBridge or HookedTransformer.
        skill: a :class:`~mechunlearn.data.Skill`, or a list of plain texts.
        site: ``"pre"`` (``hook_pre``) or ``"key"`` (``hook_post``).
        positions: ``"all"``, ``"prompt"``, ``"answer"`` or ``"last"`` (last prompt token).
        layers: layer indices (negative counts from the end); None for all.
        batch_size: examples per forward pass.
        reservoir_size: tokens kept as a uniform sample for distribution tests (0 for none).
        seed: seed of the reservoir's token keys.
        max_length: truncate texts to this many tokens (default: the model's context).
        padding_side: ``"right"`` or ``"left"``; both give the same statistics.
        quiet: hide the progress bar.

    Returns:
        NeuronStats on the model's device.

    Example:
        >>> model = mu.load_model()
        >>> stats = mu.collect(model, mu.load_skill("gsm8k", n=200), site="pre")
        >>> stats.mean.shape
        torch.Size([30, 1536])
    """
    check_site(site)
    check_positions(positions)
    layers = resolve_layers(model, layers)
    device = model_device(model)
    meta = {**_model_meta(model), "seed": int(seed)}
    stats = NeuronStats.empty(site, positions, layers, d_mlp(model), reservoir_size, device, meta)

    def step(batch: EncodedBatch, prompts, answers):
        mask = batch.mask(positions)
        flat_rows = torch.nonzero(mask.flatten()).flatten()
        # Reservoir keys depend on the example's text and the token's position only.
        idx = batch.example_index.cpu().numpy()
        ex_seed = example_seeds([prompts[i] for i in idx], [answers[i] for i in idx], seed)
        keys = token_keys(ex_seed, batch.position_ids.cpu().numpy())
        keys = torch.from_numpy(keys).to(device).flatten()[flat_rows]
        slots, rows = stats.reservoir_plan(keys)
        stats.n_tokens += int(flat_rows.numel())
        stats.n_examples += int(batch.tokens.shape[0])

        def make_hook(row: int):
            def hook(activation: Float[Tensor, "batch pos d_mlp"], hook):
                values = activation.reshape(-1, activation.shape[-1]).index_select(0, flat_rows)
                stats.update(row, values, slots, rows)
                return activation

            return hook

        return [(hook_name(site, layer), make_hook(row)) for row, layer in enumerate(layers)]

    name, _ = _run_batches(
        model, skill, site, layers, batch_size, max_length, padding_side, f"collect {site}",
        quiet, step,
    )  # fmt: skip
    stats.meta.update(skill=name, positions=positions, collected=_now(), version=__version__)
    if stats.n_tokens == 0:
        raise ValueError(
            f"No tokens of skill {name!r} fall in positions={positions!r} "
            "(for 'answer', do the examples have answers?)."
        )
    _warn_nonfinite(stats.n_nonfinite, layers, name)
    return stats


def collect_keys(
    model,
    skill: Skill | Sequence[str],
    layers: int | Sequence[int] | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    padding_side: str = "right",
    quiet: bool = False,
) -> KeyVectors:
    """Key vectors (``hook_post``) at the last prompt token of every example.

    Only the prompts matter (answers are not run: the last prompt token cannot see them).

    Returns:
        KeyVectors with ``values`` of shape ``[n_examples, len(layers), d_mlp]`` (float32, on the
        model's device), rows in the skill's order.

    Example:
        >>> keys = mu.collect_keys(model, mu.load_skill("gsm8k", n=100), layers=[-1])
        >>> keys.values.shape
        torch.Size([100, 1, 1536])
    """
    layers = resolve_layers(model, layers)
    device = model_device(model)
    if isinstance(skill, Skill):
        skill = Skill.from_texts(skill.name, skill.prompts)
    name, prompts = _skill_texts(skill)[:2]
    values = torch.zeros((len(prompts), len(layers), d_mlp(model)), device=device)

    def step(batch: EncodedBatch, prompts, answers):
        rows = torch.arange(batch.tokens.shape[0], device=device)

        def make_hook(col: int):
            def hook(activation: Float[Tensor, "batch pos d_mlp"], hook):
                values[batch.example_index, col] = activation[rows, batch.last_prompt].float()
                return activation

            return hook

        return [(hook_name("key", layer), make_hook(col)) for col, layer in enumerate(layers)]

    _run_batches(
        model, skill, "key", layers, batch_size, max_length, padding_side, "collect keys", quiet,
        step,
    )  # fmt: skip
    bad = (~torch.isfinite(values)).sum(dim=(0, 2))
    _warn_nonfinite(bad, layers, name)
    meta = {**_model_meta(model), "skill": name, "collected": _now(), "version": __version__}
    return KeyVectors(values, layers, meta)


def _warn_nonfinite(n_nonfinite: Tensor, layers: Sequence[int], skill: str) -> None:
    per_layer = n_nonfinite.reshape(len(layers), -1).sum(1).cpu()
    total = int(per_layer.sum())
    if total:
        bad = {layers[i]: int(v) for i, v in enumerate(per_layer) if v}
        warnings.warn(
            f"{total} non-finite (NaN/inf) activation values in skill {skill!r} "
            f"(by layer: {bad}) were left out of the statistics; see `n_nonfinite`. "
            "Check the model's dtype (float16 overflows) and inputs.",
            stacklevel=3,
        )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
