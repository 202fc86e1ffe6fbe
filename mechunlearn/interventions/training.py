"""The training loop shared by every trained method: SIMU and the baselines GA, GradDiff, NPO, RMU.

One loop, :func:`train`, does what every trained unlearning method needs; what differs between
methods comes in as arguments:

* the **trained parameters** (``params``: named tensors of the model, trained in place; those
  the first step's loss does not reach are dropped);
* the **loss** (``loss_fn(batch_forget, batch_retain)``): the scalar to minimise and the named
  scalars to log (``forget_loss``, ``retain_loss``, ...), either as one ``(loss, terms)`` pair or
  as an iterable of such pairs, the **parts** of the loss (the forget part, then the retain
  part). Each part is differentiated as soon as it is computed and its graph freed before the
  next part's forward pass (its gradients added into the parameters' ``.grad`` in place), so a
  step holds one batch's activations and one set of gradients at a time, not both batches'
  activations (:func:`sum_parts` is the same loss as one scalar; a second-order step, which
  keeps the graphs anyway, differentiates that sum once);
* the **optimizer** (``make_optimizer(trained) -> torch.optim.Optimizer``, built after the first
  gradient, so that it sees the parameters that are really trained; masks, where a method has
  them, live in its optimizer, as in SIMU's :class:`~.simu.MaskedSophiaH`);
* an optional **early stop** (:class:`EarlyStop`), **second-order** steps (``second_order(opt)``:
  the gradients of this step keep their graph, for a Hessian-vector product) and a **finish**
  callback that turns the full weight deltas into the method's own form (SIMU keeps only the
  critical rows of ``W_out``).

What the loop does, for every method alike:

* one forget and one retain batch per step (:func:`epochs`: a new seeded permutation of each set
  per pass, padded on the right), ``max_steps`` steps at most;
* every parameter but the trained ones has ``requires_grad=False`` during training
  (:func:`frozen`), and the flags come back afterwards;
* a progress bar showing the logged terms;
* a non-finite loss or term stops it with a FloatingPointError naming the step (``not finite at
  step k``); so does an update that makes a trained weight NaN or infinite (an explosion), and
  weight deltas that overflow;
* the result is kept as **weight deltas** (trained minus original), and the model's trained
  parameters are written back from copies on every exit (finished, error, KeyboardInterrupt), so
  the model is left bit for bit as it was;
* the global RNG state is left as it was (``torch.random.fork_rng``) and seeded with ``seed``
  inside, so that a method's own randomness (SIMU's Hutchinson probes) is reproducible.

Example:
    >>> from mechunlearn.interventions.training import (
    ...     mean_answer_loss, tokenize_answers, train)
    >>> items_f = tokenize_answers(model, forget, None, "forget", "GA")
    >>> items_r = tokenize_answers(model, retain, None, "retain", "GA")
    >>> params = [(n, p) for n, p in model.named_parameters() if ".layers.2." in n]
    >>> def loss_fn(batch_f, batch_r):
    ...     loss_f = mean_answer_loss(model, batch_f)
    ...     return -loss_f, {"forget_loss": loss_f}
    >>> result = train(model, params, loss_fn, lambda t: torch.optim.AdamW(
    ...     [p for _, p in t], lr=1e-3), items_f, items_r, max_steps=3, batch_size=4,
    ...     seed=0, name="GA", quiet=True)
    >>> len(result.history), result.stop_reason, result.n_updates
    (3, 'max_steps', 3)
    >>> all(n in dict(params) for n in result.deltas)   # trained minus original, per parameter
    True
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..batching import EncodedBatch, forward, pad_batch, tokenize_examples
from ..data import Skill, special_token_flags
from ..models import model_device
from ..validation import check_forget_retain, check_int, check_positive, check_seed

__all__ = [
    "STOP_REASONS",
    "EarlyStop",
    "LossFn",
    "LossPart",
    "TrainResult",
    "answer_nll",
    "check_answer_skill",
    "check_disjoint",
    "check_forget_loss_factor",
    "check_loop_settings",
    "check_skills",
    "epochs",
    "example_answer_nll",
    "frozen",
    "grad_diff_parts",
    "mean_answer_loss",
    "sum_parts",
    "tokenize_answers",
    "train",
]

STOP_REASONS = ("max_steps", "forget_loss_target")
"""Why training stopped: it ran ``max_steps`` steps, or the forget loss reached its target."""

Items = Sequence[tuple[list[int], int]]
"""Tokenised examples: ``(token ids, number of head tokens = BOS + prompt)``."""

LossPart = tuple[Tensor, Mapping[str, Tensor]]
"""``(loss, {term: scalar})``: one part of a step's loss and the terms it logs."""

LossFn = Callable[[EncodedBatch, EncodedBatch], LossPart | Iterable[LossPart]]
"""``loss_fn(batch_forget, batch_retain)``: one :data:`LossPart`, or several, yielded one at a
time (each is differentiated before the next is computed)."""


# ------------------------------------------------------------------------------- losses
def answer_nll(
    logits: Float[Tensor, "batch pos vocab"], batch: EncodedBatch
) -> Float[Tensor, " batch"]:
    """Per row, the summed next-token cross-entropy of its answer tokens (float32 or float64).

    Position ``p`` predicts token ``p + 1``; only answer tokens are scored.

    Example:
        >>> from mechunlearn.batching import iter_batches
        >>> batch = next(iter(iter_batches(model, ["3+4="], ["7"])))
        >>> answer_nll(model(batch.tokens), batch).shape
        torch.Size([1])
    """
    mask = batch.answer_mask[:, 1:]
    row, pos = mask.nonzero(as_tuple=True)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    scored = logits[row, pos].to(dtype)
    target = batch.tokens[row, pos + 1]
    token_nll = F.cross_entropy(scored, target, reduction="none")
    out = torch.zeros(batch.tokens.shape[0], dtype=dtype, device=logits.device)
    return out.index_add(0, row, token_nll)


def mean_answer_loss(model, batch: EncodedBatch, fwd_hooks: Sequence = ()) -> Float[Tensor, ""]:
    """Mean next-token cross-entropy of the batch's answer tokens (``L_F`` or ``L_R``), with
    ``fwd_hooks`` attached (a hook method in place while an attack fine-tunes).

    Example:
        >>> from mechunlearn.batching import iter_batches
        >>> batch = next(iter(iter_batches(model, ["3+4="], ["7"])))
        >>> float(mean_answer_loss(model, batch).detach()) > 0
        True
    """
    logits = forward(model, batch, fwd_hooks)
    count = batch.answer_mask[:, 1:].sum().clamp(min=1)
    return answer_nll(logits, batch).sum() / count


def grad_diff_parts(
    model, batch_f: EncodedBatch, batch_r: EncodedBatch, gamma: float = 1.0
) -> Iterator[LossPart]:
    """GradDiff's loss ``-L_F + gamma * L_R`` of one step in two parts (:data:`LossFn`): ``-L_F``
    (logging ``forget_loss``), then ``gamma * L_R`` (logging ``retain_loss``). Here because SIMU
    minimises it too (SIMU is GradDiff with a neuron mask and a second-order optimizer).

    Example:
        >>> from mechunlearn.batching import iter_batches
        >>> batch_f = next(iter(iter_batches(model, forget.prompts, forget.answers)))
        >>> batch_r = next(iter(iter_batches(model, retain.prompts, retain.answers)))
        >>> [sorted(terms) for _, terms in grad_diff_parts(model, batch_f, batch_r)]
        [['forget_loss'], ['retain_loss']]
    """
    loss_f = mean_answer_loss(model, batch_f)
    yield -loss_f, {"forget_loss": loss_f}
    loss_r = mean_answer_loss(model, batch_r)
    yield gamma * loss_r, {"retain_loss": loss_r}


def sum_parts(parts: Iterable[LossPart]) -> tuple[Float[Tensor, ""], dict[str, Tensor]]:
    """A loss given as parts (:data:`LossFn`) as one scalar: the parts' sum, and their terms
    with ``"loss"`` (the sum) first.

    Example:
        >>> loss, terms = sum_parts([(torch.tensor(-2.0), {"forget_loss": torch.tensor(2.0)}),
        ...                          (torch.tensor(3.0), {"retain_loss": torch.tensor(1.5)})])
        >>> float(loss), sorted(terms)
        (1.0, ['forget_loss', 'loss', 'retain_loss'])
    """
    losses: list[Tensor] = []
    terms: dict[str, Tensor] = {}
    for loss, part_terms in parts:
        losses.append(loss)
        _merge_terms(terms, part_terms)
    if not losses:
        raise ValueError("The loss function yielded no part.")
    total = losses[0]
    for loss in losses[1:]:
        total = total + loss
    return total, {"loss": total, **terms}


def _merge_terms(terms: dict[str, Tensor], part_terms: Mapping[str, Tensor]) -> None:
    """Add one part's logged terms to ``terms`` (but ``"loss"``: the sum of the parts is
    logged as ``"loss"``); a name logged by two parts is a bug."""
    part_terms = {k: v for k, v in part_terms.items() if k != "loss"}
    twice = sorted(set(terms) & set(part_terms))
    if twice:
        raise ValueError(f"Two parts of the loss log the same terms {twice}.")
    terms.update(part_terms)


@torch.no_grad()
def example_answer_nll(
    model, items: Items, batch_size: int = 8
) -> tuple[Float[Tensor, " example"], list[int]]:
    """Per example, the summed answer-token cross-entropy on the model as it is (float32), and
    its number of answer tokens. The reference for NPO and the initial loss for early stops.

    Example:
        >>> items = tokenize_answers(model, forget[:3], None, "forget", "NPO")
        >>> nll, n_tokens = example_answer_nll(model, items)
        >>> nll.shape, n_tokens
        (torch.Size([3]), [1, 1, 1])
    """
    device = model_device(model)
    out = torch.zeros(len(items), dtype=torch.float32, device=device)
    for start in range(0, len(items), batch_size):
        index = list(range(start, min(start + batch_size, len(items))))
        batch = pad_batch(model, [items[i] for i in index], index).to(device)
        out[start : start + len(index)] = answer_nll(forward(model, batch), batch).float()
    return out, [len(ids) - n_head for ids, n_head in items]


# --------------------------------------------------------------------------------- inputs
def check_answer_skill(skill: Any, role: str, name: str) -> Skill:
    """``skill`` if it is a non-empty :class:`~mechunlearn.data.Skill`, else a one-line error.

    Raises:
        TypeError: not a Skill. ValueError: no examples.
    """
    if not isinstance(skill, Skill):
        raise TypeError(
            f"{role} must be a Skill with answers ({name}'s losses are on the answer tokens), "
            f"got {type(skill).__name__}: use mu.load_skill(...) or Skill.from_texts(name, "
            "prompts, answers)."
        )
    if len(skill) == 0:
        raise ValueError(f"The {role} skill {skill.name!r} has no examples.")
    return skill


def check_skills(forget: Any, retain: Any, name: str) -> tuple[Skill, Skill]:
    """The forget and retain skills of a trained method's fit, checked: each a non-empty
    :class:`~mechunlearn.data.Skill` (:func:`check_answer_skill`), and no example in both.

    Example:
        >>> check_skills(forget, retain, "GA") == (forget, retain)
        True

    Raises:
        TypeError: a skill is not a Skill. ValueError: an empty skill, or shared examples.
    """
    forget = check_answer_skill(forget, "forget", name)
    retain = check_answer_skill(retain, "retain", name)
    check_forget_retain(forget, retain, ("forget", "retain"), "examples")
    return forget, retain


def check_loop_settings(max_steps: Any, batch_size: Any, max_length: Any, seed: Any) -> None:
    """Check the constructor settings that every trained method passes to :func:`train`:
    ``max_steps`` and ``batch_size`` (ints >= 1), ``max_length`` (None or an int >= 2) and
    ``seed``.

    Example:
        >>> check_loop_settings(max_steps=30, batch_size=8, max_length=None, seed=0)
        >>> check_loop_settings(max_steps=30, batch_size=0, max_length=None, seed=0)
        Traceback (most recent call last):
        ValueError: batch_size must lie in [1, inf], got 0.

    Raises:
        ValueError: a setting out of range (the message names it).
    """
    check_int("max_steps", max_steps, min_val=1)
    check_int("batch_size", batch_size, min_val=1)
    if max_length is not None:
        check_int("max_length", max_length, min_val=2)
    check_seed(seed)


def check_forget_loss_factor(factor: Any) -> None:
    """Check the :class:`EarlyStop` multiple a method's constructor takes: None (no early
    stop) or a finite number > 1.

    Example:
        >>> check_forget_loss_factor(1.0)
        Traceback (most recent call last):
        ValueError: forget_loss_factor must be > 1 (a multiple of the initial forget loss) ...

    Raises:
        ValueError: not None and not a finite number > 1.
    """
    if factor is not None:
        check_positive("forget_loss_factor", factor)
        if float(factor) <= 1.0:
            raise ValueError(
                "forget_loss_factor must be > 1 (a multiple of the initial forget loss) or "
                f"None, got {factor!r}."
            )


def tokenize_answers(model, skill: Skill, max_length: int | None, role: str, name: str) -> Items:
    """Tokenised examples of ``skill``; raise if none has an answer token.

    Raises:
        ValueError: no example has an answer token.
    """
    items = tokenize_examples(
        model, skill.prompts, skill.answers, max_length, special_tokens=special_token_flags(skill)
    )
    if not any(len(ids) > n_head for ids, n_head in items):
        raise ValueError(
            f"The {role} skill {skill.name!r} has no answer tokens: {name}'s losses are on the "
            "answers, so give its examples answers."
        )
    return items


def epochs(n: int, batch_size: int, gen: torch.Generator) -> Iterator[list[int]]:
    """Batches of example indices, a new permutation on every pass, forever.

    Example:
        >>> it = epochs(5, 2, torch.Generator().manual_seed(0))
        >>> sorted(sum([next(it) for _ in range(3)], []))
        [0, 1, 2, 3, 4]
    """
    while True:
        order = torch.randperm(n, generator=gen).tolist()
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]


# ------------------------------------------------------------------------------ parameters
@contextlib.contextmanager
def frozen(model, trainable: Sequence[Tensor] = ()) -> Iterator[None]:
    """``requires_grad`` off for every parameter but ``trainable``; the flags come back on exit."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def check_disjoint(params: Sequence[tuple[str, Tensor]], name: str = "SIMU") -> None:
    """Raise if two trained parameters share memory (their updates would add up)."""
    groups: dict[int, list[tuple[str, Tensor]]] = {}
    for pname, p in params:
        groups.setdefault(p.untyped_storage().data_ptr(), []).append((pname, p))
    for group in groups.values():
        if len(group) < 2:
            continue
        base = group[0][1]
        count = torch.zeros(
            base.untyped_storage().nbytes() // base.element_size(), device=base.device
        )
        for _, p in group:
            count.as_strided(p.shape, p.stride(), p.storage_offset()).add_(1.0)
        if bool((count > 1).any()):
            names = [n for n, _ in group]
            raise NotImplementedError(
                f"The parameters {names} share memory and all receive gradients, so {name} "
                "cannot train them independently."
            )


def _double_backward_ok(device: torch.device, needed: bool):
    """On CUDA, the math attention kernel (the fused ones have no double backward)."""
    if not needed or device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


# ------------------------------------------------------------------------------------ loop
@dataclass
class EarlyStop:
    """Stop once a step's ``key`` term reaches ``factor`` times the initial loss of the same
    forget examples (their summed answer-token loss over their answer-token count, before
    training). The initial loss is logged as ``"{key}_initial"`` even with ``factor=None``.

    Attributes:
        factor: the multiple (> 1), or None never to stop early.
        example_nll: per forget example, its summed answer-token loss before training.
        example_tokens: per forget example, its number of answer tokens.
        key: the logged term compared (``"forget_loss"``).
    """

    factor: float | None
    example_nll: Sequence[float]
    example_tokens: Sequence[int]
    key: str = "forget_loss"

    def initial(self, index: Sequence[int]) -> float:
        """The examples' mean answer-token loss before training."""
        return sum(self.example_nll[i] for i in index) / max(
            1, sum(self.example_tokens[i] for i in index)
        )

    def reached(self, record: Mapping[str, float]) -> bool:
        """Whether this step's record meets the target."""
        return (
            self.factor is not None
            and record[self.key] >= self.factor * (record[f"{self.key}_initial"])
        )


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        deltas: ``{name: trained - original}`` per trained parameter (or the ``finish``
            callback's form).
        history: one dict per step, the logged terms measured before that step's update (and
            the early stop's ``"{key}_initial"``).
        stop_reason: one of :data:`STOP_REASONS`.
    """

    deltas: dict[str, Tensor]
    history: list[dict[str, float]]
    stop_reason: str

    @property
    def n_updates(self) -> int:
        """Optimizer updates applied (the early-stopping step measures but does not update)."""
        return len(self.history) - (self.stop_reason == "forget_loss_target")


def train(
    model,
    params: Sequence[tuple[str, Tensor]],
    loss_fn: LossFn,
    make_optimizer: Callable[[list[tuple[str, Tensor]]], torch.optim.Optimizer],
    forget: Items,
    retain: Items,
    *,
    max_steps: int,
    batch_size: int,
    seed: int,
    name: str,
    hint: str = "lower lr",
    early_stop: EarlyStop | None = None,
    second_order: Callable[[torch.optim.Optimizer | None], bool] | None = None,
    finish: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
    quiet: bool = False,
) -> TrainResult:
    """Train ``params`` in place on ``loss_fn``, keep the result as deltas, restore the model.

    See the module docstring for what every step does.

    Args:
        model: a TransformerBridge or HookedTransformer.
        params: ``(name, tensor)`` of the parameters that may be trained (leaf tensors of the
            model); those the first step's loss does not reach are left out.
        loss_fn: ``loss_fn(batch_forget, batch_retain)``: ``(loss, terms)``, the scalar to
            minimise and the named scalars to log (float32 or wider), or an iterable of such
            parts, each differentiated before the next is computed (:data:`LossFn`).
        make_optimizer: builds the optimizer from the trained ``(name, tensor)`` list.
        forget, retain: tokenised examples (:func:`tokenize_answers`).
        max_steps: steps at most.
        batch_size: examples per batch (each of the two batches of a step).
        seed: seed of the batch order, and of the RNG inside the loop.
        name: the method's name, for the progress bar and the messages.
        hint: what to try after a non-finite loss (``"lower lr (now 0.02)"``).
        early_stop: the early-stop rule, or None.
        second_order: ``second_order(opt)`` (``opt`` None at the first step): whether this
            step's gradients keep their graph (``create_graph=True``), for an optimizer that
            takes a Hessian-vector product from ``p.grad``.
        finish: turns the deltas ``{name: trained - original}`` into the kept form; it runs
            while the model still holds the trained weights.
        quiet: hide the progress bar.

    Returns:
        The deltas, the history and the stop reason.

    Raises:
        ValueError: no gradient reaches the parameters.
        NotImplementedError: two trained parameters share memory.
        FloatingPointError: a non-finite loss or term, an update that makes a trained weight
            NaN or infinite, or overflowing deltas (the step is named; the model is restored).
    """
    device = model_device(model)
    if not params:
        raise ValueError(f"{name} has no parameters to train.")
    watched = {id(p): p for _, p in params}
    originals = {key: p.detach().clone() for key, p in watched.items()}
    gen = torch.Generator().manual_seed(seed)
    batches_f = epochs(len(forget), batch_size, gen)
    batches_r = epochs(len(retain), batch_size, gen)
    history: list[dict[str, float]] = []
    reason = "max_steps"
    devices = [device.index or 0] if device.type == "cuda" else []
    bar = tqdm(total=max_steps, desc=f"{name} unlearning", disable=quiet)
    try:
        with frozen(model, list(watched.values())), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            opt: torch.optim.Optimizer | None = None
            trained: list[tuple[str, Tensor]] = []
            for step in range(max_steps):
                idx_f, idx_r = next(batches_f), next(batches_r)
                batch_f = pad_batch(model, [forget[i] for i in idx_f], idx_f).to(device)
                batch_r = pad_batch(model, [retain[i] for i in idx_r], idx_r).to(device)
                create_graph = second_order is not None and second_order(opt)
                with torch.enable_grad(), _double_backward_ok(device, create_graph):
                    loss, terms, grads = _step_gradients(
                        loss_fn(batch_f, batch_r), [p for _, p in (trained or params)],
                        create_graph,
                    )  # fmt: skip
                values, record = _record(loss, terms, early_stop, idx_f)
                history.append(record)
                bar.set_postfix(
                    {k.removesuffix("_loss"): f"{v:.3f}" for k, v in record.items()
                     if not k.endswith("_initial")}
                )  # fmt: skip
                _check_finite(values, record, name, step, hint)
                if early_stop is not None and early_stop.reached(record):
                    reason = "forget_loss_target"
                    break
                if opt is None:  # train what the loss reaches (GPT-2 bridges alias q/k/v)
                    trained, grads = _reached(params, grads, name)
                    opt = make_optimizer(trained)
                _update(opt, trained, grads, name, step, hint)
                bar.update()
            deltas = _kept_deltas(trained, originals, finish, name, len(history) - 1, hint)
    finally:
        bar.close()
        with torch.no_grad():
            for key, p in watched.items():
                p.grad = None
                p.copy_(originals[key])
    return TrainResult(deltas, history, reason)


def _step_gradients(
    out: LossPart | Iterable[LossPart], targets: list[Tensor], create_graph: bool
) -> tuple[Tensor, dict[str, Tensor], list[Tensor | None]]:
    """One step's loss and gradients, part by part.

    Without ``create_graph``, each part is back-propagated into the targets' ``.grad`` as
    soon as it is computed (``torch.autograd.backward(..., inputs=targets)``, which adds in
    place, parameter by parameter), so its graph is freed before the next part's forward pass
    and one set of gradients is held. A Hessian step (``create_graph``) keeps every part's
    graph for the Hessian-vector product anyway: its parts are summed and differentiated once.

    Args:
        out: what the loss function returned: one ``(loss, terms)`` part or an iterable of them.
        targets: the tensors to differentiate (leaves; their ``.grad`` is cleared first and
            after).
        create_graph: keep the gradients' graph (a second-order step).

    Returns:
        The loss (detached), the logged terms (``"loss"`` first; a part's own ``"loss"`` term
        is dropped) and each target's gradient (None where no part reaches it).
    """
    parts = [out] if isinstance(out, tuple) and isinstance(out[0], Tensor) else out
    if create_graph:
        loss, terms = sum_parts(parts)
        grads = torch.autograd.grad(loss, targets, create_graph=True, allow_unused=True)
        return loss.detach(), {**terms, "loss": loss.detach()}, list(grads)
    total: Tensor | None = None
    terms: dict[str, Tensor] = {}
    for p in targets:
        p.grad = None  # a gradient left from before would be added to
    try:
        for loss, part_terms in parts:
            _merge_terms(terms, part_terms)
            total = loss.detach() if total is None else total + loss.detach()
            if loss.requires_grad:
                torch.autograd.backward(loss, inputs=targets)
        grads = [p.grad for p in targets]
    finally:
        for p in targets:
            p.grad = None  # the update hands them back (:func:`_update`)
    if total is None:
        raise ValueError("The loss function yielded no part.")
    return total, {"loss": total, **terms}, grads


def _record(
    loss: Tensor, terms: Mapping[str, Tensor], early_stop: EarlyStop | None, idx_f: list[int]
) -> tuple[list[float], dict[str, float]]:
    """A step's values (the loss, then the terms), read in one host synchronisation, and its
    history record: the named terms and the early-stop rule's initial value of the batch."""
    values = torch.stack(
        [t.detach().double() for t in (loss, *terms.values())]
    ).tolist()  # one host synchronisation per step
    record = dict(zip(terms, values[1:], strict=True))
    if early_stop is not None:
        record[f"{early_stop.key}_initial"] = early_stop.initial(idx_f)
    return values, record


def _check_finite(
    values: Sequence[float], record: Mapping[str, float], name: str, step: int, hint: str
) -> None:
    """Raise a FloatingPointError naming the step where the loss or a term is not finite."""
    if not all(math.isfinite(v) for v in values):
        shown = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in record.items()
                          if not k.endswith("_initial"))  # fmt: skip
        raise FloatingPointError(
            f"{name}'s loss is not finite at step {step} (after {step} updates): "
            f"loss {values[0]}; {shown}. The model's weights were restored; "
            f"{hint}."
        )


def _reached(
    params: Sequence[tuple[str, Tensor]], grads: Sequence[Tensor | None], name: str
) -> tuple[list[tuple[str, Tensor]], list[Tensor]]:
    """The parameters the first step's loss reaches, and their gradients.

    Raises:
        ValueError: no gradient reaches the parameters.
        NotImplementedError: two of them share memory.
    """
    trained = [c for c, g in zip(params, grads, strict=True) if g is not None]
    grads = [g for g in grads if g is not None]
    if not trained:
        raise ValueError(f"No gradient reached the parameters {name} trains.")
    check_disjoint(trained, name)
    return trained, grads


def _update(
    opt: torch.optim.Optimizer,
    trained: Sequence[tuple[str, Tensor]],
    grads: Sequence[Tensor],
    name: str,
    step: int,
    hint: str,
) -> None:
    """One optimizer step on ``trained`` with ``grads``.

    Raises:
        FloatingPointError: the update makes a trained weight NaN or infinite.
    """
    for (_, p), g in zip(trained, grads, strict=True):
        p.grad = g
    opt.step()
    opt.zero_grad(set_to_none=True)
    bad = [n for n, p in trained if not bool(torch.isfinite(p).all())]
    if bad:
        raise FloatingPointError(
            f"{name} stopped: non-finite at step {step}: its update made "
            f"{', '.join(bad)} NaN or infinite. The model's weights were "
            f"restored and nothing was kept; {hint}."
        )


def _kept_deltas(
    trained: Sequence[tuple[str, Tensor]],
    originals: dict[int, Tensor],
    finish: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None,
    name: str,
    last_step: int,
    hint: str,
) -> dict[str, Tensor]:
    """``{name: trained - original}``, turned into the kept form by ``finish``; run while the
    model still holds the trained weights.

    Raises:
        FloatingPointError: a delta overflows.
    """
    deltas = {n: p.detach() - originals[id(p)] for n, p in trained}
    if finish is not None:
        deltas = finish(deltas)
    bad = [n for n, d in deltas.items() if not bool(torch.isfinite(d).all())]
    if bad:
        raise FloatingPointError(
            f"{name} stopped: non-finite at step {last_step}: the weight deltas "
            f"of {', '.join(bad)} overflow. The model's weights were restored and "
            f"nothing was kept; {hint}."
        )
    return deltas
