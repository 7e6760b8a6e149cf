"""Fidelity to full attention and bootstrap intervals (issue 8), on the tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import compose_eval, make_method, method_names, tiny_overrides

from adore.eval import fidelity
from adore.eval import job as evaluate
from adore.eval.stats import Bootstrap
from adore.io import read_jsonl


def cfg_for(tmp_path, tiny_model_dir, *overrides):
    return compose_eval(*tiny_overrides(tiny_model_dir, f"out_root={tmp_path}", "eval.num_examples=4",
                                        "eval.max_new_tokens=8", "data=samsum", "eval.max_prompt_tokens=40", *overrides))  # fmt: skip


@pytest.mark.parametrize("method", [n for n in method_names() if n != "full"])
def test_large_budget_is_faithful(tmp_path, tiny, tiny_model_dir, method):
    """m >= the sequence length: KL 0, top-1 agreement 1, outputs identical to full attention's."""
    make_method(method, 500, tiny[0])  # skips a method that cannot run on the tiny model
    result = evaluate.run(cfg_for(tmp_path, tiny_model_dir, f"method={method}", "budget=500"), str(tmp_path / "run"))
    m = result["metrics"]
    assert m["fidelity/kl"] == pytest.approx(0, abs=1e-5)
    assert m["fidelity/top1"] == 1 and m["fidelity/rank"] == 1 and m["fidelity/identical"] == 1
    rows = read_jsonl(tmp_path / "run" / "predictions.jsonl")
    assert [r["output"] for r in rows] == [r["full_output"] for r in rows]
    assert all(r["fidelity_first_divergence"] == 8 or r["output"] == r["full_output"] for r in rows)


def test_small_budget_diverges_and_every_metric_has_an_interval(tmp_path, tiny_model_dir):
    result = evaluate.run(cfg_for(tmp_path, tiny_model_dir, "method=window", "budget=4"), str(tmp_path / "run"))
    m = result["metrics"]
    assert m["fidelity/kl"] > 1e-7 and m["fidelity/top1"] < 1  # a random tiny model: near-uniform distributions
    for key in [k for k in m if not k.endswith("_ci")]:
        low, high = m[f"{key}_ci"]
        assert low <= m[key] + 1e-9 and m[key] <= high + 1e-9, key


def test_second_method_reuses_stored_full_outputs(tmp_path, tiny_model_dir, monkeypatch, capsys):
    evaluate.run(cfg_for(tmp_path, tiny_model_dir, "method=window", "budget=6"), str(tmp_path / "a"))
    assert "[reference] stored" in capsys.readouterr().out
    monkeypatch.setattr(fidelity, "build_reference", lambda *a, **k: pytest.fail("full attention recomputed"))
    import adore.eval.tasks.generate as task_module

    monkeypatch.setattr(task_module, "build_reference", lambda *a, **k: pytest.fail("full attention recomputed"))
    evaluate.run(cfg_for(tmp_path, tiny_model_dir, "method=streaming", "budget=6"), str(tmp_path / "b"))
    assert "[reference] reusing" in capsys.readouterr().out
    # a setting the outputs depend on changes: computed again, under another key
    monkeypatch.undo()
    evaluate.run(
        cfg_for(tmp_path, tiny_model_dir, "method=streaming", "budget=6", "eval.max_new_tokens=5"), str(tmp_path / "c")
    )
    assert "[reference] stored" in capsys.readouterr().out
    assert len(list((tmp_path / "reference").iterdir())) == 2


def test_reference_text_can_be_teacher_forced(tmp_path, tiny_model_dir):
    result = evaluate.run(
        cfg_for(tmp_path, tiny_model_dir, "method=window", "budget=500", "task.fidelity.source=reference"),
        str(tmp_path / "run"),
    )
    assert result["metrics"]["fidelity/kl"] == pytest.approx(0, abs=1e-5)


def test_kl_of_a_hand_built_pair():
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.3, 0.5])
    exact = sum(a * math.log(a / b) for a, b in zip(p.tolist(), q.tolist()))
    kl, tail = fidelity.kl_top_k(p.log(), torch.tensor([0, 1, 2]), q.log())
    assert kl == pytest.approx(exact, rel=1e-5) and tail == pytest.approx(0, abs=1e-6)
    # top-2 only: the third token becomes the rest bucket (here the same atom, so still exact)
    kl2, tail2 = fidelity.kl_top_k(p.log()[:2], torch.tensor([0, 1]), q.log())
    assert kl2 == pytest.approx(exact, rel=1e-5) and tail2 == pytest.approx(0.2, rel=1e-5)
    assert fidelity.kl_top_k(p.log(), torch.tensor([0, 1, 2]), p.log())[0] == pytest.approx(0, abs=1e-7)


def test_first_divergence():
    assert fidelity.first_divergence([1, 2, 3], [1, 2, 3]) == 3
    assert fidelity.first_divergence([1, 5, 3], [1, 2, 3]) == 1
    assert fidelity.first_divergence([1, 2], [1, 2, 3]) == 2


def test_bootstrap_interval_matches_normal_theory():
    x = np.random.default_rng(7).normal(3.0, 2.0, size=400)
    low, high = Bootstrap(resamples=4000, seed=1).mean_ci(x)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert low == pytest.approx(x.mean() - half, abs=0.03) and high == pytest.approx(x.mean() + half, abs=0.03)


def test_paired_bootstrap_detects_a_shift_and_not_noise():
    rng = np.random.default_rng(0)
    a = rng.normal(10, 3, size=200)
    shifted = Bootstrap().paired(a + 1 + rng.normal(0, 0.5, 200), a)
    assert shifted["significant"] and shifted["ci"][0] > 0
    noise = Bootstrap().paired(a + rng.normal(0, 0.5, 200), a)
    assert not noise["significant"] and noise["ci"][0] < 0 < noise["ci"][1]
    with pytest.raises(ValueError, match="same examples"):
        Bootstrap().paired([1, 2], [1, 2, 3])


@pytest.mark.parametrize(
    "override, message",
    [
        ("bootstrap.resamples=0", "bootstrap.resamples=0"),
        ("bootstrap.level=1.5", "bootstrap.level=1.5"),
        ("task.fidelity.source=gold", "task.fidelity.source='gold'"),
        ("task.fidelity.top_k=0", "task.fidelity.top_k=0"),
    ],
)
def test_bad_fidelity_and_bootstrap_values_fail_early(tmp_path, tiny_model_dir, override, message, monkeypatch):
    monkeypatch.setattr(evaluate, "load", lambda *a: pytest.fail("model loaded before validation"))
    with pytest.raises(ValueError, match=message):
        evaluate.run(cfg_for(tmp_path, tiny_model_dir, override), str(tmp_path / "never"))


def test_full_attention_against_itself_is_not_rerun_and_is_exact(tiny):
    """Full attention's own fidelity is taken as KL 0 / top-1 1 without a second pass: the pass it skips gives
    exactly that, and the same bucketed tail mass."""
    from adore.eval.fidelity import Fidelity, build_reference, divergence
    from adore.methods import Full

    model, _ = tiny
    torch.manual_seed(0)
    prompts = torch.randint(10, 1000, (3, 12)).tolist()
    forced = torch.randint(10, 1000, (3, 5)).tolist()
    batches = [[0, 1], [2]]
    ref = build_reference(model, Full(), prompts, forced, forced, ["", "", ""], batches, 0, Fidelity(top_k=8), None,
                          False, {})  # fmt: skip
    scores = divergence(ref, model, Full(), prompts, batches, 0, None, False)
    assert scores["kl"] == pytest.approx([0.0] * 3, abs=1e-6) and scores["top1"] == [1.0] * 3
    shortcut = [float((1 - lp.exp().sum(-1)).clamp(min=0).mean()) for lp in ref.top_logp]
    assert scores["tail"] == pytest.approx(shortcut, abs=1e-6)
