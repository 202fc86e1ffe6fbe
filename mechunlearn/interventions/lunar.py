"""LUNAR: unlearning by redirecting the forget prompts' activations (a closed-form W_out edit).

Shen et al., "LLM Unlearning via Neural Activation Redirection" (2025; code:
``facebookresearch/LUNAR``), as docs/methods.md ("LUNAR") states it:

1. **Direction.** At layer ``l``, ``r_l = mean(resid_post_l at the last prompt token over the
   reference prompts) - mean(the same over the forget prompts)`` (``blocks.{l}.hook_resid_post``,
   prompts only, accumulated in float64, not normalised). The reference prompts are prompts the
   model declines to answer: :func:`reference_prompts` ships 76 written for this project
   (questions about fictitious entities, and requests to refuse); any Skill works.
2. **Training.** Only ``W_out`` of layer ``l`` changes. The rows are the key vectors ``k``
   (``blocks.{l}.mlp.hook_post``, the input of ``W_out``) at the prompt tokens of the forget and
   the retain prompts. Targets: on forget rows the layer's MLP output plus ``c * r_l``; on
   retain rows the unchanged MLP output. Loss: squared error over all rows.
3. **Solution.** With ``W' = W_out + dW`` the residual of row ``i`` is ``k_i dW - y_i``, where
   ``y_i = c r_l`` on forget rows and ``0`` on the others: the bias and ``k_i W_out`` cancel.
   Minimising ``sum_i ||k_i dW - y_i||^2 + lam ||dW||_F^2`` gives the normal equations
   ``(G + lam I) dW = sum_i k_i^T y_i = s_F (c r_l)^T`` with the Gram matrix
   ``G = sum_i k_i^T k_i`` over all rows and ``s_F`` the sum of the forget rows' keys, so

   ``dW = u (c r_l)^T`` with ``u = (G + lam I)^-1 s_F``   (rank one).

   ``G`` and ``s_F`` are accumulated in float64 batch by batch (no row is kept) and the system
   is solved by a Cholesky factorisation. The ridge is relative to the Gram's scale:
   ``lam = ridge * trace(G) / d_mlp`` (``ridge`` times the mean eigenvalue of ``G``), so it means
   the same whatever the size of the keys or the number of rows; it makes ``G + lam I``
   positive definite when there are fewer independent rows than neurons, and it shrinks
   ``dW`` towards 0, i.e. ``W'`` towards the original ``W_out``.
   ``solver="adam"`` runs the authors' gradient route instead (AdamW, ``lr`` 0.01, the rate
   times 0.9 after every epoch, 20 epochs, shuffled mini-batches of 64 rows) on the same
   objective divided by ``rows * d_model`` (the mean squared error of ``torch.nn.MSELoss`` plus
   the same ridge); it trains a separate tensor ``dW`` from zero, never the model's weights,
   and has to keep the key rows (float32) in memory for its epochs.
4. **Layer and coefficient.** ``coef`` ``c = 2.0`` as in the authors' configuration. Their
   layer is a manual choice (22 of 32 for Llama-3-8B); ``layer="auto"`` chooses it on
   held-back probe examples of both skills: for every candidate layer it fits that layer's
   closed-form ``dW`` on the other examples (the Gram matrices of every candidate come from one
   pass over them), applies it as hooks, and keeps the layer whose edit lowers the forget
   skill's teacher-forced accuracy most while the retain skill keeps at least 95 % of its base
   accuracy (:func:`choose_layer`). (The issue's cheaper test, adding ``c * r_l`` to the MLP
   output of every prompt, cannot tell layers apart: it moves the retain prompts too; see
   ``docs/results/index.md``, "Observations without a script".) Direction and ``dW`` are then
   fitted on all the examples given (a refit, as scikit-learn's grid search does); the sweep is
   in ``layer_sweep_``.
5. **Applying it.** :meth:`Lunar.hooks` adds ``key @ dW`` to the MLP's own output (the
   model's weights are untouched, and the hooks compose with others): one hook records the key
   at ``blocks.{l}.mlp.hook_post`` and one adds at ``blocks.{l}.mlp.hook_out``, in the same
   forward (:func:`~mechunlearn.sites.mlp_output_hook`: before the norm that Gemma 2/3 and
   OLMo 2 put after the MLP, where the bridge's ``hook_mlp_out`` fires; ``hook_mlp_out`` on a
   legacy HookedTransformer).
   :meth:`Lunar.apply_to_weights` writes ``W_out + dW`` into the model and restores the original
   weights bit for bit when its ``with`` block ends. Both give the same logits.

Where we differ from the authors' code, on purpose:

* **BOS.** The BOS token's key is the same in every text (it sees nothing before it). The
  authors' rows include it in both sets, which asks for contradictory targets on one key and
  shifts BOS, hence every continuation, by about ``n_F / (n_F + n_R) * c * r``. Here the BOS
  row of every prompt (forget and retain) is kept with the target "unchanged", so the edit
  pins it. Any other key shared by a forget and a retain prompt (a common prefix) still gets
  the compromise; the built-in skills' prompts share none.
* **Exact solution.** The authors train ``W_out`` itself in bfloat16 with AdamW, whose default
  weight decay of 0.01 pulls the whole ``W_out`` towards zero. Here the default is the
  least-squares solution in closed form; the Adam route trains ``dW`` in float32 with no weight
  decay and the same explicit ridge as the closed form, so that both solve one problem.
* **Direction site.** The authors read the input of block ``l + 1``: that is
  ``blocks.{l}.hook_resid_post`` (so the last layer works too).

Example:
    >>> lunar = mu.Lunar(layer="auto", candidates=[0, 1, 2]).fit(model, forget, retain)
    >>> len(lunar.layer_sweep_), len(lunar.layers_)   # every candidate tried, one chosen
    (3, 1)
    >>> logits = model.run_with_hooks(tokens, fwd_hooks=lunar.hooks(model))
    >>> with lunar.apply_to_weights(model):
    ...     edited = model(tokens)              # W_out edited in place
    >>> torch.allclose(edited, logits, atol=1e-5)   # the same logits
    True
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ..batching import EncodedBatch
from ..collect import run_pass
from ..data import Example, Skill
from ..models import d_mlp, model_device, model_meta, n_layers
from ..scoring import score_pass
from ..sites import hook_name, mlp_output_hook
from ..validation import MAX_SEED, check_forget_retain, check_int, model_keys, resolve_layers
from .base import Hook, HookIntervention, check_positive
from .registry import register_method
from .weights import WeightEdit, edit_w_out, w_out

SOLVERS = ("closed_form", "adam")
REFERENCE_KINDS = ("fictitious", "refuse")
#: ``layer="auto"`` keeps only layers whose retain accuracy is at least this share of the base.
RETAIN_FLOOR = 0.95
#: Rows per mini-batch of the Adam route (the authors' DataLoader batch size).
ADAM_BATCH_ROWS = 64
#: Learning-rate factor per epoch of the Adam route (the authors' ExponentialLR gamma).
ADAM_LR_DECAY = 0.9
_REFERENCE_FILE = "reference_prompts.jsonl"


# ------------------------------------------------------------------------ reference prompts
def reference_prompts(kind: str | None = None, template: str = "{prompt}") -> Skill:
    """The reference prompts shipped with mechunlearn: prompts a model declines to answer.

    76 prompts written for this project (see ``mechunlearn/resources/README.md``): 52 questions
    about fictitious people, places and objects (``kind="fictitious"``) and 24 requests an
    assistant should refuse (``kind="refuse"``). Prompts only (every answer is ``""``); each
    example's ``meta["kind"]`` says which kind it is.

    Args:
        kind: ``"fictitious"``, ``"refuse"``, or None for both.
        template: format string applied to each prompt, with the field ``{prompt}``: e.g.
            ``"Question: {prompt}\\nAnswer:"`` to match the forget skill's prompt format, so
            that the direction does not also encode the difference in format.

    Returns:
        A Skill named ``"reference"``.

    Example:
        >>> ref = reference_prompts()
        >>> len(ref), ref[0].meta["kind"]
        (76, 'fictitious')
        >>> reference_prompts("refuse", template="Question: {prompt}\\nAnswer:")[0].prompt[:9]
        'Question:'
    """
    if kind is not None and kind not in REFERENCE_KINDS:
        raise ValueError(f"kind must be one of {REFERENCE_KINDS} or None, got {kind!r}.")
    if not isinstance(template, str) or "{prompt}" not in template:
        raise ValueError(
            f"template must be a string containing '{{prompt}}', got {template!r}: "
            "e.g. 'Question: {prompt}\\nAnswer:'."
        )
    text = resources.files("mechunlearn.resources").joinpath(_REFERENCE_FILE).read_text("utf-8")
    examples = []
    for line in text.splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if kind is None or row["kind"] == kind:
            prompt = template.format(prompt=row["prompt"])
            examples.append(Example(prompt, "", {"kind": row["kind"]}))
    return Skill("reference", examples, f"package:mechunlearn/resources/{_REFERENCE_FILE}")


# ------------------------------------------------------------------------- layer selection
def choose_layer(sweep: Sequence[dict[str, Any]], retain_floor: float = RETAIN_FLOOR) -> int:
    """The layer of a sweep that lowers the forget accuracy most while the retain skill keeps
    ``retain_floor`` of its base accuracy.

    Args:
        sweep: one dict per candidate layer with ``layer``, ``forget`` and ``retain``
            (accuracies with the redirection) and ``retain_base`` (without), as in
            :attr:`Lunar.layer_sweep_`.
        retain_floor: the share of the base retain accuracy a layer must keep.

    Returns:
        Among the layers with ``retain >= retain_floor * retain_base``, the one with the lowest
        forget accuracy (ties: higher retain accuracy, then the earlier layer). If no layer
        qualifies, a warning, and the layer with the highest retain accuracy (ties: lower
        forget accuracy, then the earlier layer).

    Example:
        >>> rows = [dict(layer=0, forget=0.1, retain=0.5, retain_base=0.9),
        ...         dict(layer=1, forget=0.3, retain=0.88, retain_base=0.9)]
        >>> choose_layer(rows)
        1
    """
    if not sweep:
        raise ValueError("The sweep is empty: there is no layer to choose.")
    ok = [row for row in sweep if row["retain"] >= retain_floor * row["retain_base"]]
    if ok:
        best = min(ok, key=lambda row: (row["forget"], -row["retain"], row["layer"]))
        return int(best["layer"])
    best = min(sweep, key=lambda row: (-row["retain"], row["forget"], row["layer"]))
    warnings.warn(
        f"No layer keeps {retain_floor:.0%} of the retain skill's accuracy with the "
        f"edit; layer {best['layer']} keeps the most ({best['retain']:.3f} of "
        f"{best['retain_base']:.3f}). Consider a smaller coef.",
        stacklevel=3,
    )
    return int(best["layer"])


# ------------------------------------------------------------------------------ streaming
@dataclass
class _Normal:
    """One layer's sufficient statistics of the least-squares problem (float64)."""

    gram_f: Tensor  # sum of k k^T over forget rows   [d_mlp, d_mlp]
    gram_k: Tensor  # sum of k k^T over kept rows      [d_mlp, d_mlp]
    sum_f: Tensor  # sum of k over forget rows         [d_mlp]
    n_f: int = 0
    n_k: int = 0
    rows_f: list[Tensor] = field(default_factory=list)  # float32 key rows, Adam route only
    rows_k: list[Tensor] = field(default_factory=list)
    linear_error: Tensor | None = None  # max |k W_out + b - mlp_out| / max |mlp_out|

    @classmethod
    def empty(cls, width: int, device: torch.device) -> _Normal:
        f64 = dict(dtype=torch.float64, device=device)
        return cls(
            torch.zeros((width, width), **f64),
            torch.zeros((width, width), **f64),
            torch.zeros(width, **f64),
        )


def _pass(
    model,
    skill: Skill,
    batch_size: int,
    resid_layers: Sequence[int] = (),
    normal: dict[int, _Normal] | None = None,
    forget: bool = False,
    keep_rows: bool = False,
) -> Float[Tensor, "layer d_model"]:
    """One streaming pass over the skill's prompts (no answers), batch by batch.

    * ``resid_layers``: returns the sum over the prompts of ``resid_post`` at the last prompt
      token, per layer (float64).
    * ``normal``: accumulates, per layer, the Gram matrices of the key vectors. Forget prompts:
      prompt tokens are forget rows and BOS is a kept row; retain prompts: every real token
      (BOS and prompt) is a kept row; padding never counts. On the first batch it also measures
      whether the MLP's output is ``key @ W_out + b_out`` (what the hooks rely on).

    Each forward (:func:`mechunlearn.collect.run_pass`) stops after the deepest hook it needs.
    """
    normal = normal or {}
    width = int(model.cfg.d_model)
    sums = torch.zeros((len(resid_layers), width), dtype=torch.float64, device=model_device(model))
    first = [True]

    def step(batch: EncodedBatch) -> list[Hook]:
        hooks: list[Hook] = []
        rows = torch.arange(batch.tokens.shape[0], device=batch.tokens.device)
        for i, layer in enumerate(resid_layers):

            def last_token(activation, hook=None, i=i):
                picked = activation[rows, batch.last_prompt]
                sums[i] += picked.sum(0, dtype=torch.float64).to(sums.device)
                return activation

            hooks.append((hook_name("resid_post", layer), last_token))
        if not normal:
            return hooks
        real = batch.attention_mask.bool()
        moved = batch.prompt_mask if forget else torch.zeros_like(real)
        idx_f = torch.nonzero((moved & real).flatten()).flatten()
        idx_k = torch.nonzero((real & ~moved).flatten()).flatten()
        n_f, n_k = int(idx_f.numel()), int(idx_k.numel())
        check, first[0] = first[0], False
        for layer, ne in normal.items():
            ne.n_f += n_f
            ne.n_k += n_k
            seen: dict[str, Tensor] = {}

            def record(activation, hook=None, ne=ne, seen=seen):
                flat = activation.reshape(-1, activation.shape[-1])
                keys_k = flat.index_select(0, idx_k)
                keys_k64 = keys_k.double()
                ne.gram_k.addmm_(keys_k64.T, keys_k64)
                if n_f:
                    keys_f = flat.index_select(0, idx_f)
                    keys_f64 = keys_f.double()
                    ne.gram_f.addmm_(keys_f64.T, keys_f64)
                    ne.sum_f += keys_f64.sum(0)
                    if keep_rows:
                        ne.rows_f.append(keys_f.float().clone())
                if keep_rows:
                    ne.rows_k.append(keys_k.float().clone())
                seen["key"] = activation
                return activation

            hooks.append((hook_name("key", layer), record))
            if check:
                hooks.append((mlp_output_hook(model, layer), _linear_check(model, layer, ne, seen)))
        return hooks

    # Within a block: hook_post, then the MLP's output, then hook_resid_post.
    depth = [(layer, 2) for layer in resid_layers] + [(layer, 1) for layer in normal]
    layer, kind = max(depth)
    stop = hook_name("resid_post", layer) if kind == 2 else mlp_output_hook(model, layer)
    run_pass(model, skill, step, stop, prompts_only=True, batch_size=batch_size)
    return sums


def _linear_check(model, layer: int, ne: _Normal, seen: dict[str, Tensor]):
    """A hook at the MLP's output that measures ``max |key @ W_out + b_out - mlp_out|``."""
    try:
        weight = w_out(model, layer)
    except NotImplementedError:
        return lambda activation, hook=None: activation
    bias = getattr(model.blocks[layer].mlp, "b_out", None)

    def hook(activation: Float[Tensor, "batch pos d_model"], hook=None) -> Tensor:
        key = seen["key"].float()
        expected = key @ weight.float()
        if bias is not None:
            expected = expected + bias.float()
        scale = activation.float().abs().amax().clamp(min=1e-30)
        ne.linear_error = ((expected - activation.float()).abs().amax() / scale).detach()
        return activation

    return hook


# -------------------------------------------------------------------------------- solvers
def _ridge_lambda(gram: Tensor, ridge: float) -> float:
    return float(ridge * torch.diagonal(gram).sum() / gram.shape[0])


def _closed_form(gram: Tensor, sum_f: Tensor, target: Tensor, lam: float) -> Tensor:
    """``dW = (G + lam I)^-1 s_F target^T`` in float64."""
    system = gram.clone()
    system.diagonal().add_(lam)
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) != 0:  # not positive definite in floating point: solve with pivoting
        u = torch.linalg.solve(system, sum_f)
    else:
        u = torch.cholesky_solve(sum_f[:, None], factor)[:, 0]
    return torch.outer(u, target)


def _adam(
    ne: _Normal, target: Tensor, lam: float, epochs: int, lr: float, seed: int
) -> tuple[Tensor, list[float]]:
    """The authors' gradient route on ``dW`` (see the module docstring); returns float64."""
    with torch.inference_mode(False), torch.enable_grad():
        # clone(): rows recorded under a caller's inference_mode cannot enter autograd.
        x = torch.cat(ne.rows_f + ne.rows_k).clone()
        n, width = x.shape
        goal = torch.zeros((n, target.numel()), dtype=torch.float32, device=x.device)
        goal[: ne.n_f] = target.float().to(x.device)
        delta = torch.zeros(
            (width, target.numel()), dtype=torch.float32, device=x.device, requires_grad=True
        )
        optimizer = torch.optim.AdamW([delta], lr=lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=ADAM_LR_DECAY)
        penalty = lam / (n * target.numel())
        gen = torch.Generator().manual_seed(seed)
        history = []
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen).to(x.device)
            total = torch.zeros((), dtype=torch.float64, device=x.device)
            for chunk in order.split(ADAM_BATCH_ROWS):
                mse = (x[chunk] @ delta - goal[chunk]).square().mean()
                loss = mse + penalty * delta.square().sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += mse.detach().double() * chunk.numel()
            schedule.step()
            history.append(float(total) / n)
    return delta.detach().double(), history


def _diagnostics(ne: _Normal, delta: Tensor, target: Tensor, lam: float) -> dict[str, Any]:
    """Loss and redirection measures of ``delta`` from the sufficient statistics (exact)."""
    gram = ne.gram_f + ne.gram_k
    n = ne.n_f + ne.n_k
    size = target.numel()
    tt = float(target @ target)
    quad = float(((gram @ delta) * delta).sum())
    cross = float(ne.sum_f @ delta @ target)
    kept = float(((ne.gram_k @ delta) * delta).sum())
    mse_after = max(quad - 2 * cross + ne.n_f * tt, 0.0) / (n * size)
    return {
        "n_forget_rows": ne.n_f,
        "n_kept_rows": ne.n_k,
        "ridge_lambda": lam,
        "mse_before": ne.n_f * tt / (n * size),
        "mse_after": mse_after,
        # what both solvers minimise: the mean squared error plus the ridge penalty
        "objective": mse_after + lam * float(delta.square().sum()) / (n * size),
        # mean over forget rows of <k dW, c r> / |c r|^2: 1 = fully redirected
        "forget_redirect": cross / (ne.n_f * tt),
        # RMS over kept rows of |k dW| / |c r|: 0 = untouched
        "kept_shift": math.sqrt(max(kept, 0.0) / max(ne.n_k, 1) / tt),
    }


# ------------------------------------------------------------------------------ the sweep
class _Edit:
    """One candidate layer's edit for the layer sweep, as hooks: ``+ key @ delta`` at
    the MLP's output (every position, as the weight edit)."""

    def __init__(self, layer: int, delta: Tensor):
        self.layer, self.delta = layer, delta

    def hooks(self, model=None) -> list[Hook]:
        slot: dict[str, Tensor] = {}

        def record(activation: Tensor, hook=None) -> Tensor:
            slot["key"] = activation
            return activation

        def add(activation: Tensor, hook=None) -> Tensor:
            delta = self.delta.to(activation.device, activation.dtype)
            return activation + slot.pop("key").to(activation.dtype) @ delta

        return [
            (hook_name("key", self.layer), record),
            (mlp_output_hook(model, self.layer), add),
        ]


def _sweep(
    model, edits: dict[int, Tensor], probe_f: Skill, probe_rs: Sequence[Skill], batch_size: int
):
    """Score each candidate layer's edit on the held-back examples. With several kept skills,
    ``retain``/``retain_base`` are those of the kept skill that keeps the smallest share of its
    base score at that layer (so ``choose_layer``'s floor holds for every kept skill), and each
    kept skill has its own ``retain[<name>]`` and ``retain_base[<name>]``."""

    def scored(skill: Skill, hooks: list[Hook]):
        return score_pass(model, skill, hooks, batch_size, quiet=True)[0]

    def share(after: float, before: float) -> float:
        return after / before if before > 0 else (1.0 if after >= before else 0.0)

    base_f = scored(probe_f, [])
    base_rs = [scored(probe_r, []) for probe_r in probe_rs]
    rows = []
    for layer, delta in edits.items():
        hooks = _Edit(layer, delta.float()).hooks()
        sf = scored(probe_f, hooks)
        srs = [scored(probe_r, hooks) for probe_r in probe_rs]
        worst = min(range(len(srs)), key=lambda i: (share(srs[i].score, base_rs[i].score), i))
        row = {
            "layer": layer,
            "forget": sf.score,
            "retain": srs[worst].score,
            "forget_base": base_f.score,
            "retain_base": base_rs[worst].score,
            "forget_nll": sf.mean_nll,
            "retain_nll": srs[worst].mean_nll,
            "delta_norm": float(delta.norm()),
            "n_probe_forget": len(probe_f),
            "n_probe_retain": len(probe_rs[worst]),
        }
        if len(probe_rs) > 1:
            row["worst_retain"] = probe_rs[worst].name
            for probe_r, sr, br in zip(probe_rs, srs, base_rs, strict=True):
                row[f"retain[{probe_r.name}]"] = sr.score
                row[f"retain_base[{probe_r.name}]"] = br.score
        rows.append(row)
    for row in rows:
        row["eligible"] = bool(row["retain"] >= RETAIN_FLOOR * row["retain_base"])
    return rows


# ---------------------------------------------------------------------------- the estimator
def _check_skill(name: str, skill: Any, hint: str) -> Skill:
    if not isinstance(skill, Skill):
        raise TypeError(
            f"{name} must be a Skill, got {type(skill).__name__}: wrap plain prompts with "
            f"Skill.from_texts({name!r}, prompts)."
        )
    if len(skill) == 0:
        raise ValueError(f"The {name} skill {skill.name!r} is empty: {hint}")
    return skill


def every_third_layer(model) -> list[int]:
    """A cheap candidate set for ``Lunar(layer="auto")``: layers 2, 5, 8, ... of ``model``.

    Each candidate costs two teacher-forced passes over the held-back examples, so
    ``Lunar(layer="auto")`` sweeps every third layer unless given ``candidates``.

    Example:
        >>> from mechunlearn.interventions.lunar import every_third_layer
        >>> every_third_layer(model), model.cfg.n_layers
        ([2], 3)
    """
    return list(range(2, n_layers(model), 3))


def _int_list(value: Any) -> list[int] | None:
    """``value`` as a list of ints if it is a non-empty sequence of integers, else None."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        return None
    if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in value):
        return None
    return [int(x) for x in value]


def _check_layer(layer: Any) -> str | int | list[int]:
    if layer == "auto" and isinstance(layer, str):
        return layer
    if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool):
        return int(layer)
    as_list = _int_list(layer)
    if as_list is None:
        raise ValueError(
            f"layer must be 'auto', an int or a non-empty list of ints, got {layer!r}."
        )
    return as_list


@register_method("LUNAR", fits_on="model", multi_retain=True)
class Lunar(HookIntervention):
    """LUNAR as a ``W_out`` edit, applied by hooks or in place (see the module docstring).

    Args:
        layer: the layer(s) whose ``W_out`` changes: an int, a list of ints (each layer is
            fitted independently on the unedited model, as the authors do), or ``"auto"``
            (chosen by a sweep on held-back examples; see :meth:`fit`). Negative counts from
            the end.
        coef: the redirection coefficient ``c`` (authors: 2.0); finite and non-zero.
        solver: ``"closed_form"`` (float64 normal equations) or ``"adam"`` (the authors'
            gradient route on the same objective).
        ridge: relative ridge: ``lam = ridge * trace(G) / d_mlp`` (> 0).
        epochs: epochs of the Adam route (authors: 20).
        lr: initial learning rate of the Adam route (authors: 0.01).
        seed: seed of the held-back split (``layer="auto"``) and of Adam's row order.
        candidates: the layers ``layer="auto"`` tries (None: every third layer,
            :func:`every_third_layer`; ``"all"`` is not a value: pass ``range(n_layers)``). The
            sweep costs two teacher-forced passes over the held-back examples per candidate
            (timings: ``docs/benchmarks.md``).

    Hooks: two per layer, sharing one slot. One records the key at
    ``blocks.{l}.mlp.hook_post``, the other adds ``key @ dW`` at ``blocks.{l}.mlp.hook_out``.
    They touch every position, BOS and padding included, exactly as the weight edit does. Any
    upstream change (e.g. Neuron Adjust at ``hook_pre``) is seen; list these hooks *after* any
    other hook that changes ``blocks.{l}.mlp.hook_post`` itself (e.g. Selective Pruning's), so
    that the recorded key is the one ``W_out`` multiplies.

    Attributes:
        layers_: the edited layers.
        d_mlp_: neurons per layer of the model it was fitted on.
        meta_: the model's name and shape, and the skills' names and sizes.
        direction_: ``{layer: r_l}``, float64 ``[d_model]`` (reference mean minus forget mean).
        delta_w_out_: ``{layer: dW}``, float32 ``[d_mlp, d_model]``: the edited weight is
            ``W_out + dW``.
        layer_sweep_: for ``layer="auto"``, one dict per candidate layer (``layer``,
            ``forget``/``retain`` accuracies with the redirection and ``*_base`` without, the
            NLLs, ``delta_norm``, ``eligible``); ``[]`` otherwise.
            ``pandas.DataFrame(lunar.layer_sweep_)`` makes it a table.
        fit_loss_: ``{layer: mean squared error after the edit}`` over all rows and
            ``d_model`` outputs.
        diagnostics_: one dict per edited layer: rows, ``ridge_lambda``, ``mse_before`` /
            ``mse_after``, ``forget_redirect`` (mean share of ``c r_l`` the forget rows
            receive; 1 is exact), ``objective`` (``mse_after`` plus the ridge penalty, what
            both solvers minimise), ``kept_shift`` (RMS change of the kept rows relative to
            ``|c r_l|``; 0 is exact), ``linear_check`` (``max |key @ W_out + b_out -
            mlp_out|`` relative; ~0 when the hooks reproduce the weight edit) and, for Adam,
            ``epoch_loss``.

    Example:
        >>> lunar = Lunar(layer=1).fit(model, forget, retain)
        >>> lunar.layers_, lunar.delta_w_out_[1].shape     # dW: [d_mlp, d_model]
        ([1], torch.Size([48, 32]))
        >>> logits = model.run_with_hooks(tokens, fwd_hooks=lunar.hooks(model))
    """

    _fitted_attrs = HookIntervention._fitted_attrs + ("direction_", "delta_w_out_")

    def __init__(
        self,
        layer: str | int | Sequence[int] = "auto",
        coef: float = 2.0,
        solver: str = "closed_form",
        ridge: float = 1e-4,
        epochs: int = 20,
        lr: float = 0.01,
        seed: int = 0,
        candidates: Sequence[int] | None = None,
    ):
        layer = _check_layer(layer)
        if isinstance(coef, bool) or not isinstance(coef, (int, float, np.number)):
            raise ValueError(f"coef must be a finite non-zero number, got {coef!r}.")
        if not math.isfinite(float(coef)) or float(coef) == 0.0:
            raise ValueError(f"coef must be a finite non-zero number, got {coef!r}.")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}.")
        check_positive("ridge", ridge)
        check_positive("lr", lr)
        self.layer = layer
        self.coef = float(coef)
        self.solver = solver
        self.ridge = float(ridge)
        self.epochs = check_int("epochs", epochs, min_val=1)
        self.lr = float(lr)
        self.seed = check_int("seed", seed, min_val=0, max_val=MAX_SEED)
        if candidates is not None:
            if layer != "auto":
                raise ValueError(
                    f"candidates only applies to layer='auto' (got layer={layer!r}): "
                    "drop candidates, or pass layer='auto'."
                )
            as_list = _int_list(candidates)
            if as_list is None:
                raise ValueError(
                    f"candidates must be None or a non-empty list of layers, got {candidates!r}."
                )
            candidates = as_list
        self.candidates = candidates

    # --------------------------------------------------------------------------------- fit
    def fit(
        self,
        model,
        forget: Skill,
        retain: Skill | Sequence[Skill],
        reference: Skill | None = None,
        *,
        batch_size: int = 16,
        held_out: float | int = 0.25,
    ) -> Lunar:
        """Compute the direction(s) and solve for ``dW``; the model is never changed.

        Args:
            model: a TransformerBridge or HookedTransformer.
            forget: the skill to unlearn (its prompts; its answers too for ``layer="auto"``).
            retain: the skill to keep (likewise), or a list of skills to keep: every one
                enters the normal equations as "unchanged" rows, and ``layer="auto"`` keeps
                every one at or above its floor (``RETAIN_FLOOR`` of its base score) on its
                held-back examples.
            reference: prompts the model declines to answer; None for
                :func:`reference_prompts`.
            batch_size: prompts per forward pass.
            held_out: for ``layer="auto"``: the fraction (or number) of the forget and the
                retain examples held back to score the candidate layers (the others give the
                sweep's directions). Ignored for a fixed layer.

        Returns:
            self.

        Raises:
            TypeError: a skill is not a Skill.
            ValueError: an empty skill, a layer out of range, too few examples to hold some
                back, or a zero direction.
        """
        forget = _check_skill("forget", forget, "pass the examples to unlearn.")
        retains = _retain_list(retain)
        for kept in retains:
            check_forget_retain(forget, kept, ("forget", "retain"), "examples")
        if reference is None:
            reference = reference_prompts()
        reference = _check_skill(
            "reference",
            reference,
            "pass prompts the model declines to answer, or reference=None for reference_prompts().",
        )
        check_int("batch_size", batch_size, min_val=1)
        width = d_mlp(model)
        candidates = self._candidates(model)
        if self.layer == "auto":
            for name, skill in (("forget", forget), *(("retain", kept) for kept in retains)):
                if not any(skill.answers):
                    raise ValueError(
                        f"layer='auto' scores held-back {name} examples on their answers "
                        f"(teacher-forced), but the {name} skill {skill.name!r} has none: "
                        "give it answers, or pass a fixed layer=<int>."
                    )
            fit_f, probe_f = _hold_out(forget, held_out, self.seed, "forget")
            halves_r = [_hold_out(kept, held_out, self.seed, "retain") for kept in retains]
        ref_mean = _pass(model, reference, batch_size, candidates) / len(reference)

        device = model_device(model)
        keep = self.solver == "adam"
        sweep: list[dict[str, Any]] = []
        if self.layer == "auto":
            # Each candidate's own closed-form edit, fitted on the fit parts and scored on the
            # held-back parts: a layer is chosen for what its edit does, to both skills.
            trial = {layer: _Normal.empty(width, device) for layer in candidates}
            sums_fit = _pass(model, fit_f, batch_size, candidates, trial, True)
            for fit_r, _ in halves_r:
                _pass(model, fit_r, batch_size, (), trial, False)
            sums_probe = _pass(model, probe_f, batch_size, candidates)
            sweep_dirs = ref_mean - sums_fit / len(fit_f)
            edits = {}
            for i, layer in enumerate(candidates):
                ne = trial.pop(layer)
                gram = ne.gram_f + ne.gram_k
                target = self.coef * sweep_dirs[i]
                edits[layer] = _closed_form(gram, ne.sum_f, target, _ridge_lambda(gram, self.ridge))
            sweep = _sweep(model, edits, probe_f, [probe for _, probe in halves_r], batch_size)
            layers = [choose_layer(sweep)]
            rows = [candidates.index(layers[0])]
            sums, ref_mean = (sums_fit + sums_probe)[rows], ref_mean[rows]
            normal = {layer: _Normal.empty(width, device) for layer in layers}
            _pass(model, forget, batch_size, (), normal, True, keep)
        else:
            layers = candidates
            normal = {layer: _Normal.empty(width, device) for layer in layers}
            sums = _pass(model, forget, batch_size, layers, normal, True, keep)
        directions = {layer: ref_mean[i] - sums[i] / len(forget) for i, layer in enumerate(layers)}
        for layer, r in directions.items():
            if not bool(torch.isfinite(r).all()):
                raise ValueError(
                    f"The direction at layer {layer} is not finite: check the model's dtype "
                    "(float16 overflows) and inputs."
                )
            if float(r.abs().max()) == 0.0:
                raise ValueError(
                    f"The direction at layer {layer} is zero: the reference prompts must differ "
                    "from the forget prompts."
                )
        for kept in retains:
            _pass(model, kept, batch_size, (), normal, False, keep)

        deltas, diagnostics, losses = {}, [], {}
        for layer in layers:
            ne = normal[layer]
            gram = ne.gram_f + ne.gram_k
            if not bool(torch.isfinite(gram).all()):
                raise ValueError(
                    f"Non-finite key values at layer {layer}: check the model's dtype "
                    "(float16 overflows) and inputs."
                )
            lam = _ridge_lambda(gram, self.ridge)
            if lam <= 0.0:
                raise ValueError(
                    f"Every key vector at layer {layer} is zero: choose another layer."
                )
            target = self.coef * directions[layer]
            history = None
            if self.solver == "closed_form":
                delta = _closed_form(gram, ne.sum_f, target, lam)
            else:
                delta, history = _adam(ne, target, lam, self.epochs, self.lr, self.seed)
            info = {"layer": layer, **_diagnostics(ne, delta, target, lam)}
            info["linear_check"] = None if ne.linear_error is None else float(ne.linear_error)
            if history is not None:
                info["epoch_loss"] = history
            diagnostics.append(info)
            losses[layer] = info["mse_after"]
            deltas[layer] = delta.float()
        _warn_nonlinear(diagnostics)

        # Everything is set at the end: an interrupted fit leaves the object as it was.
        self.layers_ = list(layers)
        self.d_mlp_ = width
        self.meta_ = {
            **model_keys(model_meta(model)),
            "forget": forget.name,
            "retain": ", ".join(kept.name for kept in retains),
            "reference": reference.name,
            "n_forget": len(forget),
            "n_retain": sum(len(kept) for kept in retains),
            "n_reference": len(reference),
        }
        self.direction_ = directions
        self.delta_w_out_ = deltas
        self.output_hooks_ = {layer: mlp_output_hook(model, layer) for layer in layers}
        self.layer_sweep_ = sweep
        self.fit_loss_ = losses
        self.diagnostics_ = diagnostics
        self._clear_cache()
        return self

    def _candidates(self, model) -> list[int]:
        if self.layer == "auto":
            if self.candidates is None:
                return every_third_layer(model)
            return resolve_layers(model, self.candidates)
        return resolve_layers(model, self.layer)

    # ------------------------------------------------------------------------------ hooks
    def _hook_tensors(self) -> dict[int, Tensor]:
        return self.delta_w_out_

    def _make_hooks(self, model=None) -> list[Hook]:
        """Two hooks per layer, sharing one slot: record ``hook_post``, add at the MLP's own
        output (:func:`~mechunlearn.sites.mlp_output_hook`: ``blocks.{l}.mlp.hook_out`` on a
        TransformerBridge, before any norm after the MLP, where ``W_out + dW`` acts; the hook
        point of the fitted model when ``model`` is not given).

        Positions: every position, BOS and padding included, exactly as the weight edit
        changes every position. The recorded key is ``hook_post`` after the hooks registered
        before this one at that site (and after any upstream change, such as Neuron Adjust at
        ``hook_pre``): list these hooks *after* any other hook that changes
        ``blocks.{l}.mlp.hook_post``, so that the key is the one ``W_out`` multiplies.
        """
        hooks: list[Hook] = []
        for layer in self.layers_:
            slot: dict[str, Tensor] = {}
            hooks.append((hook_name("key", layer), self._record(layer, slot)))
            if model is not None:
                out = mlp_output_hook(model, layer)
            else:
                out = getattr(self, "output_hooks_", {}).get(layer, hook_name("mlp_out", layer))
            hooks.append((out, self._add(layer, slot)))
        return hooks

    def _record(self, layer: int, slot: dict[str, Tensor]):
        name = hook_name("key", layer)

        def hook(activation: Float[Tensor, "... d_mlp"], hook=None) -> Tensor:
            self._check_width(activation, name)
            slot["key"] = activation
            return activation

        return hook

    def _add(self, layer: int, slot: dict[str, Tensor]):
        def hook(activation: Float[Tensor, "... d_model"], hook=None) -> Tensor:
            key = slot.pop("key", None)
            if key is None:
                raise RuntimeError(
                    f"Lunar's hook at the MLP output of layer {layer} ran without the key vector "
                    f"from {hook_name('key', layer)}: pass the whole list from hooks() together."
                )
            delta = self._on(activation.device, activation.dtype)[layer]
            return activation + key.to(activation.dtype) @ delta

        return hook

    # ----------------------------------------------------------------------- weight edit
    def apply_to_weights(self, model) -> WeightEdit:
        """Write ``W_out + dW`` into the model in place; returns the undo handle.

        Use it as a context manager: the original weights come back bit for bit when the
        block ends, even after an exception. Gives the same logits as :meth:`hooks`.

        Raises:
            ValueError: the model differs from the one this was fitted on.
            NotImplementedError: the model's ``W_out`` is not a view of its weight.

        Example:
            >>> base = model(tokens)
            >>> with lunar.apply_to_weights(model):
            ...     edited = model(tokens)
            >>> torch.equal(model(tokens), base), torch.equal(edited, base)   # undone on exit
            (True, False)
        """
        self.check_model(model)
        return edit_w_out(
            model,
            {
                layer: lambda w, d=self.delta_w_out_[layer]: w.add_(d.to(w.device, w.dtype))
                for layer in self.layers_
            },
        )

    # --------------------------------------------------------------------------- reports
    def _fitted_summary(self) -> str:
        return f"layers {self.layers_}, coef {self.coef}, solver {self.solver!r}"

    # ------------------------------------------------------------------------- save / load
    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {}
        for layer in self.layers_:
            tensors[f"direction.{layer}"] = self.direction_[layer]
            tensors[f"delta_w_out.{layer}"] = self.delta_w_out_[layer]
        info = {
            "layer_sweep": self.layer_sweep_,
            "fit_loss": {str(k): v for k, v in self.fit_loss_.items()},
            "diagnostics": self.diagnostics_,
            "output_hooks": {str(k): v for k, v in self.output_hooks_.items()},
        }
        return tensors, info

    def _set_state(self, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
        self.direction_ = {layer: tensors[f"direction.{layer}"] for layer in self.layers_}
        self.delta_w_out_ = {layer: tensors[f"delta_w_out.{layer}"] for layer in self.layers_}
        self.layer_sweep_ = list(info.get("layer_sweep", []))
        self.fit_loss_ = {int(k): float(v) for k, v in info.get("fit_loss", {}).items()}
        self.diagnostics_ = list(info.get("diagnostics", []))
        # Files saved before 0.3 name no hook point: blocks.L.hook_mlp_out, as then.
        hooks = info.get("output_hooks", {})
        self.output_hooks_ = {
            layer: hooks.get(str(layer), hook_name("mlp_out", layer)) for layer in self.layers_
        }


def _retain_list(retain: Any) -> list[Skill]:
    """The kept skills as a list: one Skill, or a non-empty list or tuple of them."""
    hint = "pass examples of a skill to keep (the edit must not move them)."
    if isinstance(retain, (list, tuple)):
        if not retain:
            raise ValueError(f"retain is an empty list: {hint}")
        kept = [_check_skill("retain", r, hint) for r in retain]
        names = [r.name for r in kept]
        if len(set(names)) != len(names):
            raise ValueError(f"retain names a skill twice: {names}.")
        return kept
    return [_check_skill("retain", retain, hint)]


def _hold_out(skill: Skill, held_out: float | int, seed: int, name: str) -> tuple[Skill, Skill]:
    try:
        return skill.split(held_out, seed=seed)
    except (TypeError, ValueError):
        raise ValueError(
            f"layer='auto' holds back held_out={held_out!r} of the {name} examples to choose "
            f"the layer, which does not split {len(skill)} examples into two non-empty parts: "
            "pass more examples, another held_out, or a fixed layer=<int>."
        ) from None


def _warn_nonlinear(diagnostics: list[dict[str, Any]]) -> None:
    bad = [d["layer"] for d in diagnostics if (d["linear_check"] or 0.0) > 1e-2]
    if bad:
        warnings.warn(
            f"At layers {bad}, the MLP's output is not hook_post @ W_out + b_out (a norm "
            "after the MLP?): Lunar.hooks() and apply_to_weights() will not agree there.",
            stacklevel=3,
        )
