"""Collection: run a model over a skill's texts once and keep what the analyses and methods need.

Every collector streams: its hooks fold each batch into running statistics and return the
activation untouched, nothing of size tokens x layers x d_mlp is kept, and the forward pass
stops right after the deepest hooked site (:func:`~mechunlearn.batching.forward_until`), so not
even the unembedding is computed.

* :func:`collect` -> :class:`~mechunlearn.stats.NeuronStats` of one site (``hook_pre`` by
  default): per-neuron moments in float64 and a uniform reservoir of token values.
* :func:`collect_keys` -> :class:`~mechunlearn.stats.KeyVectors`: the key vector
  (``hook_post``) at the last prompt token of every example (Key Space Detection's input), or
  (``pool="mean"``) its mean over the example's prompt tokens.
* :func:`collect_importance` -> :class:`~mechunlearn.stats.Importance`: ``mean |x|`` at
  ``hook_post`` over every token (Selective Pruning's input).
* ``collect(model, skill, what=("pre", "keys", "mean_keys", "importance"))`` ->
  :class:`Probe`: several of
  them from **one** forward pass per batch (what a run needs; a 70B model pays for every pass).

All of them, teacher-forced scoring (:func:`mechunlearn.scoring.score_pass`) and the methods'
own passes (LUNAR's normal equations, SIMU's attribution, Key Space Detection's ``detect``) run
through one loop, :func:`run_pass`: any hooks per batch over length-sorted batches bounded in
padded tokens, each forward stopped right after the deepest hook point the caller needs.

Each example runs as ``[BOS] + prompt + answer``; BOS and padding are never counted. Under
``torchrun`` every collector shards the examples across processes and combines the shards
exactly (:mod:`mechunlearn.distributed`); every rank returns the full result.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from . import distributed
from ._version import __version__
from .batching import EncodedBatch, check_batching, forward, forward_until, iter_batches
from .data import Skill, special_token_flags
from .kernels.moments import example_seeds, token_keys
from .models import check_model, d_mlp, model_device, model_meta
from .sites import check_positions, check_site, hook_name
from .stats import Importance, KeyVectors, NeuronStats
from .validation import check_int, check_texts, resolve_layers

WHAT: tuple[str, ...] = ("pre", "key", "keys", "mean_keys", "importance")
"""What :func:`collect` can gather in one pass: ``"pre"``/``"key"`` (NeuronStats of
``hook_pre``/``hook_post``), ``"keys"`` (KeyVectors at the last prompt token), ``"mean_keys"``
(KeyVectors averaged over the prompt tokens), ``"importance"`` (Importance)."""

POOLS: tuple[str, ...] = ("last", "mean")
"""How :func:`collect_keys` reduces an example's prompt tokens to one key vector."""

_SITE_ORDER = {"pre": 0, "key": 1}  # hook_pre runs before hook_post in a layer


@dataclass
class Probe:
    """What one pass of :func:`collect` over a skill gathered (None for what was not asked).

    Attributes:
        pre: NeuronStats of ``hook_pre``.
        key: NeuronStats of ``hook_post``.
        keys: KeyVectors (last prompt token, ``hook_post``).
        mean_keys: KeyVectors (mean over the prompt tokens, ``hook_post``).
        importance: Importance (``mean |x|`` at ``hook_post``).

    Example:
        >>> probe = mu.collect(model, forget, what=("pre", "keys", "importance"), quiet=True)
        >>> probe.pre.mean.shape, probe.keys.values.shape, probe.importance.values.shape
        (torch.Size([3, 48]), torch.Size([30, 3, 48]), torch.Size([3, 48]))
        >>> probe.key is None        # not asked for
        True
    """

    pre: NeuronStats | None = None
    key: NeuronStats | None = None
    keys: KeyVectors | None = None
    mean_keys: KeyVectors | None = None
    importance: Importance | None = None

    def __getitem__(self, name: str) -> Any:
        if name not in WHAT:
            raise KeyError(f"{name!r}: a Probe holds {list(WHAT)}.")
        return getattr(self, name)


# ------------------------------------------------------------------------------ collectors
class _Collector:
    """One thing gathered during a pass: its hooks per batch, its result at the end."""

    site: str  # the MLP site its hooks read

    def hooks(self, batch: EncodedBatch) -> list:
        """The hooks for ``batch`` (``batch.example_index``: its rows' examples in the skill)."""
        raise NotImplementedError


class _StatsCollector(_Collector):
    def __init__(self, site, positions, layers, width, reservoir_size, seed, device, meta, texts):
        self.site, self.positions, self.layers, self.seed = site, positions, layers, seed
        self.texts = texts  # (prompts, answers) of the skill, for the reservoir's keys
        self.stats = NeuronStats.empty(
            site, positions, layers, width, reservoir_size, device, dict(meta, seed=int(seed))
        )

    def hooks(self, batch):
        stats = self.stats
        mask = batch.mask(self.positions)
        flat_rows = torch.nonzero(mask.flatten()).flatten()
        # Reservoir keys depend on the seed, the example's text and the token's position only.
        rows = batch.example_index.tolist()
        prompts, answers = ([texts[i] for i in rows] for texts in self.texts)
        seeds = example_seeds(prompts, answers, self.seed)
        keys = token_keys(seeds, batch.position_ids.cpu().numpy())
        keys = torch.from_numpy(keys).to(flat_rows.device).flatten()[flat_rows]
        slots, sample_rows = stats.reservoir_plan(keys)
        stats.n_tokens += int(flat_rows.numel())
        stats.n_examples += int(batch.tokens.shape[0])

        def make_hook(row: int):
            def hook(activation: Float[Tensor, "batch pos d_mlp"], hook=None):
                values = activation.reshape(-1, activation.shape[-1]).index_select(0, flat_rows)
                stats.update(row, values, slots, sample_rows)
                return activation

            return hook

        return [(hook_name(self.site, layer), make_hook(r)) for r, layer in enumerate(self.layers)]

    def finish(self, name: str) -> NeuronStats:
        stats = _merge_ranks(self.stats)
        stats.meta.update(skill=name, positions=self.positions, collected=_now())
        stats.meta["version"] = __version__
        if stats.n_tokens == 0:
            raise ValueError(
                f"No tokens of skill {name!r} fall in positions={self.positions!r} "
                "(for 'answer', do the examples have answers?)."
            )
        _warn_nonfinite(stats.n_nonfinite, self.layers, name)
        return stats


class _KeysCollector(_Collector):
    site = "key"

    def __init__(self, n_examples, layers, width, device, meta, pool="last"):
        self.layers, self.pool, self.meta = layers, pool, {**meta, "pool": pool}
        dtype = torch.float64 if pool == "mean" else torch.float32  # "mean": sums, then / count
        self.values = torch.zeros((n_examples, len(layers), width), dtype=dtype, device=device)
        self.counts = torch.zeros(n_examples, dtype=torch.float64, device=device)

    def hooks(self, batch):
        values, index = self.values, batch.example_index
        if self.pool == "mean":  # prompt tokens only: BOS, padding and answers left out
            outside = ~batch.prompt_mask[..., None]  # (padding may hold NaN: zeroed, not x 0)
            self.counts[index] = batch.prompt_mask.sum(1).to(values.dtype)

            def make_hook(col: int):
                def hook(activation: Float[Tensor, "batch pos d_mlp"], hook=None):
                    x = activation.to(values.dtype).masked_fill(outside, 0.0)
                    values[index, col] = x.sum(1)
                    return activation

                return hook

        else:
            rows = torch.arange(batch.tokens.shape[0], device=index.device)

            def make_hook(col: int):
                def hook(activation: Float[Tensor, "batch pos d_mlp"], hook=None):
                    values[index, col] = activation[rows, batch.last_prompt].float()
                    return activation

                return hook

        return [(hook_name("key", layer), make_hook(c)) for c, layer in enumerate(self.layers)]

    def finish(self, name: str) -> KeyVectors:
        values = distributed.all_reduce_sum(self.values)  # each rank filled its own rows
        if self.pool == "mean":
            counts = distributed.all_reduce_sum(self.counts)  # >= 1: prompts are not empty
            values = (values / counts[:, None, None]).float()
        bad = (~torch.isfinite(values)).sum(dim=(0, 2))
        _warn_nonfinite(bad, self.layers, name)
        meta = {**self.meta, "skill": name, "collected": _now(), "version": __version__}
        return KeyVectors(values, list(self.layers), meta)


class _ImportanceCollector(_Collector):
    site = "key"

    def __init__(self, layers, width, device, meta):
        self.layers, self.meta = layers, meta
        self.sums = torch.zeros((len(layers), width), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    def hooks(self, batch):
        sums, count = self.sums, self.count
        flat_rows = torch.nonzero(batch.mask("all").flatten()).flatten()
        count += flat_rows.numel()

        def make_hook(row: int):
            def hook(activation: Float[Tensor, "batch pos d_mlp"], hook=None):
                values = activation.reshape(-1, activation.shape[-1]).index_select(0, flat_rows)
                sums[row] += values.to(torch.float64).abs().sum(0)
                return activation

            return hook

        return [(hook_name("key", layer), make_hook(r)) for r, layer in enumerate(self.layers)]

    def finish(self, name: str) -> Importance:
        sums = distributed.all_reduce_sum(self.sums)
        n = int(distributed.all_reduce_sum(self.count))
        if n == 0:
            raise ValueError(f"Skill {name!r} has no tokens to measure.")
        meta = {**self.meta, "skill": name, "collected": _now(), "version": __version__}
        return Importance(sums / n, list(self.layers), n, meta)


# ----------------------------------------------------------------------------------- runner
def as_skill(skill: Any, what: str = "skill") -> Skill:
    """A :class:`~mechunlearn.data.Skill` from a Skill or a list of plain texts.

    Raises:
        TypeError: a skill name (use ``load_skill``), or anything that is not texts.
        ValueError: no examples.
    """
    if isinstance(skill, Skill):
        if len(skill) == 0:
            raise ValueError(f"Skill {skill.name!r} has no examples: nothing to run.")
        return skill
    if isinstance(skill, str):
        raise TypeError(
            f"The {what} must be a Skill (or a list of texts), not a name: "
            f"use mu.load_skill({skill!r})."
        )
    if not isinstance(skill, Iterable):
        raise TypeError(
            f"The {what} must be a Skill or a list of texts, got {type(skill).__name__}."
        )
    texts = check_texts(skill, f"The {what}")
    if not texts:
        raise ValueError(f"The {what} has no examples: nothing to run.")
    return Skill.from_texts("texts", texts)


def run_pass(
    model,
    skill: Skill | Sequence[str],
    hooks: Callable[[EncodedBatch], Sequence[tuple[str, Callable]]],
    stop_after: str | None,
    *,
    then: Callable[[EncodedBatch, Float[Tensor, "batch pos vocab"] | None], None] | None = None,
    prompts_only: bool = False,
    batch_size: int = 16,
    max_length: int | None = None,
    padding_side: str = "right",
    max_batch_tokens: int | None = 8192,
    inference: bool = True,
    shard: bool = False,
    desc: str = "pass",
    quiet: bool = True,
) -> None:
    """Run ``model`` over a skill batch by batch with the hooks each batch asks for: the one
    forward loop of collection, scoring (evaluation's MMLU letters too), the methods' own passes
    and the residual-knowledge probes.

    Examples are tokenised as ``[BOS] + prompt + answer`` (with the skill's special-token flags)
    and grouped into length-sorted batches of at most ``batch_size`` examples and
    ``max_batch_tokens`` padded tokens (:func:`~mechunlearn.batching.iter_batches`). For each
    batch, ``hooks(batch)`` gives the hooks; the forward runs with them and stops right after
    hook point ``stop_after`` (:func:`~mechunlearn.batching.forward_until`: nothing later is
    computed, not even the unembedding), or runs to the logits when ``stop_after`` is None;
    then ``then(batch, logits)`` sees the batch (``logits`` is None when the pass stopped
    early). Hooks are attached for one forward only and removed even when it raises.

    Args:
        model: a TransformerBridge or HookedTransformer.
        skill: the examples: a :class:`~mechunlearn.data.Skill`, or a list of plain texts.
        hooks: per batch, the ``(hook point, function)`` pairs to attach. ``batch.example_index``
            holds each row's index in ``skill`` (under sharding too).
        stop_after: the deepest hook point the pass needs (a later hook never runs), or None
            for the full forward and its logits.
        then: called after each forward with the batch and the logits (or None).
        prompts_only: run ``[BOS] + prompt`` only (answers dropped).
        batch_size: examples per forward.
        max_length: truncate texts to this many tokens (default: the model's context).
        padding_side: ``"right"`` or ``"left"``.
        max_batch_tokens: bound on padded tokens per batch (None: no bound).
        inference: run everything (hooks, forwards, ``then``) under ``torch.inference_mode``;
            False leaves autograd as the caller set it (a ``then`` that takes gradients).
        shard: under ``torchrun``, run only this rank's share of the examples
            (:func:`mechunlearn.distributed.shard`); the caller combines the ranks' results.
        desc: the progress bar's label.
        quiet: hide the progress bar.

    Example:
        >>> from mechunlearn.sites import hook_name
        >>> sums = torch.zeros(30, 48)                    # forget: 30 examples, d_mlp 48
        >>> def hooks(batch):
        ...     def keep(activation, hook):               # last prompt token, layer 0
        ...         rows = torch.arange(len(batch.last_prompt))
        ...         sums[batch.example_index] = activation[rows, batch.last_prompt]
        ...         return activation
        ...     return [(hook_name("key", 0), keep)]
        >>> mu.run_pass(model, forget, hooks, stop_after=hook_name("key", 0), prompts_only=True)
        >>> bool((sums != 0).any(1).all())                # every example's row filled
        True
    """
    check_batching(batch_size, max_batch_tokens, padding_side)
    if not isinstance(skill, Skill):
        skill = as_skill(skill)
    device = model_device(model)
    mine = distributed.shard(len(skill)) if shard else None
    part = skill[mine] if mine is not None and len(mine) < len(skill) else skill
    index = torch.as_tensor(mine, dtype=torch.long, device=device) if part is not skill else None
    batches = iter_batches(
        model,
        part.prompts,
        None if prompts_only else part.answers,
        batch_size=batch_size,
        max_length=max_length,
        padding_side=padding_side,
        max_batch_tokens=max_batch_tokens,
        special_tokens=special_token_flags(part),
    )
    bar = tqdm(
        total=len(part), desc=desc, unit="ex", leave=False,
        disable=quiet or not distributed.is_main(),
    )  # fmt: skip
    try:
        with torch.inference_mode() if inference else nullcontext():
            for batch in batches:
                if index is not None:  # rows of this rank's share -> rows of the skill
                    batch = replace(batch, example_index=index[batch.example_index])
                fwd_hooks = list(hooks(batch))
                if stop_after is None:
                    logits = forward(model, batch, fwd_hooks)
                else:
                    forward_until(model, batch, fwd_hooks, stop_after)
                    logits = None
                if then is not None:
                    then(batch, logits)
                del logits
                bar.update(int(batch.tokens.shape[0]))
    finally:
        bar.close()


def _gather(
    model,
    skill: Skill,
    collectors: Sequence[_Collector],
    layers: Sequence[int],
    fwd_hooks: Sequence = (),
    **settings: Any,
) -> None:
    """One sharded :func:`run_pass` with every collector's hooks (after ``fwd_hooks``),
    stopping after the deepest hooked site."""
    last_site = max({c.site for c in collectors}, key=_SITE_ORDER.__getitem__)

    def hooks(batch: EncodedBatch) -> list:
        out = list(fwd_hooks)
        for c in collectors:
            out += c.hooks(batch)
        return out

    run_pass(model, skill, hooks, hook_name(last_site, max(layers)), shard=True, **settings)


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
    what: str | Sequence[str] | None = None,
    max_batch_tokens: int | None = 8192,
) -> NeuronStats | Probe:
    """Stream per-neuron statistics of ``site`` over a skill's texts, or several things at once.

    Each example runs as ``[BOS] + prompt + answer``; BOS and padding are never counted.
    Statistics are float64 from the first subtraction whatever the model's dtype.

    Args:
        model: a TransformerBridge or HookedTransformer (:func:`mechunlearn.load_model`).
        skill: a :class:`~mechunlearn.data.Skill`, or a list of plain texts.
        site: ``"pre"`` (``hook_pre``) or ``"key"`` (``hook_post``).
        positions: ``"all"``, ``"prompt"``, ``"answer"`` or ``"last"`` (last prompt token), for
            the NeuronStats.
        layers: layer indices (negative counts from the end); None for all.
        batch_size: examples per forward pass.
        reservoir_size: tokens kept as a uniform sample for distribution tests (0 for none).
        seed: seed of the reservoir's token keys.
        max_length: truncate texts to this many tokens (default: the model's context).
        padding_side: ``"right"`` or ``"left"``; both give the same statistics.
        quiet: hide the progress bar.
        what: None for the NeuronStats of ``site``; or a selection of :data:`WHAT` (e.g.
            ``("pre", "keys", "importance")``) gathered in one forward pass per batch and
            returned as a :class:`Probe`. Each equals what its own call gives (statistics
            and importance exactly; key vectors to float rounding, since their batches also
            hold the answers).
        max_batch_tokens: bound on padded tokens per batch (see
            :func:`~mechunlearn.batching.iter_batches`).

    Returns:
        NeuronStats (``what=None``) or a Probe, on the model's device.

    Example:
        >>> stats = mu.collect(model, forget, site="pre", quiet=True)
        >>> stats.mean.shape         # (layers, d_mlp)
        torch.Size([3, 48])
        >>> probe = mu.collect(model, forget, what=("pre", "keys", "importance"), quiet=True)
        >>> type(probe).__name__, probe.pre.n_tokens == stats.n_tokens
        ('Probe', True)
    """
    check_model(model)
    if what is None:
        return collect(
            model, skill, site, positions, layers, batch_size, reservoir_size, seed,
            max_length, padding_side, quiet, (check_site(site),), max_batch_tokens,
        )[site]  # fmt: skip
    wanted = (what,) if isinstance(what, str) else tuple(what)
    for item in wanted:
        if isinstance(item, bool) or item not in WHAT:
            raise ValueError(f"Unknown item {item!r} in what. Choose among {list(WHAT)}.")
    if not wanted or len(set(wanted)) != len(wanted):
        raise ValueError(f"what={what!r} must name each of {list(WHAT)} at most once.")
    check_positions(positions)
    check_int("reservoir_size", reservoir_size)
    check_int("seed", seed, min_val=None)
    check_batching(batch_size, max_batch_tokens, padding_side)
    skill = as_skill(skill)
    layers = resolve_layers(model, layers)
    device, width, meta = model_device(model), d_mlp(model), model_meta(model)
    prompts_only = set(wanted) <= {"keys", "mean_keys"}
    texts = (skill.prompts, [""] * len(skill) if prompts_only else skill.answers)
    made: dict[str, _Collector] = {}
    for item in wanted:
        if item in ("pre", "key"):
            made[item] = _StatsCollector(
                item, positions, layers, width, reservoir_size, seed, device, meta, texts
            )
        elif item in ("keys", "mean_keys"):
            pool = "last" if item == "keys" else "mean"
            made[item] = _KeysCollector(len(skill), layers, width, device, meta, pool)
        else:
            made[item] = _ImportanceCollector(layers, width, device, meta)
    _gather(
        model, skill, list(made.values()), layers, prompts_only=prompts_only,
        batch_size=batch_size, max_length=max_length, padding_side=padding_side,
        max_batch_tokens=max_batch_tokens, desc="collect " + "+".join(wanted), quiet=quiet,
    )  # fmt: skip
    return Probe(**{item: c.finish(skill.name) for item, c in made.items()})


def collect_keys(
    model,
    skill: Skill | Sequence[str],
    layers: int | Sequence[int] | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    padding_side: str = "right",
    quiet: bool = False,
    max_batch_tokens: int | None = 8192,
    pool: str = "last",
) -> KeyVectors:
    """Key vectors (``hook_post``) at the last prompt token of every example, or their mean
    over its prompt tokens.

    Only the prompts run (no prompt token can see the answers).

    Args:
        model: a TransformerBridge or HookedTransformer.
        skill: a :class:`~mechunlearn.data.Skill`, or a list of plain texts.
        layers: layer indices (negative counts from the end); None for all.
        batch_size: examples per forward pass.
        max_length: truncate texts to this many tokens (default: the model's context).
        padding_side: ``"right"`` or ``"left"``.
        quiet: hide the progress bar.
        max_batch_tokens: bound on padded tokens per batch.
        pool: ``"last"`` (the default: the last prompt token, what Key Space Detection reads)
            or ``"mean"`` (the mean over every prompt token, BOS and padding excluded, summed in
            float64). ``meta["pool"]`` records it.

    Returns:
        KeyVectors with ``values`` of shape ``[n_examples, len(layers), d_mlp]`` (float32, on the
        model's device), rows in the skill's order.

    Raises:
        ValueError: an unknown ``pool``; an empty prompt.

    Example:
        >>> keys = mu.collect_keys(model, forget, layers=[-1], quiet=True)
        >>> keys.values.shape, keys.layers     # 30 examples, the last of 3 layers
        (torch.Size([30, 1, 48]), [2])
        >>> mu.collect_keys(model, forget, pool="mean", quiet=True).meta["pool"]
        'mean'
    """
    check_model(model)
    check_batching(batch_size, max_batch_tokens, padding_side)
    if not isinstance(pool, str) or pool not in POOLS:
        raise ValueError(f"Unknown pool {pool!r}. Choose among {list(POOLS)}.")
    skill = as_skill(skill)
    layers = resolve_layers(model, layers)
    keys = _KeysCollector(
        len(skill), layers, d_mlp(model), model_device(model), model_meta(model), pool
    )
    _gather(
        model, skill, [keys], layers, prompts_only=True, batch_size=batch_size,
        max_length=max_length, padding_side=padding_side, max_batch_tokens=max_batch_tokens,
        desc="collect keys", quiet=quiet,
    )  # fmt: skip
    return keys.finish(skill.name)


def collect_importance(
    model,
    skill: Skill | Sequence[str],
    layers: int | Sequence[int] | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    fwd_hooks: Sequence = (),
    quiet: bool = True,
    max_batch_tokens: int | None = 8192,
) -> Importance:
    """Stream ``mean |x|`` of every neuron at ``hook_post`` over all tokens of a skill.

    ``mean |x|`` cannot be recovered from :class:`~mechunlearn.stats.NeuronStats` (which hold
    the mean and M2 of ``x``), hence its own collector; ``collect(..., what=(..., "importance"))``
    gathers it in the same pass as the rest.

    Args:
        model: a TransformerBridge or HookedTransformer.
        skill: a :class:`~mechunlearn.data.Skill` or a list of texts.
        layers: layer indices (negative from the end); None for all.
        batch_size: examples per forward pass.
        max_length: truncate texts to this many tokens.
        fwd_hooks: hooks to run as well, before the importance hooks at the same site (e.g. a
            pruning's hooks, to measure the pruned model).
        quiet: hide the progress bar.
        max_batch_tokens: bound on padded tokens per batch.

    Returns:
        Importance on the model's device.

    Example:
        >>> imp = collect_importance(model, forget)
        >>> imp.values.shape  # (n_layers, d_mlp)
        torch.Size([3, 48])
        >>> imp
        Importance(skill='add', layers=3, d_mlp=48, tokens=150)
    """
    check_model(model)
    check_batching(batch_size, max_batch_tokens, "right")
    skill = as_skill(skill)
    layers = resolve_layers(model, layers)
    imp = _ImportanceCollector(layers, d_mlp(model), model_device(model), model_meta(model))
    _gather(
        model, skill, [imp], layers, fwd_hooks, batch_size=batch_size, max_length=max_length,
        max_batch_tokens=max_batch_tokens, desc="collect importance", quiet=quiet,
    )  # fmt: skip
    return imp.finish(skill.name)


# ---------------------------------------------------------------------------------- helpers
def _merge_ranks(stats: NeuronStats) -> NeuronStats:
    """One process's statistics: this rank's shard merged with every other rank's."""
    if distributed.world()[1] == 1:
        return stats
    names = ("count", "mean", "m2", "min", "max", "n_nonfinite", "samples", "sample_keys")
    gathered = {name: distributed.all_gather(getattr(stats, name)) for name in names}
    counts = distributed.all_gather_ints([stats.n_tokens, stats.n_examples])
    shards = [
        NeuronStats(
            site=stats.site,
            positions=stats.positions,
            layers=list(stats.layers),
            n_tokens=n_tok,
            n_examples=n_ex,
            meta=dict(stats.meta),
            **{name: gathered[name][r] for name in names},
        )
        for r, (n_tok, n_ex) in enumerate(counts)
    ]
    return NeuronStats.merge_all([s for s in shards if s.n_examples] or shards[:1])


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
