"""Faults that used to give wrong results without a word (issue #28, item 2): weight edits undone
out of order or reused, SIMU updates that blow up, damaged files, contaminated splits, and the
other cases that do not fit a row of test_bad_input.py's table."""

from __future__ import annotations

import pytest
import torch

import mechunlearn as mu
from mechunlearn import Lunar, SelectivePruning, Simu, Skill
from mechunlearn.data.files import DataFileError
from tests.tiny_models import changed_weights as _changed
from tests.tiny_models import weights as _params

F = Skill.from_texts(
    "f", [f"Q: {i}+{i + 1}?" for i in range(8)], [f" {2 * i + 1}" for i in range(8)]
)
R = Skill.from_texts(
    "r", [f"def f{i}(x):" for i in range(8)], [f"\n  return x*{i}" for i in range(8)]
)
REF = Skill.from_texts("ref", [f"Who is Zorb {c}?" for c in "ABCDEFGH"])


@pytest.fixture(scope="module")
def edits(tiny_llama):
    m = tiny_llama
    simu = Simu(layers=[1], max_steps=2, lr=0.05, batch_size=4, forget_loss_factor=None)
    simu.fit(m, F, R, quiet=True)
    sp = SelectivePruning(ratio=0.2).fit(
        mu.collect_importance(m, F, quiet=True), mu.collect_importance(m, R, quiet=True)
    )
    return {"simu": simu, "sp": sp, "lunar": Lunar(layer=1).fit(m, F, R, REF)}


# ------------------------------------------------------------------------------ weight edits
@pytest.mark.parametrize("first", ["simu", "sp"])
def test_weight_edits_undone_in_creation_order_restore_every_bit(tiny_llama, edits, first):
    m, lunar = tiny_llama, edits["lunar"]
    before = _params(m)
    with lunar.apply_to_weights(m):
        lunar_only = _params(m)
    assert _changed(m, before) == []

    e1 = edits[first].apply_to_weights(m)
    e2 = lunar.apply_to_weights(m)
    assert any("layers.1." in n and "down_proj" in n for n in _changed(m, before))
    e1.undo()  # the older edit first: exactly LUNAR's edit stays
    assert _changed(m, lunar_only) == []
    e2.undo()
    assert _changed(m, before) == []


@pytest.mark.parametrize("first", ["simu", "sp"])
def test_weight_edits_undone_in_reverse_order_restore_every_bit(tiny_llama, edits, first):
    m = tiny_llama
    before = _params(m)
    with edits[first].apply_to_weights(m), edits["lunar"].apply_to_weights(m):
        assert any("layers.1." in n and "down_proj" in n for n in _changed(m, before))
    assert _changed(m, before) == []


def test_a_spent_weight_edit_is_refused(tiny_llama, edits):
    m = tiny_llama
    before = _params(m)
    edit = edits["lunar"].apply_to_weights(m)
    with edit:
        assert _changed(m, before)
    with pytest.raises(RuntimeError, match="undone already .*apply_to_weights\\(model\\) again"):
        with edit:
            pass
    assert _changed(m, before) == []


# ------------------------------------------------------------------------------------- SIMU
def test_a_simu_update_that_blows_up_stops_and_restores(tiny_llama):
    before = _params(tiny_llama)
    simu = Simu(lr=1e30, optimizer_kwargs={"p": 1e30}, max_steps=1, forget_loss_factor=None)
    with pytest.raises(FloatingPointError, match="non-finite at step 0: .*weights were restored"):
        simu.fit(tiny_llama, F, R, quiet=True)
    assert _changed(tiny_llama, before) == []
    assert not simu.is_fitted


# ---------------------------------------------------------------------------- damaged files
def _tamper(path, name, change):
    """Rewrite tensor ``name`` of a saved file as ``change(tensor)``, keeping its metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors[name] = change(tensors[name])
    save_file(tensors, str(path), metadata=meta)


@pytest.fixture(scope="module")
def fitted(tiny_llama, edits):
    pf = mu.collect(tiny_llama, F, what=("pre", "keys"), quiet=True)
    pr = mu.collect(tiny_llama, R, what=("pre", "keys"), quiet=True)
    return {
        "na": mu.NeuronAdjust(ratio=0.1).fit(pf.pre, pr.pre),
        "ksd": mu.KeySpaceDetector(h=2.0).fit(pf.keys),
        **edits,
    }


NAN = float("nan")


@pytest.mark.parametrize(
    "kind, tensor, change, fragment",
    [
        ("lunar", "delta_w_out.1", lambda t: t.fill_(NAN), "'delta_w_out.1' holds 1536 NaN"),
        ("ksd", "alpha", lambda t: t.fill_(NAN), "'alpha' holds 3 NaN"),
        ("ksd", "region.mu", lambda t: t.fill_(float("inf")), "'region.mu' holds"),
        ("na", "mu_r", lambda t: t.fill_(NAN), "'mu_r' holds 14 NaN"),
        ("simu", "delta:blocks.1.mlp.W_out", lambda t: t.fill_(NAN), "'delta:blocks.1.mlp.W_out'"),
        ("na", "selected", lambda t: t.float() * 0.5, "'selected' holds indices but is torch.f"),
        ("sp", "selected", lambda t: t.float(), "'selected' holds indices but is torch.float32"),
    ],
)  # fmt: skip
def test_a_file_with_nan_or_float_indices_is_damaged(
    fitted, tmp_path, kind, tensor, change, fragment
):
    path = fitted[kind].save(tmp_path / kind)
    type(fitted[kind]).load(path)  # the file as saved loads
    _tamper(path, tensor, change)
    with pytest.raises(mu.DamagedFileError, match="^" + str(path).replace(".", r"\.")) as info:
        type(fitted[kind]).load(path)
    assert fragment in str(info.value) and "fit the" in str(info.value)


def test_nan_in_an_unselected_neurons_gaussian_still_loads(fitted, tmp_path):
    na = fitted["na"]
    path = na.save(tmp_path / "na")
    _tamper(path, "mu_f", lambda t: t.masked_fill(~na.selected_, NAN))
    assert torch.equal(type(na).load(path).selected_, na.selected_)


# ---------------------------------------------------------------------------------- splits
def test_split_keeps_every_copy_of_a_prompt_in_one_part():
    prompts = [f"p{i}" for i in range(10)] * 2 + ["solo"]
    skill = Skill.from_texts("dup", prompts, [f" a{i}" for i in range(21)])
    for seed in range(20):
        fit, held = skill.split(0.3, seed=seed)
        assert not set(fit.prompts) & set(held.prompts), seed
        assert len(fit) + len(held) == 21 and len(held) >= 7
        assert sorted(fit.prompts + held.prompts) == sorted(prompts)


def test_split_of_unique_prompts_is_unchanged():
    skill = Skill.from_texts("u", [str(i) for i in range(101)])
    fit, held = skill.split(0.3, seed=4)
    assert (len(fit), len(held)) == (70, 31)
    # the first 31 of the hash order, as before copies were grouped
    from mechunlearn.data.skill import _hash_order

    expected = sorted(_hash_order(skill.examples, 4, salt="split")[:31])
    assert held.prompts == [str(i) for i in expected]


def test_split_that_copies_would_empty_is_refused():
    skill = Skill.from_texts("same", ["q", "q", "q"], [" 1", " 2", " 3"])
    with pytest.raises(ValueError, match="copies of a prompt stay in one part"):
        skill.split(1, seed=0)


# ------------------------------------------------------------------------------ data files
@pytest.mark.parametrize(
    "name, content, line, fragment",
    [
        ("nan.jsonl", b'{"prompt": "a", "answer": "x"}\n{"prompt": "b", "answer": NaN}\n', 2,
         "the value NaN is not standard JSON (it would become the text 'nan')"),
        ("inf.jsonl", b'{"prompt": "a", "answer": Infinity}\n', 1,
         "the value Infinity is not standard JSON"),
        ("inf.json", b'[\n {"prompt": "a", "answer": 1},\n {"prompt": "b", "answer": -Infinity}\n]',
         3, "the value -Infinity is not standard JSON"),
        ("nul.csv", b"prompt,answer\nab,1\nc\x00d,2\n", 3, "a NUL byte at column 2"),
        ("nul.jsonl", b'{"prompt": "a\x00"}\n', 1, "a NUL byte at column 14"),
    ],
)  # fmt: skip
def test_a_data_file_with_nan_or_nul_is_refused_with_its_line(
    tmp_path, name, content, line, fragment
):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataFileError, match="re-save|quoted string") as info:
        mu.load_skill(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: ") and fragment in message, message
    assert "\n" not in message


@pytest.mark.parametrize("content", [b"not gzip at all", None], ids=["not gzip", "truncated"])
def test_a_damaged_gzip_file_is_refused_with_its_name(tmp_path, content):
    import gzip

    path = tmp_path / "qa.jsonl.gz"
    whole = gzip.compress(b'{"prompt": "a", "answer": "b"}\n' * 50)
    path.write_bytes(whole[: len(whole) // 2] if content is None else content)
    with pytest.raises(DataFileError, match="not a complete gzip file .*download or copy it"):
        mu.load_skill(str(path))


# ------------------------------------------------------------------ two models, one fit
def test_statistics_of_another_model_of_the_same_shape_warn_naming_both(tiny_llama):
    pf = mu.collect(tiny_llama, F, what=("pre", "keys", "importance"), quiet=True)
    pr = mu.collect(tiny_llama, R, what=("pre", "keys", "importance"), quiet=True)
    for part in (pr.pre, pr.keys, pr.importance):
        part.meta["model"] = "tiny-llama-finetuned"
    expected = "come from model 'tiny-llama' but .* from 'tiny-llama-finetuned'"
    # Neuron Adjust's separation scores (check_same_source) refuse them outright.
    with pytest.warns(UserWarning, match="stats_f " + expected):
        with pytest.raises(ValueError, match="different models: model is 'tiny-llama' vs"):
            mu.NeuronAdjust(ratio=0.1).fit(pf.pre, pr.pre)
    with pytest.warns(UserWarning, match="importance_f " + expected):
        mu.SelectivePruning(ratio=0.1).fit(pf.importance, pr.importance)
    with pytest.warns(UserWarning, match="keys_f " + expected):
        mu.KeySpaceDetector(fpr=0.3).fit(pf.keys, pr.keys)


# ------------------------------------------------------------------------ generation length
def test_generate_caps_new_tokens_at_the_context(tiny_llama, recwarn):
    keys_f = mu.collect_keys(tiny_llama, F, quiet=True)
    ksd = mu.KeySpaceDetector(h=1.0).fit(keys_f)
    prompt = "def f9(x):"  # not detected
    assert not ksd.detect(tiny_llama, [prompt]).detected.any()
    # a character tokenizer: BOS and 10 prompt tokens leave 245 of the 256 positions
    with pytest.warns(UserWarning, match="context of 256 tokens after a prompt of 11: .*245 new"):
        (text,) = ksd.generate(tiny_llama, [prompt], max_new_tokens=10**9)
    assert isinstance(text, str) and text


def test_greedy_generation_caps_new_tokens_at_the_context(tiny_llama):
    """The one generation runner caps every caller (greedy_generate, evaluation's generation
    protocols, the detectors' generate)."""
    from mechunlearn.generation import greedy_generate

    with pytest.warns(UserWarning, match="context of 256 tokens after a prompt of 11: .*245 new"):
        (text,) = greedy_generate(tiny_llama, ["def f9(x):"], 10**9)
    assert isinstance(text, str)
    with pytest.raises(ValueError, match="leaves no room in the model's context"):
        greedy_generate(tiny_llama, ["x" * 255], 4)  # BOS + 255 fill the 256 positions
