"""task=ruler: the RULER-style generators (deterministic, needles where they say, lengths that fit), RULER's scorer,
the three arrival regimes, and a run through eval.py's real config with the tiny model."""

from __future__ import annotations

import pytest
from conftest import compose_eval, tiny_overrides

from adore import ruler
from adore.eval import job as evaluate
from adore.eval.tasks.ruler import Chunked, OneShot, Ruler, Turns
from adore.io import read_jsonl

EOS = []  # the generators' token counts do not depend on eos ids


def counter(tokenizer, arrival=None, new_tokens: int = 16):
    arrival = arrival or OneShot()
    return lambda ex: arrival.occupies(tokenizer, ex, EOS, new_tokens)


@pytest.fixture(scope="module")
def noise():
    return ruler.haystack_sentences([ruler.NOISE])


@pytest.fixture(scope="module")
def essay():
    """Essay-like prose with WikiText's markup, as the offline file holds it."""
    text = "\n".join(
        [
            " = A Title = ",
            " The bridge was built in 1901 @-@ 1903 , and it is 1 @,@ 200 feet long . It's still used today !",
            " = = A section = = ",
            " Trains ( and cars ) cross it every day . Nobody knows why ; perhaps it works ?",
        ]
    )
    return ruler.haystack_sentences([text] * 40)


def test_haystack_sentences_read_as_prose(essay):
    assert essay[:4] == [
        "The bridge was built in 1901-1903, and it is 1,200 feet long.",
        "It's still used today!",
        "Trains (and cars) cross it every day.",
        "Nobody knows why; perhaps it works?",
    ]
    assert ruler.haystack_sentences([ruler.NOISE]) == [
        "The grass is green.",
        "The sky is blue.",
        "The sun is yellow.",
        "Here we go.",
        "There and back again.",
    ]


@pytest.mark.parametrize("variant", ruler.VARIANTS)
def test_generators_are_deterministic_and_fit_the_length(variant, packaged_tokenizer, noise):
    count = counter(packaged_tokenizer)
    length = 1024
    a = ruler.make_example(variant, length, 3, noise, count, seed=0)
    b = ruler.make_example(variant, length, 3, noise, count, seed=0)
    assert a == b  # same seed, same prompt
    other = ruler.make_example(variant, length, 3, noise, count, seed=1)
    assert other.text() != a.text() and other.references != a.references
    assert ruler.make_example(variant, length, 4, noise, count, seed=0).text() != a.text()  # another example
    used = count(a)
    assert 0.95 * length <= used <= length  # within a few % of the target, never past it
    for ref in a.references:
        assert ref.lower() in a.text().lower()  # the answers are in the prompt


def test_lengths_are_counted_in_the_arrival(packaged_tokenizer, essay):
    """The turns regime also holds the reply to the context turn: its examples are fitted with it."""
    for arrival in (OneShot(), Turns(reply_tokens=16)):
        count = counter(packaged_tokenizer, arrival, 32)
        for length in (512, 2048):
            ex = ruler.make_example("niah_single", length, 0, essay, count)
            assert 0.95 * length <= count(ex) <= length


@pytest.mark.parametrize("depth", ruler.DEPTHS)
def test_the_needle_sits_at_its_depth_in_token_ids(depth, packaged_tokenizer, essay):
    tok = packaged_tokenizer
    count = counter(tok)
    index = ruler.DEPTHS.index(depth)  # depths are cycled over the examples
    ex = ruler.make_example("niah_single", 2048, index, essay, count)
    assert ex.depth == depth and ex.needle_depths == [depth]
    ids = OneShot().segments(tok, ex, EOS)[0][0]
    context = tok(ex.context, add_special_tokens=False)["input_ids"]
    value = tok(ex.references[0], add_special_tokens=False)["input_ids"]  # digits: one token each, stable
    at = next(i for i in range(len(ids)) if ids[i : i + len(value)] == value)  # the value, in the prompt's ids
    start = next(i for i in range(len(ids)) if ids[i : i + 8] == context[:8])  # where the context begins
    where = (at - start) / len(context)
    assert abs(where - depth) < 0.03, (where, depth)


def test_multikey_hides_distractors_and_asks_for_one_key(packaged_tokenizer, noise):
    ex = ruler.make_example("niah_multikey", 1024, 0, noise, counter(packaged_tokenizer))
    assert len(ex.needles) == ruler.MULTI and len(ex.references) == 1
    assert all(n in ex.context for n in ex.needles)
    asked = ex.needles[0]
    assert asked.endswith(f"{ex.references[0]}.") and asked.split(" for ")[1].split(" is")[0] in ex.question


def test_needle_tokens_are_the_tokens_an_answer_copies(packaged_tokenizer, noise):
    tok = packaged_tokenizer
    for variant in ("niah_multikey", "niah_multivalue", "vt"):
        ex = ruler.make_example(variant, 1024, 1, noise, counter(tok))
        ids = OneShot().segments(tok, ex, EOS)[0][0]
        found = ruler.needle_tokens(tok, ids, ex)
        text = tok.decode([ids[i] for i in found])
        assert all(r in text for r in ex.references), (variant, text)
        if variant != "vt":  # the values' digits alone (one token each), none of a distractor's
            assert len(found) == 7 * len(ex.references) and text.isdigit()
        assert ex.question not in text
    fwe = ruler.make_example("fwe", 512, 0, noise, counter(tok))
    assert ruler.needle_tokens(tok, OneShot().segments(tok, fwe, EOS)[0][0], fwe) is None  # no needles
    ex = ruler.make_example("niah_single", 512, 0, noise, counter(tok))
    split = tok.convert_tokens_to_ids(["H", "ello"])  # "Hello" in two tokens: its text encodes as one
    assert ruler.needle_tokens(tok, OneShot().segments(tok, ex, EOS)[0][0] + split, ex) is None
    with pytest.raises(ValueError, match="'digits'"):
        ruler.needle_tokens(tok, ids, ex, part="digits")


def test_needle_keys_are_the_asked_needles_keys(packaged_tokenizer, noise):
    """The key tokens are the asked needles' keys, none of a distractor's; vt has no keys."""
    tok = packaged_tokenizer
    for variant, asked in (("niah_single", 1), ("niah_multikey", 1), ("niah_multivalue", 4), ("niah_multiquery", 4)):
        ex = ruler.make_example(variant, 1024, 2, noise, counter(tok))
        ids = OneShot().segments(tok, ex, EOS)[0][0]
        found = ruler.needle_tokens(tok, ids, ex, part="key")
        keys = {ruler.NEEDLE_KEY.fullmatch(n).group("key") for n in ex.needles if any(r in n for r in ex.references)}
        assert len(keys) == (1 if variant == "niah_multivalue" else asked)
        runs = [[found[0]]]  # the found tokens in runs of consecutive positions: one run per asked needle
        for i in found[1:]:
            runs[-1].append(i) if i == runs[-1][-1] + 1 else runs.append([i])
        assert len(runs) == asked and {tok.decode([ids[i] for i in run]).strip() for run in runs} == keys, variant
        distractors = [n for n in ex.needles if not any(r in n for r in ex.references)]
        assert all(ruler.NEEDLE_KEY.fullmatch(n).group("key") not in keys for n in distractors)
    vt = ruler.make_example("vt", 1024, 0, noise, counter(tok))
    assert ruler.needle_tokens(tok, OneShot().segments(tok, vt, EOS)[0][0], vt, part="key") is None


def test_scorer_counts_the_references_found():
    assert ruler.string_match_all("The number is 1234567.", ["1234567"]) == 1.0
    assert ruler.string_match_all("I do not know.", ["1234567"]) == 0.0
    assert ruler.string_match_all("They are 111, 333 and 999", ["111", "222", "333", "444"]) == 0.5  # partial
    assert ruler.string_match_all("Answer: TFTCE, nvepc", ["TFTCE", "NVEPC"]) == 1.0  # case-insensitive
    with pytest.raises(ValueError):
        ruler.string_match_all("x", [])


def test_turns_feed_the_question_as_a_later_turn(packaged_tokenizer, noise):
    tok = packaged_tokenizer
    ex = ruler.make_example("niah_single", 512, 0, noise, counter(tok, Turns()))
    first, later = Turns().segments(tok, ex, [tok.eos_token_id])
    context_turn, question_turn = tok.decode(first[0]), tok.decode(later[0])
    assert ex.references[0] in context_turn and ex.question not in context_turn
    assert ex.question in question_turn and ex.references[0] not in question_turn
    assert question_turn.rstrip().endswith(ex.answer_prefix)
    assert question_turn.index("user") < question_turn.index(ex.question)  # a new user turn, after the reply
    (one,) = OneShot().segments(tok, ex, [tok.eos_token_id])
    assert ex.question in tok.decode(one[0]) and ex.references[0] in tok.decode(one[0])


def test_arrivals_chunk_as_they_say():
    assert OneShot().chunk_for(16, 5000) == 5000  # never auto-chunked
    assert Chunked().chunk_for(64, 5000) == 64 and Chunked(chunk=100).chunk_for(64, 5000) == 100
    assert Chunked().chunk_for(None, 5000) == 5000  # full attention: the whole prompt
    assert Turns().chunk_for(16, 300) == 300
    assert [a.tag for a in (OneShot(), Chunked(), Chunked(chunk=128), Turns(), Turns(reply_tokens=8))] == [
        "oneshot", "chunked", "chunked128", "turns", "turns8"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="task.arrival.chunk=0"):
        Chunked(chunk=0)
    with pytest.raises(ValueError, match="task.arrival.reply_tokens=0"):
        Turns(reply_tokens=0)


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="task.variants"):
        Ruler(variants=["niah_nope"])
    with pytest.raises(ValueError, match="task.lengths"):
        Ruler(lengths=[0])
    with pytest.raises(ValueError, match="task.depths"):
        Ruler(depths=[1.5])


def ruler_cfg(tiny_model_dir, *more):
    return compose_eval(
        *tiny_overrides(tiny_model_dir, "task=ruler", "data=noise", "eval.num_examples=2", "eval.max_new_tokens=4",
                        "task.lengths=[256,384]", "task.variants=[niah_single,niah_multivalue,fwe]", "budget=32", *more)
    )  # fmt: skip


def test_chunked_with_a_chunk_past_the_prompt_is_oneshot(tmp_path, tiny_model_dir):
    """c >= the prompt: one forward per prompt, the same tokens as one-shot prefill."""
    outputs = []
    for name, arrival in (
        ("oneshot", ["task/arrival=oneshot"]),
        ("chunked", ["task/arrival=chunked", "task.arrival.chunk=4096"]),
    ):
        evaluate.run(ruler_cfg(tiny_model_dir, "method=window", *arrival), str(tmp_path / name))
        outputs.append([r["output"] for r in read_jsonl(tmp_path / name / "predictions.jsonl")])
    assert outputs[0] == outputs[1]


def test_ruler_runs_through_eval(tmp_path, tiny_model_dir):
    cfg = ruler_cfg(tiny_model_dir, "method=window", "task/arrival=turns")
    result = evaluate.run(cfg, str(tmp_path))
    run, metrics = result["run"], result["metrics"]
    assert run["task"] == "ruler" and run["arrival"] == "turns" and run["haystack"] == "noise"
    assert run["num_examples"] == 3 * 2 * 2
    assert {"eval/ruler_accuracy", "eval/ruler_niah_single_256", "eval/ruler_fwe_384", "eval/ruler_384"} <= set(metrics)
    assert len(metrics["eval/ruler_accuracy_ci"]) == 2 and "eval/ruler_depth0_256" in metrics
    rows = read_jsonl(tmp_path / "predictions.jsonl")
    assert len(rows) == 12 and {r["variant"] for r in rows} == {"niah_single", "niah_multivalue", "fwe"}
    for r in rows:
        assert r["prompt_tokens"] + 4 <= r["length"] and "reply" in r and 0 <= r["score"] <= 1
        assert (r["depth"] is None) == (r["variant"] == "fwe")
    assert [r["depth"] for r in rows if r["variant"] == "niah_single"] == [0.0, 0.25, 0.0, 0.25]
    assert evaluate.task_suffix(cfg.task) == "-ruler-turns"


def test_needle_kept_is_what_the_cache_holds(tmp_path, tiny_model_dir):
    """Full attention holds every needle token; a window of 32 holds none of a needle in the first half of the
    prompt; fwe has no needle to measure."""
    for method in ("full", "window"):
        result = evaluate.run(ruler_cfg(tiny_model_dir, f"method={method}"), str(tmp_path / method))
        rows = read_jsonl(tmp_path / method / "predictions.jsonl")
        for part in ("needle_kept", "key_kept"):
            assert all((r[part] is None) == (r["variant"] == "fwe") for r in rows)
            kept = [r[part] for r in rows if r["variant"] == "niah_single"]
            assert kept == ([1.0] * 4 if method == "full" else [0.0] * 4)  # depths 0 and 0.25 of 256 / 384 tokens
            assert result["metrics"][f"eval/ruler_{part}_niah_single"] == (1.0 if method == "full" else 0.0)


def test_ruler_refuses_conversations_and_lengths_past_the_window(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(evaluate, "load", lambda *a: pytest.fail("model loaded before validation"))
    with pytest.raises(ValueError, match="data=noise"):
        evaluate.run(ruler_cfg(tiny_model_dir, "data=samsum"), "/tmp/never")
    with pytest.raises(ValueError, match=r"task.lengths=\[1024, 16384\].*context window of 8192"):
        evaluate.run(ruler_cfg(tiny_model_dir, "task.lengths=[1024,16384]"), "/tmp/never")


def test_report_shows_ruler_tables_heatmap_and_paired_tests(tmp_path, tiny_model_dir):
    from adore import report

    for method in ("full", "window"):
        for arrival in ("oneshot", "turns"):
            cfg = ruler_cfg(
                tiny_model_dir, f"method={method}", f"task/arrival={arrival}", "task.variants=[niah_single]"
            )
            evaluate.run(cfg, str(tmp_path / "sweep" / arrival / method))
    assert report.main([str(tmp_path / "sweep")]) == 0
    out = tmp_path / "sweep/report"
    markdown = (out / "tables.md").read_text()
    assert "## Long context (RULER), by length" in markdown and "## Long context (RULER), by task" in markdown
    assert "Window (arrival=turns)" in markdown and "Window (arrival=oneshot)" in markdown  # one row per regime
    assert "## Long context (RULER), what the release kept" in markdown
    assert "## Long context (RULER), the asked keys the release kept" in markdown
    assert (out / "ruler_heatmap.png").exists()
    tests = (out / "significance.csv").read_text()
    assert "RULER" in tests and "noise (ruler)" in tests
