"""The lm-evaluation-harness adapter (adore/harness.py): local two-example tasks (tests/data/harness) run offline
through lm-eval with full attention and bounded methods; its scores are the engine's teacher-forced ones and its
generations are the engine's, cut at the task's stop strings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the local JSON tasks need no network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

from conftest import PROJECT  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from adore import Pipeline  # noqa: E402
from adore.engine.generate import (  # noqa: E402
    Sampling,
    forced_nll,  # noqa: E402
    generate,
    left_pad,
)
from adore.harness import AdoreLM  # noqa: E402

TASKS = PROJECT / "tests" / "data" / "harness"
# (method, m, options): full attention, and bounded methods whose m is far below the prompts' lengths
METHODS = [("full", None, {}), ("window", 8, {}), ("adore", 8, {"R": 2, "rebuild_every": 1})]
CONTEXT = "Question: which of these animals barks loudly at the postman every single morning?\nAnswer:"


@pytest.fixture(scope="module", params=METHODS, ids=[m[0] for m in METHODS])
def lm(request, tiny):
    name, m, options = request.param
    model, tokenizer = tiny
    return AdoreLM(Pipeline(model, tokenizer, method=name, m=m, batch_size=2, **options))


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def engine_tokens(lm: AdoreLM, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """Greedy tokens of `adore.engine.generate.generate` for each prompt alone (eos included)."""
    out = []
    for p in prompts:
        ids, mask = left_pad([lm.tok_encode(p)], lm.pipe.pad_token_id)
        gen = generate(lm.model, lm.method, ids, mask, max_new_tokens, lm.pipe.eos_token_ids, lm.pipe.pad_token_id)
        out.append(gen.tokens[0, : gen.lengths[0]].tolist())
    return out


# ---- loglikelihood ---------------------------------------------------------------------------------------------
def test_loglikelihood_is_the_engines_forced_nll(lm):
    """Batched requests of different lengths (an empty context included) score as `forced_nll` scores each alone."""
    pairs = [(CONTEXT, " a dog"), (CONTEXT, " a fish in the deep blue sea"), ("Hi", " there"), ("", "Hello world")]
    got = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    for (context, continuation), (logp, _) in zip(pairs, got):
        if context:
            ctx, cont = lm._encode_pair(context, continuation)
        else:
            ctx, cont = [lm.prefix_token_id], lm.tok_encode(continuation, add_special_tokens=False)
        nll, counts, _ = forced_nll(lm.model, lm.method, [ctx], [cont], lm.pipe.pad_token_id)
        assert counts == [len(cont)]
        assert logp == pytest.approx(-nll[0], abs=1e-4)
        assert logp < 0


def test_is_greedy_is_true_exactly_for_the_engines_greedy_tokens(lm):
    ctx = lm.tok_encode(CONTEXT)
    (greedy,) = engine_tokens(lm, [CONTEXT], 4)
    other = greedy[:-1] + [(greedy[-1] + 1) % len(lm.tokenizer)]
    (_, yes), (_, no) = lm._loglikelihood_tokens([(None, ctx, greedy), (None, ctx, other)])
    assert yes is True and no is False


def test_long_requests_keep_their_last_max_length_tokens(tiny):
    model, tokenizer = tiny
    lm = AdoreLM(Pipeline(model, tokenizer, method="window", m=8), max_length=12)
    ctx, cont = lm._encode_pair(CONTEXT, " a dog that barks")
    ((logp, _),) = lm._loglikelihood_tokens([(None, ctx, cont)])
    keep = (ctx + cont)[-13:]
    nll, _, _ = forced_nll(model, lm.method, [keep[: -len(cont)]], [cont], lm.pipe.pad_token_id)
    assert logp == pytest.approx(-nll[0], abs=1e-4)


def test_loglikelihood_rolling_sums_the_windows(tiny):
    """A text longer than max_length is scored in lm-eval's disjoint windows, each token once, each window the
    engine's forced NLL of its tokens given the prefix token (BOS) or the window before."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    model, tokenizer = tiny
    lm = AdoreLM(Pipeline(model, tokenizer, method="window", m=8), max_length=16)
    text = CONTEXT + " A dog. " * 6
    (total,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])
    ids = lm.tok_encode(text, add_special_tokens=False)
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, lm.prefix_token_id, 16, 1)]
    assert len(windows) > 1 and sum(len(cont) for _, cont in windows) == len(ids)
    assert windows[0][0] == [lm.prefix_token_id]
    expected = sum(-forced_nll(model, lm.method, [c], [x], lm.pipe.pad_token_id)[0][0] for c, x in windows)
    assert total == pytest.approx(expected, abs=1e-3)


# ---- generate_until --------------------------------------------------------------------------------------------
def test_generate_until_is_the_engines_generation_cut_at_until(lm):
    prompts = [CONTEXT, "Hi"]
    full = engine_tokens(lm, prompts, 12)
    texts = [lm._text(t) for t in full]
    assert all(len(t) == 12 for t in full), "the tiny model generated an eos: pick other prompts"
    # max_gen_toks alone: exactly that many of the engine's tokens
    got = lm.generate_until([request("generate_until", p, {"until": [], "max_gen_toks": 5}) for p in prompts])
    assert got == [lm._text(t[:5]) for t in full]
    # a stop string met after a few tokens: the text before it, and the batch stops there
    stop = lm._text(full[0][3:5])
    assert stop.strip() and stop in texts[0]
    reqs = [request("generate_until", p, {"until": [stop, "\u2603"], "max_gen_toks": 12}) for p in prompts]
    got = lm.generate_until(reqs)
    assert got == [t.split(stop)[0] for t in texts]
    (alone,) = lm._generate([lm.tok_encode(CONTEXT)], 12, [stop], "", Sampling())  # the loop ends at the stop
    assert stop in alone and len(alone) < len(texts[0])


# ---- through lm-eval -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,m,options", METHODS[:2], ids=[m[0] for m in METHODS[:2]])
def test_simple_evaluate_runs_the_local_tasks(tiny, monkeypatch, name, m, options):
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(PROJECT)  # the tasks' data_files are relative to the project root
    model, tokenizer = tiny
    lm = AdoreLM(Pipeline(model, tokenizer, method=name, m=m, batch_size=2, **options))
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["adore_tiny_qa", "adore_tiny_choice", "adore_tiny_ppl"],
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),  # index only ours
        log_samples=True,
        bootstrap_iters=0,
    )
    results = out["results"]
    assert 0 <= results["adore_tiny_qa"]["exact_match,none"] <= 1
    assert 0 <= results["adore_tiny_choice"]["acc,none"] <= 1
    assert results["adore_tiny_ppl"]["word_perplexity,none"] > 1
    assert out["config"]["adore_m"] == m
    for sample in out["samples"]["adore_tiny_qa"]:
        (text,) = sample["resps"][0]
        assert "\n" not in text and "Question:" not in text
        assert len(lm.tok_encode(text, add_special_tokens=False)) <= 8 + 1  # max_gen_toks (+1: re-tokenisation)
    for sample in out["samples"]["adore_tiny_choice"]:  # every choice scored by the engine's forced NLL
        for args, ((logp, _),) in zip(sample["arguments"], sample["resps"]):
            ctx, cont = lm._encode_pair(*args)
            nll, _, _ = forced_nll(model, lm.method, [ctx], [cont], lm.pipe.pad_token_id)
            assert float(logp) == pytest.approx(-nll[0], abs=1e-4)


def test_command_line_registers_the_model(tiny_model_dir, tmp_path, monkeypatch):
    """`python -m adore.harness <lm-eval arguments>` with `--model adore`, in process."""
    from adore.harness import main

    monkeypatch.chdir(PROJECT)
    args = ["--model", "adore", "--model_args", f"pretrained={tiny_model_dir},method=window,m=8", "--device", "cpu"]
    args += ["--include_path", str(TASKS), "--tasks", "adore_tiny_choice", "--batch_size", "2"]
    monkeypatch.setattr(sys, "argv", ["adore.harness", *args, "--output_path", str(tmp_path)])
    main()
    (path,) = tmp_path.rglob("results_*.json")
    results = json.loads(path.read_text())
    assert 0 <= results["results"]["adore_tiny_choice"]["acc,none"] <= 1
    assert results["config"]["adore_m"] == 8


@pytest.mark.slow
def test_python_m_adore_harness(tiny_model_dir, tmp_path):
    """The documented command, as a user runs it (a fresh process: the lazy registration under __main__)."""
    args = [sys.executable, "-m", "adore.harness", "--model", "adore"]
    args += ["--model_args", f"pretrained={tiny_model_dir},method=adore,m=8,R=2", "--include_path", str(TASKS)]
    args += ["--tasks", "adore_tiny_qa", "--device", "cpu", "--output_path", str(tmp_path)]
    env = os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(args, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = tmp_path.rglob("results_*.json")
    assert "exact_match,none" in json.loads(path.read_text())["results"]["adore_tiny_qa"]


@pytest.mark.slow
def test_packaged_model_is_the_default():
    lm = AdoreLM(method="window", m=16, device="cpu")
    assert lm.model.config.name_or_path.endswith("SmolLM2-135M-Instruct.Q4_1")
    ((dog, _), (stone, _)) = lm.loglikelihood(
        [request("loglikelihood", "Question: Which animal barks?\nAnswer:", x) for x in (" a dog", " a stone")]
    )
    assert dog > stone


# ---- errors where the bad value enters -------------------------------------------------------------------------
def test_bad_options_are_refused(tiny, tiny_model_dir):
    model, tokenizer = tiny
    pipe = Pipeline(model, tokenizer, method="window", m=8)
    with pytest.raises(ValueError, match="auto"):
        AdoreLM(pipe, batch_size="auto")
    with pytest.raises(ValueError, match="set them on the Pipeline"):
        AdoreLM(pipe, method="full")
    with pytest.raises(ValueError, match="has no option"):
        AdoreLM(tiny_model_dir, method="window", m=8, bogus=1)  # before the model loads
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cpu"):
            AdoreLM(tiny_model_dir, device="cuda:0")  # lm-eval's default --device
    with pytest.raises(ValueError, match="max_gen_toks"):
        AdoreLM(pipe, max_gen_toks=0)
