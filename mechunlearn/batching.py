"""Tokenisation and batching: ``[BOS] + prompt + answer`` examples, padded batches with the masks
of the positions that count, and forward passes over them.

An example is tokenised as ``[BOS] + prompt tokens + answer tokens`` (prompt and answer are
tokenised separately, so the boundary between them is exact). Texts longer than the model's
context are truncated from the right with a warning; an example whose prompt alone does not fit
raises, because its last prompt token would be lost. Batches are grouped by length and bounded
in padded tokens (:func:`iter_batches`), so one long text does not make a batch whose attention
scores fill the memory.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from .models import model_bos_id, model_device
from .sites import check_positions
from .validation import check_choice, check_scalar


def check_batching(
    batch_size: int, max_batch_tokens: int | None = None, padding_side: str = "right"
) -> None:
    """Validate batching arguments (integers >= 1, ``"left"``/``"right"``) before any work."""
    check_scalar(batch_size, "batch_size", numbers.Integral, min_val=1)
    if max_batch_tokens is not None:
        check_scalar(max_batch_tokens, "max_batch_tokens", numbers.Integral, min_val=1)
    check_choice(padding_side, ("left", "right"), "padding_side")


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


def _max_length(model, max_length: int | None) -> int:
    n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0)
    if max_length is None:
        return n_ctx if n_ctx > 0 else 2048
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}.")
    return min(max_length, n_ctx) if n_ctx > 0 else max_length


def cap_new_tokens(model, prompt_len: int, max_new_tokens: int) -> int:
    """``max_new_tokens``, lowered (with a warning) so that a prompt of ``prompt_len`` tokens
    plus the new ones fit the model's context (``model.cfg.n_ctx``).

    Past the context a model with learned positions fails with a raw ``IndexError``, one with
    rotary positions extrapolates silently, and a huge ``max_new_tokens`` runs for hours.

    Args:
        model: the model (its ``cfg.n_ctx``; no cap when it has none).
        prompt_len: the longest prompt of the generation call, in tokens (padding included).
        max_new_tokens: the length asked for.

    Returns:
        ``min(max_new_tokens, n_ctx - prompt_len)``.

    Raises:
        ValueError: the prompt alone fills the context.

    Example:
        >>> cap_new_tokens(model, 6, 400)   # tiny model: n_ctx 256
        250
    """
    n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0)
    if n_ctx <= 0:
        return max_new_tokens
    room = n_ctx - int(prompt_len)
    if room < 1:
        raise ValueError(
            f"A prompt of {prompt_len} tokens leaves no room in the model's context of {n_ctx} "
            "tokens: shorten the prompts (max_length=...)."
        )
    if max_new_tokens > room:
        warnings.warn(
            f"max_new_tokens={max_new_tokens} runs past the model's context of {n_ctx} tokens "
            f"after a prompt of {prompt_len}: generating at most {room} new tokens (pass "
            f"max_new_tokens <= {room} to silence this).",
            stacklevel=3,
        )
        return room
    return max_new_tokens


def tokenize_examples(
    model,
    prompts: Sequence[str],
    answers: Sequence[str],
    max_length: int | None = None,
    special_tokens: bool | Sequence[bool] = False,
) -> list[tuple[list[int], int]]:
    """Tokenise each example as ``[BOS] + prompt + answer``.

    Text is text: a literal ``"<|im_start|>"`` in a prompt is tokenised as its characters, never
    read as a special token (which could be the BOS id), unless ``special_tokens`` is True for
    that example (texts already formatted with a chat template, whose markers must be the real
    special tokens; :mod:`mechunlearn.data.variants` marks them with
    ``meta["special_tokens"] = True``).

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
    bos = model_bos_id(model)
    tok = model.tokenizer
    prompt_ids = _encode(tok, prompts, special_tokens)
    answer_ids = _encode(tok, answers, special_tokens)
    out, truncated = [], 0
    for i, (p, a) in enumerate(zip(prompt_ids, answer_ids, strict=True)):
        if not p:
            raise ValueError(f"Example {i} has an empty prompt: every example needs prompt text.")
        # A text that already starts with BOS (a chat template's first marker) gets no second.
        head = ([bos] if bos is not None and p[0] != bos else []) + list(p)
        if len(head) > limit:
            where = "the model's context" if max_length is None else "max_length"
            raise ValueError(
                f"Example {i}'s prompt is {len(head)} tokens, longer than {where} ({limit}): "
                "shorten it or pass a larger max_length."
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


def _encode(tok, texts: Sequence[str], special_tokens: bool | Sequence[bool]) -> list[list[int]]:
    texts = list(texts)
    flags = (
        [special_tokens] * len(texts) if isinstance(special_tokens, bool) else list(special_tokens)
    )
    if len(flags) != len(texts):
        raise ValueError(f"{len(flags)} special_tokens flags for {len(texts)} texts.")
    out: list[list[int] | None] = [None] * len(texts)
    for parse in (False, True):
        idx = [i for i, f in enumerate(flags) if bool(f) == parse]
        if idx:
            ids = tok(
                [texts[i] for i in idx], add_special_tokens=False, split_special_tokens=not parse
            )["input_ids"]
            for i, row in zip(idx, ids, strict=True):
                out[i] = list(row)
    return out  # type: ignore[return-value]


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
    has_bos = model_bos_id(model) is not None
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
    special_tokens: bool | Sequence[bool] = False,
) -> Iterator[EncodedBatch]:
    """Yield padded batches of ``[BOS] + prompt + answer`` on the model's device.

    Examples are grouped by length (``sort_by_length``) so that little compute goes to padding;
    each batch records which examples it holds in ``example_index``. A batch holds at most
    ``batch_size`` examples and, beyond its first, at most ``max_batch_tokens`` padded tokens,
    so that one long text (MBPP has a 4,000-token one) does not make a batch whose attention
    scores fill the memory.

    Example:
        >>> for batch in iter_batches(model, ["2+2=", "copy a:"], ["4", " a"]):
        ...     logits = model(batch.tokens, attention_mask=batch.attention_mask)
        >>> batch.tokens.shape, batch.example_index     # longest first
        (torch.Size([2, 10]), tensor([1, 0]))
    """
    check_batching(batch_size, max_batch_tokens, padding_side)
    if answers is None:
        answers = [""] * len(prompts)
    items = tokenize_examples(model, prompts, answers, max_length, special_tokens)
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
        >>> from mechunlearn.sites import hook_name
        >>> shapes = []
        >>> def record(activation, hook):      # records, returns the activation untouched
        ...     shapes.append(tuple(activation.shape))
        ...     return activation
        >>> batch = next(iter_batches(model, ["2+2="], ["4"]))   # [BOS] + 5 characters
        >>> forward_until(model, batch, [(hook_name("pre", 1), record)], hook_name("pre", 1))
        >>> shapes
        [(1, 6, 48)]
    """
    try:
        forward(model, batch, [*fwd_hooks, (stop_after, _stop_forward)])
    except _StopForward:
        pass
