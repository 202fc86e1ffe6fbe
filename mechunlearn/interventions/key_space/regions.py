"""The two region shapes of key-space detection, each a registered method: the paper's cube
(:class:`KeySpaceDetector`) and the ellipsoid (:class:`EllipsoidDetector`)."""

from __future__ import annotations

from collections.abc import Sequence

from jaxtyping import Float
from torch import Tensor

from ...kernels.regions import (
    Cube,
    fit_cube,
    fit_ellipsoid,
    mahalanobis,
    normalized_distance,
)
from ..registry import register_method
from .estimator import KeyRegionDetector


@register_method("KSD", fits_on="keys", full_name="KeySpaceDetection")
class KeySpaceDetector(KeyRegionDetector):
    """The paper's detector: an axis-aligned cube ``mu +- alpha * sigma`` per layer.

    The cube primitives (sigma floor, ``k_min``, the margin) are those of
    :mod:`mechunlearn.analysis.hypercube`, so analyses and the detector agree exactly.
    See :class:`KeyRegionDetector` for the arguments, attributes and methods.

    Where we deviate from the authors' code: any set of layers with a rule (they check only the
    last layer), a sigma floor instead of a division by zero, and an optional automatic alpha.

    Example:
        >>> ksd = mu.KeySpaceDetector(fpr=0.1).fit(keys_f, keys_r)
        >>> ksd.cube_.mu.shape        # [layer, d_mlp]: every layer by default
        torch.Size([3, 48])
        >>> ksd.detect(model, ["3+4=", "copy b:"]).detected.tolist()
        [True, False]
        >>> forget = mu.load_skill("gsm8k", n=200)                   # doctest: +SKIP
        >>> keys_cal = mu.collect_keys(model, mu.calibration_skill())  # doctest: +SKIP
        >>> ksd = KeySpaceDetector().fit(mu.collect_keys(model, forget), keys_cal)  # doctest: +SKIP
        >>> prompts = ["Natalia sold clips to 48 of her friends...", "def f(x):"]
        >>> ksd.generate(model, prompts)  # doctest: +SKIP
    """

    def _fit_region(self, x: Float[Tensor, "n layer d"]) -> dict[str, Tensor]:
        cube = fit_cube(x)
        return {
            "mu": cube.mu,
            "sigma": cube.sigma,
            "floor": cube.floor,
            "n_floored": cube.n_floored,
        }

    @staticmethod
    def _cube(region: dict[str, Tensor]) -> Cube:
        return Cube(region["mu"], region["sigma"], region["floor"], region["n_floored"], 0)

    def _distance(self, x: Float[Tensor, "m layer d"], region: dict[str, Tensor]) -> Tensor:
        return normalized_distance(x, self._cube(region))

    def _distance_row(self, x: Float[Tensor, "b d"], region_row: dict[str, Tensor]) -> Tensor:
        return normalized_distance(x, self._cube(region_row))

    @property
    def cube_(self) -> Cube:
        """The fitted cubes as a :class:`~mechunlearn.analysis.hypercube.Cube` (per layer)."""
        self._check_fitted()
        return self._cube(self.region_)


# ------------------------------------------------------------------------------ the ellipsoid
#: The ellipsoid's defaults (``analysis/detector_calibration.py``): inside at every layer, a
#: conformal false-positive cap of 0.005 (needs 199 negatives). Its regions are tighter than the
#: cube's, so it needs no share rule; with the cube's (2/3, 0.01) it refused 8 % of unseen MMLU
#: questions on one seed.
ELLIPSOID_RULE = "all"
ELLIPSOID_FPR = 0.005


@register_method("Ellipsoid", fits_on="keys", full_name="EllipsoidDetection")
class EllipsoidDetector(KeyRegionDetector):
    """A detector whose region is an ellipsoid: Mahalanobis distance under a shrunk covariance.

    Per layer, ``Sigma = (1 - s) * S + s * (tr S / d) * I`` (``S`` the empirical covariance of
    the fit keys, ``s`` the Ledoit-Wolf intensity or a fixed ``shrinkage``), and the distance
    of ``x`` is ``sqrt((x - mu)^T Sigma^-1 (x - mu))``. alpha is chosen as for the cube
    (``h * k_min`` with ``k_min`` the largest fit distance, an absolute ``alpha``, or
    automatically). ``Sigma^-1`` is applied through the eigenvectors of ``S`` (at most
    ``n - 1`` of them) with the Woodbury identity, so a hook costs a ``[b, d] x [d, n]``
    product, and nothing of size ``d x d`` is stored when ``n < d``. The isotropic part
    ``s * tr S / d`` is floored at ``1e-6 * tr S / d`` (``shrinkage=0`` with ``n <= d``
    would be singular).

    Args:
        shrinkage: None for Ledoit-Wolf, or a fixed intensity in [0, 1].
        h, alpha, layers, rule, fpr, calibration, test_size, seed: as for
            :class:`KeyRegionDetector`.

    Example:
        >>> ell = mu.EllipsoidDetector(h=1.5, layers=[-3, -2, -1], rule=2).fit(keys_f)
        >>> ell.detect(model, ["3+4=", "copy b:"]).detected.tolist()
        [True, False]
        >>> ell.detect_keys(keys_r).rate
        0.0
    """

    def __init__(
        self,
        h: float | None = None,
        alpha: float | None = None,
        layers: int | Sequence[int] | None = None,
        rule: str | int | float = ELLIPSOID_RULE,
        fpr: float = ELLIPSOID_FPR,
        calibration: str = "conformal",
        test_size: float | int = 0.5,
        seed: int = 0,
        shrinkage: float | None = None,
    ):
        super().__init__(
            h=h, alpha=alpha, layers=layers, rule=rule, fpr=fpr, calibration=calibration,
            test_size=test_size, seed=seed,
        )  # fmt: skip
        if shrinkage is not None:
            shrinkage = float(shrinkage)
            if not 0.0 <= shrinkage <= 1.0:
                raise ValueError(
                    f"shrinkage must be None (Ledoit-Wolf) or in [0, 1], got {shrinkage}."
                )
        self.shrinkage = shrinkage

    def _fit_region(self, x: Float[Tensor, "n layer d"]) -> dict[str, Tensor]:
        return fit_ellipsoid(x.transpose(0, 1), self.shrinkage)

    def _distance(self, x: Float[Tensor, "m layer d"], region: dict[str, Tensor]) -> Tensor:
        x = x.to(region["mu"].device, region["mu"].dtype)
        return mahalanobis(x - region["mu"], region["u"], region["coef"], region["iso"])

    def _distance_row(self, x: Float[Tensor, "b d"], region_row: dict[str, Tensor]) -> Tensor:
        v = x - region_row["mu"]
        return mahalanobis(v, region_row["u"], region_row["coef"], region_row["iso"])
