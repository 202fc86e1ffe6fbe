"""The mechunlearn command and its output folder, on a tiny model saved to disk (no network):
one-line errors, resume, locks, --force, damaged files, arguments checked before any work."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import pytest
import torch

from mechunlearn.cli import MARKER, main
from mechunlearn.pipeline import LOCK, RunConfig
from tests.tiny_models import make_char_tokenizer

# Slow tier (whole pipeline runs on a tiny model saved to disk): `make test-fast` skips these.
pytestmark = pytest.mark.slow

N = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama saved as a Hugging Face folder, and three skills as JSONL files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("cli")
    tok = make_char_tokenizer(root / "tok")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    skills = {
        "arith": [(f"Q: {i}+{i + 3}=", f" {2 * i + 3}") for i in range(24)],
        "code": [(f"def f{i}(x):", f"\n  return x*{i}") for i in range(24)],
        "prose": [(f"The {w} sat", " on the mat.") for w in "abcdefghijklmnopqrstuvwx"],
    }
    paths = {}
    for name, rows in skills.items():
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in rows))
        paths[name] = str(path)
    return root, paths


def argv(setup, out, *extra, command="run"):
    root, paths = setup
    return [
        command, "--model", str(root / "tiny"), "--device", "cpu", "--forget", paths["arith"],
        "--retain", paths["code"], "--general", paths["prose"], "--n", str(N), "--out", str(out),
        "--methods", "NA", "KSD", "SP", "--quiet", *extra,
    ]  # fmt: skip


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("mechunlearn: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def done(setup, tmp_path_factory):
    """A finished run of the tiny model (collect first, then run: the run resumes)."""
    out = tmp_path_factory.mktemp("run") / "report"
    assert main(argv(setup, out, command="collect")) == 0
    saved = {p.name: p.stat().st_mtime_ns for p in (out / "stats").iterdir()}
    assert main(argv(setup, out)) == 0
    return out, saved


def test_run_resumes_and_writes_a_consistent_folder(done):
    out, saved = done
    after = {p.name: p.stat().st_mtime_ns for p in (out / "stats").iterdir()}
    assert after == saved  # nothing collected twice
    marker = json.loads((out / MARKER).read_text())
    listed = set(marker["files"])
    on_disk = {
        p.relative_to(out).as_posix()
        for p in out.rglob("*")
        if p.is_file() and p.name not in (MARKER, LOCK, "config.json")
    }
    assert listed == on_disk  # the marker lists exactly what the run wrote
    config = RunConfig.from_json(json.loads((out / "config.json").read_text()))
    assert marker["key"] == config.key() and config.n == N
    table = pd.read_csv(out / "tables" / "evaluation.csv")
    assert set(table["role"]) == {"forget", "retain", "general"}
    assert {"relative_low", "relative_high", "chance", "informative"} <= set(table.columns)
    assert set(table["method"]) == {"base", "NeuronAdjust", "KeySpaceDetection", "SelectivePruning"}
    html = (out / "index.html").read_text()
    assert "95 %" in html and "chance" in html
    # The detector's row states the false-positive rate its alpha was calibrated for (the
    # default 0.01) and the conformal bound over the negatives it had.
    assert "Fitted methods" in html
    assert "false positives calibrated at 0.01 (conformal bound" in html


def test_foreign_output_folder_is_never_touched(setup, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    for extra in ((), ("--force",)):
        assert main(argv(setup, out, *extra, command="collect")) == 2
        line = one_line_error(capsys)
        assert "not a mechunlearn report" in line and "thesis.tex" in line
    assert (out / "thesis.tex").read_text() == "precious"
    assert not (out / MARKER).exists()


def test_force_removes_exactly_what_the_run_wrote(setup, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(argv(setup, out, command="collect")) == 0
    assert main(argv(setup, out, "--seed", "1", command="collect")) == 2
    assert "other settings" in one_line_error(capsys)
    (out / "stats" / "mine.csv").write_text("user data")
    assert main(argv(setup, out, "--seed", "1", "--force", command="collect")) == 2
    line = one_line_error(capsys)
    assert "mechunlearn did not write" in line and "stats/mine.csv" in line
    assert (out / "stats" / "mine.csv").read_text() == "user data"
    (out / "stats" / "mine.csv").unlink()
    assert main(argv(setup, out, "--seed", "1", "--force", command="collect")) == 0
    assert json.loads((out / MARKER).read_text())["settings"]["seed"] == 1


def test_force_never_leaves_a_report_of_the_old_settings(done, setup, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(done[0], out)
    assert (out / "index.html").exists()
    assert main(argv(setup, out, "--seed", "1", "--force", command="collect")) == 0
    assert not (out / "index.html").exists()  # the seed-0 page went with the seed-0 run
    assert not (out / "tables" / "evaluation.csv").exists()


def test_a_second_run_on_a_busy_folder_fails_naming_the_holder(setup, tmp_path, capsys):
    out = tmp_path / "busy"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    first = subprocess.Popen(
        [sys.executable, "-m", "mechunlearn.cli", *argv(setup, out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait until the first run holds the lock
            lock = out / LOCK
            if lock.exists() and "pid" in lock.read_text():
                fd = os.open(lock, os.O_RDWR)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(fd, fcntl.LOCK_UN)
                except BlockingIOError:
                    break
                finally:
                    os.close(fd)
            if first.poll() is not None:
                pytest.fail(f"the first run ended early: {first.stderr.read().decode()[-500:]}")
            time.sleep(0.05)
        assert main(argv(setup, out, "--seed", "1", "--force")) == 2
        line = one_line_error(capsys)
        assert "in use by another mechunlearn run" in line and f"pid {first.pid}" in line
    finally:
        assert first.wait(timeout=600) == 0, first.stderr.read().decode()[-800:]
    marker = json.loads((out / MARKER).read_text())
    assert marker["settings"]["seed"] == 0  # the first run's results, untouched
    table = pd.read_csv(out / "tables" / "evaluation.csv")
    assert len(table) == 3 * 4


def test_a_damaged_artefact_is_named_and_computed_again(done, setup, tmp_path):
    import shutil

    out = tmp_path / "damaged"
    shutil.copytree(done[0], out)
    stats = out / "stats" / "forget.pre.safetensors"
    stats.write_bytes(stats.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="forget.pre.safetensors is damaged"):
        assert main(argv(setup, out, command="collect")) == 0
    from mechunlearn import NeuronStats

    assert NeuronStats.load(stats).n_tokens > 0


def test_a_damaged_marker_is_one_line(setup, tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / MARKER).write_text('{"key": "x", "files": [')
    assert main(argv(setup, out, command="collect")) == 2
    line = one_line_error(capsys)
    assert MARKER in line and "damaged" in line


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--seed", "-1"), "seed must lie in [0, inf]"),
        (("--dtype", "float8"), "Unknown dtype 'float8'"),
        (("--device", "tpu"), "Unknown device 'tpu'"),
        (("--method", "NA", "ratio=2"), "NA: ratio must lie in (0, 1]"),
        (("--method", "NA", "ratio"), "A method setting is NAME=VALUE"),
        (("--method", "NA", "size=3"), "NA has no setting 'size'"),
        (("--methods", "NA", "XYZ"), "Unknown method 'XYZ'"),
        (("--n", "2"), "--n must be at least 4"),
        (("--n", "100"), "--n 100 needs 200 examples"),
    ],
)
def test_arguments_are_checked_before_any_work(setup, tmp_path, capsys, extra, message):
    out = tmp_path / "r"
    assert main(argv(setup, out, *extra)) == 2
    assert message in one_line_error(capsys)
    assert not (out / MARKER).exists()  # a corrected rerun is never refused by this one


def test_unknown_skill_is_one_line(tmp_path, capsys):
    assert main(["collect", "--forget", "gsm9k", "--out", str(tmp_path / "r")]) == 2
    line = one_line_error(capsys)
    assert "gsm9k" in line and "gsm8k" in line


def test_help_lists_the_stages(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for stage in ("run", "collect", "analyze", "unlearn", "evaluate"):
        assert stage in out


_FAULTS = """
import resource, sys, torch
if sys.argv[1] == "reuse":
    from mechunlearn.cli import reuse_freed_buffers
    assert reuse_freed_buffers()
x = torch.ones(16 * 2**20 // 4)  # warm up torch's own allocations
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    x = torch.ones(64 * 2**20 // 4)  # a 64 MiB activation buffer, freed at the next iteration
    del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(
    sys.platform != "linux" or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc only"
)
def test_reuse_freed_buffers_stops_page_faulting_large_buffers_in_again():
    def faults(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True
        )
        return int(out.stdout.strip())

    default, reused = faults("default"), faults("reuse")
    # 20 x 64 MiB fresh mappings fault in ~20 x 16k pages; reused buffers fault once.
    assert default > 100_000
    assert reused < default / 5


# -------------------------------------------------------------- the run folder's reliability
def own_state(out: Path) -> tuple[set[str], set[str], list[Path]]:
    """(files the marker lists, files on disk but the marker/lock/config, temporaries left)."""
    from mechunlearn.io import is_temporary

    listed = set(json.loads((out / MARKER).read_text())["files"])
    on_disk = {
        p.relative_to(out).as_posix()
        for p in out.rglob("*")
        if p.is_file() and p.name not in (MARKER, LOCK, "config.json")
    }
    return listed, on_disk, [p for p in out.rglob("*") if is_temporary(p)]


def test_the_marker_lists_exactly_the_paths_the_pipeline_writes(done):
    from mechunlearn.pipeline import own_files

    out, _ = done
    config = RunConfig.from_json(json.loads((out / "config.json").read_text()))
    assert own_state(out)[0] == own_files(config)  # what a rebuilt marker may claim


def test_force_refuses_marker_entries_outside_the_folder(setup, tmp_path, capsys):
    out = tmp_path / "a" / "rep"
    assert main(argv(setup, out, command="collect")) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victims = [elsewhere / f"victim{i}.txt" for i in range(3)]
    for v in victims:
        v.write_text("precious")
    (out / "stats" / "link.txt").symlink_to(victims[2])
    marker = json.loads((out / MARKER).read_text())
    before = sorted(p for p in out.rglob("*") if p.is_file())
    for entry in ("../../elsewhere/victim0.txt", str(victims[1]), "stats/link.txt"):
        edited = {**marker, "files": [*marker["files"], entry]}
        (out / MARKER).write_text(json.dumps(edited))
        assert main(argv(setup, out, "--seed", "1", "--force", command="collect")) == 2
        line = one_line_error(capsys)
        assert repr(entry) in line and "outside" in line and "nothing was deleted" in line
        assert all(v.read_text() == "precious" for v in victims)
        assert sorted(p for p in out.rglob("*") if p.is_file()) == before  # nothing deleted


_KILL = """
import os, sys
from pathlib import Path

point, argv = sys.argv[1], sys.argv[2:]
replace = os.replace


def dying_replace(src, dst, *args, **kwargs):  # kill -9 at the named point of a write
    dst = Path(dst)
    if point == "stats" and dst.name == "forget.pre.safetensors":
        os._exit(9)
    if point == "marker" and dst.name == ".mechunlearn-report.json" and (
        dst.parent / "interventions"
    ).exists():
        os._exit(9)
    replace(src, dst, *args, **kwargs)
    if point == "renamed" and dst.name == "SelectivePruning.safetensors":
        os._exit(9)
    if point == "analysis" and dst.name == "gaussian_by_layer.csv":  # the analyze stage
        os._exit(9)
    if point == "evaluation" and dst.name == "evaluation.csv":  # the evaluate stage
        os._exit(9)


os.replace = dying_replace
from mechunlearn.cli import main

sys.exit(main(argv))
"""


@pytest.mark.parametrize(
    "point, left, command",
    [
        ("stats", "stats/.forget.pre.safetensors.*.tmp", "unlearn"),  # collect: a stats write
        ("marker", "..mechunlearn-report.json.*.tmp", "unlearn"),  # during a marker write
        ("renamed", "interventions/SelectivePruning.safetensors", "unlearn"),  # unlearn: a fit
        ("analysis", "tables/gaussian_by_layer.csv", "run"),  # analyze: its first table
        ("evaluation", "tables/evaluation.csv", "run"),  # evaluate: the scores
    ],
)
def test_a_killed_run_never_blocks_the_next_one(setup, tmp_path, point, left, command):
    """kill -9 at each stage of the run (a write of the collect, analyze, unlearn and evaluate
    stages, and a marker write), then a rerun resumes, and --force with other settings starts
    the folder over."""
    import shutil

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    killed = subprocess.run(
        [sys.executable, "-c", _KILL, point, *argv(setup, out, command=command)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert killed.returncode == 9, killed.stderr[-800:]
    assert list(out.glob(left)), f"the kill left no {left}"
    listed, on_disk, _ = own_state(out)
    assert on_disk - {p.relative_to(out).as_posix() for p in out.glob("**/.*.tmp")} <= listed
    # Rerun with the same settings: resumes, and leaves a consistent folder.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed, symlinks=True)
    assert main(argv(setup, resumed, command=command)) == 0
    listed, on_disk, temporaries = own_state(resumed)
    assert listed == on_disk and not temporaries
    assert (resumed / "interventions" / "SelectivePruning.safetensors").exists()
    # Or start over with other settings: --force is not refused, and nothing old is left.
    assert main(argv(setup, out, "--seed", "1", "--force", command="collect")) == 0
    listed, on_disk, temporaries = own_state(out)
    assert listed == on_disk and not temporaries
    assert not (out / "interventions").exists()
    assert json.loads((out / MARKER).read_text())["settings"]["seed"] == 1


def test_a_rerun_records_an_unlisted_file_it_loads(done, setup, tmp_path):
    import shutil

    out = tmp_path / "unlisted"
    shutil.copytree(done[0], out)
    marker = json.loads((out / MARKER).read_text())
    lost = {"interventions/SelectivePruning.safetensors", "stats/forget.pre.safetensors"}
    (out / MARKER).write_text(json.dumps({**marker, "files": sorted(set(marker["files"]) - lost)}))
    mtimes = {rel: (out / rel).stat().st_mtime_ns for rel in lost}
    assert main(argv(setup, out, command="unlearn")) == 0
    assert {rel: (out / rel).stat().st_mtime_ns for rel in lost} == mtimes  # loaded, not redone
    assert lost <= own_state(out)[0]


def test_statistics_of_another_skill_are_collected_again(done, setup, tmp_path):
    import shutil

    from mechunlearn import NeuronStats

    out = tmp_path / "swapped"
    shutil.copytree(done[0], out)
    forget = out / "stats" / "forget.pre.safetensors"
    (retain,) = (out / "stats").glob("retain_*.pre.safetensors")
    right, wrong = NeuronStats.load(forget).meta["skill"], NeuronStats.load(retain).meta["skill"]
    assert right != wrong
    shutil.copyfile(retain, forget)
    with pytest.warns(
        UserWarning, match="forget.pre.safetensors holds statistics of the skill"
    ) as w:
        assert main(argv(setup, out, command="unlearn")) == 0
    message = next(str(x.message) for x in w if "holds statistics" in str(x.message))
    assert repr(right) in message and repr(wrong) in message
    assert NeuronStats.load(forget).meta["skill"] == right


@pytest.mark.parametrize("how", ["deleted", "damaged"])
def test_a_lost_marker_is_rebuilt_from_the_config(done, setup, tmp_path, how):
    import shutil

    out = tmp_path / how
    shutil.copytree(done[0], out)
    listed = own_state(out)[0]
    if how == "deleted":
        (out / MARKER).unlink()
    else:
        (out / MARKER).write_text('{"key": "x", "files": [')
    saved = {p.name: p.stat().st_mtime_ns for p in (out / "stats").iterdir()}
    again = tmp_path / f"{how}-force"
    shutil.copytree(out, again)
    with pytest.warns(UserWarning, match="rebuilt") if how == "damaged" else nullcontext():
        assert main(argv(setup, out, command="unlearn")) == 0  # resumes
    assert {p.name: p.stat().st_mtime_ns for p in (out / "stats").iterdir()} == saved
    assert own_state(out)[0] == listed
    # --force with other settings now starts it over instead of "not a mechunlearn report".
    with pytest.warns(UserWarning, match="rebuilt") if how == "damaged" else nullcontext():
        assert main(argv(setup, again, "--seed", "1", "--force", command="collect")) == 0
    listed, on_disk, _ = own_state(again)
    assert listed == on_disk and not (again / "index.html").exists()


def test_a_damaged_marker_without_config_says_what_recovers_the_folder(setup, tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / MARKER).write_text('{"key": "x", "files": [')
    assert main(argv(setup, out, command="collect")) == 2
    line = one_line_error(capsys)
    assert MARKER in line and "config.json is missing" in line and "delete it" not in line


def _raise(err: BaseException):
    def fail(*args, **kwargs):
        raise err

    return fail


@pytest.mark.parametrize("fault", ["read-only mkdir", "read-only lock", "full disk"])
def test_disk_errors_are_one_line_saying_what_to_do(setup, tmp_path, capsys, monkeypatch, fault):
    import errno

    import safetensors.torch
    from safetensors import SafetensorError

    out = tmp_path / "r"
    if fault == "read-only mkdir":
        mkdir = Path.mkdir

        def read_only(self, *args, **kwargs):
            if self == out:
                raise OSError(errno.EROFS, "Read-only file system", str(self))
            return mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", read_only)
        expected = ("Read-only file system", "choose an --out on a writable disk")
    elif fault == "read-only lock":
        opened = os.open

        def read_only(path, *args, **kwargs):
            if Path(path).name == LOCK:
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return opened(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", read_only)
        expected = (LOCK, "Read-only file system", "choose an --out on a writable disk")
    else:
        err = SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )
        monkeypatch.setattr(safetensors.torch, "save_file", _raise(err))
        expected = ("forget.pre.safetensors", "No space left on device", "free some space")
    assert main(argv(setup, out, command="collect")) == 2
    line = one_line_error(capsys)
    assert all(part in line for part in expected), line


def test_a_folder_where_a_statistics_file_goes_is_one_line(setup, tmp_path, capsys):
    out = tmp_path / "r"
    (out / "stats" / "forget.pre.safetensors").mkdir(parents=True)
    assert main(argv(setup, out, command="collect")) == 2
    line = one_line_error(capsys)
    assert "forget.pre.safetensors is a folder" in line and "move it away" in line


def test_an_os_error_anywhere_is_one_line(setup, tmp_path, capsys, monkeypatch):
    import errno

    import mechunlearn.pipeline

    err = IsADirectoryError(errno.EISDIR, "Is a directory", str(tmp_path / "x"))
    monkeypatch.setattr(mechunlearn.pipeline, "load_model_for", _raise(err))
    assert main(argv(setup, tmp_path / "r", command="collect")) == 2
    line = one_line_error(capsys)
    assert str(tmp_path / "x") in line and "move it away" in line


def test_the_readme_torchrun_commands_parse():
    from torch.distributed.run import parse_args

    from mechunlearn.cli import parser

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    readme = readme.replace("\\\n", " ")  # shell line continuations
    lines = [s.strip() for s in readme.splitlines() if s.strip().startswith("torchrun ")]
    assert len(lines) >= 2
    for line in lines:
        assert "-m mechunlearn.cli -- " in line, line
        args = parse_args(line.split()[1:])
        assert args.module and args.training_script == "mechunlearn.cli"
        parsed = parser().parse_args(args.training_script_args)
        assert parsed.command in ("run", "collect")
    # torchrun would stop at "--n" without the "--"; with it, mechunlearn gets the flags.
    args = parse_args(
        ["--nproc_per_node", "2", "-m", "mechunlearn.cli", "--", "collect", "--n", "4"]
    )
    assert parser().parse_args(args.training_script_args).n == 4


def test_a_leading_double_dash_is_accepted(tmp_path, capsys):
    assert main(["--", "collect", "--forget", "gsm9k", "--n", "4", "--out", str(tmp_path)]) == 2
    assert "gsm9k" in one_line_error(capsys)  # parsed: the skill is the error, not the "--"
