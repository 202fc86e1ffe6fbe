"""What comes back after unlearning: attacks on every registered method, by kind.

Each attack family is one module; each dispatches on the method's kind with ``isinstance``
(:class:`~mechunlearn.interventions.HookIntervention`: hooks attached;
:class:`~mechunlearn.interventions.WeightIntervention`: ``apply_to_weights``;
:class:`~mechunlearn.interventions.Detector`: the bare model, the detector watching):

* :mod:`.prompts`: the forget skill (and the kept skills) under format wrappers, few-shot
  priming and an instruction to ignore restrictions (:func:`prompt_attacks`).
* :mod:`.relearning`: a few fine-tuning steps with the method in place (:func:`relearning`),
  the model's weights restored bit for bit afterwards.
* :mod:`.quantization`: the edited weights rounded to 8 and 4 bits (:func:`requantization`).
* :mod:`.residual`: what the hidden states still hold: logit lens and linear probes per layer
  (:func:`residual_knowledge`).

:mod:`.summary` turns the families' tables into one recovery table per run (the forget skill's
number per method and attack, :func:`recovery_table`, :func:`recovery_markdown`).

``mechunlearn attack --out DIR`` runs them on a finished run folder (docs/attacks.md).

Example:
    >>> from mechunlearn.attacks import prompt_attacks
    >>> table = prompt_attacks(model, {"SP": sp}, forget[:8], [retain[:8]],
    ...                        shots=forget[8:12], attacks=["none", "comment"], quiet=True)
    >>> sorted(set(table["attack"]))
    ['comment', 'none']
"""

from .prompts import (
    ATTACKS,
    IGNORE_PREFIX,
    PARAGRAPHS,
    attack_skill,
    few_shot_skill,
    ignore_instructions,
    prompt_attacks,
)
from .quantization import (
    BITS,
    edited_parameters,
    quantization_step,
    quantize_tensor,
    requantization,
)
from .relearning import (
    STEPS,
    finetune,
    recovery_interval,
    relearning,
    weights_restored,
)
from .residual import (
    last_prompt_states,
    linear_probe,
    logit_lens,
    residual_knowledge,
)
from .summary import recovery_markdown, recovery_table

__all__ = [
    "ATTACKS",
    "BITS",
    "IGNORE_PREFIX",
    "PARAGRAPHS",
    "STEPS",
    "attack_skill",
    "edited_parameters",
    "few_shot_skill",
    "finetune",
    "ignore_instructions",
    "last_prompt_states",
    "linear_probe",
    "logit_lens",
    "prompt_attacks",
    "quantization_step",
    "quantize_tensor",
    "recovery_interval",
    "recovery_markdown",
    "recovery_table",
    "relearning",
    "requantization",
    "residual_knowledge",
    "weights_restored",
]
