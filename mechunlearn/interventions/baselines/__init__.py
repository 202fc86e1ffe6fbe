"""The trained unlearning baselines: GA, GradDiff, NPO and RMU, one module each.

Every one is a :class:`~mechunlearn.interventions.base.WeightIntervention` trained by the loop
SIMU uses (:func:`mechunlearn.interventions.training.train`) with torch's AdamW, kept as weight
deltas and applied with ``with est.apply_to_weights(model): ...``. What they share (the fit,
applying the deltas by parameter name, save and load) is :class:`.common.TrainedBaseline`.

Example:
    >>> from mechunlearn.interventions.baselines import GradDiff
    >>> gd = GradDiff(max_steps=2, lr=1e-3).fit(model, forget, retain, quiet=True)
    >>> gd.n_updates_
    2
"""

# isort: off
# The registration order is the order of every table.
from . import grad_ascent, grad_diff, npo, rmu  # noqa: F401

# isort: on
from .common import TrainedBaseline
from .grad_ascent import GradAscent, grad_ascent_loss
from .grad_diff import GradDiff, grad_diff_loss
from .npo import NPO, npo_loss
from .rmu import RMU, layer_activation, random_direction, rmu_loss

__all__ = [
    "NPO",
    "RMU",
    "GradAscent",
    "GradDiff",
    "TrainedBaseline",
    "grad_ascent_loss",
    "grad_diff_loss",
    "layer_activation",
    "npo_loss",
    "random_direction",
    "rmu_loss",
]
