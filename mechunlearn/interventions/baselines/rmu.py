"""Representation Misdirection for Unlearning (RMU).

Li et al., "The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning" (ICML 2024;
the authors' ``rmu/unlearn.py``, and ``RMU`` in open-unlearning, ``src/trainer/unlearn/rmu.py``).
At one layer ``l`` the residual stream ``h`` (``blocks.{l}.hook_resid_post``, the output of
decoder layer ``l``) is

* steered, on the forget tokens, toward a fixed random vector ``c * u``: ``u`` a unit vector
  drawn once (uniform in ``[0, 1)`` per coordinate, then normalised, as the authors' code draws
  it) and ``c`` the steering coefficient;
* kept, on the retain tokens, equal to the frozen model's activation ``h_ref``:

      loss = MSE(h_theta(forget), c * u) + alpha * MSE(h_theta(retain), h_ref(retain))

where MSE is the mean of squared differences over the counted tokens and the ``d_model``
coordinates. Only the MLP output weights ``W_out`` (``down_proj``) of a few layers up to ``l``
are trained (the authors: layers ``l - 2, l - 1, l``), with AdamW.

**Tokens.** The counted tokens are every prompt and answer token of an example; BOS and padding
are left out (the authors' forget corpora are plain text without a prompt; BOS's activation is
an outlier that every later position attends to, and steering it would break every text).

**Reference.** ``h_ref`` of every retain example is computed once, before training (a forward
pass that stops after layer ``l``), instead of a frozen copy of the model running at every step.

**Cost.** Every forward pass stops after layer ``l`` (:func:`~mechunlearn.batching.forward_until`):
the layers above ``l`` and the unembedding never run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from ...batching import EncodedBatch, forward_until, pad_batch
from ...models import model_device
from ...sites import hook_name
from ...validation import check_int, check_layers, check_positive, resolve_layers
from ..registry import register_method
from ..training import LossPart, sum_parts
from ..weights import w_out_owner
from .common import TrainedBaseline, check_nonnegative

__all__ = ["RMU", "layer_activation", "random_direction", "rmu_loss"]


def layer_activation(model, batch: EncodedBatch, layer: int) -> Float[Tensor, "token d_model"]:
    """The residual stream after ``layer`` at the batch's counted tokens (prompt and answer;
    BOS and padding left out), row by row, in float32; with autograd where it is on. The
    forward pass stops after ``layer``.

    Example:
        >>> from mechunlearn.batching import iter_batches
        >>> batch = next(iter(iter_batches(model, ["3+4="], ["7"])))   # BOS + 5 tokens
        >>> layer_activation(model, batch, 1).shape
        torch.Size([5, 32])
    """
    kept: dict[str, Tensor] = {}

    def keep(activation: Float[Tensor, "batch pos d_model"], hook=None) -> Tensor:
        kept["h"] = activation
        return activation

    name = hook_name("resid_post", layer)
    forward_until(model, batch, [(name, keep)], name)
    return kept["h"][batch.mask("all")].float()


def random_direction(d_model: int, seed: int) -> Float[Tensor, " d_model"]:
    """The RMU direction ``u``: uniform in ``[0, 1)`` per coordinate, normalised (float32).

    Example:
        >>> u = random_direction(4, seed=0)
        >>> round(float(u.norm()), 6), bool((u >= 0).all())
        (1.0, True)
    """
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(d_model, generator=gen, dtype=torch.float32)
    return u / u.norm()


def rmu_loss(
    model,
    batch_f: EncodedBatch,
    batch_r: EncodedBatch,
    layer: int,
    control: Float[Tensor, " d_model"],
    reference: Callable[[EncodedBatch], Float[Tensor, "token d_model"]],
    alpha: float,
    *,
    parts: bool = False,
) -> tuple[Float[Tensor, ""], dict[str, Tensor]] | Iterator[LossPart]:
    """RMU's loss ``MSE(h(forget), control) + alpha * MSE(h(retain), h_ref(retain))``.

    Args:
        model: the model being trained.
        batch_f, batch_r: a forget and a retain batch.
        layer: the steered layer.
        control: the target ``c * u``.
        reference: ``reference(batch_r)``, the frozen model's activations at the retain batch's
            counted tokens, in :func:`layer_activation`'s order.
        alpha: the retain weight.
        parts: return the loss as the training loop takes it
            (:data:`~mechunlearn.interventions.training.LossFn`): the forget MSE, then
            ``alpha`` times the retain MSE, computed one after the other.

    Returns:
        The loss and ``{"loss", "forget_loss" (forget MSE), "retain_loss" (retain MSE, before
        alpha)}``; with ``parts``, its two parts.

    Example:
        >>> from mechunlearn.batching import iter_batches
        >>> batch_f = next(iter(iter_batches(model, forget.prompts, forget.answers)))
        >>> batch_r = next(iter(iter_batches(model, retain.prompts, retain.answers)))
        >>> with torch.no_grad():
        ...     ref = layer_activation(model, batch_r, 1)
        ...     loss, terms = rmu_loss(model, batch_f, batch_r, 1, torch.zeros(32),
        ...                            lambda b: ref, alpha=100.0)
        >>> float(terms["retain_loss"])      # the model is its own reference
        0.0
    """

    def generate() -> Iterator[LossPart]:
        h_f = layer_activation(model, batch_f, layer)
        loss_f = F.mse_loss(h_f, control.to(h_f.device).expand_as(h_f))
        yield loss_f, {"forget_loss": loss_f}
        h_r = layer_activation(model, batch_r, layer)
        loss_r = F.mse_loss(h_r, reference(batch_r).to(h_r.device))
        yield alpha * loss_r, {"retain_loss": loss_r}

    return generate() if parts else sum_parts(generate())


@register_method("RMU", fits_on="model")
class RMU(TrainedBaseline):
    """RMU baseline: steer one layer's forget activations to a random vector, keep the retain
    ones, training a few layers' ``W_out`` by AdamW (module docstring).

    Defaults, from the authors' WMDP run on Zephyr-7B (32 layers, ``d_model`` 4096: layer 7,
    trained ``W_out`` of layers 5, 6, 7, ``c=6.5``, ``alpha=1200``, ``lr=5e-5``, AdamW with
    torch's ``weight_decay=0.01``, batches of 4) scaled to the 30-layer default model:

    * ``layer=7`` (the same relative depth, 7/32 of 30 is 6.6), ``trained_layers=None`` (layers
      ``layer - 2 .. layer``);
    * ``steering_coeff=100``: ``c`` sets the size of the target ``c * u`` against the
      activations it replaces. The default model's residual stream after layer 7 has a mean
      per-token norm of about 118 on GSM8K text (111 after layer 6, BOS left out); a target of
      about that norm redirects the forget activations instead of shrinking them toward zero,
      which is what Zephyr's 6.5 would do here (a target 18 times smaller than SmolLM2's
      activations). Our choice, not measured against the authors' Zephyr norms.
    * ``alpha=100``: per coordinate, the forget MSE starts near ``(|h|^2 + c^2) / d_model``
      (about 40 here), larger than Zephyr's (about 0.01 at ``c=6.5``); with ``alpha=100`` the
      retain term matters once retain activations move by about 0.6 per coordinate, a tenth
      of their scale (5.8).
    * ``lr=5e-5``, ``weight_decay=0.01``, ``batch_size=4``, ``max_steps=60`` (the authors run
      150 batches of 4 texts of up to 512 tokens; ours are short question and answer texts).

    RMU has no early stop (neither has the authors' code): it runs ``max_steps`` steps.

    Args:
        layer: the steered layer ``l`` (negative from the end).
        trained_layers: layers whose ``W_out`` is trained, each at most ``layer``; None for
            ``layer - 2, layer - 1, layer`` (those that exist).
        steering_coeff: ``c`` (> 0).
        alpha: the retain weight (>= 0).
        lr: AdamW's learning rate.
        weight_decay: AdamW's decoupled weight decay.
        max_steps: optimizer steps.
        batch_size: examples per batch (one forget and one retain batch per step).
        max_length: truncate texts to this many tokens (default: the model's context).
        seed: seed of the batch order and of the direction ``u``.

    Attributes:
        layers_, d_mlp_, meta_, deltas_, history_, n_updates_, stop_reason_: see
            :class:`~.common.TrainedBaseline` (``layers_``: the trained layers).
        layer_: the steered layer (non-negative).
        direction_: ``[d_model]`` float32 unit vector ``u``.

    Example:
        >>> rmu = mu.RMU(layer=2, steering_coeff=5.0, max_steps=4, lr=1e-2).fit(
        ...     model, forget, retain, quiet=True)
        >>> rmu.layers_, rmu.layer_, sorted(rmu.history_[0])
        ([0, 1, 2], 2, ['forget_loss', 'loss', 'retain_loss'])
        >>> rmu.history_[-1]["forget_loss"] < rmu.history_[0]["forget_loss"]
        True
    """

    _label = "RMU"
    _fitted_attrs = TrainedBaseline._fitted_attrs + ("layer_", "direction_")

    def __init__(
        self,
        layer: int = 7,
        trained_layers: int | Sequence[int] | None = None,
        steering_coeff: float = 100.0,
        alpha: float = 100.0,
        lr: float = 5e-5,
        weight_decay: float = 0.01,
        max_steps: int = 60,
        batch_size: int = 4,
        max_length: int | None = None,
        seed: int = 0,
    ):
        check_int("layer", layer, min_val=None)
        trained_layers = check_layers(trained_layers, "trained_layers")
        check_positive("steering_coeff", steering_coeff)
        check_nonnegative("alpha", alpha)
        self._set_training(lr, weight_decay, max_steps, batch_size, max_length, seed)
        self.layer = layer
        self.trained_layers = trained_layers
        self.steering_coeff = steering_coeff
        self.alpha = alpha

    def _steered_layer(self, model) -> int:
        return resolve_layers(model, self.layer)[0]

    def _layers(self, model) -> list[int]:
        layer = self._steered_layer(model)
        if self.trained_layers is None:
            return list(range(max(0, layer - 2), layer + 1))
        layers = resolve_layers(model, self.trained_layers)
        if max(layers) > layer:
            raise ValueError(
                f"trained_layers {layers} go past the steered layer {layer}: the loss does not "
                "reach a layer above it."
            )
        return layers

    def _parameters(self, model, layers):
        names = {id(p): n for n, p in model.named_parameters()}
        out = []
        for layer in layers:
            owner, _ = w_out_owner(model, layer)
            out.append((names[id(owner)], owner))
        return out

    def _objective(self, model, items_f, items_r):
        layer = self._steered_layer(model)
        device = model_device(model)
        self._direction = random_direction(int(model.cfg.d_model), self.seed)
        control = (float(self.steering_coeff) * self._direction).to(device)
        cached: list[Tensor] = []
        with torch.no_grad():
            for start in range(0, len(items_r), self.batch_size):
                index = list(range(start, min(start + self.batch_size, len(items_r))))
                batch = pad_batch(model, [items_r[i] for i in index], index).to(device)
                h = layer_activation(model, batch, layer)
                counts = batch.mask("all").sum(1).tolist()
                cached += list(torch.split(h, counts))

        def reference(batch: EncodedBatch) -> Tensor:
            return torch.cat([cached[i] for i in batch.example_index.tolist()])

        alpha = float(self.alpha)

        def loss_fn(batch_f, batch_r):
            return rmu_loss(model, batch_f, batch_r, layer, control, reference, alpha, parts=True)

        return loss_fn, None

    def fit(self, model, forget, retain, quiet: bool = False):
        super().fit(model, forget, retain, quiet)
        self.layer_ = self._steered_layer(model)
        self.direction_ = self._direction
        return self

    fit.__doc__ = TrainedBaseline.fit.__doc__

    def _extra_state(self):
        return {"direction": self.direction_}, {"layer": self.layer_}

    def _set_extra_state(self, tensors, info):
        self.direction_ = tensors["direction"]
        self.layer_ = int(info["layer"])
