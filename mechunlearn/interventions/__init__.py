"""Interventions: Neuron Adjust, Key Space Detection, Selective Pruning, LUNAR and SIMU.

Every intervention follows scikit-learn's estimator contract (:mod:`.base`): the constructor
stores hyperparameters, ``fit(...)`` returns ``self``, fitted state ends in ``_``,
``hooks(model=None)`` gives ``[(hook_name, fn), ...]``, and ``save``/``load`` round-trip.
Interventions fit on collected statistics (:mod:`mechunlearn.collect`); they depend on the
numerical kernels (:mod:`mechunlearn.kernels`), never on :mod:`mechunlearn.analysis`.

Example:
    >>> from mechunlearn.interventions import NeuronAdjust, KeySpaceDetector
    >>> na = NeuronAdjust(ratio=0.03).fit(stats_f, stats_r)
    >>> logits = model.run_with_hooks(tokens, fwd_hooks=na.hooks(model))
    >>> ksd = KeySpaceDetector().fit(keys_f, keys_r)   # alpha calibrated on the negatives
    >>> ksd.fpr_
    0.001
    >>> out = ksd.generate(model, ["3+4=", "copy b:"], max_new_tokens=8)
    >>> out[0]                                         # a forget-skill prompt: refused
    'Sorry, your query is not valid'
"""

from ..stats import Importance
from .base import Intervention, NotFittedError
from .key_space import (
    REFUSAL,
    Detection,
    DetectionRecord,
    EllipsoidDetector,
    KeyRegionDetector,
    KeySpaceDetector,
)
from .lunar import Lunar, reference_prompts
from .neuron_adjust import NeuronAdjust, layer_seed, sweep_ratio
from .pruning import SelectivePruning
from .simu import Attribution, MaskedSophiaH, Simu, critical_neurons, neuron_attribution
from .weights import WeightEdit, w_out

__all__ = [
    "REFUSAL",
    "Attribution",
    "MaskedSophiaH",
    "Detection",
    "DetectionRecord",
    "EllipsoidDetector",
    "Importance",
    "Intervention",
    "KeyRegionDetector",
    "KeySpaceDetector",
    "Lunar",
    "NeuronAdjust",
    "NotFittedError",
    "SelectivePruning",
    "Simu",
    "WeightEdit",
    "critical_neurons",
    "layer_seed",
    "neuron_attribution",
    "reference_prompts",
    "sweep_ratio",
    "w_out",
]
