"""The one generation runner: greedy (or sampled) continuations of prompts, hooks attached.

Used by the generation protocols of :mod:`mechunlearn.evaluation` and by
:meth:`KeySpaceDetector.generate <mechunlearn.interventions.KeyRegionDetector.generate>`.

**The key-value cache.** ``model.generate`` reuses the keys and values of earlier positions
(``use_past_kv_cache=True``, TransformerLens's default). With transformer-lens 4.3 and
transformers 5.24 or newer that cache is silently empty: transformers renamed the attention
modules' ``past_key_values`` argument to ``cache``, and the bridge's attention components only
read the old name, so every step after the first attends to itself alone and greedy generation
is garbage (``' ---------'`` for "What is 17 * 3?" on the default model). ``pyproject.toml``
therefore asks for ``transformers<5.24``; and before its first generation on a model,
:func:`kv_cache_agrees` compares three cached steps with three uncached ones, and where they
differ mechunlearn generates without the cache (one full forward per new token), with a warning.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .batching import cap_new_tokens, check_batching, pad_batch, tokenize_examples
from .data import Example, Skill
from .models import model_device

_CACHE_AGREES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: Token ids of the check's prompt (any ids the vocabulary holds; special ones are avoided).
_CHECK_IDS = (10, 11, 12, 13, 14, 15, 16, 17)


def kv_cache_agrees(model, steps: int = 3, rtol: float = 1e-3) -> bool:
    """Whether ``model.generate`` gives the same greedy steps with and without its key-value
    cache (checked once per model, then remembered).

    Three greedy steps from a fixed 8-token prompt, cached and uncached: the logits of every
    step must agree to ``rtol`` of their scale (the token ids where ``generate`` returns no
    logits). Any hooks attached to the model run in both; :func:`greedy_generate` checks before
    attaching its own.

    Args:
        model: a TransformerBridge or HookedTransformer.
        steps: generation steps compared.
        rtol: tolerance relative to the largest absolute logit.

    Returns:
        True where the cache can be used (also when ``generate`` has no cache to choose).

    Example:
        >>> kv_cache_agrees(model)
        True
    """
    params = inspect.signature(model.generate).parameters
    if "use_past_kv_cache" not in params:
        return True
    known = _CACHE_AGREES.get(model)
    if known is not None:
        return known
    vocab = int(model.cfg.d_vocab)
    tokens = torch.tensor([[i % vocab for i in _CHECK_IDS]], device=model_device(model))
    kwargs: dict[str, Any] = {"max_new_tokens": steps, "do_sample": False, "verbose": False,
                              "stop_at_eos": False, "return_type": "tokens"}  # fmt: skip
    logits = "output_logits" in params
    if logits:
        kwargs["output_logits"] = True
    with torch.inference_mode():
        cached = model.generate(tokens, use_past_kv_cache=True, **kwargs)
        plain = model.generate(tokens, use_past_kv_cache=False, **kwargs)
    if logits:
        a, b = torch.stack(list(cached.logits)), torch.stack(list(plain.logits))
        scale = b.abs().max().clamp_min(1e-6)
        agrees = bool(((a - b).abs().max() <= rtol * scale).item())
    else:
        agrees = torch.equal(cached, plain)
    if not agrees:
        from importlib.metadata import version

        import transformers

        warnings.warn(
            "model.generate's key-value cache gives other tokens than generation without it on "
            f"this model (transformer-lens {version('transformer-lens')}, transformers "
            f"{transformers.__version__}: the bridge's attention ignores transformers' renamed "
            "`cache` argument from 5.24 on). mechunlearn generates without the cache (one full "
            "forward per new token, slower for long continuations); `pip install "
            "'transformers<5.24'` restores it. Call model.generate(..., "
            "use_past_kv_cache=False) yourself for the same reason.",
            stacklevel=3,
        )
    _CACHE_AGREES[model] = agrees
    return agrees


def generate_from_tokens(
    model, token_lists: Sequence[Sequence[int]], max_new_tokens: int, **kwargs: Any
) -> list[str]:
    """Continuations of already-tokenised prompts, left-padded in one batch, as text.

    ``model.generate`` gets the attention mask where it takes one (TransformerBridge); a legacy
    HookedTransformer infers it from left-padded pad tokens, used only where it would infer
    exactly this mask, else one prompt at a time. Each continuation is decoded without the
    prompt and cut at the first stop token (unless ``stop_at_eos=False``). The key-value cache
    is used where :func:`kv_cache_agrees` (unless ``use_past_kv_cache`` is passed).
    ``max_new_tokens`` is lowered, with a warning, to what the model's context leaves after the
    longest prompt (:func:`mechunlearn.batching.cap_new_tokens`).

    Args:
        model: the model (any hooks attached to it run at every step).
        token_lists: token ids of each prompt (BOS included where wanted).
        max_new_tokens: generation length.
        **kwargs: passed to ``model.generate`` (default greedy: ``do_sample=False``).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    kwargs = {"do_sample": False, "verbose": False, **kwargs}
    token_lists = [list(ids) for ids in token_lists]
    batch = pad_batch(
        model, [(ids, len(ids)) for ids in token_lists], range(len(token_lists)), "left"
    )
    tokens = batch.tokens.to(model_device(model))
    mask = batch.attention_mask.to(tokens.device)
    params = inspect.signature(model.generate).parameters
    max_new_tokens = cap_new_tokens(model, tokens.shape[1], max_new_tokens)  # the context
    kwargs = {**kwargs, "max_new_tokens": max_new_tokens, "return_type": "tokens"}
    if "use_past_kv_cache" in params and "use_past_kv_cache" not in kwargs:
        kwargs["use_past_kv_cache"] = kv_cache_agrees(model)
    if "attention_mask" in params:
        out = model.generate(tokens, attention_mask=mask, **kwargs)
        new = [row[tokens.shape[1] :] for row in out]
    elif infers_left_padding(model, tokens, mask):
        # A legacy HookedTransformer takes no mask: it infers it from the pad tokens, on the
        # side its tokenizer pads, which we set to "left" for the call.
        tok = model.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        try:
            out = model.generate(tokens, **kwargs)
        finally:
            tok.padding_side = side
        new = [row[tokens.shape[1] :] for row in out]
    else:  # a generate that would misread the padding: one prompt at a time, unpadded
        new = []
        for ids in token_lists:
            single = torch.tensor([ids], device=tokens.device)
            new.append(model.generate(single, **kwargs)[0, len(ids) :])
    return [decode_continuation(model, row, kwargs) for row in new]


def infers_left_padding(model, tokens: Tensor, mask: Tensor) -> bool:
    """Whether a legacy ``HookedTransformer.generate`` would infer exactly ``mask`` from the
    left-padded ``tokens`` (it rebuilds the mask from the tokenizer's pad id)."""
    if "padding_side" not in inspect.signature(model.generate).parameters:
        return False
    try:
        from transformer_lens.utilities import get_attention_mask
    except ImportError:
        return False
    tok = model.tokenizer
    if getattr(tok, "pad_token_id", None) is None:
        return False
    side, tok.padding_side = tok.padding_side, "left"
    try:
        prepend_bos = bool(getattr(model.cfg, "default_prepend_bos", True))
        inferred = get_attention_mask(tok, tokens, prepend_bos)
    finally:
        tok.padding_side = side
    return torch.equal(inferred.to(mask.device).bool(), mask.bool())


def decode_continuation(model, ids: Tensor, kwargs: dict[str, Any]) -> str:
    """Decode generated ids, cut at the first stop token when generation stops at EOS."""
    tok = model.tokenizer
    ids = ids.tolist()
    if kwargs.get("stop_at_eos", True):
        stops = kwargs.get("eos_token_id")
        if stops is None:
            stops = getattr(model.cfg, "eos_token_id", None) or tok.eos_token_id
        stops = {stops} if isinstance(stops, int) else set(stops or [])
        for i, t in enumerate(ids):
            if t in stops:
                ids = ids[:i]
                break
    return tok.decode(ids)


def greedy_generate(
    model,
    prompts: Sequence[str],
    max_new_tokens: int,
    fwd_hooks: Sequence = (),
    batch_size: int = 8,
    special_tokens: bool | Sequence[bool] = False,
) -> list[str]:
    """Greedy continuations of ``prompts`` (text after the prompt), hooks attached throughout.

    Prompts are tokenised as everywhere in mechunlearn (``[BOS] + prompt``), ``batch_size`` at
    a time, by :func:`generate_from_tokens`.

    Example:
        >>> out = greedy_generate(model, ["3+4=", "copy b:"], 4, fwd_hooks=na.hooks(model))
        >>> len(out), isinstance(out[0], str)      # one continuation per prompt
        (2, True)
    """
    check_batching(batch_size)
    kv_cache_agrees(model)  # checked on the bare model, before the hooks are attached
    items = tokenize_examples(model, list(prompts), [""] * len(prompts), None, special_tokens)
    out: list[str] = []
    with torch.inference_mode(), model.hooks(fwd_hooks=list(fwd_hooks)):
        for start in range(0, len(items), batch_size):
            chunk = [ids for ids, _ in items[start : start + batch_size]]
            out.extend(generate_from_tokens(model, chunk, max_new_tokens))
    return out


def own_continuations(
    model,
    prompts: Sequence[str],
    max_new_tokens: int = 16,
    batch_size: int = 8,
    name: str = "own-continuations",
) -> Skill:
    """The model's own greedy continuations of ``prompts`` as a :class:`~mechunlearn.data.Skill`
    (prompt, continuation): teacher-forced accuracy on it is the share of answer tokens an
    edited model still predicts as the unedited one did. Prompts whose continuation is empty or
    only whitespace (e.g. an end-of-sequence token first) are left out.

    Args:
        model: the model, as it should be kept (no hooks attached).
        prompts: the prompts to continue.
        max_new_tokens: tokens generated per prompt.
        batch_size: prompts per generation call.
        name: the skill's name.

    Raises:
        ValueError: no prompts, or every continuation is empty.

    Example:
        >>> kept = own_continuations(model, ["The sun is", "copy a:"], max_new_tokens=4)
        >>> len(kept) <= 2, all(kept.answers)    # one example per non-empty continuation
        (True, True)
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: give the prompts to continue.")
    texts = greedy_generate(model, prompts, max_new_tokens, batch_size=batch_size)
    examples = [Example(p, t) for p, t in zip(prompts, texts, strict=True) if t.strip()]
    if not examples:
        raise ValueError(
            f"The model's greedy continuation of every one of {len(prompts)} prompts is empty "
            "(it ends them at once): give other prompts."
        )
    return Skill(name, examples, f"greedy continuations, {max_new_tokens} new tokens")
