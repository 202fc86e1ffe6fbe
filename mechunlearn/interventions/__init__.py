"""Interventions as TransformerLens hooks: Neuron Adjust, Key Space Detection, Selective Pruning,
LUNAR.

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
from .lunar import Lunar, reference_prompts
from .neuron_adjust import NeuronAdjust, layer_seed, sweep_ratio
from .pruning import Importance, SelectivePruning, WeightEdit, collect_importance

__all__ = [
    "REFUSAL",
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
    "WeightEdit",
    "collect_importance",
    "layer_seed",
    "ledoit_wolf_shrinkage",
    "reference_prompts",
    "sweep_ratio",
]
