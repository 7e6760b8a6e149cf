"""The release diagnostic (adore.engine.diagnostic): hand-computed on a constructed pattern, exact for the oracle."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_eval, make_method, tiny_overrides

from adore.engine.diagnostic import KEYS, release_stats
from adore.engine.generate import teacher_force


def test_window_on_a_constructed_pattern():
    # ten tokens at positions 0..9, the query at 9; window m=4 keeps positions 6..9
    attention = torch.tensor([[0.30, 0.05, 0.05, 0.05, 0.05, 0.10, 0.05, 0.15, 0.05, 0.15]])
    positions = torch.arange(10)[None]
    kept = positions >= 6
    stats, counted = release_stats(attention * 7, kept, torch.ones_like(kept), positions, torch.tensor([[9]]), m=4)
    assert counted.tolist() == [True]
    # full attention's top-4: positions 0 (.30), 7 and 9 (.15), 5 (.10); the window holds 7 and 9
    assert stats["recall"].item() == pytest.approx(0.5)
    assert stats["mass"].item() == pytest.approx(0.05 + 0.15 + 0.05 + 0.15)
    assert stats["mass_sink"].item() == pytest.approx(0.45) and stats["kept_sink"].item() == 0
    assert stats["mass_age0_15"].item() == pytest.approx(0.55) and stats["kept_age0_15"].item() == pytest.approx(0.40)
    assert sum(stats[k].item() for k in KEYS if k.startswith("kept_")) == pytest.approx(stats["mass"].item())


def test_steps_with_history_within_m_do_not_count():
    _, counted = release_stats(torch.ones(1, 4), torch.ones(1, 4, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool),
                               torch.arange(4)[None], torch.tensor([[3]]), m=4)  # fmt: skip
    assert counted.tolist() == [False]


def _diagnose(tiny, name, m, **overrides):
    model, _ = tiny
    torch.manual_seed(0)
    contexts = torch.randint(10, 1000, (2, 20)).tolist()
    targets = torch.randint(10, 1000, (2, 8)).tolist()
    stats = teacher_force(
        model, make_method(name, m, **overrides), contexts, targets, 0, lambda *a: None, diagnose=True
    )
    return stats["diagnostic"]


def test_oracle_recall_is_one(tiny):
    """The oracle keeps each query's true top-m; with R = m every one of them can come back."""
    for row in _diagnose(tiny, "oracle", 6, R=6):
        assert row["steps"] > 0
        assert row["recall"] == pytest.approx(1.0)


def test_window_loses_what_the_oracle_keeps(tiny):
    window, oracle = _diagnose(tiny, "window", 6), _diagnose(tiny, "oracle", 6, R=6)
    for w, o in zip(window, oracle):
        assert w["recall"] < 1.0 and w["mass"] <= o["mass"] + 1e-6
        assert w["kept_sink"] == 0  # the window keeps no old token


def test_eval_records_the_diagnostic(tiny_model_dir, tmp_path):
    from adore.eval.job import run

    cfg = compose_eval(*tiny_overrides(tiny_model_dir, "method=streaming", "budget=8", "eval.diagnose=true"))
    result = run(cfg, str(tmp_path / "run"))
    metrics = result["metrics"]
    for key in ("release_recall", "release_mass", "release_kept_sink", "release_mass_age0_15"):
        assert 0 <= metrics[f"fidelity/{key}"] <= 1
    assert metrics["fidelity/release_kept_sink"] == pytest.approx(metrics["fidelity/release_mass_sink"], abs=1e-5)
