"""Memory on paper: what collection, scoring and each method's fit and fitted state need.

:func:`predict_memory` takes a model, a TransformerLens config or a ``transformers`` config
(no weights needed: ``transformers.LlamaConfig(hidden_size=4096, ...)`` describes Llama-3-8B)
and returns a :class:`MemoryPrediction`, one row per item:

* ``model``: the weights (``n_params`` times the dtype's size).
* ``collect``: per collected skill, the moments of :class:`~mechunlearn.stats.NeuronStats`
  (count, mean, M2, min, max, non-finite count: 48 bytes per neuron), its reservoir (float32
  samples, float64 keys), the key vectors (:class:`~mechunlearn.stats.KeyVectors`, float32), the
  importances (float64), and the working memory of one batch (the forward pass's activations
  and the float64 copies of one layer's values).
* ``scoring``: the working memory of one teacher-forced batch (the scored rows' logits in the
  model's dtype, plus the float64 chunks of :data:`mechunlearn.scoring.SCORE_CHUNK_VALUES`).
* ``state``: each method's fitted state, as the tensors it saves (``est.save``; the small
  caches built from them for the hooks are left out).
* ``fit``: each method's fit, the memory it adds at its peak to the model and its inputs.

Every item lives on the model's device (the statistics, the fitted tensors and the fits'
buffers are made where the model is); ``NeuronStats.to("cpu")`` moves statistics off it.

Rows marked ``exact`` are the sizes of the tensors the code makes, byte for byte (the unit
tests compare them with the objects' ``nbytes`` on the tiny models); the others are estimates:
the fits' peaks count the buffers each fit holds at once (LUNAR's float64 Gram matrices, the
optimizer states, gradients and copies of the trained weights) plus activations by a rough
per-token rule, and ``benchmarks/bench_memory.py`` measures them against peak RSS on the two
offline models (``docs/scale.md``).

Example:
    >>> from transformers import LlamaConfig
    >>> llama8b = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    ...                       vocab_size=128256, num_attention_heads=32, num_key_value_heads=8,
    ...                       tie_word_embeddings=False)
    >>> pred = mu.predict_memory(llama8b, dtype="bfloat16", methods=["NA", "LUNAR"])
    >>> round(pred.bytes("model", "weights") / 2**30, 1)      # GiB: 8.03 B parameters
    15.0
    >>> pred.bytes("collect", "reservoir")                  # 32 layers x 1024 x 14336 float32
    1879056384
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .data import split_sizes
from .interventions.registry import get_method
from .models import _parse_dtype
from .scoring import SCORE_CHUNK_VALUES
from .validation import resolve_layers

__all__ = ["MemoryPrediction", "MemoryRow", "ModelShape", "model_shape", "predict_memory"]

#: The methods :func:`predict_memory` knows (the registered ones of this package).
KNOWN_METHODS = ("NA", "KSD", "Ellipsoid", "SP", "LUNAR", "SIMU", "GA", "GradDiff", "NPO", "RMU")

F64, F32, I64 = 8, 4, 8


# ------------------------------------------------------------------------------ the shape
@dataclass(frozen=True)
class ModelShape:
    """What the memory of a model's runs depends on.

    Attributes:
        name: the model's name (or the config's type).
        n_layers, d_model, d_mlp, d_vocab: the transformer's sizes.
        n_heads, n_kv_heads, d_head: attention heads (grouped-query: ``n_kv_heads`` < ``n_heads``).
        n_params: parameters (tied embeddings counted once).
        attn_params: per layer, the attention parameters but normalisation weights (what SIMU
            trains).
        block_params: per layer, every parameter of the block.
        dtype: the weights' dtype.
    """

    name: str
    n_layers: int
    d_model: int
    d_mlp: int
    d_vocab: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    n_params: int
    attn_params: int
    block_params: int
    dtype: torch.dtype = torch.float32

    @property
    def itemsize(self) -> int:
        """Bytes per weight."""
        return torch.empty((), dtype=self.dtype).element_size()


def model_shape(obj: Any, dtype: torch.dtype | str | None = None) -> ModelShape:
    """The :class:`ModelShape` of a model, a TransformerLens config or a ``transformers`` config.

    A model gives its parameter counts exactly (from its parameters); a config gives them by
    the rule of Llama-style blocks (grouped-query attention, a gated MLP, RMS norms; Gemma's
    extra norms), which is exact for Llama, Mistral, Qwen and Gemma 2/3 and approximate for
    architectures with biases everywhere (GPT-2: pass the model instead).

    Args:
        obj: a TransformerBridge / HookedTransformer, its ``cfg``, or a ``transformers``
            ``PretrainedConfig`` (multimodal ones give their text config).
        dtype: the weights' dtype (default: the model's, else the config's, else float32, the
            default of :func:`mechunlearn.load_model`).

    Raises:
        TypeError: ``obj`` is none of those.
    """
    want = _parse_dtype(dtype)
    if hasattr(obj, "cfg") and hasattr(obj, "parameters"):
        return _shape_of_model(obj, want)
    if hasattr(obj, "d_model") and hasattr(obj, "d_mlp"):
        return _shape_of_tl_config(obj, want)
    if hasattr(obj, "hidden_size") or hasattr(obj, "get_text_config"):
        return _shape_of_hf_config(obj, want)
    raise TypeError(
        f"predict_memory needs a model, a TransformerLens config or a transformers config, got "
        f"{type(obj).__name__}: e.g. transformers.AutoConfig.from_pretrained(name)."
    )


def _shape_of_model(model, dtype: torch.dtype | None) -> ModelShape:
    base = _shape_of_tl_config(model.cfg, dtype)
    params = list({id(p): p for p in model.parameters()}.values())
    first = params[0].dtype if params else torch.float32
    attn = [p for n, p in model.blocks[0].attn.named_parameters() if "norm" not in n.lower()]
    return ModelShape(
        name=base.name,
        n_layers=base.n_layers,
        d_model=base.d_model,
        d_mlp=base.d_mlp,
        d_vocab=base.d_vocab,
        n_heads=base.n_heads,
        n_kv_heads=base.n_kv_heads,
        d_head=base.d_head,
        n_params=sum(p.numel() for p in params),
        attn_params=sum(p.numel() for p in attn),
        block_params=sum(p.numel() for p in model.blocks[0].parameters()),
        dtype=dtype or first,
    )


def _shape_of_tl_config(cfg, dtype: torch.dtype | None) -> ModelShape:
    d, m, n_layers = int(cfg.d_model), int(cfg.d_mlp), int(cfg.n_layers)
    heads = int(cfg.n_heads)
    kv = int(getattr(cfg, "n_key_value_heads", None) or heads)
    d_head = int(getattr(cfg, "d_head", None) or d // heads)
    gated = bool(getattr(cfg, "gated_mlp", False))
    return _shape(
        name=str(getattr(cfg, "model_name", "model")),
        n_layers=n_layers, d_model=d, d_mlp=m, d_vocab=int(cfg.d_vocab), n_heads=heads,
        n_kv_heads=kv, d_head=d_head, gated=gated, tied=False, bias=False, extra_norms=0,
        dtype=dtype or getattr(cfg, "dtype", None) or torch.float32,
    )  # fmt: skip


def _shape_of_hf_config(config, dtype: torch.dtype | None) -> ModelShape:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    d, heads = int(cfg.hidden_size), int(cfg.num_attention_heads)
    kind = str(getattr(cfg, "model_type", "") or "")
    own = getattr(cfg, "dtype", None)
    extra_norms = 2 * d if kind.startswith(("gemma2", "gemma3")) else 0  # pre/post-MLP norms
    head_dim = int(getattr(cfg, "head_dim", None) or d // heads)
    if kind.startswith("gemma3") or kind.startswith("qwen3"):
        extra_norms += 2 * head_dim  # q_norm, k_norm
    return _shape(
        name=str(getattr(cfg, "_name_or_path", "") or kind or "model"),
        n_layers=int(cfg.num_hidden_layers), d_model=d,
        d_mlp=int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None)
                  or 4 * d),
        d_vocab=int(cfg.vocab_size), n_heads=heads,
        n_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads), d_head=head_dim,
        gated=kind not in ("gpt2", "gpt_neox", "opt"),
        tied=bool(getattr(cfg, "tie_word_embeddings", True)),
        bias=bool(getattr(cfg, "attention_bias", False)), extra_norms=extra_norms,
        dtype=dtype or _config_dtype(own),
    )  # fmt: skip


def _config_dtype(value: Any) -> torch.dtype:
    """A config's ``dtype`` (a torch dtype or its name), float32 where it names none we know."""
    try:
        return _parse_dtype(value) or torch.float32
    except ValueError:  # "auto" and the like
        return torch.float32


def _shape(
    name, n_layers, d_model, d_mlp, d_vocab, n_heads, n_kv_heads, d_head, gated, tied, bias,
    extra_norms, dtype,
) -> ModelShape:  # fmt: skip
    q, kv = n_heads * d_head, n_kv_heads * d_head
    attn = d_model * q + 2 * d_model * kv + q * d_model
    if bias:
        attn += q + 2 * kv + d_model
    mlp = (3 if gated else 2) * d_model * d_mlp
    block = attn + mlp + 2 * d_model + extra_norms
    embed = d_vocab * d_model * (1 if tied else 2)
    return ModelShape(
        name=name, n_layers=n_layers, d_model=d_model, d_mlp=d_mlp, d_vocab=d_vocab,
        n_heads=n_heads, n_kv_heads=n_kv_heads, d_head=d_head,
        n_params=embed + n_layers * block + d_model, attn_params=attn, block_params=block,
        dtype=dtype,
    )  # fmt: skip


# ---------------------------------------------------------------------------- the result
@dataclass(frozen=True)
class MemoryRow:
    """One predicted item.

    Attributes:
        stage: ``"model"``, ``"collect"``, ``"scoring"``, ``"state"`` or ``"fit"``.
        item: what it is (``"moments"``, ``"reservoir"``, a method's name, ...).
        bytes: its size.
        device: where it lives (``"model"``: the model's device).
        exact: whether ``bytes`` is the size of the tensors made (else an estimate).
        note: how it was counted.
    """

    stage: str
    item: str
    bytes: int
    device: str
    exact: bool
    note: str = ""


@dataclass
class MemoryPrediction:
    """The rows of :func:`predict_memory`, with the shape and settings they were computed for.

    Attributes:
        shape: the model's :class:`ModelShape`.
        rows: the items.
        settings: the arguments of the prediction.
    """

    shape: ModelShape
    rows: list[MemoryRow]
    settings: dict[str, Any] = field(default_factory=dict)

    def bytes(self, stage: str, item: str) -> int:
        """The bytes of one row.

        Raises:
            KeyError: no such row (the message lists them).
        """
        for row in self.rows:
            if row.stage == stage and row.item == item:
                return row.bytes
        have = [(r.stage, r.item) for r in self.rows]
        raise KeyError(f"No row ({stage!r}, {item!r}); the rows are {have}.")

    def peak(self, method: str) -> int:
        """What the device must hold to fit ``method``: the weights, the fit's peak and, for a
        method fitted on collected inputs (NA, SP, the detectors), those of both skills.

        Raises:
            KeyError: ``method`` was not predicted.
        """
        inputs = {
            "pre": ("moments", "reservoir"), "keys": ("keys",), "importance": ("importance",),
        }.get(get_method(method).fits_on, ())  # fmt: skip
        need = self.bytes("model", "weights") + self.bytes("fit", method)
        need += 2 * sum(self.bytes("collect", item) for item in inputs)  # forget and retain
        return need

    def to_frame(self):
        """The rows as a pandas DataFrame (``bytes`` and ``GiB`` columns)."""
        import pandas as pd

        frame = pd.DataFrame([vars(r) for r in self.rows])
        frame.insert(3, "GiB", frame["bytes"] / 2**30)
        return frame

    def to_markdown(self) -> str:
        """A Markdown table of the rows (GiB to 3 significant digits)."""
        lines = ["| stage | item | GiB | exact | note |", "|---|---|---:|:---:|---|"]
        for r in self.rows:
            lines.append(
                f"| {r.stage} | {r.item} | {_gib(r.bytes)} | {'yes' if r.exact else ''} | "
                f"{r.note} |"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        s = self.shape
        head = (
            f"MemoryPrediction({s.name}: {s.n_layers} layers, d_model {s.d_model}, d_mlp "
            f"{s.d_mlp}, vocab {s.d_vocab}, {s.n_params / 1e9:.3g} B params, {s.dtype})"
        )
        width = max(len(f"{r.stage} {r.item}") for r in self.rows)
        body = [
            f"  {f'{r.stage} {r.item}':<{width}}  {_gib(r.bytes):>9} GiB  "
            f"{'exact' if r.exact else 'est.':<5}  {r.note}"
            for r in self.rows
        ]
        return "\n".join([head, *body])


def _gib(n: int) -> str:
    value = n / 2**30
    return f"{value:.3g}" if value >= 0.001 else f"{value:.2e}"


# ---------------------------------------------------------------------------- prediction
def predict_memory(
    model_or_config: Any,
    *,
    methods: Sequence[str] | Mapping[str, Mapping[str, Any]] | None = None,
    reservoir_size: int = 1024,
    layers: int | Sequence[int] | None = None,
    n_examples: int = 200,
    batch_size: int = 16,
    max_batch_tokens: int | None = 8192,
    seq_len: int = 128,
    dtype: torch.dtype | str | None = None,
    simu_critical: float = 0.01,
) -> MemoryPrediction:
    """Predict the memory of collection, scoring and each method's fit and fitted state.

    Args:
        model_or_config: a model, a TransformerLens config or a ``transformers`` config
            (:func:`model_shape`).
        methods: method names, or ``{name: settings}`` as a run's ``methods`` mapping (e.g.
            ``{"LUNAR": {"layer": 22}, "GA": {"layers": [28, 29, 30, 31]}}``); the registry's
            defaults fill the rest. None for every method of :data:`KNOWN_METHODS`.
        reservoir_size: :func:`~mechunlearn.collect`'s ``reservoir_size``.
        layers: the collected layers, as ``collect``'s ``layers`` (an index, a list of them, None
            for all): statistics, keys, importances, NA, SP and the detectors scale with them.
        n_examples: examples per skill (key vectors, the detectors' fit, RMU's cache).
        batch_size: examples per forward pass (collection, scoring, training).
        max_batch_tokens: the bound on padded tokens per batch (collection and scoring).
        seq_len: padded tokens per example (prompt and answer).
        dtype: the weights' dtype (default: the model's or config's, else float32).
        simu_critical: the fraction of the chosen layers' neurons that SIMU finds critical
            (their ``W_out`` rows are kept as deltas; data-dependent, 1 % by default; SIMU's
            state row is exact for that count).

    Returns:
        The :class:`MemoryPrediction`.

    Raises:
        TypeError: ``model_or_config`` is not a model or config; a layer is not an int.
        ValueError: an unknown method or setting, or a value out of range.
    """
    shape = model_shape(model_or_config, dtype)
    device = _device_of(model_or_config)
    n_layers = len(resolve_layers(shape.n_layers, layers))
    for name, value in (("n_examples", n_examples), ("batch_size", batch_size),
                        ("seq_len", seq_len)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if (
        isinstance(reservoir_size, bool)
        or not isinstance(reservoir_size, int)
        or reservoir_size < 0
    ):
        raise ValueError(f"reservoir_size must be an int >= 0, got {reservoir_size!r}.")
    if (
        isinstance(simu_critical, bool)
        or not isinstance(simu_critical, (int, float))
        or not 0.0 <= float(simu_critical) <= 1.0
    ):
        raise ValueError(f"simu_critical must be a fraction in [0, 1], got {simu_critical!r}.")
    wanted = _methods(methods)
    tokens = batch_size * seq_len
    if max_batch_tokens is not None:
        tokens = min(tokens, max(int(max_batch_tokens), seq_len))
    ctx = _Ctx(shape, device, n_layers, n_examples, batch_size, seq_len, tokens, simu_critical)
    rows = [MemoryRow("model", "weights", shape.n_params * shape.itemsize, device, True,
                      f"{shape.n_params:,} parameters in {shape.dtype}")]  # fmt: skip
    rows += _collect_rows(ctx, reservoir_size)
    rows.append(_scoring_row(ctx))
    for name, settings in wanted.items():
        try:
            state, state_note, exact, fit, fit_note = _METHODS[name](ctx, name, settings)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{name}: {err}") from None
        rows.append(MemoryRow("state", name, state, device, exact, state_note))
        rows.append(MemoryRow("fit", name, fit, device, False, fit_note))
    args = dict(
        methods=list(wanted), reservoir_size=reservoir_size, layers=n_layers,
        n_examples=n_examples, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
        seq_len=seq_len, dtype=str(shape.dtype), simu_critical=simu_critical,
    )  # fmt: skip
    return MemoryPrediction(shape, rows, args)


@dataclass(frozen=True)
class _Ctx:
    s: ModelShape
    device: str
    layers: int  # collected layers
    n: int  # examples per skill
    batch: int
    seq: int
    tokens: int  # tokens per collection / scoring batch
    critical: float


def _device_of(obj: Any) -> str:
    if hasattr(obj, "parameters"):
        for p in obj.parameters():
            return str(p.device)
    return "model"


def _methods(methods: Any) -> dict[str, dict[str, Any]]:
    if methods is None:
        names: dict[str, Any] = {name: {} for name in KNOWN_METHODS}
    elif isinstance(methods, str):
        names = {methods: {}}
    elif isinstance(methods, Mapping):
        for k, v in methods.items():
            if v is not None and not isinstance(v, Mapping):
                raise ValueError(f"methods[{k!r}] must be a mapping of settings, got {v!r}.")
        names = {str(k): dict(v or {}) for k, v in methods.items()}
    else:
        names = {str(k): {} for k in methods}
    out = {}
    for name, settings in names.items():
        defaults = get_method(name).settings()  # an unregistered name: the registry's error
        if name not in _METHODS:
            warnings.warn(
                f"predict_memory has no memory rule for {name!r} (registered outside the "
                f"package): its fitted state and fit are not predicted. It knows "
                f"{list(KNOWN_METHODS)}.",
                stacklevel=3,
            )
            continue
        unknown = sorted(set(settings) - set(defaults))
        if unknown:
            raise ValueError(f"{name} has no setting {unknown}: choose among {list(defaults)}.")
        out[name] = {**defaults, **settings}
    return out


# ------------------------------------------------------------------------- collect, score
def _inference_batch(ctx: _Ctx, tokens: int) -> int:
    """Working memory of one forward pass without gradients, by a rule measured on the two
    offline models (``docs/scale.md``): about ``8 d_mlp + 4 d_model`` values per token in the
    weights' dtype, plus one layer's attention scores and probabilities (eager attention, at
    least float32)."""
    s = ctx.s
    seq = min(ctx.seq, tokens)
    scores = (tokens // seq) * s.n_heads * seq * seq * 2 * max(s.itemsize, F32)
    return tokens * (8 * s.d_mlp + 4 * s.d_model) * s.itemsize + scores


def _collect_rows(ctx: _Ctx, reservoir: int) -> list[MemoryRow]:
    s, L, d, dev = ctx.s, ctx.layers, ctx.s.d_mlp, ctx.device
    # One layer's NeuronStats.update (mask, finite values, float64 deviations, min/max) and the
    # importance's float64 |x| (what=("pre", "keys", "importance"): a run's one pass).
    update = ctx.tokens * d * (1 + 8 + 3 * s.itemsize + F32 + 2 * F64)
    return [
        MemoryRow("collect", "moments", L * d * 48, dev, True,
                  f"{L} layers x {d}: count, mean, m2, min, max, n_nonfinite (8 bytes each)"),
        MemoryRow("collect", "reservoir", L * reservoir * d * F32 + reservoir * F64, dev, True,
                  f"{L} x {reservoir} x {d} float32 samples + float64 keys"),
        MemoryRow("collect", "keys", ctx.n * L * d * F32, dev, True,
                  f"{ctx.n} examples x {L} x {d} float32"),
        MemoryRow("collect", "importance", L * d * F64, dev, True, f"{L} x {d} float64"),
        MemoryRow("collect", "batch", _inference_batch(ctx, ctx.tokens) + update, dev, False,
                  f"{ctx.tokens} tokens: activations + one layer's float64 copies"),
    ]  # fmt: skip


def _scoring_row(ctx: _Ctx) -> MemoryRow:
    s = ctx.s
    rows = min(ctx.tokens, max(1, ctx.tokens // 2))  # answer tokens scored, at most half a batch
    logits = rows * s.d_vocab * s.itemsize
    chunk = 2 * min(SCORE_CHUNK_VALUES, rows * s.d_vocab) * F64
    return MemoryRow("scoring", "batch", _inference_batch(ctx, ctx.tokens) + logits + chunk,
                     ctx.device, False,
                     f"{ctx.tokens} tokens, {rows} scored: logits + float64 chunks")  # fmt: skip


# ------------------------------------------------------------------------------ methods
def _training_activations(ctx: _Ctx, batch: int, depth: int, graphs: int, vocab: bool) -> int:
    """Activations autograd keeps for a step: ``graphs`` batches (1 for the first-order methods,
    whose training loop differentiates the forget part of the loss and frees its graph before
    the retain part's forward pass; 2 for SIMU's Hessian steps, whose first gradients keep
    both parts' graphs) of ``batch`` examples of ``seq_len`` tokens, through the
    ``depth`` layers above the first trained one (about ``4 d_model + 2 n_heads d_head +
    4 d_mlp`` values per token and layer, and the attention probabilities); where the loss reads
    the logits, each graph's float32 rows of the answer tokens (half the tokens) and their
    log-softmax, and one batch's logits (or their gradient) at a time."""
    s = ctx.s
    tokens = batch * ctx.seq
    width = 4 * s.d_model + 2 * s.n_heads * s.d_head + 4 * s.d_mlp
    attention = batch * s.n_heads * ctx.seq**2 * 2 * max(s.itemsize, F32)
    out = graphs * depth * (tokens * width * s.itemsize + attention)
    if vocab:
        out += graphs * tokens * s.d_vocab * F32 + tokens * s.d_vocab * s.itemsize
    return out


def _na(ctx: _Ctx, name: str, settings: dict) -> tuple:
    cells = ctx.layers * ctx.s.d_mlp
    state = cells * (6 * F64 + 1)  # scores, 4 Gaussians, retain_index (int64); selected (bool)
    return (state, f"{ctx.layers} x {ctx.s.d_mlp}: 6 float64/int64 tensors + a bool mask", True,
            state + 3 * cells * F64, "state + float64 temporaries of the scores")  # fmt: skip


def _sp(ctx: _Ctx, name: str, settings: dict) -> tuple:
    cells = ctx.layers * ctx.s.d_mlp
    state = cells * (F64 + 1)
    return (state, "float64 scores + bool mask", True, state + cells * F64,
            "state + the score's temporaries")  # fmt: skip


def _detector_layers(ctx: _Ctx, settings) -> int:
    layers = settings.get("layers")
    return ctx.layers if layers is None else len(resolve_layers(ctx.s.n_layers, layers))


def _ksd(ctx: _Ctx, name: str, settings: dict) -> tuple:
    L, d = _detector_layers(ctx, settings), ctx.s.d_mlp
    state = L * d * 2 * F64 + L * 4 * 8  # mu, sigma; floor, n_floored, alpha, k_min
    x = ctx.n * L * d * F64  # keys in float64
    return (state, f"{L} layers: mu, sigma (float64) + 4 per-layer scalars", True,
            state + 2 * x, "keys in float64, their splits and distances")  # fmt: skip


def _ellipsoid(ctx: _Ctx, name: str, settings: dict) -> tuple:
    L, d = _detector_layers(ctx, settings), ctx.s.d_mlp
    n_fit = split_sizes(ctx.n, settings.get("test_size", 0.5))[0]
    if settings.get("h") is not None or settings.get("alpha") is not None:
        n_fit = ctx.n
    r = n_fit if n_fit <= d else d
    state = (L * d + L * d * r + L * r + 2 * L) * F64 + 2 * L * F64
    x = ctx.n * L * d * F64
    # more fit vectors than neurons: the [d, d] covariance and its eigenvectors
    covariance = 2 * L * d * d * F64 if n_fit > d else 0
    return (state, f"{L} layers: mu, u [{d} x {r}], coef, iso, shrinkage (float64)", True,
            state + 4 * x + covariance, "keys in float64, centred copy, eigenvectors")  # fmt: skip


def _lunar_layers(ctx: _Ctx, settings) -> tuple[int, int]:
    """(layers fitted at the end, candidates swept at once)."""
    layer, total = settings["layer"], ctx.s.n_layers
    if layer == "auto":
        cands = settings.get("candidates")
        count = len(range(2, total, 3)) if cands is None else len(resolve_layers(total, cands))
        return 1, max(count, 1)
    return len(resolve_layers(total, layer)), 0


def _lunar(ctx: _Ctx, name: str, settings: dict) -> tuple:
    s = ctx.s
    fitted, swept = _lunar_layers(ctx, settings)
    gram = s.d_mlp * s.d_mlp * F64
    state = fitted * (s.d_model * F64 + s.d_mlp * s.d_model * F32)
    delta64 = s.d_mlp * s.d_model * F64
    # Fixed layer(s): two Grams per layer, then G, its copy, its Cholesky factor and the
    # solver's copy of the factor (torch.cholesky_solve copies it), at once.
    fixed = (2 * fitted + 4) * gram + 2 * delta64
    note = f"{2 * fitted + 4} float64 [{s.d_mlp} x {s.d_mlp}] (Grams, G, copy, Cholesky x2)"
    if swept:
        fit = (2 * swept + 4) * gram + swept * delta64
        note = f"layer='auto': {2 * swept + 4} float64 [{s.d_mlp}]^2 ({swept} candidates' Grams)"
    else:
        fit = fixed
    fit += _inference_batch(ctx, ctx.batch * max(1, ctx.seq // 2))  # prompts only
    return (state, f"{fitted} layer(s): direction (float64) + dW [{s.d_mlp} x {s.d_model}] "
            "(float32)", True, fit, note)  # fmt: skip


def _trained(trained: int, itemsize: int, moments: int) -> int:
    """A shared-loop fit's buffers: the copies of the trained weights (restored on exit), their
    gradients (the last ones stay referenced until the loop ends), ``moments`` optimizer states
    and the deltas, all in the weights' dtype."""
    return trained * itemsize * (3 + moments)


def _layer_list(value: Any, total: int) -> list[int] | None:
    """A method's ``layers`` setting as layer indices (None: all)."""
    return None if value is None else resolve_layers(total, value)


def _baseline(ctx: _Ctx, name: str, settings: dict) -> tuple:
    s = ctx.s
    chosen = _layer_list(settings.get("layers"), s.n_layers)
    trained = s.n_params if chosen is None else len(chosen) * s.block_params
    what = "every parameter" if chosen is None else f"{len(chosen)} blocks"
    depth = s.n_layers - (0 if chosen is None else min(chosen))
    fit = _trained(trained, s.itemsize, 2)
    fit += _training_activations(ctx, settings["batch_size"], depth, 1, True)
    return (
        trained * s.itemsize,
        f"deltas of {what} ({trained:,} weights, {s.dtype})",
        True,
        fit,
        "copies + grads + AdamW (2) + deltas of the trained weights; activations",
    )


def _rmu(ctx: _Ctx, name: str, settings: dict) -> tuple:
    s = ctx.s
    steered = resolve_layers(s.n_layers, settings["layer"])[0]
    chosen = _layer_list(settings.get("trained_layers"), s.n_layers)
    chosen = list(range(max(0, steered - 2), steered + 1)) if chosen is None else chosen
    trained = len(chosen) * s.d_mlp * s.d_model
    state = trained * s.itemsize + s.d_model * F32
    cache = ctx.n * ctx.seq * s.d_model * s.itemsize  # h_ref of every retain token
    fit = _trained(trained, s.itemsize, 2) + cache
    depth = steered + 1 - min(chosen)
    fit += _training_activations(ctx, settings["batch_size"], depth, 1, False)
    return (
        state,
        f"W_out deltas of {len(chosen)} layers + direction",
        True,
        fit,
        f"as GA on {len(chosen)} W_out + the retain activations at layer {steered}",
    )


def _simu(ctx: _Ctx, name: str, settings: dict) -> tuple:
    s = ctx.s
    chosen = _layer_list(settings.get("layers"), s.n_layers) or list(range(s.n_layers))
    count = len(chosen)
    cells = count * s.d_mlp
    critical = round(float(ctx.critical) * cells)
    attn = count * s.attn_params
    state = cells * (2 * F32 + 1) + (attn + critical * s.d_model) * s.itemsize
    if settings.get("dual"):
        state -= cells * F32
    w_out = count * s.d_mlp * s.d_model  # trained whole, masked to the critical rows
    fit = _trained(attn + w_out, s.itemsize, 3)  # SophiaH: momentum, hessian, its moment
    fit += w_out * (s.itemsize + 1)  # MaskedSophiaH's copies and masks
    # the double backward of a Hessian step keeps the first backward's graph as well
    depth = s.n_layers - min(chosen)
    fit += 2 * _training_activations(ctx, settings["batch_size"], depth, 2, True)
    return (
        state,
        f"attribution x2 (float32), critical mask, deltas of {count} layers' "
        f"attention + {critical} W_out rows",
        True,
        fit,
        "SophiaH (3 states) on attention + W_out, copies, grads; double backward",
    )


_METHODS = {
    "NA": _na, "KSD": _ksd, "Ellipsoid": _ellipsoid, "SP": _sp, "LUNAR": _lunar,
    "SIMU": _simu, "GA": _baseline, "GradDiff": _baseline, "NPO": _baseline, "RMU": _rmu,
}  # fmt: skip
