"""What a key-region detector reports: :class:`Detection` (per sequence: detected or not, the
margin per layer) and :class:`DetectionRecord` (the margins its hooks wrote in the latest
forward). The detectors are in :mod:`mechunlearn.interventions.key_space`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from jaxtyping import Bool, Float
from torch import Tensor

REFUSAL = "Sorry, your query is not valid"
"""The authors' refusal text."""


@dataclass
class Detection:
    """Per-query detection results.

    Attributes:
        detected: ``[n]`` whether each query is detected under the rule.
        fired: ``[n, layers]`` whether it is inside each layer's region (``margin <= 1``).
        margin: ``[n, layers]`` distance / alpha per layer: for the cube,
            ``max_i |x_i - mu_i| / sigma_i / alpha``; inside when ``<= 1``.
        score: ``[n]`` the rule-relevant margin: the ``k``-th smallest margin over layers
            (``k = 1`` for ``"any"``, all layers for ``"all"``); ``detected == (score <= 1)``.
            NaN margins count as outside (``inf``).
        layers: the model layers, in column order.
        rule: the rule (a float: the share of the layers).
        fpr: the false-positive rate the detector's alpha was calibrated for (its ``fpr_``),
            or None when alpha came from ``h``/``alpha`` and nobody measured it.
    """

    detected: Bool[Tensor, " n"]
    fired: Bool[Tensor, "n layer"]
    margin: Float[Tensor, "n layer"]
    score: Float[Tensor, " n"]
    layers: list[int]
    rule: str | int
    fpr: float | None = None

    def __len__(self) -> int:
        return int(self.detected.shape[0])

    @property
    def rate(self) -> float:
        """Fraction of queries detected."""
        return float(self.detected.float().mean()) if len(self) else math.nan

    def to(self, device: torch.device | str) -> Detection:
        """A copy on ``device``."""
        return Detection(
            self.detected.to(device),
            self.fired.to(device),
            self.margin.to(device),
            self.score.to(device),
            list(self.layers),
            self.rule,
            self.fpr,
        )

    def to_frame(self):
        """One row per query: detected, score, fired layers, and each layer's margin."""
        import pandas as pd

        d = self.to("cpu")
        frame = pd.DataFrame(
            {
                "detected": d.detected.numpy(),
                "score": d.score.double().numpy(),
                "fired_layers": [
                    [self.layers[j] for j in torch.nonzero(row).flatten().tolist()]
                    for row in d.fired
                ],
            }
        )
        for j, layer in enumerate(self.layers):
            frame[f"margin_L{layer}"] = d.margin[:, j].double().numpy()
        return frame

    def __repr__(self) -> str:
        fpr = "unmeasured" if self.fpr is None else f"{self.fpr:g}"
        rule = f"{self.rule:.3g}" if isinstance(self.rule, float) else repr(self.rule)
        return (
            f"Detection(n={len(self)}, detected={int(self.detected.sum())}, rule={rule}, "
            f"calibrated fpr={fpr})"
        )


class _RuleDetector(Protocol):
    """What a :class:`DetectionRecord` needs of its detector (a fitted ``KeyRegionDetector``):
    its layers and its rule over their margins. Typed here so that this module does not import
    the estimator module, which imports it."""

    layers_: list[int]

    def _combine(self, margin: Tensor) -> tuple[Tensor, ...]: ...

    def _detection(self, margin: Tensor) -> Detection: ...


class DetectionRecord:
    """Margins written by a detector's hooks during the latest forward; tensors stay on device.

    Each forward overwrites the layer's entry. Reading :attr:`detected` (etc.) combines the
    layers by the detector's rule without leaving the device; only printing or ``bool()``
    synchronises.

    Example:
        >>> _ = model.run_with_hooks(tokens, fwd_hooks=ksd.hooks())
        >>> ksd.record.detected      # [batch] bool, on the model's device
        tensor([False, False])
    """

    def __init__(self, detector: _RuleDetector):
        self.detector = detector
        self.margins: dict[int, Tensor] = {}

    def reset(self) -> None:
        """Forget what was recorded."""
        self.margins.clear()

    @property
    def margin(self) -> Float[Tensor, "batch layer"]:
        """``[batch, layers]`` margins of the latest forward."""
        missing = [layer for layer in self.detector.layers_ if layer not in self.margins]
        if missing:
            raise RuntimeError(
                f"No margins recorded at layers {missing}: run a forward pass with these hooks "
                "first (one that reaches those layers)."
            )
        return torch.stack([self.margins[layer] for layer in self.detector.layers_], -1)

    @property
    def detected(self) -> Bool[Tensor, " batch"]:
        """Whether each sequence is detected under the rule."""
        return self.detector._combine(self.margin)[0]

    def detection(self) -> Detection:
        """All of it as a :class:`Detection` (still on the device)."""
        return self.detector._detection(self.margin)
