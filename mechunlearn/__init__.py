"""mechunlearn: mechanistic checks and inference-time skill unlearning for TransformerLens models.

Example:
    >>> import mechunlearn as mu
    >>> model = mu.load_model()                       # offline default: SmolLM2-135M-Instruct
    >>> forget = mu.load_skill("gsm8k", n=200)
    >>> stats = mu.collect(model, forget, site="pre")  # streaming per-neuron statistics

``mu.plots`` (matplotlib, seaborn) is imported on first use, not with the package.
"""

from . import analysis
from ._version import __version__
from .collect import Probe, collect, collect_importance, collect_keys
from .data import Example, Skill, SkillNotFoundError, calibration_skill, load_skill
from .evaluation import evaluate, relative_table
from .interventions import (
    REFUSAL,
    Detection,
    EllipsoidDetector,
    KeySpaceDetector,
    NeuronAdjust,
    NotFittedError,
    SelectivePruning,
    Simu,
    sweep_ratio,
)
from .io import DamagedFileError
from .models import DEFAULT_MODEL, ModelNotFoundError, load_model
from .sites import hook_name
from .stats import Importance, KeyVectors, NeuronStats

__all__ = [
    "DEFAULT_MODEL",
    "REFUSAL",
    "DamagedFileError",
    "Detection",
    "EllipsoidDetector",
    "Example",
    "Importance",
    "KeySpaceDetector",
    "KeyVectors",
    "ModelNotFoundError",
    "NeuronAdjust",
    "NeuronStats",
    "NotFittedError",
    "Probe",
    "SelectivePruning",
    "Simu",
    "Skill",
    "SkillNotFoundError",
    "__version__",
    "analysis",
    "calibration_skill",
    "collect",
    "collect_importance",
    "collect_keys",
    "evaluate",
    "hook_name",
    "load_model",
    "load_skill",
    "plots",
    "relative_table",
    "sweep_ratio",
]


def __getattr__(name: str):
    # Plotting pulls in matplotlib and seaborn: imported on first use only.
    if name in ("plots", "report"):
        import importlib

        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'mechunlearn' has no attribute {name!r}")
