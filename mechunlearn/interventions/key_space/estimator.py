"""The key-region detector's estimator, :class:`KeyRegionDetector`: fit (a region per layer and
its calibrated ``alpha``), detection on stored keys or by hooks, and abstention in generation.
The region's shape (cube, ellipsoid) is a subclass's (:mod:`.regions`); the method is described
in :mod:`mechunlearn.interventions.key_space`."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ...batching import EncodedBatch, tokenize_examples
from ...collect import run_pass
from ...data import Skill, special_token_flags
from ...generation import generate_from_tokens
from ...kernels.regions import check_finite
from ...sites import hook_name
from ...stats import KeyVectors
from ...validation import (
    MAX_SEED,
    check_choice,
    check_compatible,
    check_forget_retain,
    check_has_values,
    check_int,
    check_layers,
    check_probability,
    check_test_size,
    check_texts,
    check_type,
    model_keys,
)
from ..base import Detector, Hook, check_positive
from .results import REFUSAL, Detection, DetectionRecord

#: ``fit(keys_f, keys_r)`` warns when the calibrated region detects less than this share of the
#: held-out forget queries (the false-positive cap, not the skill, decided alpha).
LOW_DETECTION = 0.5

#: The default false-positive cap (:class:`KeySpaceDetector`'s): with ``n`` negatives the
#: conformal rank is ``floor(fpr * (n + 1))``, so 0.01 needs 99 negatives (``calibration_skill()``
#: ships 504). Chosen in ``analysis/detector_calibration.py`` (``docs/results/calibration.md``).
DEFAULT_FPR = 0.01

#: How ``fit(keys_f, keys_r)`` chooses alpha: ``"conformal"`` (one ``h`` shared by every layer,
#: at a split-conformal order statistic of the negatives' scores) or ``"rank"`` (per-layer alphas
#: at a shared rank of each layer's negative distances, capped on half of the negatives: the
#: default before issue 25).
CALIBRATIONS = ("conformal", "rank")

#: The default rule (:class:`KeySpaceDetector`'s): detected when inside the region at two thirds
#: of the checked layers or more (20 of the default model's 30).
DEFAULT_RULE = 2 / 3


class KeyRegionDetector(Detector):
    """Shared machinery of key-space detectors: fit, alpha, rules, hooks, detect, generate.

    A subclass defines the region: :meth:`_fit_region` (per-layer tensors from fit vectors),
    :meth:`_distance` (``[m, layers, d] -> [m, layers]``, in units where ``k_min`` is the
    largest fit distance) and :meth:`_distance_row` (one layer, ``[b, d] -> [b]``).

    Args:
        h: alpha as a multiple of ``k_min`` (authors: 2 for GSM8K, 1.4 for MBPP), for a region
            fitted without negatives (its false-positive rate is then unmeasured). When
            neither ``h`` nor ``alpha`` is given, ``fit(keys_f, keys_r)`` chooses alpha
            automatically and ``fit(keys_f)`` alone is refused.
        alpha: an absolute alpha (the same for every layer).
        layers: model layers to check (negative counts from the last collected layer);
            ``None`` (the default) for every layer of the key vectors; ``-1`` for the
            authors' last layer only.
        rule: ``"any"``, ``"all"``, an int ``k`` (detected when inside at ``>= k`` layers) or
            a float share in (0, 1) of the checked layers (``k = ceil(share * n_layers)``);
            default ``2 / 3`` (20 of the default model's 30 layers; the ellipsoid's:
            ``"all"``), chosen in ``analysis/detector_calibration.py``.
        fpr: with ``fit(keys_f, keys_r)``, the false-positive cap, in (0, 1); default 0.01
            (the ellipsoid's: 0.005). With ``calibration="conformal"`` it is a guarantee:
            ``j = floor(fpr * (n + 1))`` for ``n`` negatives (:func:`conformal_rank`), alpha
            just below the ``j``-th smallest negative score, so that a new query drawn like
            the negatives (exchangeable with them) is detected with probability at most
            ``j / (n + 1) <= fpr``. It needs ``n >= 1 / fpr - 1`` negatives (99 at 0.01, 199
            at 0.005): fewer raise a ValueError that says how many. The guarantee says nothing
            about queries unlike the negatives (``docs/results/calibration.md`` measures
            unseen MMLU and XQuAD questions). With ``calibration="rank"`` it caps the share
            detected on the negatives' calibration part, with no guarantee.
        calibration: how ``fit(keys_f, keys_r)`` chooses alpha. ``"conformal"`` (the
            default): one ``h`` for every layer (``alpha = h * k_min`` per layer), the largest
            whose rule detects at most ``j - 1`` of all the negatives (above), then lowered to
            the middle of the held-out forget queries' plateau (which only lowers the
            false-positive rate). ``"rank"``: the default before issue 25, per-layer alphas
            at a shared rank of each layer's distances to half of the negatives (the other
            half measures it), capped at ``fpr`` on that half; no guarantee, and at a small
            ``fpr`` one negative near the skill caps every layer.
        test_size: the held-out share of F (and, with ``calibration="rank"``, of the
            negatives) in that calibration (a fraction, rounded up, or a count).
        seed: seed of the calibration's splits.

    Attributes:
        layers_, d_mlp_, meta_: as for every intervention.
        region_: per-layer region tensors (leading dimension: layers).
        k_min_: ``[layers]`` largest fit distance per layer.
        alpha_: ``[layers]`` the alpha used per layer.
        h_: ``[layers]`` ``alpha_ / k_min_`` (the effective h).
        calibration_: when alpha was chosen automatically, how (``"method"``: the
            ``calibration``; with ``"conformal"``: ``"rank"`` ``j``, ``"bound"``
            ``j / (n + 1)``, ``"n_negatives"``, ``"h"``) and the held-out rates, else None.
        fpr_: the false-positive rate alpha was calibrated for (``fpr``), or None when alpha
            came from ``h``/``alpha`` and no false-positive rate was measured.
    """

    _fitted_attrs = Detector._fitted_attrs + ("region_", "alpha_", "k_min_")

    def __init__(
        self,
        h: float | None = None,
        alpha: float | None = None,
        layers: int | Sequence[int] | None = None,
        rule: str | int | float = DEFAULT_RULE,
        fpr: float = DEFAULT_FPR,
        calibration: str = "conformal",
        test_size: float | int = 0.5,
        seed: int = 0,
    ):
        if h is not None and alpha is not None:
            raise ValueError("Give h (alpha = h * k_min) or an absolute alpha, not both.")
        if h is not None:
            check_positive("h", h)
        if alpha is not None:
            check_positive("alpha", alpha)
        _check_rule(rule)
        layers = check_layers(layers)
        self.h = None if h is None else check_positive("h", h)
        self.alpha = None if alpha is None else check_positive("alpha", alpha)
        self.layers = layers
        self.rule = rule
        self.fpr = check_probability("fpr", fpr)
        self.calibration = check_choice(calibration, CALIBRATIONS, "calibration")
        self.test_size = check_test_size("test_size", test_size)
        self.seed = check_int("seed", seed, min_val=None, max_val=MAX_SEED)

    # --------------------------------------------------------------------- region (abstract)
    def _fit_region(self, x: Float[Tensor, "n layer d"]) -> dict[str, Tensor]:
        raise NotImplementedError

    def _distance(self, x: Float[Tensor, "m layer d"], region: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def _distance_row(self, x: Float[Tensor, "b d"], region_row: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    # --------------------------------------------------------------------------------- fit
    def fit(
        self,
        keys_f: KeyVectors,
        keys_r: KeyVectors | Sequence[KeyVectors] | None = None,
    ) -> KeyRegionDetector:
        """Fit the forget skill's region; alpha from ``h``/``alpha``, or calibrated on negatives.

        Args:
            keys_f: forget-skill key vectors (:func:`mechunlearn.collect_keys`).
            keys_r: key vectors of what must *not* be detected (retain skills, ordinary text:
                :func:`mechunlearn.calibration_skill` ships a general set), or a list of them
                (concatenated); alpha is then chosen automatically under the false-positive
                cap ``fpr`` (see the module docstring), and ``h``/``alpha`` must not be set.
                Without ``keys_r``, ``h`` or ``alpha`` must be given: such a detector's
                false-positive rate is unmeasured. Give negatives in the prompt format of the
                forget keys (``calibration_skill()`` has two formats by default).

        Returns:
            self.

        Raises:
            ValueError: neither negatives nor ``h``/``alpha`` (the message shows the call);
                with ``calibration="conformal"``, fewer negatives than ``fpr`` needs
                (``1 / fpr - 1``; the message says how many).

        Example:
            >>> ksd = mu.KeySpaceDetector(fpr=0.1).fit(keys_f, keys_r)  # tiny model: add vs copy
            >>> ksd.fpr_, ksd.layers_, ksd.calibration_["rank"], len(keys_r)  # j = floor(0.1 * 31)
            (0.1, [0, 1, 2], 3, 30)
            >>> mu.KeySpaceDetector().fit(keys_f, keys_r)  # fpr=0.01 needs 99 negatives
            Traceback (most recent call last):
            ...
            ValueError: fpr=0.01 needs at least 99 negatives for a conformal bound; got 30: ...
            >>> mu.KeySpaceDetector().fit(keys_f)
            Traceback (most recent call last):
            ...
            ValueError: KeySpaceDetector().fit(keys_f) alone would give ...

            On the real model, with the shipped general questions as negatives:

            >>> keys_f = mu.collect_keys(model, mu.load_skill("gsm8k", n=100))  # doctest: +SKIP
            >>> keys_cal = mu.collect_keys(model, mu.calibration_skill())  # doctest: +SKIP
            >>> ksd = mu.KeySpaceDetector().fit(keys_f, keys_cal)  # doctest: +SKIP
        """
        check_type(keys_f, KeyVectors, "keys_f", "Collect them with mu.collect_keys(model, skill).")
        check_has_values(keys_f, "keys_f")
        if isinstance(keys_r, (list, tuple)):
            if not keys_r:
                raise ValueError("keys_r is an empty list: pass key vectors, or None.")
            for i, part in enumerate(keys_r):
                check_type(part, KeyVectors, f"keys_r[{i}]", "Collect them with mu.collect_keys.")
            keys_r = KeyVectors.concat_all(list(keys_r))
        if keys_r is None and self.h is None and self.alpha is None:
            raise ValueError(
                f"{type(self).__name__}().fit(keys_f) alone would give a detector whose "
                "false-positive rate nobody measured: pass negatives, e.g. "
                "fit(keys_f, mu.collect_keys(model, mu.calibration_skill())), or set h= (the "
                "authors' alpha = h * k_min) to accept an uncalibrated region."
            )
        layers = self._resolve_layers(keys_f)
        rule_k = layers_needed(self.rule, len(layers))
        x_f = self._select(keys_f, layers)
        check_finite(x_f, "The forget key vectors")
        self.layers_ = layers
        self.d_mlp_ = keys_f.d_mlp
        self.meta_ = model_keys(keys_f.meta)
        self.meta_["forget"] = keys_f.meta.get("skill")
        self.calibration_ = None
        self.fpr_ = None
        if keys_r is None:
            self.region_ = self._fit_region(x_f)
            self.k_min_ = self._distance(x_f, self.region_).amax(0)
            if self.alpha is not None:
                self.alpha_ = torch.full_like(self.k_min_, float(self.alpha))
            else:
                self.alpha_ = float(self.h) * self.k_min_
        else:
            calibrate = self._conformal if self.calibration == "conformal" else self._calibrate
            calibrate(keys_f, keys_r, layers, rule_k, self.fpr, self.test_size, self.seed)
            self.fpr_ = self.fpr
        self.h_ = self.alpha_ / self.k_min_
        self._after_fit()
        return self

    def _calibrate(self, keys_f, keys_r, layers, rule_k, fpr, test_size, seed) -> None:
        """Fit the region on a part of ``keys_f`` and choose ``alpha`` under the false-positive
        cap on a part of ``keys_r`` (the module docstring); the other parts measure it."""
        self._check_negatives(keys_f, keys_r)
        fit_f, held_f = self._fit_part(keys_f, layers, test_size, seed)
        cal_idx, test_idx = keys_r.split_indices(test_size, seed)
        cal_r, test_r = keys_r.subset(cal_idx), keys_r.subset(test_idx)
        dev = self.k_min_.device
        d_held = self._distance(self._select(held_f, layers).to(dev), self.region_)
        d_cal = self._distance(self._select(cal_r, layers).to(dev), self.region_)
        d_test = self._distance(self._select(test_r, layers).to(dev), self.region_)
        d_cal = torch.nan_to_num(d_cal, nan=torch.inf)
        best, alpha_max, capping = _alpha_under_cap(d_cal, rule_k, fpr, cal_idx)
        t_min = _plateau_start(d_held, alpha_max, rule_k)
        self.alpha_ = alpha_max * (0.5 * (t_min + 1.0))
        self.calibration_ = {
            "method": "rank",
            "fpr": float(fpr),
            "rank": int(best),
            "alpha_max": alpha_max.tolist(),
            "t_min": t_min,
            "n_fit_f": len(fit_f),
            "n_heldout_f": len(held_f),
            "n_cal_r": len(cal_r),
            "n_test_r": len(test_r),
            "retain": keys_r.meta.get("skill"),
            "detect_f": _rate(d_held, self.alpha_, rule_k),
            "fpr_r_cal": _rate(d_cal, self.alpha_, rule_k),
            "fpr_r_test": _rate(d_test, self.alpha_, rule_k),
            "capping_negatives": capping,
            "per_layer": _per_layer_rates(d_held, d_cal, d_test, self.alpha_, layers),
        }
        self._warn_low_detection(fpr, len(held_f), capping)

    def _conformal(self, keys_f, keys_r, layers, rule_k, fpr, test_size, seed) -> None:
        """``calibration="conformal"``: fit the region on a part of ``keys_f``; one ``h`` for
        every layer (``alpha_ = h * k_min_``; ``h`` alone where ``k_min_`` is 0), just below
        the ``j``-th smallest rule score of the negatives, ``j = floor(fpr * (n + 1))``
        (:func:`conformal_rank`); then the middle of the plateau of the held-out forget
        queries (the module docstring)."""
        self._check_negatives(keys_f, keys_r)
        n = len(keys_r)
        j = conformal_rank(n, fpr)
        fit_f, held_f = self._fit_part(keys_f, layers, test_size, seed)
        dev = self.k_min_.device
        # A layer whose fit vectors all coincide has k_min 0: its distances stay in their own
        # units there (scale 1), so that only the fit vectors' point is inside at any sane h.
        usable = (self.k_min_ > 0) & torch.isfinite(self.k_min_)
        scale = torch.where(usable, self.k_min_, torch.ones_like(self.k_min_))
        d_held = self._distance(self._select(held_f, layers).to(dev), self.region_) / scale
        d_neg = self._distance(self._select(keys_r, layers).to(dev), self.region_) / scale
        s_neg = rule_scores(d_neg, rule_k)
        s_held = rule_scores(d_held, rule_k)
        h_max, capping = conformal_threshold(s_neg, j)
        if not math.isfinite(h_max):  # fewer than j negatives have a finite score
            finite = s_held[torch.isfinite(s_held)]
            h_max = max(1.0, float(finite.max()) if finite.numel() else 1.0)
        inside = s_held[s_held <= h_max]
        t_min = float(inside.max()) if inside.numel() else h_max
        h = 0.5 * (t_min + h_max)
        self.alpha_ = (h * scale).clamp(max=torch.finfo(scale.dtype).max)  # finite, to save
        self.calibration_ = {
            "method": "conformal",
            "fpr": float(fpr),
            "rank": int(j),
            "bound": j / (n + 1),
            "h_max": h_max,
            "alpha_max": (h_max * scale).clamp(max=torch.finfo(scale.dtype).max).tolist(),
            "t_min": t_min,
            "h": h,
            "n_fit_f": len(fit_f),
            "n_heldout_f": len(held_f),
            "n_negatives": n,
            "retain": keys_r.meta.get("skill"),
            "detect_f": float((s_held <= h).double().mean()) if len(held_f) else math.nan,
            "fpr_r_cal": float((s_neg <= h).double().mean()),
            "capping_negatives": capping,
            "per_layer": _per_layer_rates(d_held, d_neg, None, torch.full_like(scale, h), layers),
        }
        self._warn_low_detection(fpr, len(held_f), capping)

    def _fit_part(self, keys_f, layers, test_size, seed) -> tuple[KeyVectors, KeyVectors]:
        """Split ``keys_f`` into ``(fit, held-out)`` parts and fit ``region_`` and ``k_min_`` on
        the fit part."""
        fit_f, held_f = keys_f.split(test_size, seed)
        if len(fit_f) < 2:
            raise ValueError("The fit part of keys_f needs at least 2 vectors: lower test_size.")
        x_fit = self._select(fit_f, layers)
        self.region_ = self._fit_region(x_fit)
        self.k_min_ = self._distance(x_fit, self.region_).amax(0)
        return fit_f, held_f

    def _warn_low_detection(self, fpr: float, n_held: int, capping: list[int]) -> None:
        """Warn when the calibrated region detects less than :data:`LOW_DETECTION` of the
        held-out forget queries, naming the negatives that decided alpha."""
        detect_f = self.calibration_["detect_f"]
        if detect_f < LOW_DETECTION:
            why = (
                f"keys_r rows {capping} lie near the forget skill (one rank further they would "
                "be detected) and cap alpha: inspect them (they may belong to the skill) and drop "
                "them, or raise fpr"
                if capping
                else "no negative limits alpha (it already reaches the farthest): the held-out "
                "forget queries lie outside the region; fit on more, or more varied, forget queries"
            )
            warnings.warn(
                f"{type(self).__name__}: at fpr={fpr} the calibrated region detects only "
                f"{detect_f:.0%} of the {n_held} held-out forget queries: {why}.",
                stacklevel=4,
            )

    def _check_negatives(self, keys_f: KeyVectors, keys_r: KeyVectors) -> None:
        """Negatives that calibration can use: key vectors of the same model, and no ``h`` or
        ``alpha`` set (calibration chooses alpha)."""
        check_type(keys_r, KeyVectors, "keys_r", "Collect them with mu.collect_keys(model, skill).")
        if self.h is not None or self.alpha is not None:
            raise ValueError(
                "fit(keys_f, keys_r) chooses alpha automatically: construct the detector "
                "without h or alpha, or call fit(keys_f) alone."
            )
        check_forget_retain(keys_f, keys_r, ("keys_f", "keys_r"), "key vectors")
        check_compatible(keys_f.meta, keys_r.meta, ("n_layers", "d_mlp"), "KeyVectors")
        if keys_r.d_mlp != keys_f.d_mlp:
            raise ValueError(f"keys_r has d_mlp={keys_r.d_mlp}, keys_f {keys_f.d_mlp}.")

    def _resolve_layers(self, keys: KeyVectors) -> list[int]:
        if self.layers is None:
            return list(keys.layers)
        wanted = [self.layers] if isinstance(self.layers, int) else list(self.layers)
        out = [keys.layers[keys.layer_index(int(layer))] for layer in wanted]
        if len(set(out)) != len(out):
            raise ValueError(f"layers {wanted} repeat a layer (as {out}).")
        return out

    @staticmethod
    def _select(keys: KeyVectors, layers: Sequence[int]) -> Float[Tensor, "n layer d"]:
        cols = torch.as_tensor([keys.layer_index(layer) for layer in layers])
        return keys.values.index_select(1, cols.to(keys.values.device)).to(torch.float64)

    def _after_fit(self) -> None:
        self._clear_cache()
        self.record = DetectionRecord(self)

    # ------------------------------------------------------------------------- decisions
    def _combine(self, margin: Tensor) -> tuple[Tensor, Tensor]:
        k = layers_needed(self.rule, len(self.layers_))
        margin = torch.nan_to_num(margin, nan=torch.inf)
        score = margin.sort(-1).values[..., k - 1]
        return score <= 1, score

    def _detection(self, margin: Tensor) -> Detection:
        detected, score = self._combine(margin)
        fired = torch.nan_to_num(margin, nan=torch.inf) <= 1
        return Detection(detected, fired, margin, score, list(self.layers_), self.rule, self.fpr_)

    @property
    def takes_negatives(self) -> bool:
        """False when ``h`` or ``alpha`` fixes the region (``fit(keys_f)`` alone)."""
        return self.h is None and self.alpha is None

    def key_layers(self) -> list[int]:
        """The layers whose key vectors :meth:`detect_keys` reads (``layers_``)."""
        self._check_fitted()
        return list(self.layers_)

    def detect_keys(self, keys: KeyVectors) -> Detection:
        """Detection of already-collected key vectors (no model run).

        Example:
            >>> ksd.detect_keys(keys_r)     # false positives on the retain skill
            Detection(n=30, detected=0, rule=0.667, calibrated fpr=unmeasured)
            >>> ksd.detect_keys(keys_f).rate
            1.0
        """
        self._check_fitted()
        if keys.d_mlp != self.d_mlp_:
            raise ValueError(f"These key vectors have d_mlp={keys.d_mlp}, not {self.d_mlp_}.")
        x = self._select(keys, self.layers_).to(self.alpha_.device)
        return self._detection(self._distance(x, self.region_) / self.alpha_)

    # ------------------------------------------------------------------------------ hooks
    def hooks(
        self,
        model=None,
        positions: Int[Tensor, " batch"] | None = None,
        record: DetectionRecord | None = None,
    ) -> list[Hook]:
        """Hooks that record each sequence's margins, leaving activations untouched.

        Args:
            model: if given, checked against the fitted model.
            positions: ``[batch]`` index of each row's last prompt token (right padding);
                default: the last position (unpadded or left-padded prompts, and every step
                of generation).
            record: where to write; default a fresh :class:`DetectionRecord`, also stored as
                ``self.record``.

        Positions: none changes (the hooks only read the last prompt token's key vector).

        Example:
            >>> last = max(ksd.layers_)
            >>> _ = model.run_with_hooks(tokens, fwd_hooks=ksd.hooks(), stop_at_layer=last + 1)
            >>> ksd.record.detected     # on the device until read
            tensor([False, False])
        """
        self._check_fitted()
        if model is not None:
            self.check_model(model)
        if record is None:
            record = self.record = DetectionRecord(self)
        return [
            (hook_name("key", layer), self._hook(row, layer, positions, record))
            for row, layer in enumerate(self.layers_)
        ]

    def _hook_tensors(self) -> dict[str, Any]:
        rows = [{k: v[row] for k, v in self.region_.items()} for row in range(len(self.layers_))]
        return {"alpha": self.alpha_, "rows": rows}

    def _hook(self, row: int, layer: int, positions: Tensor | None, record: DetectionRecord):
        name = hook_name("key", layer)
        moved: dict[str, Tensor] = {}

        def hook(activation: Float[Tensor, "batch pos d_mlp"], hook=None) -> Tensor:
            self._check_width(activation, name)
            if activation.ndim != 3:
                raise ValueError(
                    f"{type(self).__name__} hook at {name} expects [batch, pos, d_mlp], got "
                    f"shape {tuple(activation.shape)}."
                )
            device = activation.device
            t = self._on(device, _region_dtype(device))
            if positions is None:
                x = activation[:, -1]
            else:
                pos = moved.get(str(device))
                if pos is None:  # once per device (a no-op when already there)
                    pos = moved[str(device)] = positions.to(device)
                rows = torch.arange(activation.shape[0], device=device)
                x = activation[rows, pos]
            dist = self._distance_row(x.to(t["alpha"].dtype), t["rows"][row])
            record.margins[layer] = dist / t["alpha"][row]
            return activation

        return hook

    # ----------------------------------------------------------------------------- detect
    def detect(
        self,
        model,
        prompts,
        batch_size: int = 16,
        max_length: int | None = None,
    ) -> Detection:
        """Detect prompts: one prompt-only forward per batch, read at the last prompt token.

        Tokenised as :func:`mechunlearn.collect_keys` does (``[BOS] + prompt``), right-padded;
        each forward (:func:`mechunlearn.run_pass`) stops as soon as the last detection layer's
        key vector is read.

        Args:
            model: the model the detector was fitted on.
            prompts: a Skill (its prompts), a list of strings, or one string.
            batch_size: prompts per forward.
            max_length: the longest prompt allowed (default: the model's context).

        Returns:
            A :class:`Detection` on the CPU, in the prompts' order.

        Example:
            >>> det = ksd.detect(model, ["3+4=", "copy b:"])
            >>> det.rate, det.detected.tolist()
            (0.5, [True, False])
            >>> list(det.to_frame().columns)
            ['detected', 'score', 'fired_layers', 'margin_L0', 'margin_L1', 'margin_L2']
        """
        self.check_model(model)
        if not isinstance(prompts, Skill):
            prompts = Skill.from_texts("prompts", _prompts_and_flags(prompts)[0])
        margin = torch.empty((len(prompts), len(self.layers_)), dtype=torch.float64)
        record = DetectionRecord(self)

        def hooks(batch: EncodedBatch) -> list[Hook]:
            record.reset()
            return self.hooks(positions=batch.last_prompt, record=record)

        def keep(batch: EncodedBatch, _) -> None:
            margin[batch.example_index.cpu()] = record.margin.double().cpu()

        # Stop right after the last detection layer's key vector: the rest of the model (that
        # layer's W_out, later layers, the unembedding) is not needed.
        last = hook_name("key", max(self.layers_))
        run_pass(
            model, prompts, hooks, last, then=keep, prompts_only=True, batch_size=batch_size,
            max_length=max_length,
        )  # fmt: skip
        return self._detection(margin)

    # --------------------------------------------------------------------------- generate
    def generate(
        self,
        model,
        prompts,
        max_new_tokens: int = 64,
        refusal: str = REFUSAL,
        batch_size: int | None = None,
        max_length: int | None = None,
        return_detection: bool = False,
        **generate_kwargs: Any,
    ) -> list[str] | tuple[list[str], Detection]:
        """Answer the prompts, abstaining on detected ones.

        Detects every prompt (:meth:`detect`), then generates only for the kept prompts with
        ``model.generate`` (greedy unless ``generate_kwargs`` say otherwise), left-padded with
        an attention mask, from the same tokens as detection (``[BOS] + prompt``). Detected
        prompts get ``refusal`` and cost no generation step.

        Args:
            model: the model.
            prompts: a Skill (its prompts), a list of strings, or one string.
            max_new_tokens: generation length; lowered, with a warning, to what fits the
                model's context after the longest prompt of a generation call
                (:func:`mechunlearn.batching.cap_new_tokens`).
            refusal: the text returned for detected prompts (the authors' by default).
            batch_size: prompts per detection forward and per generation call (default: 16
                per detection forward, and every kept prompt in one generation call).
            max_length: the longest prompt allowed.
            return_detection: also return the :class:`Detection`.
            **generate_kwargs: passed to ``model.generate`` (e.g. ``do_sample=True``).

        Returns:
            The continuation of each prompt (without the prompt, cut at the first EOS), or the
            refusal; with ``return_detection``, ``(texts, detection)``.

        Example:
            >>> texts = ksd.generate(model, ["3+4=", "copy b:"], max_new_tokens=3)
            >>> texts[0]                  # detected: the refusal, no generation
            'Sorry, your query is not valid'
        """
        check_int("max_new_tokens", max_new_tokens, min_val=1)
        skill = prompts if isinstance(prompts, Skill) else None
        prompts, flags = _prompts_and_flags(prompts)
        n = len(prompts)
        detection = self.detect(
            model, skill if skill is not None else prompts, batch_size=batch_size or 16,
            max_length=max_length,
        )  # fmt: skip
        bs = batch_size or n
        keep = torch.nonzero(~detection.detected).flatten().tolist()
        texts = [refusal] * n
        if keep:
            items = tokenize_examples(
                model, [prompts[i] for i in keep], [""] * len(keep), max_length,
                special_tokens=[flags[i] for i in keep],
            )  # fmt: skip
            kwargs = {"do_sample": False, "verbose": False, **generate_kwargs}
            for start in range(0, len(keep), bs):
                chunk = list(range(start, min(start + bs, len(keep))))
                outs = generate_from_tokens(
                    model, [items[i][0] for i in chunk], max_new_tokens, **kwargs
                )
                for i, out in zip(chunk, outs, strict=True):
                    texts[keep[i]] = out
        return (texts, detection) if return_detection else texts

    # --------------------------------------------------------------------------- reports
    def _fitted_summary(self) -> str:
        alpha = ", ".join(f"{a:.3g}" for a in self.alpha_.tolist())
        if self.fpr_ is None:
            fpr = "unmeasured"
        else:
            fpr = f"calibrated at {self.fpr_:g}"
            cal = self.calibration_ or {}
            if cal.get("method") == "conformal":
                fpr += f" (conformal bound {cal['bound']:.3g} over {cal['n_negatives']} negatives)"
            elif cal.get("fpr_r_test") is not None:
                fpr += f" ({cal['fpr_r_test']:.3g} on held-out negatives)"
        return f"layers {self.layers_}, alpha [{alpha}], rule {self.rule!r}, false positives {fpr}"

    # ------------------------------------------------------------------------- save / load
    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {f"region.{k}": v for k, v in self.region_.items()}
        tensors.update(alpha=self.alpha_, k_min=self.k_min_)
        return tensors, {"calibration": self.calibration_, "fpr": self.fpr_}

    def _set_state(self, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
        self.region_ = {k[7:]: v for k, v in tensors.items() if k.startswith("region.")}
        self.alpha_, self.k_min_ = tensors["alpha"], tensors["k_min"]
        n = len(self.layers_)
        if self.alpha_.shape != (n,) or self.k_min_.shape != (n,):
            raise ValueError(f"alpha/k_min must have one value per layer ({n}).")
        self.h_ = self.alpha_ / self.k_min_
        self.calibration_ = info.get("calibration")
        cal = self.calibration_ or {}
        if "calibration" not in info.get("params", {}):  # saved before issue 25: rank only
            self.calibration = "rank"
        self.fpr_ = info.get("fpr", cal.get("fpr"))
        self._after_fit()


# ------------------------------------------------------------------------------ calibration
def conformal_rank(n: int, fpr: float) -> int:
    """The split-conformal rank ``j = floor(fpr * (n + 1))`` for ``n`` calibration negatives.

    A detector that fires on a new query when its score is below the ``j``-th smallest of the
    ``n`` negatives' scores (detection when the score is small) fires on a new negative with
    probability at most ``j / (n + 1) <= fpr``, when the new negative and the ``n`` are
    exchangeable (drawn from one distribution; the probability is over both). This is the
    usual upper-tail form read from below: the ``ceil((n + 1)(1 - fpr))``-th order statistic of
    the nonconformity score ``-score``.

    Raises:
        ValueError: ``j == 0``: ``n < 1 / fpr - 1`` negatives cannot bound the rate at ``fpr``
            (the message says how many are needed).

    Example:
        >>> conformal_rank(568, 0.005), conformal_rank(504, 0.01)
        (2, 5)
    """
    j = math.floor(float(fpr) * (n + 1) + 1e-9)
    if j < 1:
        need = math.ceil(1 / float(fpr) - 1 - 1e-9)
        raise ValueError(
            f"fpr={fpr:g} needs at least {need} negatives for a conformal bound; got {n}: pass "
            f"more negatives (mu.calibration_skill() ships 504 prompts), raise fpr to "
            f"{1 / (n + 1):.3g} or more, or use calibration='rank' (no guarantee)."
        )
    return j


def conformal_threshold(scores: Float[Tensor, " n"], j: int) -> tuple[float, list[int]]:
    """Just below the ``j``-th smallest of ``scores`` (1-based; NaN counts as infinite): the
    largest threshold that leaves ``j - 1`` of them inside (``score <= threshold``), and the
    rows at the ``j``-th smallest score (inside one step further)."""
    scores = torch.nan_to_num(scores.double(), nan=torch.inf)
    value = scores.sort().values[j - 1]
    capping = torch.nonzero(scores == value).flatten().tolist() if torch.isfinite(value) else []
    return max(float(value) * (1 - 1e-9), 0.0), capping


def rule_scores(margin: Float[Tensor, "n layer"], k: int) -> Float[Tensor, " n"]:
    """The rule-relevant margin of each row: its ``k``-th smallest over layers (NaN: infinite);
    a row is detected when it is ``<= 1``."""
    return torch.nan_to_num(margin, nan=torch.inf).sort(-1).values[..., k - 1]


def _alpha_at(ranked: Float[Tensor, "m layer"], j: int) -> Float[Tensor, " layer"]:
    """Per layer, just below the ``j``-th smallest calibration distance (0-based): ``j``
    calibration points inside per layer; the relative gap keeps distance / alpha clear of 1
    after rounding."""
    return ranked[j] * (1 - 1e-9)


def _alpha_under_cap(
    d_cal: Float[Tensor, "m layer"], rule_k: int, fpr: float, cal_idx
) -> tuple[int, Float[Tensor, " layer"], list[int]]:
    """The largest rank ``j`` whose per-layer alphas detect at most ``fpr`` of the calibration
    negatives (``d_cal``, NaN already infinite) under the rule: ``(j, alpha_max, capping)``, with
    ``capping`` the rows of the negatives (indices ``cal_idx`` into ``keys_r``) that one rank
    further would be inside."""
    ranked = d_cal.sort(0).values  # [m, layers], ascending
    m = ranked.shape[0]
    # Compare counts, not float rates: 1/10 in float32 is 0.10000000149 > fpr=0.1.
    allowed = math.floor(float(fpr) * m + 1e-9)
    best, inside_best = 0, None  # j = 0 always meets the cap: every box ends below its nearest
    capping = []  # the calibration negatives the cap stops short of (inside one rank further)
    for j in range(m):  # m is small (hundreds); the count is monotone in j
        inside = _detect(d_cal / _alpha_at(ranked, j), rule_k)
        if int(inside.sum()) <= allowed:
            best, inside_best = j, inside
        else:
            capping = cal_idx[(inside & ~inside_best).cpu()].tolist()
            break
    return best, _alpha_at(ranked, best).clamp(min=0), capping


def _plateau_start(
    d_held: Float[Tensor, "n layer"], alpha_max: Float[Tensor, " layer"], rule_k: int
) -> float:
    """``t_min``: held-out forget query ``i`` is detected at ``alpha = t * alpha_max`` iff
    ``t >= s_i``, its rule-relevant margin at ``alpha_max``; every ``t`` in ``[t_min, 1]`` gives
    the best detection (``t_min``: the largest ``s_i <= 1``; 1 when none is detected). The fit
    takes the middle of that interval, away from both the retain queries (``t = 1``) and the
    last detected forget query (``t = t_min``)."""
    s_held = torch.nan_to_num(d_held / alpha_max, nan=torch.inf)
    s_held = s_held.sort(-1).values[:, rule_k - 1]
    inside = s_held[s_held <= 1]
    return float(inside.max()) if inside.numel() else 1.0


def _rate(d: Float[Tensor, "n layer"], alpha: Float[Tensor, " layer"], rule_k: int) -> float:
    """The share of the rows of ``d`` detected at ``alpha`` under the rule."""
    return float(_detect(d / alpha, rule_k).double().mean())


def _per_layer_rates(d_held, d_cal, d_test, alpha, layers) -> dict[int, dict[str, float]]:
    """Per layer alone: the held-out forget detection and the false-positive rates (on the
    negatives' calibration part, and on their test part when there is one)."""
    per_layer = {}
    for col, layer in enumerate(layers):
        a = alpha[col]
        per_layer[int(layer)] = {
            "detect_f": float((d_held[:, col] <= a).float().mean()),
            "fpr_r_cal": float((d_cal[:, col] <= a).float().mean()),
        }
        if d_test is not None:
            per_layer[int(layer)]["fpr_r_test"] = float((d_test[:, col] <= a).float().mean())
    return per_layer


def _check_rule(rule: Any) -> None:
    msg = (
        "rule must be 'any', 'all', an int k >= 1 (layers) or a float share in (0, 1) of the "
        f"layers, got {rule!r}."
    )
    if isinstance(rule, str):
        if rule not in ("any", "all"):
            raise ValueError(msg)
    elif isinstance(rule, float):
        if not 0.0 < rule < 1.0:
            raise ValueError(msg + (" For every layer, say 'all'." if rule == 1.0 else ""))
    elif isinstance(rule, bool) or not isinstance(rule, int) or rule < 1:
        raise ValueError(msg)


def layers_needed(rule: str | int | float, n: int) -> int:
    """The number of layers (of ``n``) whose region must hold a query for ``rule``: 1 for
    ``"any"``, ``n`` for ``"all"``, ``k`` for an int, ``ceil(share * n)`` for a float share.

    Example:
        >>> [layers_needed(rule, 30) for rule in ("any", "all", 2 / 3, 0.5, 4)]
        [1, 30, 20, 15, 4]
        >>> layers_needed(2 / 3, 3), layers_needed(0.5, 3)
        (2, 2)
    """
    if rule == "any":
        return 1
    if rule == "all":
        return n
    if isinstance(rule, float):
        return max(1, math.ceil(rule * n - 1e-9))
    if rule > n:
        raise ValueError(f"rule={rule} asks for {rule} layers, but the detector checks {n}.")
    return int(rule)


def _detect(margin: Tensor, k: int) -> Tensor:
    margin = torch.nan_to_num(margin, nan=torch.inf)
    return margin.sort(-1).values[..., k - 1] <= 1


def _region_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _prompts_and_flags(prompts) -> tuple[list[str], list[bool]]:
    """The prompts as strings, and per prompt whether it holds real special tokens (only a
    chat-formatted Skill does; plain strings are text)."""
    if isinstance(prompts, Skill):
        return list(prompts.prompts), special_token_flags(prompts)
    if isinstance(prompts, str):
        return [prompts], [False]
    out = check_texts(prompts, "prompts")
    if not out:
        raise ValueError("No prompts given.")
    return out, [False] * len(out)
