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
   accuracy (:func:`choose_layer`, with the package's one choosing rule,
   :func:`~mechunlearn.kernels.ranking.rank_candidates`). (The issue's cheaper test, adding
   ``c * r_l`` to the MLP output of every prompt, cannot tell layers apart: it moves the retain
   prompts too; see ``docs/results/index.md``, "Observations without a script".) Direction and
   ``dW`` are then fitted on all the examples given (a refit, as scikit-learn's grid search
   does); the sweep is in ``layer_sweep_``.
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

Modules, one job each (every name is importable from this package): :mod:`.reference` (the
reference prompts), :mod:`.solver` (the streaming pass, the two solvers, the diagnostics),
:mod:`.layer` (``layer="auto"``: the sweep and :func:`choose_layer`), :mod:`.estimator`
(:class:`Lunar`).

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

from .estimator import SOLVERS, Lunar
from .layer import RETAIN_FLOOR, choose_layer, every_third_layer
from .reference import REFERENCE_KINDS, reference_prompts
from .solver import ADAM_BATCH_ROWS, ADAM_LR_DECAY

__all__ = [
    "ADAM_BATCH_ROWS",
    "ADAM_LR_DECAY",
    "REFERENCE_KINDS",
    "RETAIN_FLOOR",
    "SOLVERS",
    "Lunar",
    "choose_layer",
    "every_third_layer",
    "reference_prompts",
]
