"""Offline datasets (one record schema, disjoint deterministic splits) and metrics."""

from __future__ import annotations

import pytest

from adore.data import DataSpec, extract_answer, last_boxed, load_records, normalize_answer
from adore.eval.metrics import bleu, exact_match, quality, rouge

SIZES = {"chat": (800, 200), "math": (500, 500), "gsm8k": (1000, 319), "samsum": (818, 819)}


@pytest.mark.parametrize("name", SIZES)
def test_offline_partitions_are_disjoint_and_sized(name):
    train = load_records(DataSpec(name=name, split="train"))
    evaluation = load_records(DataSpec(name=name, split="eval"))
    assert (len(train), len(evaluation)) == SIZES[name]
    assert not {r["id"] for r in train} & {r["id"] for r in evaluation}
    for r in evaluation[:20]:
        assert set(r) == {"id", "messages", "reference", "answer"}
        assert r["messages"][-1]["role"] == "user" and r["reference"]
    assert [r["id"] for r in load_records(DataSpec(name=name), 5)] == [r["id"] for r in evaluation[:5]]


def test_chat_prompt_is_the_dialogue_up_to_its_last_user_turn():
    records = load_records(DataSpec(name="chat"), 50)
    assert any(len(r["messages"]) >= 3 for r in records), "multi-turn context is kept"


def test_answers_are_extracted():
    math = load_records(DataSpec(name="math"), 20)
    assert all(r["answer"] for r in math)
    gsm = load_records(DataSpec(name="gsm8k"), 5)
    assert all(r["answer"].replace(",", "").lstrip("-").isdigit() for r in gsm)
    assert last_boxed("so \\boxed{\\frac{1}{2}} and \\boxed{3}") == "3"
    assert last_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert normalize_answer("$1,000.$") == normalize_answer("1000") == "1000"
    assert normalize_answer("\\dfrac{1}{2}") == "\\frac{1}{2}"
    assert extract_answer("so it is 12, then 42. The answer is 1,024") == "1,024"
    assert exact_match(["The answer is 1,024", "7"], ["1024", "8"]) == [1.0, 0.0]


def test_missing_offline_folder_names_the_source_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="SAMSum.*data.source=hub"):
        load_records(DataSpec(name="samsum", root=str(tmp_path)))


@pytest.mark.parametrize(
    "kwargs", [dict(name="nope"), dict(name="chat", split="test"), dict(name="chat", source="web")]
)
def test_bad_data_config_fails_with_a_message(kwargs):
    with pytest.raises(ValueError, match="data\\."):
        DataSpec(**kwargs)


def test_metrics_on_known_cases():
    refs = ["the cat sat on the mat", "a b c d"]
    assert bleu(refs, refs) == pytest.approx(100.0)
    assert rouge(refs, refs)["rougeL"] == [pytest.approx(100.0)] * 2
    assert rouge(["dogs run"], ["the cat sat"])["rouge1"] == [0.0]
    summary, per_example = quality(["the cat sat on a mat", "x y"], refs, [None, None], "packaged:all-MiniLM-L6-v2")
    assert 0 < summary["rougeL"] < 100
    assert per_example["bertscore_f"][0] > per_example["bertscore_f"][1]


def test_a_malformed_dataset_file_is_named(tmp_path):
    (tmp_path / "competition_math").mkdir()
    (tmp_path / "competition_math/test.jsonl").write_text('{"problem": "1+1", "solution": "\\\\boxed{2}"}\n{broken\n')
    with pytest.raises(ValueError, match=r"competition_math/test.jsonl is not a readable JSON"):
        load_records(DataSpec("math", root=str(tmp_path)))
