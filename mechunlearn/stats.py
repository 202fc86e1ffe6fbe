"""What collection produces: per-neuron statistics, key vectors and importances, as data objects.

* :class:`NeuronStats`: streaming per-layer, per-neuron moments of one hook site over a skill
  (count, mean and M2 in float64, min, max, non-finite counts) and a uniform reservoir sample of
  token values; exact :meth:`~NeuronStats.merge` of shards.
* :class:`KeyVectors`: the key vector (``hook_post``) at the last prompt token of every example.
* :class:`Importance`: Selective Pruning's ``mean |x|`` per neuron at ``hook_post``.

Each saves to one safetensors file and loads it back with every tensor's dtype and shape checked
against the others and the metadata (:mod:`mechunlearn.io`). They are computed by
:mod:`mechunlearn.collect`; nothing here runs a model.

BOS is never counted: its activations are outliers of their own (a "massive activation"; the
default model's are measured in ``docs/results/index.md``), and Neuron Adjust leaves it alone
for the same reason. Padding is never
counted either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from functools import reduce
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .data import split_sizes
from .io import DamagedFileError, check_shape, load_tensors, save_tensors
from .kernels.moments import chan_merge
from .models import check_same_model
from .sites import check_positions, check_site
from .validation import check_compatible, check_int, check_type


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
        >>> stats = mu.collect(model, forget, site="pre", quiet=True)
        >>> stats.std.shape  # (layers, d_mlp)
        torch.Size([3, 48])
        >>> stats.n_examples, stats.site
        (30, 'pre')
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

    @classmethod
    def from_samples(
        cls,
        samples: Float[Tensor, "layer token d_mlp"],
        *,
        site: str = "pre",
        positions: str = "all",
        layers: Sequence[int] | None = None,
        keys: Float[Tensor, " token"] | None = None,
        seed: int = 0,
        samples_dtype: torch.dtype = torch.float32,
        meta: dict[str, Any] | None = None,
    ) -> NeuronStats:
        """Statistics of given values: the moments of ``samples`` (non-finite values left out and
        counted, as :func:`~mechunlearn.collect` does) with every token in the reservoir.

        For tests and for statistics computed elsewhere.

        Args:
            samples: ``[layers, tokens, d_mlp]`` values (any float dtype; the moments are
                computed in float64).
            site, positions: what the values are.
            layers: model layer of each row (default ``0..layers-1``).
            keys: each token's reservoir key (default: uniform draws seeded by ``seed``).
            samples_dtype: dtype of the reservoir.
            meta: metadata (model, skill, ...).

        Example:
            >>> stats = NeuronStats.from_samples(torch.randn(2, 500, 8))
            >>> stats.std.shape
            torch.Size([2, 8])
        """
        x = torch.as_tensor(samples)
        if x.ndim != 3:
            raise ValueError(f"samples must be [layers, tokens, d_mlp], got shape {list(x.shape)}.")
        n_rows, n, d = x.shape
        layers = list(range(n_rows)) if layers is None else [int(v) for v in layers]
        if len(layers) != n_rows:
            raise ValueError(f"{len(layers)} layers given for {n_rows} rows of samples.")
        if keys is None:
            gen = torch.Generator().manual_seed(int(seed))
            keys = torch.rand(n, generator=gen, dtype=torch.float64)
        keys = torch.as_tensor(keys, dtype=torch.float64).to(x.device)
        if keys.shape != (n,):
            raise ValueError(f"keys must have shape [{n}], got {list(keys.shape)}.")
        stats = cls.empty(site, positions, layers, d, n, x.device, meta)
        stats.samples = stats.samples.to(samples_dtype)
        for row in range(n_rows):
            stats.update(row, x[row])
        stats.samples[:, :n] = x.to(samples_dtype)
        stats.sample_keys[:] = keys
        stats.n_tokens = n
        return stats

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
        """Row of model layer ``layer`` (negative counts from the last collected layer)."""
        return _layer_index(self.layers, layer, "these statistics")

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
        # Everything in float64 from the first subtraction, whatever the activation's dtype
        # (bf16/fp16 deviations and squares would lose most of their precision). Non-finite
        # values are left out of the sums and counted separately.
        # (Sums of values are accumulated in float64, exact for float32 and narrower inputs;
        # the deviations are float64 before they are squared.)
        finite = torch.isfinite(values)
        n_b = finite.sum(0)
        x = torch.where(finite, values, 0.0)
        mean_b = x.sum(0, dtype=torch.float64) / n_b.clamp(min=1)
        dev = x.to(torch.float64).sub_(mean_b).masked_fill_(~finite, 0.0)
        m2_b = dev.square_().sum(0)
        lo = torch.where(finite, values, torch.inf).amin(0).to(torch.float64)
        hi = torch.where(finite, values, -torch.inf).amax(0).to(torch.float64)
        count, mean, m2 = chan_merge(
            self.count[row], self.mean[row], self.m2[row], n_b, mean_b, m2_b
        )
        self.count[row], self.mean[row], self.m2[row] = count, mean, m2
        self.min[row] = torch.minimum(self.min[row], lo)
        self.max[row] = torch.maximum(self.max[row], hi)
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
        check_compatible(
            self.meta, other.meta, ("model", "n_layers", "d_mlp", "d_model", "seed"), what
        )
        check_compatible(
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
        if other is self or (
            self.n_tokens > 0
            and self.n_tokens == other.n_tokens
            and torch.equal(self.sample_keys, other.sample_keys.to(self.sample_keys.device))
            and torch.equal(self.count, other.count.to(self.count.device))
        ):
            raise ValueError(
                "These two NeuronStats are the same shard (same tokens, same reservoir): "
                "merging would count every token twice. Merge statistics of disjoint texts."
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
        return reduce(NeuronStats.merge, shards)

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
        """Read statistics written by :meth:`save`, checking every tensor against the others.

        Raises:
            FileNotFoundError: no such file.
            DamagedFileError: the file is damaged or inconsistent (the message names it).
        """
        f64, i64 = torch.float64, torch.int64
        schema = {
            "count": i64, "mean": f64, "m2": f64, "min": f64, "max": f64, "n_nonfinite": i64,
            "samples": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
            "sample_keys": f64,
        }  # fmt: skip
        keys = ("site", "positions", "layers", "n_tokens", "n_examples", "meta")
        tensors, info = load_tensors(path, "NeuronStats", device, schema, keys)
        layers, meta = _checked_layers(path, info), _checked_meta(path, info)
        n_tokens = _checked_count(path, info, "n_tokens")
        n_examples = _checked_count(path, info, "n_examples")
        d = tensors["mean"].shape[-1] if tensors["mean"].ndim == 2 else -1
        if "d_mlp" in meta and d != int(meta["d_mlp"]):
            raise DamagedFileError(
                f"{path}: the statistics hold {d} neurons per layer but the metadata says "
                f"d_mlp={meta['d_mlp']}: the file is damaged."
            )
        size = tensors["sample_keys"].shape[0] if tensors["sample_keys"].ndim == 1 else -1
        for name in ("count", "mean", "m2", "min", "max", "n_nonfinite"):
            check_shape(path, name, tensors[name], (len(layers), d))
        check_shape(path, "samples", tensors["samples"], (len(layers), size, d))
        if tensors["count"].numel() and int(tensors["count"].max()) > n_tokens:
            raise DamagedFileError(
                f"{path}: a neuron counts more values than n_tokens={n_tokens}: damaged file."
            )
        try:
            site, positions = check_site(info["site"]), check_positions(info["positions"])
        except ValueError as err:
            raise DamagedFileError(f"{path}: {err}") from None
        return cls(
            site=site,
            positions=positions,
            layers=layers,
            n_tokens=n_tokens,
            n_examples=n_examples,
            meta=meta,
            **tensors,
        )


@dataclass
class KeyVectors:
    """Key vectors (``hook_post``) at the last prompt token of each example, per layer (or their
    mean over the example's prompt tokens: ``meta["pool"] == "mean"``, see
    :func:`mechunlearn.collect_keys`).

    Attributes:
        values: ``[n_examples, layers, d_mlp]`` float32, row ``i`` is example ``i`` of the skill.
        layers: the model layers, in order.
        meta: model, skill and package version.

    Example:
        >>> keys = mu.collect_keys(model, forget, quiet=True)
        >>> keys.values.shape, keys.layer(-1).shape   # (n, layers, d_mlp); the last layer
        (torch.Size([30, 3, 48]), torch.Size([30, 48]))
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

    def split_indices(
        self, test_size: float | int = 0.5, seed: int = 0
    ) -> tuple[Int[Tensor, " n_fit"], Int[Tensor, " n_test"]]:
        """The row indices of :meth:`split`'s (fit, held-out) parts, each ascending."""
        n_test = split_sizes(len(self), test_size)[1]
        check_int("seed", seed, min_val=None)
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return perm[n_test:].sort().values, perm[:n_test].sort().values

    def split(self, test_size: float | int = 0.5, seed: int = 0) -> tuple[KeyVectors, KeyVectors]:
        """Random disjoint (fit, held-out) parts.

        ``test_size`` is a fraction in (0, 1), rounded up (the rule of
        :func:`mechunlearn.data.split_sizes`, as ``Skill.split``), or a count.
        """
        fit, test = self.split_indices(test_size, seed)
        return self.subset(fit), self.subset(test)

    def concat(self, other: KeyVectors) -> KeyVectors:
        """Rows of both (same model and layers)."""
        check_compatible(self.meta, other.meta, ("model", "n_layers", "d_mlp"), "KeyVectors")
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

    @staticmethod
    def concat_all(parts: Sequence[KeyVectors]) -> KeyVectors:
        """The rows of every part, in order (see :meth:`concat`)."""
        if not parts:
            raise ValueError("No key vectors to concatenate.")
        return reduce(KeyVectors.concat, parts)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> KeyVectors:
        """Read key vectors written by :meth:`save`, checking shapes against the metadata."""
        floats = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
        tensors, info = load_tensors(
            path, "KeyVectors", device, {"values": floats}, ("layers", "meta")
        )
        layers, meta = _checked_layers(path, info), _checked_meta(path, info)
        values = tensors["values"]
        n = values.shape[0] if values.ndim == 3 else -1
        check_shape(
            path, "values", values, (n, len(layers), int(meta.get("d_mlp", values.shape[-1])))
        )
        return cls(values, layers, meta)


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

    def merge(self, other: Importance) -> Importance:
        """Importances of both shards' tokens together (token-weighted mean of ``mean |x|``)."""
        if not isinstance(other, Importance):
            raise TypeError(f"Can only merge Importance, got {type(other).__name__}.")
        check_compatible(self.meta, other.meta, ("model", "n_layers", "d_mlp"), "importances")
        if self.layers != other.layers:
            raise ValueError(
                f"Cannot merge importances of layers {self.layers} and {other.layers}."
            )
        n = self.n_tokens + other.n_tokens
        total = self.values * self.n_tokens + other.values.to(self.values.device) * other.n_tokens
        meta = dict(self.meta)
        return Importance(total / max(n, 1), list(self.layers), n, meta)

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
        """Read importances written by :meth:`save`, checking shapes against the metadata."""
        tensors, info = load_tensors(
            path, "Importance", device, {"values": torch.float64}, ("layers", "n_tokens", "meta")
        )
        layers, meta = _checked_layers(path, info), _checked_meta(path, info)
        values = tensors["values"]
        check_shape(path, "values", values, (len(layers), int(meta.get("d_mlp", values.shape[-1]))))
        return cls(values, layers, _checked_count(path, info, "n_tokens"), meta)


# ------------------------------------------------------------------------------ helpers
def check_stats(stats: Any, name: str = "stats") -> NeuronStats:
    """``stats`` if it is :class:`NeuronStats`, else a TypeError naming the call that makes one."""
    return check_type(stats, NeuronStats, name, "Collect them with mu.collect(model, skill).")


def _layer_index(layers: Sequence[int], layer: int, what: str) -> int:
    """Position of model layer ``layer`` in ``layers`` (negative counts from the last one)."""
    check_int("layer", layer, min_val=None)
    if layer < 0 and -layer <= len(layers):
        return len(layers) + layer
    try:
        return list(layers).index(layer)
    except ValueError:
        raise ValueError(
            f"Layer {layer} was not collected; {what} hold layers {list(layers)}."
        ) from None


def _checked_meta(path: Any, info: dict[str, Any]) -> dict[str, Any]:
    meta = info["meta"]
    if not isinstance(meta, dict):
        raise DamagedFileError(f"{path}: metadata 'meta' is not a mapping: the file is damaged.")
    for key in ("n_layers", "d_mlp", "d_model"):
        value = meta.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise DamagedFileError(f"{path}: meta[{key!r}]={value!r} is not a positive integer.")
    return dict(meta)


def _checked_layers(path: Any, info: dict[str, Any]) -> list[int]:
    layers = info["layers"]
    total = info["meta"].get("n_layers") if isinstance(info.get("meta"), dict) else None
    ok = isinstance(layers, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in layers
    )
    if not ok or len(set(layers)) != len(layers) or (total and any(v >= total for v in layers)):
        raise DamagedFileError(
            f"{path}: layers={layers!r} are not distinct layer indices of a {total}-layer model: "
            "the file is damaged."
        )
    return list(layers)


def _checked_count(path: Any, info: dict[str, Any], key: str) -> int:
    value = info[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DamagedFileError(f"{path}: {key}={value!r} is not a count: the file is damaged.")
    return value
