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
  ``"all"``, an int ``k`` (inside at ``k`` layers or more), or a float share of the layers
  (``2 / 3``: inside at ``ceil(2/3 * n)`` layers or more).
* **Defaults (issue 25, item 5).** Every collected layer (``layers=None``), the conformal
  calibration below; :class:`KeySpaceDetector`: ``rule=2/3``, ``fpr=0.01``;
  :class:`EllipsoidDetector`: ``rule="all"``, ``fpr=0.005``. Chosen in
  ``analysis/detector_calibration.py`` (forget GSM8K, keep MBPP, the pipeline's negatives, three
  seeds), whose table, with unseen MMLU and XQuAD en questions, is on the documentation page
  ``docs/results/calibration.md``. The earlier defaults (issue 16, ``analysis/ksd_defaults.py``:
  rule ``"all"``, ``fpr=0.001`` with the rank calibration, i.e. no calibration negative inside)
  let one maths word problem among the negatives cap every layer: they detected 0.28 of
  held-out GSM8K on seed 1. Detection is tied to the prompt format (``docs/results/formats.md``):
  fit on every format you need to catch.
* **Negatives are required.** ``fit(keys_f)`` alone (no ``h``/``alpha``) is refused: a
  region fitted on the forget skill alone refuses ordinary questions at an unmeasured rate.
  :func:`mechunlearn.calibration_skill` ships general questions to calibrate on.
* **Automatic alpha, conformal (the default).** ``fit(keys_f, keys_r)`` splits F into a fit
  part and a held-out part; the region is fitted on the fit part. Each query's score is its
  rule-relevant margin at ``h = 1`` (the ``k``-th smallest over layers of its distance over
  ``k_min``); with ``n`` negatives and ``j = floor(fpr * (n + 1))``
  (:func:`~mechunlearn.interventions.key_space.estimator.conformal_rank`), ``h_max`` sits just
  below the ``j``-th smallest negative score, so ``j - 1`` negatives are inside. Split-conformal
  guarantee: a new query exchangeable with the negatives is detected with probability at most
  ``j / (n + 1) <= fpr``; with ``n < 1 / fpr - 1`` negatives there is no such ``j`` and ``fit``
  raises, saying how many are needed. Every ``h`` in ``[t_min, h_max]`` (``t_min``: where the last
  detected held-out forget query enters) detects the same held-out forget queries; we take the
  middle (a smaller ``h`` keeps the guarantee). ``calibration_`` holds ``rank`` (``j``),
  ``bound`` (``j / (n + 1)``), the held-out detection ``detect_f``, the share of negatives
  inside ``fpr_r_cal``, and ``capping_negatives``: the rows of ``keys_r`` (of the
  concatenation, when it is a list) at the ``j``-th smallest score, inside one step further.
  When held-out detection falls below 50 %, ``fit`` warns and names them.
* **Automatic alpha, rank (``calibration="rank"``, the default before issue 25).** R is split
  into a calibration part and a test part. ``alpha_max`` is the largest per-layer alpha that
  keeps the rule-level false-positive rate on the R calibration part ``<= fpr``: layers share one
  rank, each layer's alpha sitting just below its ``j``-th smallest R distance, with the largest
  ``j`` that meets the cap; then ``t * alpha_max`` with ``t = (t_min + 1) / 2`` as above. The
  held-out rates (detection of held-out F, false positives on the R calibration and test parts)
  are in ``calibration_``. No guarantee, and at ``fpr=0.001`` with fewer than 1000 negatives no
  negative may be inside, so one negative near the skill caps every layer
  (``docs/results/unlearning.md``, "Why seed 1 fails").
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
