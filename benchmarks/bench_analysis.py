"""Benchmark: vectorised gaussian_fit / separation vs a per-neuron loop over scipy.stats.

At the default model's size (30 layers x 1536 neurons, 2048 reservoir samples per skill) by
default, on synthetic NeuronStats (seeded; no model needed) whose neurons mix realistic
shapes: Gaussian, skewed (log-normal), heavy-tailed (Student t, 3-10 degrees of freedom),
bimodal mixtures, and Gaussian values rounded to bfloat16 (the ties a low-precision model
makes). ``--real`` collects both skills (GSM8K vs MBPP) from the default model instead.

* ``vectorised``: ``gaussian_fit(stats_f)`` and ``separation(stats_f, stats_r)`` over every
  neuron of every layer (median of ``--repeats`` runs; also ``gaussian_fit`` with the decision
  rule accuracy, ``other=stats_r``, reported apart);
* ``loop``: per neuron, ``scipy.stats`` ``skew``, ``kurtosis``, ``kstest`` (vs the fitted
  normal), ``anderson``, ``shapiro``, ``jarque_bera`` for the Gaussian fit, and ``ks_2samp``,
  ``mannwhitneyu`` (AUROC = U / (n_F n_R)) plus the closed-form Gaussian measures for the
  separation. The loop runs on a random subset of ``--loop-neurons`` neurons and its time is
  extrapolated linearly to every neuron (each neuron costs the same work); the two give the
  same numbers on that subset (asserted).

Both run in the same process, one after the other. Wall times are the headline; CPU times of
the process (all threads) are reported too, because on a machine shared with other work wall
times swing with the load. The result goes to ``benchmarks/results/analysis.json``.

Usage:
    python benchmarks/bench_analysis.py [--layers 30] [--d-mlp 1536] [--samples 2048]
        [--loop-neurons 400] [--repeats 3] [--real]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import scipy
import torch
from scipy import stats as sps

import mechunlearn as mu
from mechunlearn import NeuronStats
from mechunlearn.analysis.gaussian import gaussian_fit
from mechunlearn.analysis.separation import separation

RESULTS = Path(__file__).parent / "results"
GOAL = 50.0


# ------------------------------------------------------------------------------ synthetic data
def synthetic_stats(
    n_layers: int, d_mlp: int, n: int, seed: int, skill: str, shift: float = 0.0
) -> NeuronStats:
    """NeuronStats with a reservoir of ``n`` values per neuron drawn from a seeded mixture of
    shapes, and streaming moments equal to the reservoir's own."""
    gen = torch.Generator().manual_seed(seed)
    meta = {"model": "synthetic", "n_layers": n_layers, "d_mlp": d_mlp, "skill": skill}
    stats = NeuronStats.empty("pre", "all", list(range(n_layers)), d_mlp, n, "cpu", meta)
    for layer in range(n_layers):
        kind = torch.multinomial(
            torch.tensor([0.4, 0.2, 0.2, 0.1, 0.1]), d_mlp, replacement=True, generator=gen
        )
        z = torch.randn(n, d_mlp, generator=gen)
        x = z.clone()
        skewed = kind == 1
        x[:, skewed] = torch.exp(0.6 * z[:, skewed]) - 1.0
        heavy = kind == 2
        df = 3.0 + 7.0 * torch.rand(int(heavy.sum()), generator=gen)
        chi = torch.distributions.Chi2(df).sample((n,)) if heavy.any() else None
        if chi is not None:
            x[:, heavy] = z[:, heavy] / torch.sqrt(chi / df)
        bimodal = kind == 3
        flip = torch.rand(n, int(bimodal.sum()), generator=gen) < 0.3
        x[:, bimodal] = z[:, bimodal] + 3.0 * flip
        mu_ = 0.3 * torch.randn(d_mlp, generator=gen) + shift * torch.rand(d_mlp, generator=gen)
        sd = torch.exp(0.4 * torch.randn(d_mlp, generator=gen)) * (1.0 + 0.02 * layer)
        x = mu_ + sd * x
        bf16 = kind == 4
        x[:, bf16] = x[:, bf16].to(torch.bfloat16).float()
        stats.samples[layer] = x
        x64 = x.double()
        stats.count[layer] = n
        stats.mean[layer] = x64.mean(0)
        stats.m2[layer] = (x64 - x64.mean(0)).square().sum(0)
        stats.min[layer], stats.max[layer] = x64.amin(0), x64.amax(0)
    stats.sample_keys[:] = torch.rand(n, generator=gen, dtype=torch.float64)
    stats.n_tokens = n
    return stats


def real_stats(n_examples: int, samples: int, device: str):
    """Both skills collected from the default model (site 'pre', every token)."""
    model = mu.load_model(device=device, quiet=True)
    out = []
    for name in ("gsm8k", "mbpp"):
        skill = mu.load_skill(name, n=n_examples, seed=0)
        out.append(mu.collect(model, skill, site="pre", reservoir_size=samples, quiet=True))
    return out[0].to("cpu"), out[1].to("cpu")


# ----------------------------------------------------------------------------- scipy per neuron
def loop_gaussian(v: np.ndarray) -> dict[str, float]:
    mean, sd = v.mean(), v.std(ddof=1)
    ks = sps.kstest(v, "norm", args=(mean, sd))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = sps.anderson(v, "norm")
    sw = sps.shapiro(v)
    jb = sps.jarque_bera(v)
    return {
        "skew": sps.skew(v),
        "kurtosis": sps.kurtosis(v),
        "ks_stat": ks.statistic,
        "ks_p": ks.pvalue,
        "ad_stat": ad.statistic,
        "shapiro_w": sw.statistic,
        "shapiro_p": sw.pvalue,
        "jb_stat": jb.statistic,
        "jb_p": jb.pvalue,
    }


def loop_separation(f: np.ndarray, r: np.ndarray, mf, sf, nf, mr, sr, nr) -> dict[str, float]:
    d = mf - mr
    pooled = math.sqrt(((nf - 1) * sf**2 + (nr - 1) * sr**2) / (nf + nr - 2))
    kl = math.log(sr / sf) + (sf**2 + d**2) / (2 * sr**2) - 0.5
    kl_rev = math.log(sf / sr) + (sr**2 + d**2) / (2 * sf**2) - 0.5
    out = {
        "mean_diff": d,
        "cohens_d": abs(d) / pooled,
        "kl": kl,
        "sym_kl": kl + kl_rev,
        "bhattacharyya": d**2 / (4 * (sf**2 + sr**2))
        + 0.5 * math.log((sf**2 + sr**2) / (2 * sf * sr)),
        "wasserstein": math.sqrt(d**2 + (sf - sr) ** 2),
        "ks": sps.ks_2samp(f, r).statistic,
        "auroc_f": sps.mannwhitneyu(f, r).statistic / (f.size * r.size),
    }
    return out


# Tolerances of the vectorised numbers against the loop (see tests/unit/test_gaussian.py).
TOL = {
    "ks_p": 1e-6,
    "shapiro_w": 1e-8,
    "shapiro_p": 1e-6,
}


def compare(table, rows: list[dict[str, float]], index: np.ndarray) -> dict[str, float]:
    """Max |difference| per column between the vectorised table and the loop; asserts."""
    worst = {}
    for key in rows[0]:
        got = table[key].to_numpy()[index]
        ref = np.array([r[key] for r in rows])
        diff = np.abs(got - ref)
        scale = np.maximum(1.0, np.abs(ref))
        bad = ~((diff <= TOL.get(key, 1e-9) * scale) | (np.isnan(got) & np.isnan(ref)))
        assert not bad.any(), (
            f"{key}: vectorised and loop differ, e.g. {got[bad][:3]} vs {ref[bad][:3]}"
        )
        worst[key] = float(np.nanmax(diff)) if diff.size else 0.0
    return worst


def median_time(fn, repeats: int):
    """Median wall time, median CPU time (this process, all threads), all wall times, result."""
    times, cpu, out = [], [], None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(times), statistics.median(cpu), times, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--d-mlp", type=int, default=1536)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--loop-neurons", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", action="store_true", help="collect from the default model")
    parser.add_argument("--examples", type=int, default=200, help="examples per skill (--real)")
    parser.add_argument("--device", default="cpu", help="model device (--real)")
    parser.add_argument("--out", default=str(RESULTS / "analysis.json"))
    args = parser.parse_args()

    t0 = time.perf_counter()
    if args.real:
        stats_f, stats_r = real_stats(args.examples, args.samples, args.device)
        source = f"default model, gsm8k vs mbpp, {args.examples} examples each"
    else:
        stats_f = synthetic_stats(args.layers, args.d_mlp, args.samples, args.seed, "forget", 0.5)
        stats_r = synthetic_stats(args.layers, args.d_mlp, args.samples, args.seed + 1, "retain")
        source = "synthetic mixture (normal, log-normal, Student t, bimodal, bfloat16-rounded)"
    n_layers, d = stats_f.mean.shape
    total = n_layers * d
    print(
        f"{source}: {n_layers} layers x {d} neurons, {stats_f.n_samples} / {stats_r.n_samples} "
        f"samples (built in {time.perf_counter() - t0:.1f} s); torch threads "
        f"{torch.get_num_threads()}, {os.cpu_count()} CPUs",
        flush=True,
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant-neuron warnings, if any
        t_fit, c_fit, fit_times, fit = median_time(lambda: gaussian_fit(stats_f), args.repeats)
        print(f"vectorised gaussian_fit: {t_fit:.2f} s wall {[round(t, 2) for t in fit_times]}, "
              f"{c_fit:.2f} s CPU")  # fmt: skip
        t_sep, c_sep, sep_times, sep = median_time(
            lambda: separation(stats_f, stats_r), args.repeats
        )
        print(f"vectorised separation:   {t_sep:.2f} s wall {[round(t, 2) for t in sep_times]}, "
              f"{c_sep:.2f} s CPU")  # fmt: skip
        t_rule, _, _, fit_rule = median_time(lambda: gaussian_fit(stats_f, other=stats_r), 1)
        print(f"vectorised gaussian_fit(other=...) with rule accuracy: {t_rule:.2f} s wall")

    rng = np.random.default_rng(args.seed)
    index = np.sort(rng.choice(total, size=min(args.loop_neurons, total), replace=False))
    sep_by_flat = sep.table.sort_values(["layer", "neuron"]).reset_index(drop=True)
    f_vals = stats_f.sample_values().double().numpy()  # [layer, n, d]
    r_vals = stats_r.sample_values().double().numpy()
    mf, sf, nf = (t.numpy().ravel() for t in (stats_f.mean, stats_f.std, stats_f.count))
    mr, sr, nr = (t.numpy().ravel() for t in (stats_r.mean, stats_r.std, stats_r.count))
    cols_f = [np.ascontiguousarray(f_vals[i // d, :, i % d]) for i in index]
    cols_r = [np.ascontiguousarray(r_vals[i // d, :, i % d]) for i in index]

    t, c = time.perf_counter(), time.process_time()
    loop_g = [loop_gaussian(v) for v in cols_f]
    t_loop_g, c_loop_g = time.perf_counter() - t, time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    loop_s = [
        loop_separation(a, b, mf[i], sf[i], nf[i], mr[i], sr[i], nr[i])
        for a, b, i in zip(cols_f, cols_r, index, strict=True)
    ]
    t_loop_s, c_loop_s = time.perf_counter() - t, time.process_time() - c
    per_g, per_s = t_loop_g / index.size, t_loop_s / index.size
    cpu_g, cpu_s = c_loop_g / index.size * total, c_loop_s / index.size * total
    print(
        f"scipy loop on {index.size} random neurons: gaussian {per_g * 1e3:.2f} ms/neuron, "
        f"separation {per_s * 1e3:.2f} ms/neuron; extrapolated linearly to {total} neurons: "
        f"{per_g * total:.0f} s and {per_s * total:.0f} s",
        flush=True,
    )
    diff_g = compare(fit.table, loop_g, index)
    diff_s = compare(sep_by_flat, loop_s, index)
    print(f"same numbers on the {index.size} neurons (asserted); max |diff|:")
    print("  " + ", ".join(f"{k} {v:.1e}" for k, v in {**diff_g, **diff_s}.items()))

    full_g, full_s = per_g * total, per_s * total
    result = {
        "source": source,
        "layers": n_layers,
        "d_mlp": d,
        "samples": [stats_f.n_samples, stats_r.n_samples],
        "neurons": total,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        "vectorised_seconds": {
            "gaussian_fit": t_fit,
            "separation": t_sep,
            "gaussian_fit_with_rule_accuracy": t_rule,
            "repeats": {"gaussian_fit": fit_times, "separation": sep_times},
            "cpu": {"gaussian_fit": c_fit, "separation": c_sep},
        },
        "loop": {
            "neurons_timed": int(index.size),
            "note": "per-neuron scipy loop timed on a random subset and extrapolated linearly",
            "ms_per_neuron": {"gaussian_fit": per_g * 1e3, "separation": per_s * 1e3},
            "extrapolated_seconds": {"gaussian_fit": full_g, "separation": full_s},
            "extrapolated_cpu_seconds": {"gaussian_fit": cpu_g, "separation": cpu_s},
        },
        "speedup": {
            "gaussian_fit": full_g / t_fit,
            "separation": full_s / t_sep,
            "combined": (full_g + full_s) / (t_fit + t_sep),
        },
        "speedup_cpu_time": {
            "gaussian_fit": cpu_g / c_fit,
            "separation": cpu_s / c_sep,
            "combined": (cpu_g + cpu_s) / (c_fit + c_sep),
        },
        "load_average_1min": os.getloadavg()[0],
        "goal": GOAL,
        "max_abs_diff_vs_scipy": {**diff_g, **diff_s},
        "share_gaussian": fit.share_gaussian,
        "mean_rule_balanced_acc": float(fit_rule.table["rule_balanced_acc"].mean()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    sp = result["speedup"]
    cp = result["speedup_cpu_time"]
    print(
        f"speed-up vectorised / scipy loop (wall): gaussian_fit {sp['gaussian_fit']:.0f}x, "
        f"separation {sp['separation']:.0f}x, combined {sp['combined']:.0f}x (goal >= {GOAL:.0f}x)"
    )
    print(
        f"speed-up in CPU time (robust to other load; load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs): gaussian_fit {cp['gaussian_fit']:.0f}x, separation "
        f"{cp['separation']:.0f}x, combined {cp['combined']:.0f}x"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
