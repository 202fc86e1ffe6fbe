"""How often Neuron Adjust's Gaussian decision rule ``p_F(x) >= p_R(x)`` picks the right skill,
on both skills' reservoir samples (vectorised over neurons)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .samples import BLOCK_ELEMENTS, filled_rows, layer_samples, run_layers

if TYPE_CHECKING:
    from ..stats import NeuronStats


def rule_accuracy(stats_f: NeuronStats, stats_r: NeuronStats) -> dict[str, np.ndarray]:
    """Share of each skill's reservoir values that ``p_F(x) >= p_R(x)`` assigns correctly.

    ``log p_F(x) - log p_R(x) = ((x - mu_R)^2 / sigma_R^2 - (x - mu_F)^2 / sigma_F^2) / 2
    + log(sigma_R / sigma_F)``, evaluated as a quadratic ``(a x + b) x + c`` in float64 per
    block of neurons (ties, ``p_F = p_R``, go to F as in Neuron Adjust).
    """

    def host(t: Tensor) -> np.ndarray:
        return t.detach().to("cpu", torch.float64).numpy()

    n_layers, d = stats_f.mean.shape
    mu_f, sd_f, mu_r, sd_r = (
        host(t) for t in (stats_f.mean, stats_f.std, stats_r.mean, stats_r.std)
    )
    with np.errstate(all="ignore"):
        # log p_F - log p_R = (a x + b) x + c
        inv_f2, inv_r2 = 1.0 / sd_f**2, 1.0 / sd_r**2
        qa = 0.5 * (inv_r2 - inv_f2)
        qb = mu_f * inv_f2 - mu_r * inv_r2
        qc = 0.5 * (mu_r**2 * inv_r2 - mu_f**2 * inv_f2) + np.log(sd_r / sd_f)
    ok = (sd_f > 0) & (sd_r > 0) & np.isfinite(qa) & np.isfinite(qb) & np.isfinite(qc)
    out = {}
    for name, stats, want_f in (
        ("rule_acc_forget", stats_f, True),
        ("rule_acc_retain", stats_r, False),
    ):
        rows = filled_rows(stats)
        n = int(rows.numel())
        hits = np.zeros((n_layers, d))
        count = np.zeros((n_layers, d))

        def job(row: int, stats=stats, rows=rows, n=n, want_f=want_f, hits=hits, count=count):
            x = layer_samples(stats, row, rows)
            step = max(1, BLOCK_ELEMENTS // max(1, n))
            for s in range(0, d, step):
                e = min(d, s + step)
                xb = x[s:e].astype(np.float64)
                with np.errstate(all="ignore"):
                    v = xb * qa[row, s:e, None]
                    v += qb[row, s:e, None]
                    v *= xb
                    to_f = v >= -qc[row, s:e, None]  # NaN (a left-out value) compares False
                finite = np.isfinite(xb)
                n_finite = np.count_nonzero(finite, axis=1)
                if n_finite.min(initial=n) < n:
                    to_f = (to_f if want_f else ~to_f) & finite
                    hits[row, s:e] = np.count_nonzero(to_f, axis=1)
                else:
                    hit_f = np.count_nonzero(to_f, axis=1)
                    hits[row, s:e] = hit_f if want_f else n - hit_f
                count[row, s:e] = n_finite

        if n:
            run_layers(job, n_layers)
        with np.errstate(all="ignore"):
            acc = np.where(ok & (count > 0), hits / count, np.nan)
        out[name] = acc.ravel()
    out["rule_balanced_acc"] = 0.5 * (out["rule_acc_forget"] + out["rule_acc_retain"])
    return out
