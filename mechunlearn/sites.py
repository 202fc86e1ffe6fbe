"""Hook sites, layer selection, tokenisation and the token positions that count.

Two MLP sites matter for skill unlearning (METHODS.md):

* ``"pre"`` -> ``blocks.{l}.mlp.hook_pre``: the pre-activation. Gated MLPs (Llama, Gemma,
  SmolLM2): ``W_gate @ z``. GELU MLPs (GPT-2, Pythia): ``W_in @ z + b_in``.
* ``"key"`` -> ``blocks.{l}.mlp.hook_post``: the key vector, the input of ``W_out``.

An example is tokenised as ``[BOS] + prompt tokens + answer tokens`` (prompt and answer are
tokenised separately, so the boundary between them is exact). BOS and padding are never
counted; ``positions`` chooses among the rest:

* ``"all"``: every prompt and answer token;
* ``"prompt"``: prompt tokens only;
* ``"answer"``: answer tokens only;
* ``"last"``: the last prompt token (where Key Space Detection reads the key vector).

Texts longer than the model's context are truncated from the right with a warning; an example
whose prompt alone does not fit raises, because its last prompt token would be lost.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor

SITES: dict[str, str] = {"pre": "hook_pre", "key": "hook_post"}
POSITIONS: tuple[str, ...] = ("all", "prompt", "answer", "last")


def check_site(site: str) -> str:
    """Return ``site`` if it is a known site, else raise a ValueError naming the choices."""
    if site not in SITES:
        raise ValueError(
            f"Unknown site {site!r}. Choose one of {sorted(SITES)}: 'pre' is "
            "blocks.L.mlp.hook_pre (pre-activation), 'key' is blocks.L.mlp.hook_post (key vector)."
        )
    return site


def check_positions(positions: str) -> str:
    """Return ``positions`` if known, else raise a ValueError naming the choices."""
    if positions not in POSITIONS:
        raise ValueError(f"Unknown positions {positions!r}. Choose one of {list(POSITIONS)}.")
    return positions


def hook_name(site: str, layer: int) -> str:
    """TransformerLens hook name of ``site`` at ``layer``.

    Example:
        >>> hook_name("pre", 3)
        'blocks.3.mlp.hook_pre'
    """
    return f"blocks.{layer}.mlp.{SITES[check_site(site)]}"


def n_layers(model) -> int:
    """Number of transformer blocks of a TransformerBridge or HookedTransformer."""
    return int(model.cfg.n_layers)


def d_mlp(model) -> int:
    """MLP width (number of neurons per layer)."""
    value = getattr(model.cfg, "d_mlp", None)
    if value is None:
        raise ValueError(
            "The model's cfg has no d_mlp: mechunlearn needs a model with dense MLP blocks."
        )
    return int(value)


def model_name(model) -> str:
    """The model's name as its config records it."""
    return str(getattr(model.cfg, "model_name", None) or type(model).__name__)


def model_device(model) -> torch.device:
    """Device of the model's first parameter (where tokens must go)."""
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device(getattr(model.cfg, "device", "cpu") or "cpu")


def resolve_layers(model, layers: int | Sequence[int] | None) -> list[int]:
    """Normalise a layer selection to a sorted list of distinct non-negative indices.

    ``None`` means every layer; negative indices count from the end, as in Python.

    Raises:
        ValueError: a layer is out of range, repeated, or the selection is empty.
    """
    total = n_layers(model)
    if layers is None:
        return list(range(total))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int | torch.SymInt):
            try:
                layer = int(layer)
            except (TypeError, ValueError):
                raise ValueError(f"Layers must be integers, got {layer!r}.") from None
        index = layer + total if layer < 0 else layer
        if not 0 <= index < total:
            raise ValueError(
                f"Layer {layer} is out of range: the model has {total} layers (0..{total - 1})."
            )
        out.append(int(index))
    if not out:
        raise ValueError("No layers selected: pass None for every layer, or a list of indices.")
    if len(set(out)) != len(out):
        raise ValueError(f"Layers repeat in {list(layers)}: give each layer once.")
    return sorted(out)


@dataclass
class EncodedBatch:
    """A padded batch of examples with masks for the positions that count.

    Attributes:
        tokens: token ids, padded.
        attention_mask: 1 for real tokens (BOS included), 0 for padding.
        prompt_mask: True on prompt tokens (BOS and padding excluded).
        answer_mask: True on answer tokens.
        last_prompt: index of each row's last prompt token.
        position_ids: each token's position within its own text (0 = first real token).
        example_index: index of each row in the skill it came from.
    """

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    prompt_mask: Bool[Tensor, "batch pos"]
    answer_mask: Bool[Tensor, "batch pos"]
    last_prompt: Int[Tensor, " batch"]
    position_ids: Int[Tensor, "batch pos"]
    example_index: Int[Tensor, " batch"]

    def mask(self, positions: str) -> Bool[Tensor, "batch pos"]:
        """Boolean mask of the positions that count for ``positions``."""
        check_positions(positions)
        if positions == "all":
            return self.prompt_mask | self.answer_mask
        if positions == "prompt":
            return self.prompt_mask
        if positions == "answer":
            return self.answer_mask
        mask = torch.zeros_like(self.prompt_mask)
        mask[torch.arange(mask.shape[0], device=mask.device), self.last_prompt] = True
        return mask

    def to(self, device: torch.device | str) -> EncodedBatch:
        """Move every tensor to ``device``."""
        return EncodedBatch(**{k: v.to(device) for k, v in vars(self).items()})


def _bos_id(model) -> int | None:
    tokenizer = model.tokenizer
    if not getattr(model.cfg, "default_prepend_bos", True):
        return None
    return tokenizer.bos_token_id


def _max_length(model, max_length: int | None) -> int:
    n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0)
    if max_length is None:
        return n_ctx if n_ctx > 0 else 2048
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}.")
    return min(max_length, n_ctx) if n_ctx > 0 else max_length


def tokenize_examples(
    model, prompts: Sequence[str], answers: Sequence[str], max_length: int | None = None
) -> list[tuple[list[int], int]]:
    """Tokenise each example as ``[BOS] + prompt + answer``.

    Returns:
        For each example, its token ids and the number of leading tokens that are BOS or prompt.

    Raises:
        ValueError: an empty prompt, or a prompt longer than the context.
    """
    if model.tokenizer is None:
        raise ValueError("The model has no tokenizer: mechunlearn tokenises text itself.")
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers.")
    limit = _max_length(model, max_length)
    bos = _bos_id(model)
    tok = model.tokenizer
    prompt_ids = tok(list(prompts), add_special_tokens=False)["input_ids"]
    answer_ids = tok(list(answers), add_special_tokens=False)["input_ids"]
    out, truncated = [], 0
    for i, (p, a) in enumerate(zip(prompt_ids, answer_ids, strict=True)):
        if not p:
            raise ValueError(f"Example {i} has an empty prompt: every example needs prompt text.")
        head = ([bos] if bos is not None else []) + list(p)
        if len(head) > limit:
            raise ValueError(
                f"Example {i}'s prompt is {len(head)} tokens, longer than the model's context "
                f"({limit}): shorten it or pass a larger max_length."
            )
        ids = head + list(a)
        if len(ids) > limit:
            truncated += 1
            ids = ids[:limit]
        out.append((ids, len(head)))
    if truncated:
        warnings.warn(
            f"{truncated} of {len(out)} examples were longer than {limit} tokens and were "
            "truncated from the right (their prompts are intact).",
            stacklevel=3,
        )
    return out


def pad_batch(
    model,
    items: Sequence[tuple[list[int], int]],
    example_index: Sequence[int],
    padding_side: str = "right",
) -> EncodedBatch:
    """Pad tokenised examples into an :class:`EncodedBatch` on the CPU."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    tok = model.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    has_bos = _bos_id(model) is not None
    width = max(len(ids) for ids, _ in items)
    b = len(items)
    tokens = torch.full((b, width), pad_id, dtype=torch.long)
    attention = torch.zeros((b, width), dtype=torch.long)
    prompt_mask = torch.zeros((b, width), dtype=torch.bool)
    answer_mask = torch.zeros((b, width), dtype=torch.bool)
    position_ids = torch.zeros((b, width), dtype=torch.long)
    last_prompt = torch.zeros(b, dtype=torch.long)
    for row, (ids, n_head) in enumerate(items):
        start = 0 if padding_side == "right" else width - len(ids)
        stop = start + len(ids)
        tokens[row, start:stop] = torch.tensor(ids, dtype=torch.long)
        attention[row, start:stop] = 1
        position_ids[row, start:stop] = torch.arange(len(ids))
        prompt_mask[row, start + int(has_bos) : start + n_head] = True
        answer_mask[row, start + n_head : stop] = True
        last_prompt[row] = start + n_head - 1
    return EncodedBatch(
        tokens=tokens,
        attention_mask=attention,
        prompt_mask=prompt_mask,
        answer_mask=answer_mask,
        last_prompt=last_prompt,
        position_ids=position_ids,
        example_index=torch.as_tensor(list(example_index), dtype=torch.long),
    )


def iter_batches(
    model,
    prompts: Sequence[str],
    answers: Sequence[str] | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    padding_side: str = "right",
    sort_by_length: bool = True,
    max_batch_tokens: int | None = 8192,
) -> Iterator[EncodedBatch]:
    """Yield padded batches of ``[BOS] + prompt + answer`` on the model's device.

    Examples are grouped by length (``sort_by_length``) so that little compute goes to padding;
    each batch records which examples it holds in ``example_index``. A batch holds at most
    ``batch_size`` examples and, beyond its first, at most ``max_batch_tokens`` padded tokens,
    so that one long text (MBPP has a 4,000-token one) does not make a batch whose attention
    scores fill the memory.

    Example:
        >>> for batch in iter_batches(model, ["2 + 2 ="], [" 4"]):
        ...     logits = model(batch.tokens, attention_mask=batch.attention_mask)
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be at least 1, got {max_batch_tokens}.")
    if answers is None:
        answers = [""] * len(prompts)
    items = tokenize_examples(model, prompts, answers, max_length)
    order = list(range(len(items)))
    if sort_by_length:
        order.sort(key=lambda i: -len(items[i][0]))
    device = model_device(model)
    chunk: list[int] = []
    width = 0
    for i in order:
        new_width = max(width, len(items[i][0]))
        too_many = len(chunk) >= batch_size
        too_big = max_batch_tokens is not None and (len(chunk) + 1) * new_width > max_batch_tokens
        if chunk and (too_many or too_big):
            yield pad_batch(model, [items[j] for j in chunk], chunk, padding_side).to(device)
            chunk, new_width = [], len(items[i][0])
        chunk.append(i)
        width = new_width
    if chunk:
        yield pad_batch(model, [items[j] for j in chunk], chunk, padding_side).to(device)


def count_tokens(batches: Sequence[EncodedBatch], positions: str = "all") -> int:
    """Number of counted tokens over ``batches`` (a convenience for reports)."""
    return int(sum(int(b.mask(positions).sum()) for b in batches))


def forward(model, batch: EncodedBatch, fwd_hooks=(), **kwargs) -> Tensor:
    """Run ``model`` on ``batch`` with ``fwd_hooks`` attached, passing the attention mask.

    Hooks are removed afterwards even if the forward raises (``run_with_hooks`` resets them).
    """
    kwargs.setdefault("attention_mask", batch.attention_mask)
    return model.run_with_hooks(batch.tokens, fwd_hooks=list(fwd_hooks), **kwargs)


class _StopForward(Exception):
    """Raised by :func:`forward_until`'s last hook to end a forward pass early."""


def _stop_forward(activation: Tensor, hook=None) -> Tensor:
    raise _StopForward


def forward_until(model, batch: EncodedBatch, fwd_hooks, stop_after: str) -> None:
    """Run ``model`` on ``batch`` with ``fwd_hooks`` and stop right after hook point
    ``stop_after`` (its own hooks included): nothing later is computed, not even the unembedding
    (TransformerBridge's ``stop_at_layer`` still computes it). For hooks that only record.

    Example:
        >>> forward_until(model, batch, [(hook_name("pre", 3), record)], hook_name("pre", 3))
    """
    try:
        forward(model, batch, [*fwd_hooks, (stop_after, _stop_forward)])
    except _StopForward:
        pass
