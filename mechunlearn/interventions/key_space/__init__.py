"""Key Space Detection (KSD): abstain when a query's key vectors lie in the forget skill's region.

Li, Sun & Weng, "Effective Skill Unlearning through Intervention and Abstention" (NAACL 2025),
as stated in docs/methods.md ("Key Space Detection"):

1. Take the key vector (``blocks.{l}.mlp.hook_post``) at the **last prompt token** of each
   forget query (:func:`mechunlearn.collect_keys`); per layer fit ``mu`` and ``sigma`` (sample
   std) per dimension (:func:`mechunlearn.analysis.hypercube.fit_cube`, whose documented sigma
   floor keeps constant dimensions from dividing by zero).
2. The cube is ``mu +- alpha * sigma``, with ``alpha = h * k_min`` (``k_min``: the smallest cube
   holding every fit vector, :func:`~mechunlearn.analysis.hypercube.k_min`) or an absolute
   ``alpha``.
3. A query is inside a layer's cube when every dimension satisfies ``|x - mu| <= alpha * sigma``,
   i.e. when its *margin* ``max_i |x_i - mu_i| / sigma_i / alpha`` is ``<= 1``.
4. Detected queries get a fixed refusal instead of an answer.

Beyond the paper:

* **Layers and rules.** The authors check only the last layer (``layers=-1``). Any set of
  layers can be combined with ``rule="any"`` (detected when inside at one layer or more),
  ``"all"``, or an int ``k`` (inside at ``k`` layers or more).
* **Defaults (issue 16).** Every collected layer (``layers=None``), ``rule="all"``,
  ``fpr=0.001`` (no calibration negative inside), for both regions: chosen in
  ``analysis/ksd_defaults.py`` on probe data only (GSM8K probe questions; the shipped
  calibration questions; probe halves of MMLU, MBPP, Wikipedia sentences, XQuAD questions and
  HumanEval), among the every-layer candidates, since a fixed layer number would not carry to
  a model of another depth. Their detection and false-positive rates on the default model
  (held-out data never used for fitting or choosing, 95 % Wilson intervals), against the
  authors' last layer and a region fitted without negatives, are on the documentation page
  ``docs/results/formats.md`` (Results, "Detectors and formats"), with the command that
  measures them. Detection is tied to the prompt format: fit on every format you need to catch.
* **Negatives are required.** ``fit(keys_f)`` alone (no ``h``/``alpha``) is refused: a
  region fitted on the forget skill alone refuses ordinary questions at an unmeasured rate.
  :func:`mechunlearn.calibration_skill` ships general questions to calibrate on.
* **Automatic alpha.** ``fit(keys_f, keys_r)`` splits F into a fit part and a
  held-out part, and R into a calibration part and a test part. The region is fitted on the
  F fit part. ``alpha_max`` is the largest per-layer alpha that keeps the rule-level
  false-positive rate on the R calibration part ``<= fpr``: layers share one rank, each
  layer's alpha sitting just below its ``j``-th smallest R distance, with the largest ``j``
  that meets the cap (equal per-layer false-positive rates). Detection of held-out F only
  grows with alpha, so ``alpha_max`` maximises it under the cap; but so does every
  ``t * alpha_max`` with ``t`` in ``[t_min, 1]`` (``t_min``: where the last detected held-out
  forget query enters). We take the middle, ``t = (t_min + 1) / 2``: the best held-out
  detection under the cap, with a margin on both sides. The held-out rates (detection of held-out
  F, false positives on the R calibration and test parts) are in ``calibration_``, with
  ``capping_negatives``: the rows of ``keys_r`` (of the concatenation, when it is a list) that one
  rank further would be inside, i.e. the negatives that decided alpha. When held-out detection
  falls below 50 %, ``fit`` warns and names them (``docs/results/unlearning.md``, "Why seed 1
  fails", shows such a negative on the default model).
* **A region that is not a box.** :class:`EllipsoidDetector` uses the Mahalanobis distance
  under a Ledoit-Wolf shrinkage covariance, with the same interface (one base class,
  :class:`KeyRegionDetector`).

Abstention in generation (:meth:`KeyRegionDetector.generate`): one prompt-only forward with the
detection hooks (stopping after the last detection layer), then greedy generation of the kept
prompts only, left-padded in one batch; detected prompts cost no generation step.

Modules, one job each (every name is importable from this package): :mod:`.results`
(:class:`Detection`, :class:`DetectionRecord`), :mod:`.estimator` (:class:`KeyRegionDetector`:
fit, calibration, detection, generation), :mod:`.regions` (the registered shapes,
:class:`KeySpaceDetector` and :class:`EllipsoidDetector`).
"""

from .estimator import LOW_DETECTION, KeyRegionDetector
from .regions import EllipsoidDetector, KeySpaceDetector
from .results import REFUSAL, Detection, DetectionRecord

__all__ = [
    "LOW_DETECTION",
    "REFUSAL",
    "Detection",
    "DetectionRecord",
    "EllipsoidDetector",
    "KeyRegionDetector",
    "KeySpaceDetector",
]
