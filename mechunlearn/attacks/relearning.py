"""Relearning: how much of the forget skill a few fine-tuning steps bring back.

The model is fine-tuned for ``k`` steps (default ``k`` in :data:`STEPS` = 1, 5, 20; one run,
scored after each ``k``) on solved forget examples that are *not* among the scored ones, with
the method in place, as its kind says:

* a :class:`~mechunlearn.interventions.HookIntervention`: its hooks are attached during every
  fine-tuning forward pass and during scoring;
* a :class:`~mechunlearn.interventions.WeightIntervention`: the model is fine-tuned inside
  ``apply_to_weights`` (starting from the edited weights) and scored there;
* a :class:`~mechunlearn.interventions.Detector`: it stays as fitted; the model is fine-tuned
  (bare) and scored with the same detector watching the fine-tuned model.

The bare model fine-tuned the same way (same examples, same order, same optimizer) is the
reference (``base_attacked``). As a control, the same attack can train on a different skill
(``control``): recovery there means the method is fragile to any fine-tuning, not to the forget
skill's examples.

**Recovery** of a scored skill is ``(after attack - after unlearning) / (base - after
unlearning)``: 0 when the attack brings nothing back, 1 when the skill is back at the bare
model's score (above 1: better than before). Its interval is a paired bootstrap over the scored
examples (:func:`recovery_interval`). Where unlearning changed nothing (base equal to after
unlearning, e.g. a kept skill) the ratio is undefined (NaN).

Optimizer: ``torch.optim.AdamW`` over every parameter of the model; loss: the mean
cross-entropy of the answer tokens (the trained methods' ``mean_answer_loss``), batches
of ``batch_size`` examples in a seeded order (``training.epochs``).

**Memory.** The model is fine-tuned in place inside :func:`weights_restored`, which keeps one
copy of every parameter and buffer (on the CPU by default, ``offload=True``) and writes it back
bit for bit on exit, even after an exception; AdamW adds two more copies and the gradients one,
on the model's device. For the default model (135 M parameters, float32) that is about 0.5 GB
of CPU memory and 1.6 GB beside the model on its device: less than a deep copy of the model
plus its optimizer, and the hooks stay attached to the model they were fitted on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..batching import pad_batch
from ..data import Skill
from ..evaluation import abstentions, applied, teacher_forced
from ..interventions.base import Detector, WeightIntervention
from ..interventions.registry import kind_of
from ..interventions.training import epochs, frozen, mean_answer_loss, tokenize_answers
from ..kernels.bootstrap import N_BOOT, _check_level, _percentiles, paired_arrays, resampled_sums
from ..models import model_device, model_meta
from ..scoring import ExampleScores
from ..validation import check_int, check_positive, check_seed

__all__ = ["STEPS", "finetune", "recovery_interval", "relearning", "weights_restored"]

#: Fine-tuning steps after which the attacked model is scored (one run, cumulative).
STEPS: tuple[int, ...] = (1, 5, 20)


@contextlib.contextmanager
def weights_restored(model, offload: bool = True) -> Iterator[None]:
    """Run the block, then write every parameter and buffer of ``model`` back bit for bit.

    Also restores each parameter's ``requires_grad`` flag and ``.grad``, and the model's
    train/eval mode, on any exit (finished, exception, KeyboardInterrupt).

    Args:
        model: the model.
        offload: keep the snapshot on the CPU (else on the model's device).

    Example:
        >>> from mechunlearn.attacks import weights_restored
        >>> before = model(tokens)
        >>> with weights_restored(model):
        ...     with torch.no_grad():
        ...         _ = model.blocks[0].mlp.W_out.mul_(0.0)
        >>> torch.equal(model(tokens), before)
        True
    """
    tensors = list(model.parameters()) + list(model.buffers())
    saved = [t.detach().to("cpu" if offload else t.device, copy=True) for t in tensors]
    grads = [getattr(t, "grad", None) for t in tensors]
    flags = [t.requires_grad for t in tensors]
    training = model.training
    try:
        yield
    finally:
        with torch.no_grad():
            for t, s, g, f in zip(tensors, saved, grads, flags, strict=True):
                t.copy_(s)
                t.grad = g
                t.requires_grad_(f)
        model.train(training)


def finetune(
    model,
    train: Skill,
    steps: int,
    fwd_hooks: Sequence = (),
    lr: float = 1e-4,
    batch_size: int = 8,
    weight_decay: float = 0.0,
    seed: int = 0,
    callback: Callable[[int], Any] | None = None,
    quiet: bool = True,
) -> list[float]:
    """Fine-tune ``model`` **in place** for ``steps`` AdamW steps on ``train``'s answer tokens.

    Wrap the call in :func:`weights_restored` to get the weights back. Every parameter is
    trained (``requires_grad`` flags restored on exit); ``fwd_hooks`` are attached to every
    forward pass (a hook method's hooks: the gradient flows through them).

    Args:
        model: the model.
        train: solved examples (prompt and answer).
        steps: optimizer steps.
        fwd_hooks: hooks attached during fine-tuning.
        lr: AdamW's learning rate.
        batch_size: examples per step (a new seeded permutation of ``train`` on every pass).
        weight_decay: AdamW's weight decay.
        seed: the batch order.
        callback: called as ``callback(step)`` after each step (1-based), outside autograd.
        quiet: hide the progress bar.

    Returns:
        The loss of each step (before its update).

    Example:
        >>> from mechunlearn.attacks import finetune, weights_restored
        >>> with weights_restored(model):
        ...     losses = finetune(model, forget, steps=3, lr=1e-2, batch_size=30)
        >>> len(losses), losses[-1] < losses[0]
        (3, True)
    """
    steps = check_int("steps", steps, min_val=1)
    batch_size = check_int("batch_size", batch_size, min_val=1)
    lr = check_positive("lr", lr)
    seed = check_seed(seed)
    items = tokenize_answers(model, train, None, "fine-tuning", "fine-tuning")
    device = model_device(model)
    params = [p for p in model.parameters() if p.is_floating_point()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=float(weight_decay))
    order = epochs(len(items), batch_size, torch.Generator().manual_seed(seed))
    losses: list[float] = []
    with frozen(model, params):
        for step in tqdm(range(1, steps + 1), desc=f"fine-tune {train.name}", disable=quiet):
            idx = next(order)
            batch = pad_batch(model, [items[i] for i in idx], idx).to(device)
            with torch.enable_grad():
                loss = mean_answer_loss(model, batch, fwd_hooks)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"The fine-tuning loss is not finite at step {step}: lower lr (now {lr})."
                )
            optimizer.step()
            losses.append(value)
            if callback is not None:
                callback(step)
    optimizer.zero_grad(set_to_none=True)
    return losses


def recovery_interval(
    attacked, unlearned, base, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of ``(attacked - unlearned) / (base - unlearned)`` under a paired
    bootstrap over examples (the same draws for the three, so each example's difficulty
    cancels; the totals cancel too, as all three score the same examples).

    Args:
        attacked, unlearned, base: per example, the correct count (abstentions zeroed).
        n_boot: resamples; seed: their seed; level: the coverage.

    Returns:
        ``(low, high)``; resamples where ``base == unlearned`` are left out (NaN if all are).

    Example:
        >>> from mechunlearn.attacks import recovery_interval
        >>> low, high = recovery_interval(np.r_[np.ones(5), np.zeros(5)], np.zeros(10),
        ...                               np.ones(10))
        >>> 0.1 < low < 0.5 < high < 0.9
        True
    """
    a, u, b = paired_arrays({"attacked": attacked, "unlearned": unlearned, "base": base})
    _check_level(level)
    sa, su, sb = resampled_sums(a, u, b, n_boot=n_boot, seed=seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _percentiles((sa - su) / (sb - su), level)


def _recovery(attacked: ExampleScores, unlearned: ExampleScores, base: ExampleScores) -> float:
    gap = base.score - unlearned.score
    return (attacked.score - unlearned.score) / gap if gap else math.nan


def _check_disjoint(train: Skill, scored: Mapping[str, Skill], what: str) -> None:
    prompts = set(train.prompts)
    for name, skill in scored.items():
        shared = prompts.intersection(skill.prompts)
        if shared:
            raise ValueError(
                f"The {what} examples share {len(shared)} prompts with the scored skill "
                f"{name!r} (e.g. {next(iter(shared))!r}): fine-tune on examples the score does "
                "not use (the probe half)."
            )


def relearning(
    model,
    interventions: Mapping[str, Any],
    train: Skill,
    scored: Skill | Sequence[Skill] | Mapping[str, Skill],
    roles: Mapping[str, str] | None = None,
    control: Skill | None = None,
    steps: Sequence[int] = STEPS,
    lr: float = 1e-4,
    batch_size: int = 8,
    seed: int = 0,
    n_boot: int = N_BOOT,
    level: float = 0.95,
    offload: bool = True,
    quiet: bool = False,
    store: MutableMapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Fine-tune with each method in place and measure what comes back (module docstring).

    One fine-tuning run per training set for the bare model (which also scores every detector:
    a detector's model is fine-tuned bare) and one per output-changing method, each scored after
    every ``k`` of ``steps``. The model's weights are restored bit for bit after each run
    (:func:`weights_restored`), also after an exception. With a ``store``, the scores of every
    finished run are kept there and a later call with the same settings skips that run (resume
    after a kill; e.g. a :class:`~mechunlearn.io.JsonStore`).

    Args:
        model: the model.
        interventions: ``{method name: fitted intervention}``.
        train: solved forget examples to fine-tune on, disjoint from every scored skill.
        scored: the held-out skills (the forget skill and the kept ones).
        roles: ``{scored skill name: role}`` (``"forget"``, ``"retain"``, ...).
        control: another skill to fine-tune on as a control (rows with ``train_on
            "control"``), disjoint from the scored ones; None for none.
        steps: the step counts to score after (one run up to the largest).
        lr, batch_size, seed: the fine-tuning's (:func:`finetune`).
        n_boot, level: the recovery interval's bootstrap.
        offload: keep the weight snapshot on the CPU.
        quiet: hide the progress bars.
        store: a mapping that keeps finished runs' scores (JSON values; other settings or
            skills than the stored ones clear it); None for none.

    Returns:
        One row per training set, method, step count and scored skill: ``train_on,
        train_skill, method, kind, steps, skill, role, base, unlearned, base_attacked,
        attacked, recovery, recovery_low, recovery_high, relative_attacked`` (``attacked /
        base_attacked``), ``n``.

    Raises:
        ValueError: training examples among the scored ones, or bad step counts.

    Example:
        >>> from mechunlearn.attacks import relearning
        >>> t = relearning(model, {"SP": sp, "KSD": ksd}, forget[15:], [forget[:15], retain[:8]],
        ...                steps=[1, 2], quiet=True, n_boot=200)
        >>> len(t), sorted(set(t["method"]))     # 2 methods x 2 step counts x 2 skills
        (8, ['KSD', 'SP'])
    """
    if isinstance(scored, Skill):
        scored = [scored]
    scored = dict(scored) if isinstance(scored, Mapping) else {s.name: s for s in scored}
    roles = dict(roles or {})
    steps = sorted({check_int("steps", k, min_val=1) for k in steps})
    if not steps:
        raise ValueError("steps is empty: give at least one step count, e.g. (1, 5, 20).")
    runs = {"forget": train} if control is None else {"forget": train, "control": control}
    for what, skill in runs.items():
        _check_disjoint(skill, scored, f"{what} fine-tuning")
    detectors = {m: iv for m, iv in interventions.items() if isinstance(iv, Detector)}
    changing = {m: iv for m, iv in interventions.items() if m not in detectors}
    bs = max(batch_size, 16)

    kept = _Scores(store, model, interventions, runs, scored, steps, lr, batch_size, seed)

    def score(iv) -> dict[str, ExampleScores]:
        return {n: teacher_forced(model, s, iv, bs) for n, s in scored.items()}

    base = kept.get_or_make(("base",), lambda: score(None))
    unlearned = {
        m: kept.get_or_make(("unlearned", m), lambda iv=iv: score(iv))
        for m, iv in interventions.items()
    }
    attacked: dict[tuple[str, str, int], dict[str, ExampleScores]] = {}
    fit = {"lr": lr, "batch_size": batch_size, "seed": seed, "quiet": quiet}
    bar = tqdm(total=len(runs) * (1 + len(changing)), desc="relearning", disable=quiet)
    for what, skill in runs.items():
        bare_run = [(what, m, k) for m in ("base", *detectors) for k in steps]
        if not kept.load(bare_run, attacked):

            def record_base(step: int, what=what) -> None:
                bare = score(None)
                attacked[(what, "base", step)] = bare
                for m, det in detectors.items():
                    attacked[(what, m, step)] = {
                        n: dataclasses.replace(
                            s, abstained=abstentions(model, det, scored[n].prompts, bs)
                        )
                        for n, s in bare.items()
                    }

            with weights_restored(model, offload):
                finetune(model, skill, steps[-1], callback=_at(steps, record_base), **fit)
            kept.save(bare_run, attacked)
        bar.update()
        for m, iv in changing.items():
            run = [(what, m, k) for k in steps]
            if kept.load(run, attacked):
                bar.update()
                continue
            scorer = None if isinstance(iv, WeightIntervention) else iv

            def record(step: int, what=what, m=m, scorer=scorer) -> None:
                attacked[(what, m, step)] = score(scorer)

            with weights_restored(model, offload), applied(model, iv) as hooks:
                finetune(model, skill, steps[-1], hooks, callback=_at(steps, record), **fit)
            kept.save(run, attacked)
            bar.update()
    bar.close()
    rows = []
    for what, skill in runs.items():
        for m, iv in interventions.items():
            for k in steps:
                for n in scored:
                    a, u, b = attacked[(what, m, k)][n], unlearned[m][n], base[n]
                    ref = attacked[(what, "base", k)][n]
                    low, high = recovery_interval(a.counted, u.counted, b.counted, n_boot, seed,
                                                  level)  # fmt: skip
                    rows.append(
                        {
                            "train_on": what, "train_skill": skill.name, "method": m,
                            "kind": kind_of(type(iv)), "steps": k, "skill": n,
                            "role": roles.get(n), "base": b.score, "unlearned": u.score,
                            "base_attacked": ref.score, "attacked": a.score,
                            "recovery": _recovery(a, u, b), "recovery_low": low,
                            "recovery_high": high,
                            "relative_attacked": a.score / ref.score if ref.score else math.nan,
                            "n": len(scored[n]),
                        }
                    )  # fmt: skip
    return pd.DataFrame(rows)


class _Scores:
    """:func:`relearning`'s finished runs in a user's store (or nowhere): scores as JSON under
    ``"/"``-joined keys, beside the settings they were made with (others clear the store): the
    model's name and shape, each method's class and parameters, the texts of every training and
    scored skill (a digest), the step counts and the fine-tuning's settings. A method refitted
    with the same parameters on other data is not told apart: give a new store."""

    FIELDS = ("correct", "total", "nll", "abstained")

    def __init__(self, store, model, methods, runs, scored, steps, lr, batch_size, seed):
        self.store = {} if store is None else store
        settings = {
            "model": {k: str(v) for k, v in model_meta(model).items()},
            "methods": {m: f"{type(iv).__name__}{_params(iv)!r}" for m, iv in methods.items()},
            "runs": {what: _digest(skill) for what, skill in runs.items()},
            "scored": {name: _digest(skill) for name, skill in scored.items()},
            "steps": [int(k) for k in steps], "lr": float(lr), "batch_size": int(batch_size),
            "seed": int(seed),
        }  # fmt: skip
        if self.store.get("settings") != settings:
            self.store.clear()
            self.store["settings"] = settings

    @staticmethod
    def _key(parts) -> str:
        return "/".join(map(str, parts))

    def get_or_make(self, parts, make: Callable[[], dict[str, ExampleScores]]):
        key = self._key(parts)
        if key in self.store:
            return self._decode(self.store[key])
        scores = make()
        self.store[key] = self._encode(scores)
        return scores

    def load(self, keys, into: dict) -> bool:
        """Whether every ``(train_on, method, step)`` of a run is stored; if so, its scores go
        to ``into``."""
        if not all(self._key(("attacked", *k)) in self.store for k in keys):
            return False
        into.update({k: self._decode(self.store[self._key(("attacked", *k))]) for k in keys})
        return True

    def save(self, keys, scores: dict) -> None:
        """Store a finished run's scores (one write)."""
        self.store.update({self._key(("attacked", *k)): self._encode(scores[k]) for k in keys})

    @classmethod
    def _encode(cls, scores: dict[str, ExampleScores]) -> dict[str, dict[str, list]]:
        return {n: {f: getattr(s, f).tolist() for f in cls.FIELDS} for n, s in scores.items()}

    @classmethod
    def _decode(cls, data) -> dict[str, ExampleScores]:
        return {
            n: ExampleScores(
                *(np.asarray(d[f], dtype=float) for f in cls.FIELDS[:3]),
                np.asarray(d["abstained"], dtype=bool),
            )
            for n, d in data.items()
        }


def _digest(skill: Skill) -> str:
    """A skill's name and the SHA-256 of its prompts and answers."""
    h = hashlib.sha256()
    for ex in skill:
        h.update(ex.prompt.encode() + b"\0" + ex.answer.encode() + b"\0")
    return f"{skill.name}:{len(skill)}:{h.hexdigest()[:16]}"


def _params(iv) -> dict[str, Any]:
    """A method's constructor parameters (``get_params``), or none for other objects."""
    get = getattr(iv, "get_params", None)
    return get() if callable(get) else {}


def _at(steps: Sequence[int], fn: Callable[[int], Any]) -> Callable[[int], None]:
    """A callback that runs ``fn(step)`` only at the given steps."""
    wanted = set(steps)

    def callback(step: int) -> None:
        if step in wanted:
            fn(step)

    return callback
