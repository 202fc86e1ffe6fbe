"""Run by tests/unit/test_distributed.py under torchrun: every collector and evaluate() on a tiny
model, sharded across the processes; rank 0 saves the results for the test to compare with one
process. ``FAIL_RANK=k`` makes rank k raise, to check that the whole run fails with its error."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mechunlearn import distributed  # noqa: E402
from tests.distributed.common import evaluate_all, probe_all, tiny_model  # noqa: E402


def main(out: str) -> None:
    assert distributed.init_from_env(timeout_s=120)
    rank, size = distributed.world()
    assert size == 2, size
    if os.environ.get("FAIL_RANK") == str(rank):
        raise RuntimeError(f"rank {rank} failed on purpose")
    model = tiny_model()
    probe, keys, importance = probe_all(model)
    table = evaluate_all(model, probe)
    if distributed.is_main():
        folder = Path(out)
        probe.pre.save(folder / "pre")
        probe.keys.save(folder / "probe_keys")
        probe.importance.save(folder / "probe_importance")
        keys.save(folder / "keys")
        importance.save(folder / "importance")
        table.to_csv(folder / "evaluation.csv", index=False)
    distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
