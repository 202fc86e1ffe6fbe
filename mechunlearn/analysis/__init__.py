"""Checks of the assumptions behind Neuron Adjust and Key Space Detection, layer by layer.

Each analysis returns a result object of DataFrames (drawn by :mod:`mechunlearn.plots`). The
cube primitives and the separation scores and selection live in :mod:`mechunlearn.kernels`
(the interventions use them too) and are re-exported here.

* :func:`gaussian_fit`: are ``hook_pre`` values Gaussian per neuron? (NA's assumption)
* :func:`separation`: which neurons separate two skills? (NA's selection)
* :func:`hypercube`: do a skill's queries sit in a hypercube of the key space? (KSD's assumption)
* :func:`convexity`: is that region convex, linearly separable, one box or several?
"""

from ..kernels.regions import (
    Cube,
    contains,
    fit_cube,
    inclusion_rate,
    k_min,
    log_volume,
    normalized_distance,
)
from ..kernels.separation import separation_scores, top_neurons
from .convexity import ConvexityResult, convexity
from .gaussian import GaussianFit, gaussian_fit
from .hypercube import HypercubeResult, hypercube
from .separation import Separation, separation

__all__ = [
    "ConvexityResult",
    "Cube",
    "GaussianFit",
    "HypercubeResult",
    "Separation",
    "contains",
    "convexity",
    "fit_cube",
    "gaussian_fit",
    "hypercube",
    "inclusion_rate",
    "k_min",
    "log_volume",
    "normalized_distance",
    "separation",
    "separation_scores",
    "top_neurons",
]
