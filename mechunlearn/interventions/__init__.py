"""Interventions: Neuron Adjust, Key Space Detection, Selective Pruning (hooks), SIMU (weights).

Every intervention follows scikit-learn's estimator contract (:mod:`.base`): the constructor
stores hyperparameters, ``fit(...)`` returns ``self``, fitted state ends in ``_``,
``hooks(model=None)`` gives ``[(hook_name, fn), ...]``, and ``save``/``load`` round-trip.

Example:
    >>> from mechunlearn.interventions import NeuronAdjust, KeySpaceDetector
    >>> na = NeuronAdjust(ratio=0.03).fit(pre_f, pre_r)
    >>> logits = model.run_with_hooks(tokens, fwd_hooks=na.hooks(model))
    >>> ksd = KeySpaceDetector(h=2.0).fit(keys_f)
    >>> ksd.generate(model, prompts, max_new_tokens=64)
"""

from .base import Intervention, NotFittedError
from .key_space import (
    REFUSAL,
    Detection,
    DetectionRecord,
    EllipsoidDetector,
    KeyRegionDetector,
    KeySpaceDetector,
    ledoit_wolf_shrinkage,
)
from .neuron_adjust import NeuronAdjust, layer_seed, sweep_ratio
from .pruning import Importance, SelectivePruning, WeightEdit, collect_importance
from .simu import Attribution, MaskedSophiaH, Simu, critical_neurons, neuron_attribution

__all__ = [
    "REFUSAL",
    "Attribution",
    "Detection",
    "DetectionRecord",
    "EllipsoidDetector",
    "Importance",
    "Intervention",
    "KeyRegionDetector",
    "KeySpaceDetector",
    "MaskedSophiaH",
    "NeuronAdjust",
    "NotFittedError",
    "SelectivePruning",
    "Simu",
    "WeightEdit",
    "collect_importance",
    "critical_neurons",
    "layer_seed",
    "ledoit_wolf_shrinkage",
    "neuron_attribution",
    "sweep_ratio",
]
