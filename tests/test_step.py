"""The decode step of issue 13: unchanged outputs, no host sync, static shapes, the rebuild policies, the plain
causal prefill and chunked prefill's bounded memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_method, method_names

from adore.engine.generate import generate, prefill
from adore.engine.session import Session

GOLDEN = json.loads((Path(__file__).parent / "golden" / "engine_tokens.json").read_text())["tokens"]
SYNCS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::masked_select")
REBUILDING = ("adore", "adore_trained", "oracle")
# trained controllers pinned by file (`adore_trained` names whichever ships now)
PINNED = {
    "adore_future": "checkpoints/controller_smollm2_future_k64.pt",
    "adore_probe": "checkpoints/controller_smollm2_probe_k64.pt",
}


def golden_prompts(vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(100, vocab, (3, 90), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :17] = 0
    return ids, mask


def variants():
    return [(n, R) for n in method_names() for R in ((0, 3) if n in REBUILDING else (None,))]


def check_golden(model, tag: str, name: str, R):
    ids, mask = golden_prompts(49152)
    overrides = {} if R is None else {"R": R, "rebuild": "recompute", "rebuild_every": 1}  # the paper's rule
    if name in PINNED:
        overrides["controller"] = PINNED[name]
    method = make_method("adore" if name in PINNED else name, 16, model, **overrides)
    out = generate(model, method, ids, mask, 12, [], 0)
    assert out.tokens.tolist() == GOLDEN[f"{tag}/{name}/{R}"], f"{name} R={R} decodes differently than before"


@pytest.mark.parametrize("name,R", variants())
def test_outputs_equal_those_before_the_step_rewrite(tiny, name, R):
    """Greedy tokens of every method (the paper's rebuild rule included) equal those of the engine before
    issue 13, recorded in tests/golden/engine_tokens.json."""
    check_golden(tiny[0], "tiny", name, R)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,R",
    [("window", None), ("h2o", None), ("adore_future", 3), ("adore_probe", 0), ("adore_probe", 3), ("oracle", 3)],
)
def test_packaged_outputs_equal_those_before_the_step_rewrite(packaged, name, R):
    check_golden(packaged[0], "packaged", name, R)


def decode_a_few(model, method, static: bool, steps: int = 6, batch: int = 2):
    session = Session(model, method, batch, 64, static_shapes=static)
    ids = torch.randint(10, 1000, (batch, 20), generator=torch.Generator().manual_seed(0))
    logits = session.feed(ids)
    tokens = []
    for _ in range(steps):
        tokens.append(logits[:, -1].argmax(-1))
        logits = session.feed(tokens[-1][:, None])
    return session, torch.stack(tokens, 1), logits


@pytest.mark.parametrize(
    "name,overrides",
    [(n, {}) for n in method_names() if n not in REBUILDING]
    + [("adore", {"R": 3, "rebuild_every": 1}), ("adore", {"R": 3, "rebuild": "survivors"}), ("oracle", {"R": 3})]
    + [("adore", {"R": 3, "rebuild": "keep", "rebuild_every": 1})]
    + [("adore", {"R": 3, "rebuild_every": 1, "config": {"heads": 2, "head_dim": 4}, "release": "attention"})]
    + [("adore", {"R": 3, "rebuild": "recall", "rebuild_every": 1})]
    + [("adore", {"R": 3, "rebuild": "recall", "rebuild_every": 1, "release": "mass", "recent_ratio": 0.5})]
    + [("adore", {"R": 4, "rebuild": "recall", "page_size": 2, "config": {"heads": 2, "head_dim": 4}})]
    + [
        (
            "adore",
            {"R": 4, "rebuild": "recall", "page_size": 2, "config": {"heads": 2, "head_dim": 4}, "page_summary": True},
        ),
        ("adore", {"R": 3, "rebuild": "recall", "config": {"heads": 2, "head_dim": 4}, "page_summary": 2}),
    ],
)
def test_a_decode_step_never_syncs_with_the_host(tiny, name, overrides):
    """With static shapes (the CUDA default) a decode step is tensor work only: the profiler sees no op that
    reads a value back to the host (item / int / bool of a tensor, nonzero, boolean-mask indexing)."""
    model, _ = tiny
    session, tokens, logits = decode_a_few(model, make_method(name, 8, model, **overrides), static=True)
    with torch.profiler.profile() as prof:
        session.feed(logits[:, -1].argmax(-1, keepdim=True))
    syncs = {e.key: e.count for e in prof.key_averages() if e.key in SYNCS}
    assert not syncs, f"method={name}: the decode step syncs with the host: {syncs}"
    if session.method.R:
        assert session.last_rebuilt_cols.shape[1] == session.method.R  # always R columns: one shape every step


@pytest.mark.parametrize("rebuild", ["recompute", "survivors", "keep", "recall"])
def test_static_shapes_decode_like_compact_ones(tiny, rebuild):
    """Static shapes run R rebuild columns every step (padding where fewer are picked); the CPU default runs
    only as many as the fullest row picks. Same tokens."""
    model, _ = tiny
    make = lambda: make_method("adore", 8, model, R=3, rebuild=rebuild, rebuild_every=1)  # noqa: E731
    static = decode_a_few(model, make(), static=True, steps=10)
    compact = decode_a_few(model, make(), static=False, steps=10)
    assert torch.equal(static[1], compact[1])
    torch.testing.assert_close(static[2], compact[2], rtol=1e-4, atol=1e-4)
    brought = lambda s: (s.rebuilt, s.recalled)  # noqa: E731
    assert brought(static[0]) == brought(compact[0]) and sum(brought(static[0])) > 0


def test_survivors_rebuild_fewer_tokens_and_keep_more_of_them(tiny):
    """`survivors` skips released tokens that rank below the m best: fewer rebuilt, a larger share kept."""
    model, _ = tiny
    top = decode_a_few(model, make_method("oracle", 6, model, R=4), static=False, steps=20)[0]
    survivors = decode_a_few(model, make_method("oracle", 6, model, R=4, rebuild="survivors"), False, steps=20)[0]
    assert 0 < survivors.rebuilt < top.rebuilt
    assert survivors.rebuilt_kept / survivors.rebuilt > top.rebuilt_kept / top.rebuilt


def test_keep_holds_released_tokens_and_forwards_only_the_picks_that_changed(tiny):
    """`keep`: the release holds up to R of the tokens it drops in R more slots, unattended; a pick found held is
    attended from its slot without a forward. Fewer tokens forwarded than `top`, the kept cache still m."""
    model, _ = tiny
    m, R = 6, 4
    top = decode_a_few(model, make_method("oracle", m, model, R=R), static=False, steps=20)[0]
    keep, _, logits = decode_a_few(model, make_method("oracle", m, model, R=R, rebuild="keep"), False, steps=20)
    assert keep.cache.capacity == m + 2 * R + 1 == top.cache.capacity + R
    assert keep.reused > 0 and 0 < keep.rebuilt < top.rebuilt
    for _ in range(5):
        held_cols = torch.where(keep.rebuild.held, keep.slot_col, -2)  # (B, C) history columns held before the step
        logits = keep.feed(logits[:, -1].argmax(-1, keepdim=True))
        assert (keep.rebuild.held.sum(1) <= R).all() and not (keep.rebuild.held & ~keep.slot_valid).any()
        assert all(len(p) == m for p in keep.cached_positions())  # the kept cache, held tokens not in it
        forwarded = keep.last_rebuilt_cols  # (B, r), -1: none
        assert not (forwarded[:, :, None] == held_cols[:, None, :]).any()  # a held pick is never forwarded again


def test_keep_forwards_at_most_rebuild_forward_picks_per_step(tiny):
    """`rebuild_forward` = F: each step forwards at most the F best picks that are not held (the batch's forward
    is that wide at most); the others wait, and held picks are still attended without a forward."""
    model, _ = tiny
    method = make_method("oracle", 6, model, R=4, rebuild="keep", rebuild_forward=1)
    session, _, logits = decode_a_few(model, method, static=False, steps=8)
    for _ in range(6):
        logits = session.feed(logits[:, -1].argmax(-1, keepdim=True))
        assert session.last_rebuilt_cols.shape[1] <= 1
    assert session.reused > 0 and session.rebuilt > 0


def test_rebuild_every_k_steps(tiny):
    model, _ = tiny
    session, _, logits = decode_a_few(model, make_method("adore", 8, model, R=3, rebuild_every=2), False, steps=3)
    widths = []
    for _ in range(6):
        logits = session.feed(logits[:, -1].argmax(-1, keepdim=True))
        widths.append((session.feeds % 2, session.last_rebuilt_cols.shape[1]))
    assert all(width == 0 for odd, width in widths if odd) and any(width > 0 for odd, width in widths if not odd)


@pytest.mark.parametrize(
    "bad", [{"rebuild": "all"}, {"rebuild_every": 0}, {"rebuild_forward": 2}, {"rebuild": "keep", "rebuild_forward": 0}]
)
def test_bad_rebuild_policy_fails_with_a_message(bad):
    from adore.methods import Adore

    with pytest.raises(ValueError, match="method.rebuild"):
        Adore(m=8, R=2, **bad)


@pytest.mark.parametrize("name", ["full", "window", "h2o", "tova", "adore"])
def test_plain_prompt_prefill_equals_the_masked_one(tiny, name, monkeypatch):
    """A prompt without padding into an empty cache runs SDPA's causal kernel (and, for attention recorders,
    weights over past keys only); forcing the dense slot mask gives the same decode."""
    model, _ = tiny
    plain = decode_a_few(model, make_method(name, 8, model), static=False)
    monkeypatch.setattr(Session, "_plain_prompt", lambda self, first, valid: False)
    masked = decode_a_few(model, make_method(name, 8, model), static=False)
    assert torch.equal(plain[1], masked[1])
    torch.testing.assert_close(plain[2], masked[2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["window", "h2o", "adore"])
def test_chunked_prefill_with_m_above_the_prompt_equals_one_shot(tiny, name):
    model, _ = tiny
    ids = torch.randint(10, 1000, (2, 40), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    one_shot = generate(model, make_method(name, 64, model), ids, mask, 8, [], 0)
    chunked = generate(model, make_method(name, 64, model), ids, mask, 8, [], 0, prefill_chunk=7)
    assert torch.equal(one_shot.tokens, chunked.tokens)


def test_chunked_prefill_memory_is_bounded_by_m_plus_chunk(tiny):
    """A prompt of any length runs in m + chunk + R + 1 slots of KV."""
    model, _ = tiny
    m, chunk, R, L = 16, 32, 3, 1500
    session = Session(model, make_method("adore", m, model, R=R), 1, L + 1)
    prefill(session, torch.randint(10, 1000, (1, L)), torch.ones(1, L, dtype=torch.bool), chunk)
    per_slot = session.cache.nbytes // session.cache.capacity
    assert session.peak_kv_bytes <= (m + chunk + R + 1) * per_slot


def test_a_prompt_far_longer_than_m_is_chunked_by_default(tiny):
    """Above 16 m and 2,048 tokens, prefill goes in chunks of 4 m unless told otherwise."""
    from adore.engine.generate import prefill_chunk_for

    assert prefill_chunk_for(256, 4096) == 4096 and prefill_chunk_for(256, 4097) == 1024  # 16 m
    assert prefill_chunk_for(64, 2000) == 2000 and prefill_chunk_for(None, 10**5) == 10**5  # 2,048; no budget
    assert prefill_chunk_for(256, 8192, chunk=8192) == 8192  # an explicit chunk wins: one shot
    model, _ = tiny
    m, R, L = 16, 3, 2100
    session = Session(model, make_method("adore", m, model, R=R), 1, L + 1)
    prefill(session, torch.randint(10, 1000, (1, L)), torch.ones(1, L, dtype=torch.bool))
    per_slot = session.cache.nbytes // session.cache.capacity
    assert session.peak_kv_bytes <= (m + 4 * m + R + 1) * per_slot


def test_rebuild_policy_names_runs_only_where_it_matters():
    from adore.methods import Adore

    assert Adore(m=8, R=0).tag == "adore_m8_R0_untrained_seed0"  # R = 0: no policy in the name
    assert Adore(m=8, R=2, rebuild_every=1).tag == "adore_m8_R2_untrained_seed0"  # the paper's rule, as before
    assert Adore(m=8, R=2).tag == "adore_m8_R2_untrained_seed0_rebuild_every8"
