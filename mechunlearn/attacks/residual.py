"""What the hidden states still know: logit lens and linear probes, per layer, before and after.

An unlearning method that only hides the answer at the output may leave it readable inside.
With the method active (hooks attached, weights edited; a detector changes nothing) and
without, for every layer ``L``:

* **Logit lens** (:func:`logit_lens`): the residual stream after block ``L``
  (``blocks.L.hook_resid_post``) at the last prompt token, read through the model's final norm
  and unembedding (``model.ln_final``, ``model.unembed``). ``lens_top1``: the share of held-out
  forget examples whose answer's first token is the top-1 token; ``lens_rank``: its median rank
  (0 = top-1). At the last layer this is the model's own prediction.
* **Linear probe** (:func:`linear_probe`): L2-regularised logistic regression (float64,
  L-BFGS, standardised features) that tells forget from retain prompts by the same residual
  vectors, trained on the probe halves and tested on the held-out halves. An accuracy near 1
  after unlearning means the forget skill's prompts are still recognisable at that layer (what
  a detector reads; not that the answer is still there).

A :class:`~mechunlearn.interventions.Detector` only watches: every hidden state is the bare
model's, so its "after" equals "before" at every layer; the table says so in
``states_changed`` (False) rather than leave it to be inferred. For the other kinds
``states_changed`` says whether any recorded state differs from the bare model's at that layer
(an intervention on layer 10 leaves layers 0-9 untouched).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..batching import EncodedBatch
from ..collect import run_pass
from ..data import Skill
from ..evaluation import applied
from ..interventions.base import Detector
from ..interventions.registry import kind_of
from ..models import model_device
from ..validation import check_int, check_positive, resolve_layers

__all__ = ["last_prompt_states", "linear_probe", "logit_lens", "residual_knowledge"]


def _site(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def last_prompt_states(
    model,
    skill: Skill,
    fwd_hooks: Sequence = (),
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
) -> tuple[Tensor, Tensor]:
    """The residual stream after each layer at each example's last prompt token.

    Each forward pass stops after the deepest layer's ``hook_resid_post``.

    Args:
        model: the model.
        skill: the examples (answers optional: without one the target is -1).
        fwd_hooks: hooks attached during the passes (an intervention's).
        layers: the layers (default: all).
        batch_size: examples per forward pass.

    Returns:
        ``(states, targets)``: ``[n, layers, d_model]`` float32 on the model's device, and each
        example's first answer token id ``[n]`` (-1 without an answer).

    Example:
        >>> from mechunlearn.attacks import last_prompt_states
        >>> states, targets = last_prompt_states(model, forget[:4])
        >>> tuple(states.shape), targets.tolist()[:2]
        ((4, 3, 32), [20, 21])
    """
    layers = resolve_layers(model, layers)
    device = model_device(model)
    n = len(skill)
    states = torch.zeros((n, len(layers), int(model.cfg.d_model)), device=device)
    targets = torch.full((n,), -1, dtype=torch.long, device=device)

    def hooks(batch: EncodedBatch) -> list:
        rows = torch.arange(batch.tokens.shape[0], device=device)
        index = batch.example_index.to(device)

        def record(col: int):
            def hook(activation, hook=None):
                states[index, col] = activation[rows, batch.last_prompt].float()
                return activation

            return hook

        return [*fwd_hooks, *((_site(layer), record(c)) for c, layer in enumerate(layers))]

    def first_answer_token(batch: EncodedBatch, _) -> None:
        rows = torch.arange(batch.tokens.shape[0], device=device)
        nxt = (batch.last_prompt + 1).clamp(max=batch.tokens.shape[1] - 1)
        has = batch.answer_mask[rows, nxt]
        targets[batch.example_index.to(device)] = torch.where(has, batch.tokens[rows, nxt], -1)

    run_pass(
        model, skill, hooks, _site(max(layers)), then=first_answer_token, batch_size=batch_size
    )
    return states, targets


def logit_lens(model, states: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Rank and top-1 hit of each target token, read from each layer's residual vectors through
    the final norm and the unembedding.

    Args:
        model: the model (its ``ln_final`` and ``unembed``).
        states: ``[n, layers, d_model]`` (:func:`last_prompt_states`).
        targets: ``[n]`` token ids (examples with -1 are left out).

    Returns:
        ``(ranks, top1)``: ``[n', layers]`` long ranks (0 = top-1) and bool hits.

    Example:
        >>> from mechunlearn.attacks import last_prompt_states, logit_lens
        >>> states, targets = last_prompt_states(model, forget[:4])
        >>> ranks, top1 = logit_lens(model, states, targets)
        >>> tuple(ranks.shape), top1.dtype
        ((4, 3), torch.bool)
    """
    keep = targets >= 0
    states, targets = states[keep], targets[keep]
    ranks = torch.zeros(states.shape[:2], dtype=torch.long, device=states.device)
    with torch.inference_mode():
        for col in range(states.shape[1]):
            x = states[:, col].unsqueeze(0)
            dtype = model.unembed.W_U.dtype if hasattr(model.unembed, "W_U") else x.dtype
            logits = model.unembed(model.ln_final(x.to(dtype))).squeeze(0).float()
            own = logits.gather(-1, targets[:, None])
            ranks[:, col] = (logits > own).sum(-1)
    return ranks, ranks == 0


def linear_probe(
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    l2: float = 1e-2,
    max_iter: int = 200,
) -> float:
    """Held-out accuracy of an L2-regularised logistic regression (float64, L-BFGS).

    Features are standardised with the training set's mean and standard deviation; the loss is
    the mean log-loss plus ``l2 * |w|^2 / 2``.

    Args:
        x_train, x_test: ``[n, d]`` features.
        y_train, y_test: ``[n]`` labels 0/1.
        l2: the ridge penalty.
        max_iter: L-BFGS iterations.

    Returns:
        The share of ``x_test`` classified right.

    Raises:
        ValueError: a training set without both labels, or mismatched shapes.

    Example:
        >>> from mechunlearn.attacks import linear_probe
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.arange(40) % 2
        >>> x = torch.randn(40, 5, generator=g) + 3 * y[:, None]
        >>> linear_probe(x[:20], y[:20], x[20:], y[20:])
        1.0
    """
    l2 = check_positive("l2", l2)
    max_iter = check_int("max_iter", max_iter, min_val=1)
    xa, xb = (x.detach().to("cpu", torch.float64) for x in (x_train, x_test))
    ya, yb = (y.detach().to("cpu", torch.float64).reshape(-1) for y in (y_train, y_test))
    if xa.ndim != 2 or xb.ndim != 2 or xa.shape[1] != xb.shape[1]:
        raise ValueError(
            f"Features must be [n, d] of one d, got {tuple(xa.shape)}, {tuple(xb.shape)}."
        )
    if len(ya) != len(xa) or len(yb) != len(xb):
        raise ValueError("Each feature row needs one label.")
    if not (bool((ya == 0).any()) and bool((ya == 1).any())):
        raise ValueError("The probe's training set needs examples of both labels (0 and 1).")
    mean, std = xa.mean(0), xa.std(0).clamp_min(1e-12)
    xa, xb = (xa - mean) / std, (xb - mean) / std
    w = torch.zeros(xa.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = xa @ w[:-1] + w[-1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z, ya)
        loss = loss + 0.5 * l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    pred = (xb @ w.detach()[:-1] + w.detach()[-1]) > 0
    return float((pred.double() == yb).double().mean())


def residual_knowledge(
    model,
    interventions: Mapping[str, Any],
    forget: Skill,
    retain: Skill,
    forget_test: Skill,
    retain_test: Skill,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    l2: float = 1e-2,
    quiet: bool = False,
) -> pd.DataFrame:
    """Logit lens and linear probe per layer, bare and with each method (module docstring).

    Args:
        model: the model.
        interventions: ``{method name: fitted intervention}``.
        forget, retain: the probe halves (the probe's training set).
        forget_test, retain_test: the held-out halves (the probe's test set; the logit lens
            reads ``forget_test``'s first answer tokens).
        layers: the layers (default: all).
        batch_size: examples per forward pass.
        l2: the probe's ridge penalty.
        quiet: hide the progress bar.

    Returns:
        One row per method and layer: ``method, kind, layer, states_changed,
        lens_top1_before, lens_top1_after, lens_rank_before, lens_rank_after, probe_before,
        probe_after, n_train, n_test``.

    Example:
        >>> from mechunlearn.attacks import residual_knowledge
        >>> t = residual_knowledge(model, {"SP": sp, "KSD": ksd}, forget[:10], retain[:10],
        ...                        forget[10:20], retain[10:20], quiet=True)
        >>> t.groupby("method")["states_changed"].any().to_dict()
        {'KSD': False, 'SP': True}
    """
    layers = resolve_layers(model, layers)
    skills = {"f": forget, "r": retain, "ft": forget_test, "rt": retain_test}
    y_train = torch.cat([torch.ones(len(forget)), torch.zeros(len(retain))])
    y_test = torch.cat([torch.ones(len(forget_test)), torch.zeros(len(retain_test))])

    def measure(hooks) -> tuple[dict[str, Tensor], Tensor, Tensor, list[float]]:
        got = {
            k: last_prompt_states(model, s, hooks, layers, batch_size) for k, s in skills.items()
        }
        states = {k: v[0] for k, v in got.items()}
        ranks, top1 = logit_lens(model, states["ft"], got["ft"][1])
        x_train = torch.cat([states["f"], states["r"]])
        x_test = torch.cat([states["ft"], states["rt"]])
        probe = [
            linear_probe(x_train[:, c], y_train, x_test[:, c], y_test, l2)
            for c in range(len(layers))
        ]
        return states, ranks, top1, probe

    bar = tqdm(total=1 + len(interventions), desc="residual knowledge", disable=quiet)
    before = measure([])
    bar.update()
    rows = []
    for m, iv in interventions.items():
        if isinstance(iv, Detector):  # watches only: every hidden state is the bare model's
            after, changed = before, [False] * len(layers)
        else:
            with applied(model, iv) as hooks:
                after = measure(hooks)
            changed = [
                any(not torch.equal(after[0][k][:, c], before[0][k][:, c]) for k in skills)
                for c in range(len(layers))
            ]
        bar.update()
        for c, layer in enumerate(layers):
            rows.append(
                {
                    "method": m, "kind": kind_of(type(iv)), "layer": layer,
                    "states_changed": changed[c],
                    "lens_top1_before": float(before[2][:, c].double().mean()),
                    "lens_top1_after": float(after[2][:, c].double().mean()),
                    "lens_rank_before": float(before[1][:, c].double().quantile(0.5)),
                    "lens_rank_after": float(after[1][:, c].double().quantile(0.5)),
                    "probe_before": before[3][c], "probe_after": after[3][c],
                    "n_train": len(y_train), "n_test": len(y_test),
                }
            )  # fmt: skip
    bar.close()
    return pd.DataFrame(rows)
