"""Two CPU processes (torchrun, gloo) give the result of one process over all examples, and a
rank that fails makes the whole run fail with its error instead of hanging."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import mechunlearn as mu
from tests.distributed.common import evaluate_all, probe_all, tiny_model

# Slow tier (two torchrun-style processes per case): `make test-fast` skips these.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "distributed" / "worker.py"


def torchrun(out: Path, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(out)]  # fmt: skip
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    done = torchrun(out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def one_process():
    model = tiny_model()
    probe, keys, importance = probe_all(model)
    return probe, keys, importance, evaluate_all(model, probe)


def assert_same_stats(a: mu.NeuronStats, b: mu.NeuronStats) -> None:
    assert torch.equal(a.count, b.count) and a.n_tokens == b.n_tokens
    assert a.n_examples == b.n_examples
    for name in ("mean", "m2", "min", "max"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-10, atol=1e-12)
    # the reservoir: the same tokens (keys), with their values
    ka, ia = a.sample_keys.sort()
    kb, ib = b.sample_keys.sort()
    assert torch.equal(ka, kb)
    torch.testing.assert_close(a.samples[:, ia], b.samples[:, ib], rtol=1e-5, atol=1e-6)


def test_statistics_keys_and_importance_equal_one_process(two_processes, one_process):
    probe, keys, importance, _ = one_process
    assert_same_stats(mu.NeuronStats.load(two_processes / "pre"), probe.pre)
    for name, ref in (("keys", keys), ("probe_keys", probe.keys)):
        got = mu.KeyVectors.load(two_processes / name)
        torch.testing.assert_close(got.values, ref.values, rtol=1e-5, atol=1e-6)  # example order
    for name, ref in (("importance", importance), ("probe_importance", probe.importance)):
        got = mu.Importance.load(two_processes / name)
        assert got.n_tokens == ref.n_tokens
        torch.testing.assert_close(got.values, ref.values, rtol=1e-10, atol=1e-12)


def test_evaluation_counts_equal_one_process(two_processes, one_process):
    table = pd.read_csv(two_processes / "evaluation.csv")
    ref = one_process[3]
    pd.testing.assert_frame_equal(
        table[["skill", "method", "score", "relative", "abstention_rate", "n"]],
        ref[["skill", "method", "score", "relative", "abstention_rate", "n"]].reset_index(
            drop=True
        ),
        rtol=1e-6,
    )


def test_a_failing_rank_fails_the_run_with_its_error(tmp_path):
    done = torchrun(tmp_path, FAIL_RANK="1")
    assert done.returncode != 0
    assert "rank 1 failed on purpose" in done.stdout + done.stderr
