"""The Python API (adore/api.py) on the tiny random Llama: the engine's invariants, seen through `Pipeline`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import PROJECT

import adore
import adore.api
from adore import Pipeline
from adore.methods import H2O, Window

PROMPTS = [
    "Summarise: the cat sat on the mat.",
    "Hi",
    [{"role": "user", "content": "Tell me about the weather today."}],
]
TEXT = "The quick brown fox jumps over the lazy dog, then it runs into the forest and sleeps."
NEW = 12


@pytest.fixture(scope="module")
def full(tiny):
    return Pipeline(*tiny, method="full")


@pytest.fixture(scope="module")
def full_outputs(full):
    return full.generate(PROMPTS, max_new_tokens=NEW), full.score(TEXT)


@pytest.mark.parametrize("name", ["window", "streaming", "h2o", "adore"])
def test_large_budget_gives_full_attention_text_and_perplexity(tiny, full_outputs, name):
    pipe = Pipeline(*tiny, method=name, m=256)
    texts, ppl = full_outputs
    assert pipe.generate(PROMPTS, max_new_tokens=NEW) == texts
    assert pipe.score(TEXT) == pytest.approx(ppl, rel=1e-5)


def test_batched_equals_one_at_a_time(tiny, full_outputs):
    pipe = Pipeline(*tiny, method="streaming", m=8, sinks=2, batch_size=3)
    batched = pipe.generate(PROMPTS, max_new_tokens=NEW)
    assert batched == [pipe.generate(p, max_new_tokens=NEW) for p in PROMPTS]
    assert batched != full_outputs[0], "m=8 changes some reply (else this test checks nothing)"
    assert pipe.score([TEXT, TEXT[:40]]) == pytest.approx([pipe.score(TEXT), pipe.score(TEXT[:40])], rel=1e-5)


@pytest.mark.parametrize("sampling", [{}, {"do_sample": True, "temperature": 0.8, "seed": 3}])
def test_stream_pieces_join_to_generate_text(tiny, sampling):
    pipe = Pipeline(*tiny, method="h2o", m=8)
    pieces = list(pipe.stream(PROMPTS[2], max_new_tokens=NEW, **sampling))
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == pipe.generate(PROMPTS[2], max_new_tokens=NEW, **sampling)


def test_leaving_a_stream_early_stops_generating(tiny, monkeypatch):
    """The stream is read step by step: breaking after the first piece leaves the other ~200 tokens ungenerated."""
    from adore.engine.session import Session

    feeds = []
    original = Session.feed
    monkeypatch.setattr(Session, "feed", lambda self, *a, **k: feeds.append(1) or original(self, *a, **k))
    pipe = Pipeline(*tiny, method="window", m=8)
    for _ in pipe.stream("Hi", max_new_tokens=200):
        break
    assert 1 <= len(feeds) <= 5  # the prompt, and the few tokens before the first whole piece of text


def test_method_by_name_equals_method_object(tiny):
    by_name = Pipeline(*tiny, method="h2o", m=8, recent_ratio=0.25)
    by_object = Pipeline(*tiny, method=H2O(m=8, recent_ratio=0.25))
    assert by_name.method == by_object.method
    assert by_name.generate(PROMPTS, max_new_tokens=NEW) == by_object.generate(PROMPTS, max_new_tokens=NEW)
    assert by_name.score(TEXT) == by_object.score(TEXT)


def test_model_by_folder_equals_loaded_model(tiny, tiny_model_dir):
    assert Pipeline(tiny_model_dir, method="window", m=8).generate(PROMPTS, max_new_tokens=NEW) == Pipeline(
        *tiny, method=Window(m=8)
    ).generate(PROMPTS, max_new_tokens=NEW)


def test_text_prompt_is_one_user_message_and_prompted_score(tiny, full):
    message = [{"role": "user", "content": PROMPTS[0]}]
    assert full.generate(PROMPTS[0], max_new_tokens=NEW) == full.generate(message, max_new_tokens=NEW)
    assert full.score("It sat.", prompt=PROMPTS[0]) == pytest.approx(full.score(["It sat."], prompt=[message])[0])
    assert full.score("It sat.", prompt=PROMPTS[0]) != pytest.approx(full.score("It sat."))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "nope"}, r"method='nope' is not a method config: choose one of \[.*'window'"),
        ({"method": Window(m=8), "m": 8}, "set them on the method object"),
        ({"method": "h2o", "R": 4}, r"has no option \['R'\]: its options are \['recent_ratio'\]"),
        ({"method": "full", "m": 8}, "keeps every token"),
        ({"method": "window", "m": 0}, "m=0 must be a positive integer"),
        ({"method": 3}, "pass one of"),
        ({"batch_size": 0}, "batch_size=0"),
    ],
)
def test_bad_settings_raise_value_errors_that_name_the_fix(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Pipeline(*tiny, **kwargs)


def test_bad_calls_raise_value_errors(tiny, full):
    with pytest.raises(ValueError, match="pass the tokenizer"):
        Pipeline(tiny[0])
    with pytest.raises(ValueError, match="pass a str, chat messages"):
        full.generate(3)
    with pytest.raises(ValueError, match="pass a str, chat messages"):
        full.generate([])
    with pytest.raises(ValueError, match="stream takes one prompt"):
        next(full.stream(["a", "b"]))
    with pytest.raises(ValueError, match="unknown sampling option"):
        full.generate("Hi", max_new_tokens=2, temprature=0.5)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        full.generate("Hi", max_new_tokens=0)
    with pytest.raises(ValueError, match="no token to score"):
        full.score("Hi")
    with pytest.raises(ValueError, match="2 texts and 3 prompts"):
        full.score(["a b c", "d e f"], prompt=["x", "y", "z"])


def test_import_adore_stays_cheap():
    """`import adore` loads neither torch nor Hydra; `adore.Pipeline` imports the API on first use."""
    code = "import sys, adore; assert 'torch' not in sys.modules and 'hydra' not in sys.modules, sorted(sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Pipeline is adore.api.Pipeline and "Pipeline" in dir(adore)
    with pytest.raises(AttributeError):
        adore.nothing  # noqa: B018


@pytest.mark.slow
def test_docs_example_runs_on_the_packaged_model(tmp_path):
    """The first Python block of docs/api.md, as a user would paste it (the packaged SmolLM2)."""
    doc = (PROJECT / "docs" / "api.md").read_text()
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    env = os.environ | {"PYTHONPATH": str(PROJECT)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "perplexity" in out.stdout
