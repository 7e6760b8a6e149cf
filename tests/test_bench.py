"""The decode-throughput benchmark (adore.bench) on the tiny model: every registry method, the engine's loop."""

from __future__ import annotations

import pytest
import torch

from adore import bench
from adore.generate import generate
from adore.io import read_json
from adore.registry import build_method, method_config, method_names


def test_bench_runs_every_method(tmp_path, tiny_model_dir, capsys):
    """Every method config runs (one row per R where it has one), or is skipped with a note when it cannot run."""
    args = "--prompt-len 24 --new-tokens 4 --batch 2 --m 8 --R 0,2 --hf-generate".split()
    rows = bench.main(
        [*args, "--model", tiny_model_dir, "--methods", ",".join(method_names()), "--out", str(tmp_path / "b.json")]
    )
    skipped = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[skip]")]
    assert [line.split()[1] for line in skipped] == ["method=adore_trained"] * 2  # its controller fits SmolLM2 only
    expected = []
    for name in method_names():
        if name != "adore_trained":
            has_R = "R" in method_config(name, 8)
            expected += [build_method(name, 8, R=r).tag for r in (0, 2)] if has_R else [build_method(name, 8).tag]
    tags = [r["method"] for r in rows]
    assert tags == ["hf_generate_full", *expected]
    assert all(r["decode_tok_per_s"] > 0 for r in rows)
    assert sum(r["rebuilt_tokens"] for r in rows if "_R2" in r["method"]) > 0  # R=2 rebuilds, R=0 does not
    assert all(r["rebuilt_tokens"] == 0 for r in rows if "_R0" in r["method"])
    written = read_json(tmp_path / "b.json")["rows"]
    assert [r["method"] for r in written] == tags
    assert next(r for r in written if r["method"] == "full")["x_full"] == pytest.approx(1.0)


def test_bench_rejects_an_unknown_method(tmp_path, tiny_model_dir):
    with pytest.raises(SystemExit, match="choose from.*'window'"):
        bench.main(["--model", tiny_model_dir, "--methods", "window,adore_r0", "--out", str(tmp_path / "bench.json")])


def test_bench_decodes_what_generate_does(tiny):
    """The benchmark times the engine's own loop: the same greedy tokens as `generate.generate`."""
    model = tiny[0]
    ids = torch.randint(100, 1000, (2, 20), generator=torch.Generator().manual_seed(0))
    _, gen = bench.run_method(model, build_method("adore", 6, R=2), ids, 8)
    ref = generate(model, build_method("adore", 6, R=2), ids, torch.ones_like(ids), 8, [], 0)
    assert gen.tokens.shape == (2, 8) and torch.equal(gen.tokens, ref.tokens)
    assert len(gen.stats["step_s"]) == 7 and "step_s" not in ref.stats  # latencies only when asked for
