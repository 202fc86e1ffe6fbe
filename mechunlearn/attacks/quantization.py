"""Re-quantization: does rounding the edited weights to 8 or 4 bits undo the edit?

A weight edit that lives below the quantizer's resolution disappears when someone quantizes
the unlearned model to share or serve it (GGUF Q8_0/Q4_0, as llama.cpp does). For every method
with a weight form (a :class:`~mechunlearn.interventions.WeightIntervention`, and the hook
methods that also give ``apply_to_weights``: Selective Pruning, LUNAR) this attack

1. finds the tensors the edit changes (:func:`edited_parameters`: every parameter compared
   bit for bit before and inside ``apply_to_weights``);
2. rounds those tensors only, with the edit applied, through the ``gguf`` package's reference
   quantizers (:func:`quantize_tensor`: ``gguf.quants.quantize`` then ``dequantize``, Q8_0 for
   8 bits, Q4_0 for 4 bits; blocks of 32 consecutive values of the flattened tensor, so along
   each row where the row length is a multiple of 32, as in a GGUF file);
3. scores every skill, and does the same on the bare model (the same tensors rounded without
   the edit) as the reference, so that the quantizer's own damage cancels in
   ``relative_quantized = method_quantized / base_quantized``;
4. restores the weights bit for bit (:class:`~mechunlearn.interventions.weights.WeightEdit`).

**What a delta smaller than one quantization step means.** Q8_0 stores each block of 32 values
as ``round(x / d) * d`` with ``d = max|x| / 127``; Q4_0 as one of 16 levels ``d * (q - 8)``
with ``d = max|x| / 8`` (sign of the largest value) — a step ``d`` about 16 times as coarse.
An entry whose edit moves it by less than half a step usually rounds to the same level as the
original weight: the edit is *erased* there (``erased``: the share of edited entries that
quantize to the same value with and without the edit). Zeroed entries (Selective Pruning)
always survive, as 0 is on every grid; LUNAR's and SIMU's small additive deltas may not. The
default model is itself a de-quantized Q4_1 GGUF (SmolLM2-135M-Instruct): its weights sit on a
4-bit grid (blocks of 32, a scale and a minimum each), so 8-bit rounding of an *unedited*
tensor changes it by at most half a Q8_0 step and 4-bit rounding by about a Q4 step; a method
whose relative score survives 8 bits but not 4 is one whose edit is of the order of the model's
own quantization noise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from torch import Tensor
from tqdm.auto import tqdm

from ..data import Skill
from ..evaluation import teacher_forced
from ..interventions.base import Detector
from ..interventions.registry import kind_of
from ..interventions.weights import WeightEdit
from ..kernels.bootstrap import N_BOOT, paired_ratio_interval
from ..scoring import ExampleScores

__all__ = ["BITS", "edited_parameters", "quantization_step", "quantize_tensor", "requantization"]

#: Bits per weight -> the GGUF quantizer used.
BITS: dict[int, GGMLQuantizationType] = {8: GGMLQuantizationType.Q8_0, 4: GGMLQuantizationType.Q4_0}
BLOCK = 32
"""Values per quantization block (Q8_0 and Q4_0)."""


def _qtype(bits: int) -> GGMLQuantizationType:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {sorted(BITS)}, got {bits!r}.")
    return BITS[bits]


def _blocks(x: Tensor) -> np.ndarray:
    """``x`` flattened to float32 blocks ``[n_blocks, 32]`` (the tail padded with zeros, which
    change no block's largest magnitude)."""
    flat = x.detach().to("cpu", torch.float32).reshape(-1).numpy()
    pad = (-flat.size) % BLOCK
    return np.concatenate([flat, np.zeros(pad, np.float32)]).reshape(-1, BLOCK)


def quantize_tensor(x: Tensor, bits: int = 8) -> Tensor:
    """``x`` rounded through GGUF Q8_0 (``bits=8``) or Q4_0 (``bits=4``) and back.

    Blocks of 32 consecutive values of the flattened tensor; returned with ``x``'s shape, dtype
    and device.

    Example:
        >>> from mechunlearn.attacks import quantize_tensor
        >>> x = torch.linspace(-1, 1, 64)
        >>> bool((quantize_tensor(x, 8) - x).abs().max() <= 1 / 127 / 2 + 1e-3)
        True
    """
    blocks = _blocks(x)
    back = dequantize(quantize(blocks, _qtype(bits)), _qtype(bits)).reshape(-1)
    out = torch.from_numpy(np.ascontiguousarray(back[: x.numel()])).reshape(x.shape)
    return out.to(device=x.device, dtype=x.dtype)


def quantization_step(x: Tensor, bits: int = 8) -> Tensor:
    """Per entry of ``x``, the quantization step ``d`` of its block (float32, ``x``'s shape):
    ``max|x| / 127`` for Q8_0, ``max|x| / 8`` for Q4_0.

    Example:
        >>> from mechunlearn.attacks import quantization_step
        >>> quantization_step(torch.full((32,), 2.54), 8)[0].item()
        0.02
    """
    divisor = 127.0 if _qtype(bits) == BITS[8] else 8.0
    blocks = torch.from_numpy(_blocks(x))
    step = blocks.abs().amax(1, keepdim=True).expand_as(blocks) / divisor
    return step.reshape(-1)[: x.numel()].reshape(x.shape)


def edited_parameters(model, intervention) -> dict[str, Tensor]:
    """``{parameter name: parameter}`` of every parameter ``intervention.apply_to_weights``
    changes (compared bit for bit; the weights are restored before returning).

    Raises:
        TypeError: the intervention has no weight form.

    Example:
        >>> from mechunlearn.attacks import edited_parameters
        >>> sorted(edited_parameters(model, lunar))   # LUNAR(layer=1) edits one W_out
        ['model.layers.1._original_component.mlp._original_component.down_proj._original_component.weight']
    """
    if isinstance(intervention, Detector) or not callable(
        getattr(intervention, "apply_to_weights", None)
    ):
        raise TypeError(
            f"{type(intervention).__name__} has no weight form (apply_to_weights): "
            "re-quantization applies to weight edits, Selective Pruning and LUNAR."
        )
    params = dict(model.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    with intervention.apply_to_weights(model):
        return {n: p for n, p in params.items() if not torch.equal(p.detach(), before[n])}


def _quantized(model, tensors: Mapping[str, Tensor], bits: int) -> WeightEdit:
    """Round ``tensors`` in place; the returned edit undoes it (also used as a ``with``)."""
    edit = WeightEdit(model)
    try:
        for t in tensors.values():
            edit.apply(t, lambda w: w.copy_(quantize_tensor(w, bits)))
    except BaseException:
        edit.undo()
        raise
    return edit


def _erased(model, intervention, tensors: Mapping[str, Tensor], bits: int) -> dict[str, float]:
    """Share of edited entries that round to the same value with and without the edit, and the
    median ``|delta| / step`` of the edited entries."""
    original = {n: t.detach().clone() for n, t in tensors.items()}
    erased, changed, ratios = 0, 0, []
    with intervention.apply_to_weights(model):
        for n, t in tensors.items():
            new = t.detach()
            moved = new != original[n]
            same = quantize_tensor(new, bits) == quantize_tensor(original[n], bits)
            erased += int((same & moved).sum())
            changed += int(moved.sum())
            step = quantization_step(original[n], bits).to(new.device)
            delta = (new - original[n]).abs().float()
            ratios.append((delta[moved] / step[moved].clamp_min(1e-30)).cpu())
    ratio = torch.cat(ratios) if ratios else torch.zeros(0)
    return {
        "edited_entries": changed,
        "erased": erased / changed if changed else float("nan"),
        "delta_over_step": float(ratio.double().median()) if ratio.numel() else float("nan"),
    }


def requantization(
    model,
    interventions: Mapping[str, Any],
    skills: Skill | Sequence[Skill] | Mapping[str, Skill],
    roles: Mapping[str, str] | None = None,
    bits: Sequence[int] = (8, 4),
    batch_size: int = 16,
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = 0.95,
    quiet: bool = False,
) -> pd.DataFrame:
    """Score each weight-form method with its edited tensors rounded to ``bits`` (docstring).

    Methods without a weight form (Neuron Adjust's hooks, detectors) are left out.

    Args:
        model: the model.
        interventions: ``{method name: fitted intervention}``.
        skills: the held-out skills to score.
        roles: ``{skill name: role}``.
        bits: 8 (Q8_0) and/or 4 (Q4_0).
        batch_size: examples per forward pass.
        n_boot, seed, level: the paired bootstrap of ``relative_quantized``.
        quiet: hide the progress bar.

    Returns:
        One row per method, bits and skill: ``method, kind, bits, skill, role, base,
        base_quantized, unlearned, quantized, relative, relative_quantized,
        relative_quantized_low, relative_quantized_high, edited_tensors, edited_entries,
        erased, delta_over_step, n``.

    Example:
        >>> from mechunlearn.attacks import requantization
        >>> t = requantization(model, {"LUNAR": lunar, "NA": na}, [forget[:8]], quiet=True)
        >>> sorted(set(t["method"])), sorted(set(t["bits"]))   # NA has no weight form
        (['LUNAR'], [4, 8])
    """
    if isinstance(skills, Skill):
        skills = [skills]
    skills = dict(skills) if isinstance(skills, Mapping) else {s.name: s for s in skills}
    roles = dict(roles or {})
    for b in bits:
        _qtype(b)
    weighty = {
        m: iv
        for m, iv in interventions.items()
        if not isinstance(iv, Detector) and callable(getattr(iv, "apply_to_weights", None))
    }

    def score() -> dict[str, ExampleScores]:
        return {n: teacher_forced(model, s, None, batch_size) for n, s in skills.items()}

    base = score()
    rows = []
    bar = tqdm(total=len(weighty) * len(bits), desc="re-quantization", disable=quiet)
    for m, iv in weighty.items():
        tensors = edited_parameters(model, iv)
        with iv.apply_to_weights(model):
            unlearned = score()
        for b in bits:
            with _quantized(model, tensors, b):
                base_q = score()
            with iv.apply_to_weights(model), _quantized(model, tensors, b):
                quant = score()
            info = _erased(model, iv, tensors, b)
            for n in skills:
                low, high = paired_ratio_interval(
                    quant[n].counted, base_q[n].counted, base_q[n].total, n_boot, seed, level
                )
                bq, q = base_q[n].score, quant[n].score
                rows.append(
                    {
                        "method": m, "kind": kind_of(type(iv)), "bits": b, "skill": n,
                        "role": roles.get(n), "base": base[n].score, "base_quantized": bq,
                        "unlearned": unlearned[n].score, "quantized": q,
                        "relative": unlearned[n].score / base[n].score
                        if base[n].score else float("nan"),
                        "relative_quantized": q / bq if bq else float("nan"),
                        "relative_quantized_low": low, "relative_quantized_high": high,
                        "edited_tensors": len(tensors), **info, "n": len(skills[n]),
                    }
                )  # fmt: skip
            bar.update()
    bar.close()
    return pd.DataFrame(rows)
