"""Regions of key space: axis-aligned cubes ``mu +- alpha * sigma`` and shrinkage ellipsoids.

Shared by the hypercube analysis (:mod:`mechunlearn.analysis.hypercube`) and the key-space
detectors (:mod:`mechunlearn.interventions.key_space`). Conventions:

* ``sigma`` is the sample standard deviation (``ddof=1``) of the fit vectors, in float64.
* **sigma floor.** A dimension that is constant on the fit vectors (sigma = 0) would divide by
  zero. sigma is floored, per layer, at ``max(rel_floor * median_i sigma_i, abs_floor)`` with
  ``rel_floor = 1e-6`` and ``abs_floor = 1e-12``. So a constant dimension admits only values
  within ``alpha * 1e-6`` typical sigma of its constant. The number of floored dimensions is
  recorded (``Cube.n_floored``).
* **Margin.** ``normalized_distance(x, cube) = max_i |x_i - mu_i| / sigma_i``, the smallest alpha
  whose cube holds ``x``; inside at alpha when the margin is ``<= alpha`` (the same division as
  ``k_min``, so every fit vector is inside at ``alpha = k_min`` exactly). NaN is never inside.
* **k_min** is the largest margin of the fit vectors (closed form). By Samuelson's inequality it
  never exceeds ``(n - 1)/sqrt(n)`` for ``n`` fit vectors.
* **Ellipsoid.** :func:`ledoit_wolf_shrinkage` gives the Ledoit-Wolf intensity of a shrinkage
  covariance, used by :class:`~mechunlearn.interventions.EllipsoidDetector`.

Example:
    >>> cube = fit_cube(keys_f.layer(-1))            # [n, d_mlp] -> mu, sigma of shape [d_mlp]
    >>> alpha = 1.5 * k_min(keys_f.layer(-1), cube)   # KSD's alpha = h * k_min
    >>> contains(keys_r.layer(-1), cube, alpha).shape  # [m] bool
    torch.Size([30])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

REL_FLOOR = 1e-6
"""Default relative σ floor: a fraction of the layer's median σ."""


ABS_FLOOR = 1e-12
"""Default absolute σ floor (used when the median σ itself is 0)."""


_CHUNK_ELEMENTS = 1 << 24  # elements per chunk of |x − μ|/σ (128 MiB in float64)


@dataclass(frozen=True)
class Cube:
    """The box ``μ ± α·σ`` of a set of vectors, for any α.

    Leading ("batch") dimensions are allowed: fitting ``[n, layer, d_mlp]`` gives one cube per
    layer, with ``mu`` and ``sigma`` of shape ``[layer, d_mlp]``.

    Attributes:
        mu: mean per dimension.
        sigma: sample standard deviation (ddof=1) per dimension, floored at ``floor``.
        floor: the σ floor of each cube (see the module docstring).
        n_floored: dimensions whose σ was raised to the floor, per cube.
        n: number of fit vectors.

    Example:
        >>> cube = fit_cube(torch.randn(100, 48))
        >>> cube.mu.shape, cube.contains(torch.randn(5, 48), alpha=4.0).shape
        (torch.Size([48]), torch.Size([5]))
    """

    mu: Float[Tensor, "*batch d"]
    sigma: Float[Tensor, "*batch d"]
    floor: Float[Tensor, "*batch"]
    n_floored: Int[Tensor, "*batch"]
    n: int

    @property
    def d(self) -> int:
        """Number of dimensions."""
        return int(self.mu.shape[-1])

    def __getitem__(self, index) -> Cube:
        """The cube(s) at ``index`` of the leading dimensions (e.g. one layer)."""
        return Cube(
            self.mu[index], self.sigma[index], self.floor[index], self.n_floored[index], self.n
        )

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Cube:
        """A copy on ``device`` and/or in floating ``dtype``."""
        mu = self.mu.to(device=device, dtype=dtype)
        sigma = self.sigma.to(device=device, dtype=dtype)
        floor = self.floor.to(device=device, dtype=dtype)
        return Cube(mu, sigma, floor, self.n_floored.to(device), self.n)

    def distance(self, x: Tensor) -> Tensor:
        """:func:`normalized_distance` of ``x`` to this cube."""
        return normalized_distance(x, self)

    def contains(self, x: Tensor, alpha: float | Tensor) -> Tensor:
        """:func:`contains`: whether each vector of ``x`` is inside ``μ ± α·σ``."""
        return contains(x, self, alpha)

    def log_volume(self, alpha: float | Tensor) -> Tensor:
        """:func:`log_volume` of this cube at ``alpha``."""
        return log_volume(self, alpha)


def check_finite(values: Tensor, what: str = "values") -> None:
    """Raise a ValueError if ``values`` holds NaN or inf."""
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        raise ValueError(
            f"{what} hold {int(bad.sum())} non-finite (NaN/inf) values: drop those examples "
            "or collect them again in float32 (float16 overflows)."
        )


def fit_cube(
    values: Float[Tensor, "n *batch d"],
    rel_floor: float = REL_FLOOR,
    abs_floor: float = ABS_FLOOR,
    dtype: torch.dtype = torch.float64,
) -> Cube:
    """Fit ``μ`` and floored ``σ`` (sample std, ddof=1) per dimension over the first axis.

    Args:
        values: fit vectors, examples first: ``[n, d]``, or ``[n, layer, d]`` for one cube per
            layer (``KeyVectors.values`` directly).
        rel_floor: σ floor as a fraction of the median σ of each cube's dimensions.
        abs_floor: smallest floor (when the median σ is itself 0).
        dtype: dtype of the statistics (float64 by default; pass float32 on devices without
            float64).

    Returns:
        The :class:`Cube`.

    Raises:
        ValueError: fewer than two vectors, fewer than two axes, or non-finite values.

    Example:
        >>> cube = fit_cube(keys_f.values)     # [n, layer, d_mlp] -> one cube per layer
        >>> cube.mu.shape, cube[-1].sigma.shape   # every layer; the last layer
        (torch.Size([3, 48]), torch.Size([48]))
    """
    x = torch.as_tensor(values)
    if x.ndim < 2:
        raise ValueError(
            f"fit_cube needs vectors of shape [n, ..., d], got shape {tuple(x.shape)}."
        )
    if x.shape[0] < 2:
        raise ValueError(
            f"fit_cube needs at least 2 vectors for a sample standard deviation, got {x.shape[0]}."
        )
    if not (rel_floor >= 0 and abs_floor > 0):
        raise ValueError(f"Need rel_floor >= 0 and abs_floor > 0, got {rel_floor}, {abs_floor}.")
    check_finite(x, "The cube's fit vectors")
    x = x.to(dtype)
    mu = x.mean(0)
    raw = x.std(0, correction=1)
    floor = (raw.median(dim=-1).values * rel_floor).clamp(min=abs_floor)
    sigma = torch.maximum(raw, floor.unsqueeze(-1))
    n_floored = (raw < floor.unsqueeze(-1)).sum(-1)
    return Cube(mu, sigma, floor, n_floored, int(x.shape[0]))


def normalized_distance(
    x: Float[Tensor, "m *batch d"],
    cube: Cube,
) -> Float[Tensor, "m *batch"]:  # noqa: F821 (shape)
    """The margin ``max_i |x_i − μ_i| / σ_i`` of each vector: the smallest α whose cube holds it.

    ``x`` broadcasts against the cube after its first axis: ``[m, d]`` against one cube gives
    ``[m]``; ``[m, layer, d]`` against a per-layer cube gives ``[m, layer]``; ``[m, 1, d]``
    against ``k`` cubes of shape ``[k, d]`` gives ``[m, k]``. Computed in the cube's dtype, in
    chunks of rows so that memory stays bounded. A vector with a NaN gets a NaN margin.

    Example:
        >>> train, test = keys_f.layer(-1)[:20], keys_f.layer(-1)[20:]
        >>> cube = fit_cube(train)             # [n, d]
        >>> normalized_distance(test, cube).shape    # [m]
        torch.Size([10])
    """
    x = torch.as_tensor(x)
    if x.ndim < 2 or x.shape[-1] != cube.mu.shape[-1]:
        raise ValueError(
            f"Vectors of shape {tuple(x.shape)} do not match a cube of {cube.mu.shape[-1]} "
            "dimensions (expected [m, ..., d])."
        )
    x = x.to(device=cube.mu.device)
    per_row = math.prod(torch.broadcast_shapes(x.shape[1:], cube.mu.shape))
    step = max(1, _CHUNK_ELEMENTS // max(per_row, 1))
    out = [
        ((chunk.to(cube.mu.dtype) - cube.mu).abs() / cube.sigma).amax(-1) for chunk in x.split(step)
    ]
    if not out:
        shape = torch.broadcast_shapes(x.shape[1:-1], cube.mu.shape[:-1])
        return torch.zeros((0, *shape), dtype=cube.mu.dtype, device=cube.mu.device)
    return torch.cat(out)


def contains(
    x: Float[Tensor, "m *batch d"], cube: Cube, alpha: float | Tensor
) -> Bool[Tensor, "m *batch"]:  # noqa: F821 (shape)
    """Whether each vector lies in ``μ ± α·σ`` on every dimension (margin ``≤ α``).

    ``alpha`` is a number or a tensor broadcastable to the cube's leading shape (one α per
    layer). NaN vectors are outside.

    Example:
        >>> train = keys_f.layer(-1)
        >>> cube = fit_cube(train)
        >>> inside = contains(keys_r.layer(-1), cube, alpha=2 * k_min(train, cube))
        >>> inside.shape, inside.dtype
        (torch.Size([30]), torch.bool)
    """
    alpha = torch.as_tensor(alpha, dtype=cube.mu.dtype, device=cube.mu.device)
    return normalized_distance(x, cube) <= alpha


def k_min(values: Float[Tensor, "n *batch d"], cube: Cube | None = None) -> Float[Tensor, "*batch"]:
    """The smallest α whose cube holds every vector of ``values``: the largest margin.

    Args:
        values: the probe vectors (those the cube was fitted on, for KSD's ``k_min``).
        cube: the cube; fitted on ``values`` when omitted.

    Example:
        >>> km = k_min(keys_f.values)   # one k_min per layer
        >>> n = len(keys_f)
        >>> km.shape, bool((km <= (n - 1) / n**0.5).all())   # Samuelson's bound
        (torch.Size([3]), True)
    """
    cube = fit_cube(values) if cube is None else cube
    return normalized_distance(values, cube).amax(0)


def inclusion_rate(
    x: Float[Tensor, "m *batch d"], cube: Cube, alphas: Sequence[float] | Tensor
) -> Float[Tensor, "alpha *batch"]:  # noqa: F821 (shape)
    """Fraction of the vectors of ``x`` inside the cube, for each α of ``alphas``.

    Example:
        >>> cube = fit_cube(keys_f.layer(-1))
        >>> rate = inclusion_rate(keys_r.layer(-1), cube, torch.linspace(0, 20, 41))
        >>> rate.shape, float(rate[0]), bool((rate.diff() >= 0).all())   # grows with alpha
        (torch.Size([41]), 0.0, True)
    """
    margin = normalized_distance(x, cube)
    alphas = torch.as_tensor(alphas, dtype=margin.dtype, device=margin.device).reshape(-1)
    shape = (-1,) + (1,) * margin.ndim
    return (margin.unsqueeze(0) <= alphas.reshape(shape)).to(margin.dtype).mean(1)


def log_volume(cube: Cube, alpha: float | Tensor) -> Float[Tensor, "*batch"]:
    """``Σ_i log(2·α·σ_i)``: the natural log of the cube's volume at ``alpha`` (nats).

    ``alpha`` may be one number or one per cube (broadcast against the leading shape).

    Example:
        >>> train = keys_f.layer(-1)
        >>> cube = fit_cube(train)
        >>> a = k_min(train, cube)
        >>> float(log_volume(cube, 2 * a) - log_volume(cube, a))   # d_mlp * log(2)
        33.27
    """
    alpha = torch.as_tensor(alpha, dtype=cube.sigma.dtype, device=cube.sigma.device)
    return cube.d * torch.log(2 * alpha) + cube.sigma.log().sum(-1)


def ledoit_wolf_shrinkage(x: Float[Tensor, "*batch n d"]) -> Float[Tensor, " *batch"]:
    """Ledoit-Wolf shrinkage intensity of the covariance of ``x`` (rows are samples).

    The estimator of Ledoit & Wolf (2004) as scikit-learn computes it
    (``sklearn.covariance.ledoit_wolf_shrinkage`` with ``assume_centered=False``): the
    shrunk covariance is ``(1 - s) * S + s * tr(S)/d * I`` with ``S`` the empirical covariance
    (divided by ``n``). Computed from ``n x n`` Gram matrices, in float64.
    """
    x = x.to(torch.float64)
    n, d = x.shape[-2], x.shape[-1]
    xc = x - x.mean(-2, keepdim=True)
    sq_norms = xc.square().sum(-1)  # [*, n]
    mu = sq_norms.sum(-1) / (n * d)  # tr(S) / d
    gram = xc @ xc.transpose(-1, -2)
    delta_ = gram.square().sum((-1, -2)) / n**2  # ||S||_F^2
    beta_ = sq_norms.square().sum(-1)
    beta = (beta_ / n - delta_) / (d * n)
    delta = delta_ / d - mu.square()  # ||S - mu I||_F^2 / d
    beta = torch.minimum(beta, delta)
    return torch.where(beta > 0, beta / delta.clamp(min=torch.finfo(torch.float64).tiny), 0.0)


#: Floor of the ellipsoid's isotropic part, relative to ``tr S / d``.
ELLIPSOID_REL_FLOOR = 1e-6


def fit_ellipsoid(
    x: Float[Tensor, "layer n d"], shrinkage: float | None = None
) -> dict[str, Tensor]:
    """Per layer, the shrinkage covariance ``Sigma = (1 - s) S + s (tr S / d) I`` of ``x``.

    ``S`` is the empirical covariance, ``s`` the Ledoit-Wolf intensity
    (:func:`ledoit_wolf_shrinkage`) or a fixed ``shrinkage`` in [0, 1]. ``Sigma^-1`` is kept in
    Woodbury form through the eigenvectors of ``S`` (at most ``n - 1`` of them, from the
    ``n x n`` Gram matrix when ``n <= d``), so nothing of size ``d x d`` is stored when
    ``n < d``. The isotropic part is floored at ``ELLIPSOID_REL_FLOOR * tr S / d``.

    Returns:
        ``{"mu": [L, d], "u": [L, d, r], "coef": [L, r], "iso": [L], "shrinkage": [L]}``
        (float64), for :func:`mahalanobis`.
    """
    x = x.to(torch.float64)  # [layer, n, d]
    n, d = x.shape[1], x.shape[2]
    if n < 2:
        raise ValueError("An ellipsoid needs at least 2 fit vectors.")
    mu = x.mean(1)
    xc = x - mu.unsqueeze(1)
    if shrinkage is None:
        s = ledoit_wolf_shrinkage(x)
    else:
        s = torch.full((x.shape[0],), float(shrinkage), dtype=torch.float64)
    s = s.to(x.device)
    trace_d = xc.square().sum((1, 2)) / (n * d)
    iso = torch.maximum(s * trace_d, ELLIPSOID_REL_FLOOR * trace_d).clamp(min=1e-30)
    if n <= d:  # eigenvectors of S from the n x n Gram matrix
        lam, v = torch.linalg.eigh(xc @ xc.transpose(1, 2) / n)  # [L, n], [L, n, n]
        keep = lam > lam.amax(-1, keepdim=True) * 1e-10
        lam = torch.where(keep, lam, 0.0)
        u = (xc.transpose(1, 2) @ v) / (n * lam).clamp(min=1e-300).sqrt().unsqueeze(1)
        u = u * keep.unsqueeze(1)
    else:
        lam, u = torch.linalg.eigh(xc.transpose(1, 2) @ xc / n)  # [L, d], [L, d, d]
        lam = lam.clamp(min=0)
    scaled = (1 - s).unsqueeze(-1) * lam
    coef = scaled / (iso.unsqueeze(-1) + scaled)
    return {"mu": mu, "u": u, "coef": coef, "iso": iso, "shrinkage": s}


def mahalanobis(
    v: Float[Tensor, "... d"], u: Tensor, coef: Tensor, iso: Tensor
) -> Float[Tensor, "..."]:
    """``sqrt(v^T Sigma^-1 v)`` with ``Sigma^-1 = (I - U diag(coef) U^T) / iso``
    (:func:`fit_ellipsoid`'s Woodbury form; ``u`` ``[d, r]``, or ``[layer, d, r]`` with ``v``
    ``[..., layer, d]``)."""
    if u.ndim == 2:
        proj = v @ u  # [..., r]
    else:
        # One [m, d] x [d, r] product per layer: a broadcast matmul would copy u once per row.
        proj = torch.einsum("...ld,ldr->...lr", v, u)
    sq = (v.square().sum(-1) - (coef * proj.square()).sum(-1)) / iso
    return sq.clamp(min=0).sqrt()
