"""mechunlearn: mechanistic checks and inference-time skill unlearning for TransformerLens models.

Example:
    >>> import mechunlearn as mu
    >>> model = mu.load_model()   # offline default: SmolLM2-135M-Instruct  # doctest: +SKIP
    >>> forget = mu.load_skill("gsm8k", n=200)                            # doctest: +SKIP
    >>> stats = mu.collect(model, forget, site="pre", quiet=True)  # per-neuron statistics
    >>> stats.mean.shape          # (layers, d_mlp): [30, 1536] on the default model
    torch.Size([3, 48])

The docstrings' examples run as doctests (``make doctest``) against a tiny random Llama
(3 layers, ``d_mlp`` 48, a character-level vocabulary of 101 tokens) and two 30-example skills,
``forget`` (``"3+4="`` -> ``"7"``) and ``retain`` (``"copy b:"`` -> ``" b"``), built by the
repository's ``conftest.py``; their outputs are that model's. Lines that need the real model,
the benchmark data or minutes of compute are marked ``# doctest: +SKIP``.

``mu.plots`` (matplotlib, seaborn) is imported on first use, not with the package.
"""

from . import analysis
from ._version import __version__
from .collect import Probe, collect, collect_importance, collect_keys, run_pass
from .data import Example, Skill, SkillNotFoundError, calibration_skill, load_skill
from .evaluation import evaluate, relative_table
from .fluency import fluency, fluency_table
from .generation import greedy_generate, own_continuations
from .interventions import (
    NPO,
    REFUSAL,
    RMU,
    Detection,
    Detector,
    EllipsoidDetector,
    GradAscent,
    GradDiff,
    HookIntervention,
    KeySpaceDetector,
    Lunar,
    NeuronAdjust,
    NotFittedError,
    SelectivePruning,
    Simu,
    WeightIntervention,
    get_method,
    methods,
    reference_prompts,
    register_method,
    sweep_ratio,
)
from .io import DamagedFileError
from .memory import MemoryPrediction, predict_memory
from .models import (
    DEFAULT_MODEL,
    OFFLINE_MODELS,
    ModelNotFoundError,
    UnsupportedArchitectureError,
    load_model,
)
from .sites import hook_name
from .stats import Importance, KeyVectors, NeuronStats
from .tuning import Search, prune_iteratively, tune, tune_neuron_adjust

__all__ = [
    "DEFAULT_MODEL",
    "NPO",
    "REFUSAL",
    "RMU",
    "DamagedFileError",
    "Detection",
    "Detector",
    "EllipsoidDetector",
    "Example",
    "GradAscent",
    "GradDiff",
    "HookIntervention",
    "Importance",
    "KeySpaceDetector",
    "KeyVectors",
    "Lunar",
    "MemoryPrediction",
    "ModelNotFoundError",
    "NeuronAdjust",
    "NeuronStats",
    "NotFittedError",
    "OFFLINE_MODELS",
    "Probe",
    "Search",
    "SelectivePruning",
    "Simu",
    "Skill",
    "SkillNotFoundError",
    "UnsupportedArchitectureError",
    "WeightIntervention",
    "__version__",
    "analysis",
    "calibration_skill",
    "collect",
    "collect_importance",
    "collect_keys",
    "evaluate",
    "fluency",
    "fluency_table",
    "get_method",
    "greedy_generate",
    "hook_name",
    "load_model",
    "load_skill",
    "methods",
    "own_continuations",
    "plots",
    "predict_memory",
    "prune_iteratively",
    "reference_prompts",
    "register_method",
    "relative_table",
    "run_pass",
    "sweep_ratio",
    "tune",
    "tune_neuron_adjust",
]


def __getattr__(name: str):
    # Plotting pulls in matplotlib and seaborn: imported on first use only.
    if name in ("plots", "report"):
        import importlib

        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'mechunlearn' has no attribute {name!r}")
