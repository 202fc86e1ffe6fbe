"""Interventions: Neuron Adjust, Key Space Detection, Selective Pruning, LUNAR, SIMU, and the
trained baselines GA, GradDiff, NPO and RMU (:mod:`.baselines`).

Each method is one module (or one package: LUNAR, SIMU, Key Space Detection) holding its class and
its registration next to it (:mod:`.registry`,
``@register_method("NA", fits_on="pre")``); :func:`methods` lists them.

Every intervention follows scikit-learn's estimator contract (:mod:`.base`): the constructor
stores hyperparameters, ``fit(...)`` returns ``self``, fitted state ends in ``_``,
``hooks(model=None)`` gives ``[(hook_name, fn), ...]``, and ``save``/``load`` round-trip.
Interventions fit on collected statistics (:mod:`mechunlearn.collect`); they depend on the
numerical kernels (:mod:`mechunlearn.kernels`), never on :mod:`mechunlearn.analysis`.

Example:
    >>> from mechunlearn.interventions import NeuronAdjust, KeySpaceDetector
    >>> na = NeuronAdjust(ratio=0.03).fit(stats_f, stats_r)
    >>> logits = model.run_with_hooks(tokens, fwd_hooks=na.hooks(model))
    >>> ksd = KeySpaceDetector(fpr=0.1).fit(keys_f, keys_r)   # alpha calibrated on 30 negatives
    >>> ksd.fpr_
    0.1
    >>> out = ksd.generate(model, ["3+4=", "copy b:"], max_new_tokens=8)
    >>> out[0]                                         # a forget-skill prompt: refused
    'Sorry, your query is not valid'
"""

# isort: off
# The registration order is the order of every table: the paper's methods, then the others.
from . import neuron_adjust, key_space, pruning, lunar, simu  # noqa: F401
from .baselines import grad_ascent, grad_diff, npo, rmu  # noqa: F401

# isort: on
from ..stats import Importance
from .base import Detector, HookIntervention, Intervention, NotFittedError, WeightIntervention
from .baselines import NPO, RMU, GradAscent, GradDiff, TrainedBaseline
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
from .registry import (
    MethodSpec,
    get_method,
    methods,
    register_method,
    spec_of,
    unregister_method,
)
from .simu import Attribution, MaskedSophiaH, Simu, critical_neurons, neuron_attribution
from .weights import WeightEdit, w_out

__all__ = [
    "NPO",
    "REFUSAL",
    "RMU",
    "Attribution",
    "MaskedSophiaH",
    "Detection",
    "DetectionRecord",
    "GradAscent",
    "GradDiff",
    "Detector",
    "HookIntervention",
    "MethodSpec",
    "WeightIntervention",
    "get_method",
    "methods",
    "register_method",
    "spec_of",
    "unregister_method",
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
    "TrainedBaseline",
    "WeightEdit",
    "critical_neurons",
    "layer_seed",
    "neuron_attribution",
    "reference_prompts",
    "sweep_ratio",
    "w_out",
]
