"""Checks of the assumptions behind Neuron Adjust and Key Space Detection, layer by layer.

* :func:`gaussian_fit`: are ``hook_pre`` values Gaussian per neuron? (NA's assumption)
* :func:`separation`: which neurons separate two skills? (NA's selection)
* :func:`hypercube`: do a skill's queries sit in a hypercube of the key space? (KSD's assumption)
* :func:`convexity`: is that region convex, linearly separable, one box or several?
"""

from .convexity import ConvexityResult, convexity
from .gaussian import GaussianFit, gaussian_fit
from .hypercube import (
    Cube,
    HypercubeResult,
    contains,
    fit_cube,
    hypercube,
    inclusion_rate,
    k_min,
    log_volume,
    normalized_distance,
)
from .separation import Separation, separation, separation_scores, top_neurons

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
