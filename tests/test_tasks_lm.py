"""Language modelling, streaming dialogue and long generation under a fixed cache (tasks perplexity, stream, long)."""

from __future__ import annotations

from pathlib import Path

import conftest
import pytest
import torch
from conftest import compose_eval as eval_cfg
from conftest import make_method, method_names

from adore.data import WIKITEXT_EVAL_ARTICLES, DataSpec, load_records
from adore.engine.generate import forced_nll, generate
from adore.engine.session import Session
from adore.engine.text import eos_ids
from adore.eval import job as evaluate
from adore.eval.metrics import repeated_ngram_fraction
from adore.eval.tasks import Context
from adore.eval.tasks.long import Long
from adore.eval.tasks.perplexity import Perplexity
from adore.eval.tasks.stream import Stream, dialogue_turns, segments
from adore.io import read_json, read_jsonl
from adore.lit.data import encode_document
from adore.methods import Full, Window

METHODS = method_names()


def tiny_overrides(tiny_model_dir, *more):
    return conftest.tiny_overrides(
        tiny_model_dir, "eval.num_examples=2", "eval.max_new_tokens=5", "eval.max_prompt_tokens=96", *more
    )


def texts(seed=0):
    """Two texts of different lengths: a context (3 tokens / 1 token) and the scored rest (13 / 8 tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 1000, (2, 16), generator=g).tolist()
    return [ids[0][:3], ids[1][:1]], [ids[0][3:], ids[1][1:9]]


@pytest.fixture(scope="module")
def full_nll(tiny):
    return forced_nll(tiny[0], Full(), *texts(), pad_id=0)[:2]


def context(tiny, tiny_model_dir):
    model, tok = tiny
    return Context(model, tok, None, DataSpec("chat"), Path(tiny_model_dir), progress=False)


# ---- perplexity -------------------------------------------------------------------------------------------
def test_wikitext2_is_split_into_articles():
    records = load_records(DataSpec("wikitext2"))
    assert len(records) == WIKITEXT_EVAL_ARTICLES and records[0]["id"] == "wikitext2-0" and records[0]["messages"] == []
    assert records[0]["reference"].startswith(" = Robert Boulter = \n Robert Boulter is")
    assert " = Du Fu = " not in records[0]["reference"] and records[1]["reference"].startswith(" = Du Fu = ")
    assert "\r" not in records[0]["reference"] and " = = Career = = " in records[0]["reference"]


def test_wikitext2_offline_train_articles_are_never_evaluated(packaged_tokenizer):
    """Only the test file ships: articles 0-31 are evaluated, 32-61 can be labelled (cut into windows)."""
    evaluated, train = load_records(DataSpec("wikitext2")), load_records(DataSpec("wikitext2", split="train"))
    assert len(evaluated) == WIKITEXT_EVAL_ARTICLES and train[0]["id"] == f"wikitext2-{WIKITEXT_EVAL_ARTICLES}"
    assert not {r["reference"] for r in evaluated} & {r["reference"] for r in train}
    windows = encode_document(packaged_tokenizer, train[0], 128)
    assert all(len(w["input_ids"]) <= 128 and w["labels"] == w["input_ids"] for w in windows)
    ids = packaged_tokenizer(train[0]["reference"])["input_ids"]
    assert [t for w in windows for t in w["input_ids"]] == ids[: sum(len(w["input_ids"]) for w in windows)]


@pytest.mark.parametrize("name", METHODS)
def test_perplexity_with_budget_over_text_length_equals_full_attention(tiny, full_nll, name):
    nll, count, stats = forced_nll(tiny[0], make_method(name, 16, tiny[0]), *texts(), pad_id=0)
    assert count == full_nll[1] == [13, 8]
    assert nll == pytest.approx(full_nll[0], rel=1e-4)
    assert stats["decode_tokens"] == 12 + 7 and stats["rebuilt_tokens"] == 0


@pytest.mark.parametrize("name", [n for n in METHODS if n != "full"])
def test_a_document_longer_than_m_never_grows_the_cache_past_m(tiny, name, monkeypatch):
    model, _ = tiny
    m = 5
    method = make_method(name, m, model)
    feeds = []
    original = Session.feed

    def checked_feed(self, input_ids, valid=None, all_logits=False):
        logits = original(self, input_ids, valid, all_logits)
        if self.method is not method:  # the oracle's shadow full-attention session
            return logits
        feeds.append(input_ids.shape[1])
        assert int(self.slot_valid.sum(1).max()) <= m
        assert self.cache.capacity <= m + method.R + input_ids.shape[1]  # + R rebuilt in flight, for one new token
        return logits

    monkeypatch.setattr(Session, "feed", checked_feed)
    nll, count, _ = forced_nll(model, method, *texts(), pad_id=0)
    assert feeds == [3] + [1] * 12  # the context, then one target per feed: release between every two tokens
    assert all(x > 0 for x in nll) and count == [13, 8]


def test_chat_data_scores_the_reference_answers_given_the_prompt(tiny, tiny_model_dir):
    records = load_records(DataSpec("samsum"), 3)
    task = Perplexity(num_tokens=40, max_doc_tokens=16, batch_size=2)
    kept, contexts, targets = task.texts(tiny[1], records)
    assert [r["id"] for r in kept] == [r["id"] for r in records]
    assert [len(t) for t in targets] == [16, 16, 8] and contexts[0][-4:] == tiny[1]("<|im_start|>assistant\n")[
        "input_ids"
    ]
    out = task.run(context(tiny, tiny_model_dir), Window(m=8), records)
    assert out.metrics["eval/tokens"] == 40 and out.metrics["eval/ppl"] > 1
    low, high = out.metrics["eval/ppl_ci"]
    assert low <= out.metrics["eval/ppl"] <= high
    assert [r["tokens"] for r in out.rows] == [16, 16, 8]


def test_joined_documents_make_full_length_streams_scored_by_position(tiny, tiny_model_dir):
    records = load_records(DataSpec("wikitext2"), 6)
    task = Perplexity(num_tokens=60, batch_size=2, join_tokens=30, position_bin=8)
    kept, contexts, targets = task.texts(tiny[1], records)
    assert [len(c) + len(t) for c, t in zip(contexts, targets)] == [31, 31] and kept[0]["id"] == "wikitext2-0"
    ids = tiny[1](records[0]["reference"])["input_ids"]
    assert contexts[0] + targets[0] == ids[:31] and contexts[1] + targets[1] == ids[31:62]  # the article goes on
    out = task.run(context(tiny, tiny_model_dir), Window(m=8), records)
    by_position = [out.metrics[f"eval/ppl_pos{start}"] for start in (0, 8, 16, 24)]  # bins of 8, 8, 8, 6 positions
    assert all(p > 1 for p in by_position) and "eval/ppl_pos32" not in out.metrics
    assert sum(sum(r["nll_by_position"]) for r in out.rows) == pytest.approx(sum(r["nll"] for r in out.rows))
    with pytest.raises(ValueError, match="join_tokens=30 joins documents: use data=wikitext2"):
        task.texts(tiny[1], load_records(DataSpec("samsum"), 2))


# ---- stream -----------------------------------------------------------------------------------------------
def test_segments_follow_the_chat_template(packaged_tokenizer):
    tok = packaged_tokenizer
    record = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
        ],
        "reference": "Ciao",
    }
    turns = dialogue_turns(record, None)
    assert [t[1] for t in turns] == ["Hello", "Ciao"] and dialogue_turns(record, 1) == turns[:1]
    (first, _), (cut, after_eos) = segments(tok, turns, [tok.eos_token_id])
    assert tok.decode(first).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(cut) == "<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(after_eos) == "\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    # the stream of a dialogue whose replies ended with eos is the template's own rendering of it
    whole = tok.apply_chat_template(record["messages"], add_generation_prompt=True, tokenize=False)
    assert tok.decode(first + tok("Hello")["input_ids"] + [tok.eos_token_id] + after_eos) == whole


@pytest.mark.parametrize("method", [Full(), Window(m=10_000)])
def test_stream_equals_independent_full_attention_generation_of_each_turn(tiny, tiny_model_dir, method):
    model, tok = tiny
    records = [r for r in load_records(DataSpec("chat"), 12) if len(dialogue_turns(r, None)) >= 3][:2]
    out = Stream(batch_size=2, max_turns=3, max_new_tokens=4).run(context(tiny, tiny_model_dir), method, records)
    assert out.metrics["eval/turns"] == len(out.rows) == 6 and out.metrics["eval/dialogues"] == 2
    for row in out.rows:
        ids = torch.tensor([row["context_ids"]])
        ref = generate(model, Full(), ids, torch.ones_like(ids), 4, eos_ids(model, tok), tok.pad_token_id)
        assert ref.tokens[0, : ref.lengths[0]].tolist() == row["output_ids"], row["id"]
    for a, b in zip(out.rows, out.rows[1:]):  # the next turn's stream continues this turn's reply
        if a["dialogue"] == b["dialogue"]:
            assert b["context_ids"][: a["context_tokens"] + len(a["output_ids"])] == a["context_ids"] + a["output_ids"]


def test_stream_grows_past_m_with_a_bounded_cache(tiny, tiny_model_dir, monkeypatch):
    m = 8
    original = Session.feed

    def checked_feed(self, input_ids, valid=None, all_logits=False):
        logits = original(self, input_ids, valid, all_logits)
        assert int(self.slot_valid.sum(1).max()) <= m
        return logits

    monkeypatch.setattr(Session, "feed", checked_feed)
    records = load_records(DataSpec("chat"), 3)
    out = Stream(batch_size=3, max_turns=2, max_new_tokens=4).run(context(tiny, tiny_model_dir), Window(m=m), records)
    assert out.metrics["eval/context_tokens"] > 10 * m
    assert {"eval/bleu", "eval/rougeL", "eval/bleu_ci", "eval/rougeL_ci"} <= set(out.metrics)
    assert out.perf["perf/stream_tokens"] > 0 and out.perf["perf/peak_kv_bytes"] > 0


# ---- long generation --------------------------------------------------------------------------------------
def test_repeated_ngram_fraction_by_hand():
    # 3-grams of 1 2 3 1 2 3 1: 123 231 312 123 231 -> the last two repeat earlier ones
    assert repeated_ngram_fraction([1, 2, 3, 1, 2, 3, 1], 3) == pytest.approx(2 / 5)
    assert repeated_ngram_fraction([5, 5, 5, 5], 1) == pytest.approx(3 / 4)
    assert repeated_ngram_fraction([1, 2, 3, 4], 2) == 0.0 and repeated_ngram_fraction([1, 2], 3) == 0.0


@pytest.mark.parametrize("method, expected", [(Window(m=6), 12), (Full(), 8)])
def test_long_generation_runs_length_factor_times_m(tiny, tiny_model_dir, method, expected):
    records = load_records(DataSpec("chat"), 3)
    out = Long(length_factor=2, reference_m=4, batch_size=2).run(context(tiny, tiny_model_dir), method, records)
    assert [r["new_tokens"] for r in out.rows] == [expected] * 3 and out.run["max_new_tokens"] == expected
    assert 0 <= out.metrics["eval/repeated_ngram_fraction"] <= 1
    assert out.perf["perf/decode_tok_per_s"] > 0


# ---- through eval.py's job --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, keys",
    [
        (
            [
                "task=perplexity",
                "data=wikitext2",
                "task.num_tokens=24",
                "task.max_doc_tokens=10",
                "method=window",
                "budget=4",
            ],
            {"eval/ppl", "eval/nll", "eval/ppl_ci", "eval/tokens"},
        ),
        (
            ["task=perplexity", "data=samsum", "task.num_tokens=12", "method=h2o", "budget=8", "eval.diagnose=true"],
            {"eval/ppl", "fidelity/release_recall", "fidelity/release_kept_sink"},
        ),
        (
            ["task=stream", "data=chat", "task.max_turns=2", "method=streaming", "budget=8"],
            {"eval/bleu", "eval/rougeL_ci", "eval/turns", "eval/context_tokens"},
        ),
        (
            ["task=long", "data=chat", "task.length_factor=2", "method=adore", "budget=4"],
            {"eval/repeated_ngram_fraction", "eval/repeated_ngram_fraction_ci"},
        ),
    ],
)
def test_each_task_runs_through_eval(tmp_path, tiny_model_dir, overrides, keys):
    cfg = eval_cfg(*tiny_overrides(tiny_model_dir, *overrides))
    result = evaluate.run(cfg, str(tmp_path))
    task = overrides[0].split("=")[1]
    assert evaluate.task_suffix(cfg.task).startswith(f"-{task}")
    assert read_json(tmp_path / "results.json")["run"]["task"] == task and result["run"]["data"] == cfg.data.name
    assert keys <= set(result["metrics"]) and result["perf"]["perf/decode_tok_per_s"] > 0
    assert len(read_jsonl(tmp_path / "predictions.jsonl")) >= 1
    if task == "perplexity" and cfg.data.name == "wikitext2":
        assert result["metrics"]["eval/tokens"] == 24 and result["run"]["m"] == 4


@pytest.mark.parametrize(
    "override, message",
    [
        ("task=perplexity task.num_tokens=0", "task.num_tokens=0"),
        ("task=perplexity task.max_doc_tokens=-1", "task.max_doc_tokens=-1"),
        ("task=stream task.max_turns=0", "task.max_turns=0"),
        ("task=stream eval.max_new_tokens=0", "eval.max_new_tokens=0"),
        ("task=long task.length_factor=0", "task.length_factor=0"),
        ("task=long task.ngram=0", "task.ngram=0"),
        ("task=stream data=wikitext2", "no dialogues"),
        ("task=long data=wikitext2", "no prompts"),
    ],
)
def test_bad_task_values_fail_before_any_model_loads(override, message, monkeypatch):
    monkeypatch.setattr(evaluate, "load", lambda *a: pytest.fail("model loaded before validation"))
    with pytest.raises(ValueError, match=message):
        evaluate.run(eval_cfg(*override.split()), "/tmp/never")
