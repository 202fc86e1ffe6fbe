"""SIMU: attribute the forget skill to MLP neurons, then unlearn with masked second-order steps.

Agarwal, Pamnani & Hakkani-Tür, "SIMU: Selective Influence Machine Unlearning" (2025; no public
code), as stated in docs/methods.md ("SIMU"):

1. **Attribution** (:func:`neuron_attribution`). Integrated gradients of every MLP neuron's key
   value ``beta`` (site *key*, ``blocks.{l}.mlp.hook_post``, the input of ``W_out``) along the
   straight path from 0 to ``beta`` in ``steps`` (``m``) right-Riemann steps ``alpha = j / m``,
   ``j = 1..m`` (as in Dai et al.'s knowledge neurons, which SIMU's ``Att(w_l^k)`` follows)::

       Att(l, k) = 1/m  sum_j  sum_tokens  beta_lk * d logL / d a_lk  at  a = alpha_j * beta

   where ``logL`` is the mean log-likelihood of the skill's answer tokens (teacher-forced,
   every answer token predicted from the position before it), i.e. minus the forget loss
   ``L_F``. Two precision choices:

   * **Sign.** ``Att`` is the attribution of ``-L_F``, so ``Att > 0`` means the neuron's
     activation *supports* the forget answers (it lowers ``L_F``), as in Dai et al., whose
     attribution is that of the answer's probability. The issue writes ``beta * dL/da``; with
     ``L`` the loss itself, ``Att > t * max`` would select the neurons that work *against* the
     forget answers, which is not what "neurons that encode the forget set" means.
   * **All chosen layers at once.** At step ``j`` the key of *every* chosen layer is replaced by
     ``alpha_j * beta_l`` (``beta_l`` recorded in a clean forward pass first), and one backward
     pass gives ``dlogL/da`` for every neuron of every chosen layer. This is integrated gradients
     of the function ``logL(a_1, ..., a_L)`` of all chosen layers' keys along the straight path
     from all-zero keys to the clean keys, so completeness holds over all chosen neurons
     together: ``sum_{l,k} Att(l, k) -> logL(beta) - logL(0)`` as ``m`` grows. It costs
     ``m + 1`` passes per batch instead of the ``L * (m + 1)`` of the per-layer path (scale one
     layer, leave the others live), which for the 30-layer default model is 30 times cheaper.
     With one chosen layer (``layers=[l]``) the two paths are the same.
   * **Tokens.** ``sum_tokens`` runs over every prompt and answer token (BOS and padding
     excluded, as ``positions="all"`` in :mod:`mechunlearn.sites`); only those keys are scaled,
     BOS and padding keep their clean keys. A neuron's key at a prompt position reaches the
     answer through attention, so summing over the answer-predicting positions alone would drop
     part of its influence (and break completeness).

   A neuron is *critical* where ``Att(l, k) > t * max_k Att(l, .)`` (``threshold`` ``t``; a
   layer whose largest attribution is not positive has none). By default (``dual=False``,
   "forget-only" neurons) a neuron that is also critical for the retain skill (same rule on
   ``Att_R``) is left out; ``dual=True`` keeps these "dual" neurons (and skips the retain
   attribution).

2. **Masked second-order unlearning** (:class:`MaskedSophiaH`). GradDiff loss
   ``-L_F + gamma * L_R`` (mean answer-token cross-entropy of one forget and one retain batch
   per step), updating only (a) every parameter of the chosen layers' attention blocks except
   normalisation weights: the ``W_Q, W_K, W_V, W_O`` projections and their biases where the
   model has them, and (b) the critical neurons' rows of ``W_out``. Every other parameter has
   ``requires_grad=False`` during training. The mask is applied to the gradients (before the
   Hessian estimate), to the Hutchinson Hessian estimate, to both optimizer moments, and to the
   parameters (masked entries written back after every step), so masked entries stay
   bit-identical.

   The optimizer is ``pytorch_optimizer.SophiaH`` (pytorch-optimizer 4.x): per entry, with
   ``g`` the masked gradient, ``m <- beta1 m + (1 - beta1) g``; every ``update_period`` steps
   a Hutchinson estimate ``h = z * (H z)`` of the Hessian diagonal (``z ~ N(0, I)``, one
   Hessian-vector product by double backward, hence ``create_graph=True``), ``v <- beta2 v +
   (1 - beta2) h``; then ``w <- w - lr * clip(m / max(v, eps), -p, p)`` (no bias correction;
   library defaults ``betas=(0.96, 0.99)``, ``p=0.01``, ``update_period=10``, ``eps=1e-12``).
   **How it differs from the paper's Sophia.** SIMU uses Sophia (Liu et al., 2023) as in SOUL,
   whose Hessian diagonal is the Gauss-Newton-Bartlett estimate: labels resampled from the
   model's own softmax, ``h = B * g_hat ** 2`` (one extra ordinary backward, always >= 0, a
   Gauss-Newton approximation). Hutchinson instead estimates the diagonal of the true Hessian
   of the GradDiff loss, unbiased but noisy and possibly negative: the ascent term ``-L_F`` has
   mostly negative curvature, and where ``v <= eps`` the step is the clipped sign of the
   momentum, ``lr * p``, i.e. sign descent. It needs a double backward (about twice the memory
   of a step) on the Hessian steps only. The ``'rademacher'`` probe distribution is refused.
   ``optimizer_kwargs`` passes the other SophiaH arguments (``betas``, ``p``,
   ``update_period``, ``num_samples``, ``weight_decay``, ``eps``). SophiaH reads the graph of
   ``p.grad`` for its Hessian-vector product; :meth:`Simu.fit` computes the gradients with
   ``torch.autograd.grad(loss, params, create_graph=True)`` on the Hessian steps (plain
   gradients otherwise) and assigns them to ``p.grad``, which is what
   ``loss.backward(create_graph=True)`` does without its parameter-gradient reference cycle.

   Training runs ``max_steps`` steps at most and stops early once a step's forget loss reaches
   ``forget_loss_factor`` times the initial loss of the same examples (measured before
   training, in the attribution pass). A non-finite loss, or an update that makes a trained
   weight non-finite, stops it with a FloatingPointError that names the step (``non-finite at
   step k``). On any exit (finished, error, KeyboardInterrupt) the model's weights
   and ``requires_grad`` flags are restored bit-identically: :meth:`Simu.fit` leaves the model
   exactly as it found it and keeps the result as weight deltas.

3. **Result.** ``deltas_``: per trained attention parameter, ``new - old``; per layer with
   critical neurons, the change of their ``W_out`` rows. :meth:`Simu.apply_to_weights` adds
   them in place and restores the weights on exit (even after an exception). The attention
   deltas have no cheap hook form, so :meth:`Simu.hooks` raises NotImplementedError;
   :meth:`Simu.mlp_hooks` gives the exact hook form of the ``W_out`` part alone (``key @
   dW_out`` added at ``hook_mlp_out``), for analysis.

The training loop (batching, frozen parameters, progress bar, early stop, the NaN and
explosion stops, deltas, restoring the model) is :func:`mechunlearn.interventions.training.train`,
shared with the trained baselines (GA, GradDiff, NPO, RMU); SIMU gives it its loss, its masked
optimizer, its trained parameters and the second-order steps.

Randomness: the batch order (a permutation of each set per pass) and the Hutchinson probes
come from ``seed``; the global RNG state is left as it was (``torch.random.fork_rng``).

Modules, one job each (every name is importable from this package): :mod:`.attribution`
(:func:`neuron_attribution`, :func:`critical_neurons`), :mod:`.optimizer` (:class:`MaskedSophiaH`),
:mod:`.estimator` (:class:`Simu`).
"""

from ..training import STOP_REASONS, answer_nll
from .attribution import Attribution, critical_neurons, neuron_attribution
from .estimator import Simu
from .optimizer import MaskedSophiaH

__all__ = [
    "STOP_REASONS",
    "Attribution",
    "MaskedSophiaH",
    "Simu",
    "answer_nll",
    "critical_neurons",
    "neuron_attribution",
]
