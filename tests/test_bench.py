"""The decode-throughput benchmark (adore.bench) on the tiny model: every registry method, the engine's loop."""

from __future__ import annotations

import pytest
import torch

from adore import bench
from adore.bench.rounds import merge_rounds
from adore.engine.generate import generate
from adore.engine.session import Session
from adore.io import read_json
from adore.models import cpu_model
from adore.registry import build_method, method_config, method_names


def smollm2_only() -> list[str]:
    """The configs whose trained controller reads SmolLM2's width: they cannot run on the tiny model."""
    return [n for n in method_names() if method_config(n, 16).get("controller")]


def test_bench_runs_every_method(tmp_path, tiny_model_dir, capsys):
    """Every method config runs (one row per R where it has one), or is skipped with a note when it cannot run."""
    args = "--prompt-len 24 --new-tokens 4 --batch 2 --m 8 --R 0,2 --rebuild-every 1 --hf-generate".split()
    rows = bench.main(
        [*args, "--model", tiny_model_dir, "--methods", ",".join(method_names()), "--out", str(tmp_path / "b.json")]
    )
    skipped = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[skip]")]
    trained = smollm2_only()
    assert {line.split()[1] for line in skipped} == {f"method={n}" for n in trained}  # controllers fit SmolLM2 only
    expected = []
    for name in sorted(method_names(), key=lambda n: n != "full"):  # full attention first
        if name not in trained:
            has_R = "R" in method_config(name, 8)
            rows_of = [build_method(name, 8, R=0), build_method(name, 8, R=2, rebuild_every=1)] if has_R else []
            expected += [m.tag for m in rows_of] if has_R else [build_method(name, 8).tag]
    tags = [r["method"] for r in rows if not r["method"].startswith("floor_")]
    assert tags == ["hf_generate_full", *expected]
    assert all(r["decode_tok_per_s"] > 0 for r in rows)  # transformers' steps timed inside its generate too
    # every method row has its floor: a bare forward over m cached tokens, or over the context for full attention
    floors = {r["method"] for r in rows if r["method"].startswith("floor_")}
    assert floors == {"floor_8", f"floor_{24 + 4 // 2}"}
    assert all(r["x_floor"] > 0 for r in rows if r["method"] in expected)
    assert sum(r["rebuilt_tokens"] for r in rows if "_R2" in r["method"]) > 0  # R=2 rebuilds, R=0 does not
    assert all(r["rebuilt_tokens"] == 0 for r in rows if "_R0" in r["method"])
    written = read_json(tmp_path / "b.json")
    assert [r["method"] for r in written["rows"]] == [r["method"] for r in rows]
    assert next(r for r in written["rows"] if r["method"] == "full")["x_full"] == pytest.approx(1.0)
    # the machine is named with its ratios: its model and the vector instructions torch's kernels use
    device = written["setup"]["device_name"]
    assert device.startswith(cpu_model()) and f"({torch.backends.cpu.get_cpu_capability()})" in device


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


def test_rows_decode_in_turns_the_order_rotated_and_the_outputs_their_own(tiny):
    """The rows of a batch decode one step each in turn, the order rotated every step, so that drift of the
    machine spreads over all; each row decodes what it decodes alone, and every fed step is timed."""
    model = tiny[0]
    ids = torch.randint(100, 1000, (2, 20), generator=torch.Generator().manual_seed(2))
    methods = [build_method("window", 6), build_method("adore", 6, R=2, rebuild_every=1), build_method("h2o", 6)]
    decoders = [bench.start_floor(model, 2, 6, 5)] + [bench.start_method(model, m, ids, 5) for m in methods]
    order = []

    def logged(i, steps):
        for item in steps:
            order.append(i)
            yield item

    for i, decoder in enumerate(decoders):  # record who steps when
        decoder.steps = logged(i, decoder.steps)
    bench.decode_in_turns(decoders, 5)
    assert order[:4] == [0, 1, 2, 3]  # the first tokens, from prefill
    assert order[4:8] == [1, 2, 3, 0] and order[8:12] == [2, 3, 0, 1] and len(order) == 4 * 5
    for decoder, method in zip(decoders[1:], methods):
        row, gen = decoder.finish()
        _, alone = bench.run_method(model, method, ids, 5)
        assert torch.equal(gen.tokens, alone.tokens), method.tag
        assert len(gen.stats["step_s"]) == 4 and row["decode_tok_per_s"] > 0


def test_transformers_generate_is_timed_step_by_step_with_its_own_attention(tiny):
    """--hf-generate: prefill and every decode step stamped inside one `generate` call, with transformers' SDPA
    (not the engine's registered attention, which is restored after)."""
    model = tiny[0]
    Session(model, build_method("window", 6), 1, 8)  # registers the engine's attention
    engine = model.config._attn_implementation
    ids = torch.randint(100, 1000, (2, 12), generator=torch.Generator().manual_seed(3))
    prefill_s, steps = bench.hf_generate(model, ids, 5)
    assert prefill_s > 0 and len(steps) == 4 and all(s > 0 for s in steps)
    assert model.config._attn_implementation == engine == "adore"


def test_history_bytes_count_what_a_session_keeps_per_fed_token(tiny):
    """Besides the KV cache a session keeps, per history column, an id, a position, a valid flag and a slot (8 + 8
    + 1 + 8 bytes, one slot column spare), plus the method's per-token state: none for window, H2O's float mass."""
    model = tiny[0]
    B, L = 2, 30
    plain = B * L * (8 + 8 + 1) + B * (L + 1) * 8
    assert Session(model, build_method("window", 6), B, L).history_bytes == plain
    assert Session(model, build_method("h2o", 6), B, L).history_bytes == plain + B * L * 4
    adore = Session(model, build_method("adore", 6), B, L)
    assert adore.history_bytes == plain + B * L * adore.method.net.state_width * 4  # z_i, float32


def test_an_assumed_prefill_gives_the_assumed_tokens_method_state(tiny):
    """--synthetic-prompt: the assumed tokens get random per-token state, so a probe controller ranks them and
    rebuilds them (with zeros for state it saw none: no rebuild at all, and a cost the benchmark never measured)."""
    model = tiny[0]
    ids = torch.randint(100, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    probe = {"heads": 2, "head_dim": 4, "input_layer": 1}
    row, _ = bench.run_method(
        model, build_method("adore", 8, R=2, rebuild_every=1, config=probe), ids, 4, synthetic=True
    )
    assert row["rebuilt_per_step"] > 0
    session = Session(model, build_method("adore", 8, config=probe), 2, 44)
    session.assume_prefilled(ids)
    tokens = session.state.tokens
    assert tokens["filled"][:, :40].all() and torch.equal(tokens["pos"][:, :39], session.hist_pos[:, :39])
    assert (tokens["z"][:, :39] != 0).all()


def test_shared_prefill_decodes_what_an_own_prefill_does(tiny):
    """Methods that prefill alike settle one shared prompt forward: every method then decodes the tokens it
    decodes after its own prefill, and the forward runs once per prefill signature."""
    model = tiny[0]
    ids = torch.randint(100, 1000, (2, 20), generator=torch.Generator().manual_seed(1))
    shared = bench.SharedPrefill(model, ids, 6)
    names = sorted((n for n in method_names() if n not in smollm2_only()), key=lambda n: n != "full")  # as bench runs
    tags = {}
    for name in names:
        overrides = {"R": 2} if "R" in method_config(name, 6) else {}
        own_row, own = bench.run_method(model, build_method(name, 6, **overrides), ids, 6)
        row, gen = bench.run_method(model, build_method(name, 6, **overrides), ids, 6, shared=shared)
        assert torch.equal(gen.tokens, own.tokens), name
        assert row["kv_bytes_decode"] == own_row["kv_bytes_decode"], name
        assert row["kv_bytes_peak"] == own_row["kv_bytes_peak"], name  # what its own prefill would have held
        tags[name] = row["prefill_shared_with"]
    assert tags["oracle"] is None  # a shadow full-attention session rides along: its prefill is its own
    # no recordings (the paper's controller reads embeddings, which need no forward): one forward, full's
    assert tags["full"] == tags["window"] == tags["streaming"] == tags["adore"] == "full"
    assert tags["h2o"] == build_method("h2o", 6).tag  # attention totals: a forward of its own
    assert len(shared.forwards) == len({t for t in tags.values() if t})
    source, step, _, _ = shared.forwards[next(iter(shared.forwards))]  # full attention's forward
    with pytest.raises(ValueError, match="does not prefill like"):  # H2O needs the attention totals it lacks
        Session(model, build_method("h2o", 6), 2, 26).adopt(source, step)


def test_bench_rebuild_policies_and_batches(tmp_path, tiny_model_dir):
    """--rebuild / --rebuild-every give a row per policy for R > 0; --batch a block per batch size."""
    rows = bench.main(
        [*"--prompt-len 24 --new-tokens 4 --batch 1,3 --m 8 --R 0,2 --rebuild top,survivors --rebuild-every 1,2".split(),
         "--model", tiny_model_dir, "--methods", "window,adore", "--out", str(tmp_path / "b.json")]
    )  # fmt: skip
    adore = [r for r in rows if r["method"].startswith("adore")]
    assert len(adore) == 2 * (1 + 2 * 2)  # per batch: R=0, and R=2 under 2 policies x 2 periods
    assert {r["batch"] for r in rows} == {1, 3}
    assert any("rebuildsurvivors" in r["method"] and "rebuild_every2" in r["method"] for r in adore)
    assert all(r["rebuilt_per_step"] == 0 for r in adore if "_R0" in r["method"])


def test_page_sizes_pair_with_the_R_values_they_divide():
    """`--R 4,64 --page-size 0,16`: R = 4 as tokens only, R = 64 as tokens and in pages; a page size that divides
    no R, or a policy value a method refuses, is one line before any model loads."""
    from adore.bench.cli import parser, row_specs
    from adore.bench.specs import methods_for

    specs = methods_for(["adore"], 32, [4, 64], None, ["recall"], pages=[0, 16])
    assert [(o["R"], o.get("page_size")) for _, o in specs] == [(4, None), (64, None), (64, 16)]
    with pytest.raises(SystemExit, match="--page-size=16 divides no R in \\[4, 8\\]"):
        methods_for(["adore"], 32, [4, 8], None, ["recall"], pages=[16])
    with pytest.raises(SystemExit, match="^method=adore R=4 rebuild=recall store_dtype=fp8: .*store_dtype"):
        row_specs(parser().parse_args("--methods adore --R 4 --rebuild recall --store-dtype fp8".split()))
    shipped = row_specs(parser().parse_args("--methods window,adore_trained".split()))  # no --R: each config's own
    assert shipped == [("window", {}), ("adore_trained", {"R": 16})]
    # the shipped config recalls already: its page sizes and store dtypes need no --rebuild recall
    paged = methods_for(["adore_trained"], 256, [64], None, pages=[16], stores=["int8"])
    assert paged == [("adore_trained", {"R": 64, "page_size": 16, "store_dtype": "int8"})]
    with pytest.raises(SystemExit, match="--page-size=16 sets recall's page_size, but no row recalls"):
        methods_for(["adore"], 32, [16], None, ["recompute"], pages=[16])


def test_bench_kv_budget_runs_each_method_at_its_largest_batch(tmp_path, tiny_model_dir):
    """Under a KV budget a bounded method (m + R + 1 slots per row) runs far more rows than full attention
    (the whole context per row), from an assumed prefill; in rounds, each batch's clock is merged with it."""
    budget_gib = 2**-14  # 64 KiB: the tiny model's KV is 2 layers x 2 heads x 8 dims x 4 bytes x 2 = 256 B per slot
    rows = bench.main(
        [*"--prompt-len 200 --new-tokens 4 --m 8 --R 0 --rounds 2".split(), "--kv-budget-gib", str(budget_gib),
         "--model", tiny_model_dir, "--methods", "full,window", "--out", str(tmp_path / "b.json")]
    )  # fmt: skip
    full = next(r for r in rows if r["method"] == "full")
    window = next(r for r in rows if r["method"] == "window_m8")
    assert full["batch"] == 2**16 // (256 * 204) and window["batch"] == 2**16 // (256 * 9)
    assert full["prefill_s"] is None and window["x_full"] > 0 and window["kv_bytes_decode"] <= 2**16
    # outside the budget: what each row keeps per fed token, the same for both (neither keeps per-token state)
    assert window["history_bytes"] * full["batch"] == full["history_bytes"] * window["batch"]
    # each batch ran beside its own clock (one row over m tokens); x full goes through them, drift divided out
    clocks = [r for r in rows if r["method"] == "clock"]
    assert [c["batch"] for c in clocks] == [1, 1] and full["x_full"] == 1.0 and window["rounds"] == 2
    assert window["x_full"] == pytest.approx(window["x_full_raw"] * full["clock_tok_per_s"] / window["clock_tok_per_s"])


def test_bench_kl_and_chunked_prefill(tmp_path, tiny_model_dir):
    """--kl: full attention is 0 from itself, a window is not; --prefill-chunk: a row per chunk size, whose
    peak KV stays within m + chunk + R + 1 slots (the one-shot row's peak is the whole prompt)."""
    rows = bench.main(
        [*"--prompt-len 60 --new-tokens 5 --batch 2 --m 8 --R 0 --prefill-chunk 0,16 --kl".split(),
         "--model", tiny_model_dir, "--methods", "full,window", "--out", str(tmp_path / "b.json")]
    )  # fmt: skip
    by = {r["method"]: r for r in rows}
    assert by["full"]["kl_full"] == pytest.approx(0.0, abs=1e-5) and by["window_m8"]["kl_full"] > 0
    per_slot = by["window_m8"]["kv_bytes_decode"] // 9
    assert by["window_m8_chunk16"]["kv_bytes_peak"] <= (8 + 16 + 0 + 1) * per_slot < by["window_m8"]["kv_bytes_peak"]


def test_bench_prefill_ab_times_each_prefill_signature_in_turns(tmp_path, tiny_model_dir, capsys):
    """--prefill-ab: transformers' prefill and one method per prefill signature, N rounds each, medians compared."""
    args = "--prompt-len 24 --new-tokens 2 --batch 2 --m 8 --R 0 --methods full,window,h2o --prefill-ab 3".split()
    bench.main([*args, "--model", tiny_model_dir, "--out", str(tmp_path / "b.json")])
    ab = read_json(tmp_path / "b.json")["prefill_ab"]
    assert [r["contender"] for r in ab] == ["hf_generate_full", "full", "h2o_m8_r0.5"]  # window prefills as full does
    assert all(len(r["times_s"]) == 3 and r["median_s"] > 0 for r in ab)
    assert ab[0]["x_hf"] == 1.0 and ab[1]["x_full"] == 1.0
    assert "prefill alone, 3 rounds in turns" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--prefill-ab=2 times real prefills"):
        bench.main([*args[:-1], "2", "--synthetic-prompt", "--model", tiny_model_dir, "--out", str(tmp_path / "c")])


def test_rounds_report_each_row_at_its_median_with_the_range_of_its_ratios(tmp_path, tiny_model_dir, capsys):
    """`--rounds 3` measures the batch three times: every method row carries its three ratios to its floor, the
    median as `x_floor`, and the table prints their range; a bad count stops before the model loads."""
    out = tmp_path / "b.json"
    args = ["--model", tiny_model_dir, "--prompt-len", "16", "--new-tokens", "3", "--batch", "2", "--m", "6"]
    rows = bench.main([*args, "--methods", "window,h2o", "--rounds", "3", "--out", str(out)])
    methods = [r for r in rows if not r["method"].startswith("floor_")]
    assert len(rows) == 3 and all(r["rounds"] == 3 and len(r["x_floor_rounds"]) == 3 for r in methods)
    assert all(r["x_floor"] == sorted(r["x_floor_rounds"])[1] for r in methods)
    assert "x floor range" in capsys.readouterr().out
    assert read_json(out)["rows"][1]["x_floor_rounds"] == methods[0]["x_floor_rounds"]
    with pytest.raises(SystemExit, match="--rounds=0 must be at least 1"):
        bench.main([*args, "--rounds", "0", "--out", str(out)])


def test_merged_rounds_take_medians_of_what_is_timed_and_the_rest_from_the_first():
    first = {"method": "a", "decode_tok_per_s": 10.0, "x_floor": 0.9, "kv_bytes_decode": 5, "kl_full": 0.1}
    rounds = [[first], [first | {"decode_tok_per_s": 30.0, "x_floor": 0.7}], [first | {"decode_tok_per_s": 20.0}]]
    (row,) = merge_rounds(rounds)
    assert row["decode_tok_per_s"] == 20.0 and row["x_floor"] == 0.9 and row["x_floor_rounds"] == [0.9, 0.7, 0.9]
    assert row["kv_bytes_decode"] == 5 and row["kl_full"] == 0.1 and row["rounds"] == 3
    assert merge_rounds([[first]]) == [first]  # one round: the rows as they are
