"""mechunlearn: mechanistic checks and inference-time skill unlearning for TransformerLens models.

Example:
    >>> import mechunlearn as mu
    >>> model = mu.load_model()                       # offline default: SmolLM2-135M-Instruct
    >>> forget = mu.load_skill("gsm8k", n=200)
    >>> stats = mu.collect(model, forget, site="pre")  # streaming per-neuron statistics
"""

__version__ = "0.1.0"

from . import analysis, plots  # noqa: E402
from .collect import KeyVectors, NeuronStats, collect, collect_keys  # noqa: E402
from .data import Example, Skill, SkillNotFoundError, load_skill  # noqa: E402
from .evaluation import evaluate, relative_table  # noqa: E402
from .interventions import (  # noqa: E402
    REFUSAL,
    Detection,
    EllipsoidDetector,
    Importance,
    KeySpaceDetector,
    Lunar,
    NeuronAdjust,
    NotFittedError,
    SelectivePruning,
    collect_importance,
    reference_prompts,
    sweep_ratio,
)
from .models import DEFAULT_MODEL, ModelNotFoundError, load_model  # noqa: E402
from .sites import hook_name  # noqa: E402

__all__ = [
    "DEFAULT_MODEL",
    "REFUSAL",
    "Detection",
    "Importance",
    "sweep_ratio",
    "EllipsoidDetector",
    "KeySpaceDetector",
    "Lunar",
    "NeuronAdjust",
    "NotFittedError",
    "SelectivePruning",
    "analysis",
    "collect_importance",
    "evaluate",
    "plots",
    "relative_table",
    "Example",
    "KeyVectors",
    "ModelNotFoundError",
    "NeuronStats",
    "Skill",
    "SkillNotFoundError",
    "collect",
    "collect_keys",
    "hook_name",
    "load_model",
    "load_skill",
    "reference_prompts",
]
