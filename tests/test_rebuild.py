"""The rebuild policies (adore.engine.rebuild) and recall's store and page summaries, alone where possible."""

from __future__ import annotations

import pytest
import torch
from conftest import make_method

from adore.engine.cache import SlotCache
from adore.engine.columns import as_wide, at_columns
from adore.engine.generate import generate, prefill
from adore.engine.kvstore import KVStore
from adore.engine.pages import PageSummary
from adore.engine.rebuild import Keep, Recall
from adore.engine.session import Session

PROBE = {"config": {"heads": 2, "head_dim": 4}}


def prompts(batch=3, length=24, seed=1):
    ids = torch.randint(100, 1000, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # one padded row: recall must respect padding like every policy
    return ids, mask


@pytest.mark.parametrize("store_dtype", ["model", "bfloat16"])
@pytest.mark.parametrize("probe", [False, True])
def test_recall_with_R_above_the_released_count_equals_full_attention(tiny, probe, store_dtype):
    """Invariant (ADORE.md): with a store and R >= the tokens released, every step attends every past token with
    the KV it entered with: full attention's tokens exactly (fp32 model, so a bf16 store is not exact in theory;
    here it changes no greedy token)."""
    model, _ = tiny
    ids, mask = prompts()
    full = generate(model, make_method("full", None, model), ids, mask, 8, [], 0).tokens
    extra = PROBE if probe else {}
    method = make_method("adore", 16, model, R=16, rebuild="recall", rebuild_every=1, store_dtype=store_dtype, **extra)
    out = generate(model, method, ids, mask, 8, [], 0)  # 24 + 8 - 16 <= 16 released at any step
    assert torch.equal(out.tokens, full)
    assert out.stats["rebuilt_tokens"] == 0 and out.stats["recalled_tokens"] > 0  # copied back, never forwarded


def test_recall_copies_are_bit_exact_and_the_store_is_write_through(tiny):
    """Every fed token's KV is in the store as its forward computed it; a recalled token's slot holds exactly that."""
    model, _ = tiny
    method = make_method("adore", 8, model, R=4, rebuild="recall", rebuild_every=1)
    session = Session(model, method, 2, 64)
    ids, _ = prompts(batch=2, length=20)
    logits = session.feed(ids)
    store = session.rebuild.store
    cached = session.slot_col >= 0
    for b in range(2):
        for slot in cached[b].nonzero()[:, 0].tolist():
            col = int(session.slot_col[b, slot])
            assert torch.equal(store.keys[b, col], session.cache.keys[:, b, :, slot])
            assert torch.equal(store.values[b, col], session.cache.values[:, b, :, slot])
    step = session.forward(logits[:, -1].argmax(-1, keepdim=True))  # a decode step: its KV is stored too
    slot = [int(step.slots[b, 0]) for b in range(2)]
    written = [
        (session.cache.keys[:, b, :, s].clone(), session.cache.values[:, b, :, s].clone()) for b, s in enumerate(slot)
    ]
    session.settle(step)
    for b in range(2):
        assert torch.equal(store.keys[b, step.start], written[b][0])
        assert torch.equal(store.values[b, step.start], written[b][1])
    recalled = session.last_rebuilt_cols
    assert (recalled >= 0).any()
    for b, col in (recalled >= 0).nonzero().tolist():
        c = int(recalled[b, col])
        slot = int(session.hist_slot[b, c])
        if slot >= 0:  # still cached after the release
            assert torch.equal(session.cache.keys[:, b, :, slot], store.keys[b, c])


@pytest.mark.parametrize("static_shapes", [False, True])
@pytest.mark.parametrize("store_dtype,page_size", [("model", None), ("model", 4), ("int8", None), ("int4", None)])
def test_a_pick_still_in_the_free_slot_it_left_is_taken_back_uncopied(
    tiny, monkeypatch, store_dtype, page_size, static_shapes
):
    """A released token's KV stays in its slot until the slot is claimed again; a pick found there is relinked, not
    copied, and every step's logits equal those of copying every pick, up to the order attention sums its slots in
    (a lossy store: its slots count as holding a token only after a copy, so what is reused is what a copy writes)."""
    model, _ = tiny
    ids, mask = prompts(batch=2, length=24)
    forced = torch.randint(100, 1000, (2, 10), generator=torch.Generator().manual_seed(3))
    extra = {"page_size": page_size} if page_size else {}

    def run():
        method = make_method(
            "adore", 8, model, R=8, rebuild="recall", rebuild_every=1, store_dtype=store_dtype, **PROBE, **extra
        )
        session = Session(model, method, 2, 40, static_shapes=static_shapes)
        logits = [session.feed(ids, mask)] + [session.feed(forced[:, i : i + 1]) for i in range(forced.shape[1])]
        return torch.cat(logits, 1), session

    found, reusing = run()
    monkeypatch.setattr(Recall, "resident_slots", lambda self, cols, ok: torch.full_like(cols, -1))
    copied, copying = run()
    assert torch.allclose(found, copied, rtol=0, atol=1e-6)
    assert reusing.reused > 0 and copying.reused == 0 and reusing.recalled == copying.recalled


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_wide_elements_are_the_same_bytes_and_an_indexed_copy_through_them_is_bit_exact(dtype):
    """`as_wide` sees a CPU tensor's last dimension as 16-byte elements: the same memory, so a copy through it moves
    the same bits; a layout it cannot see so (an odd width, a strided last dimension) comes back as it is."""
    cache = torch.randn(3, 4, 2, 6, 16).to(dtype)  # (layers, B, heads, slots, head_dim)
    store = torch.randn(4, 5, 3, 2, 16).to(dtype)  # (B, T, layers, heads, head_dim)
    rows, slots, cols = torch.tensor([0, 2, 3]), torch.tensor([5, 1, 0]), torch.tensor([4, 0, 2])
    expected = cache.clone()
    expected.permute(1, 3, 0, 2, 4)[rows, slots] = store[rows, cols]
    as_wide(cache).permute(1, 3, 0, 2, 4)[rows, slots] = as_wide(store[rows, cols])
    assert as_wide(cache).dtype == torch.complex128 and as_wide(cache).data_ptr() == cache.data_ptr()
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))  # bit for bit, NaN payloads too
    odd, strided = torch.randn(2, 3), torch.randn(2, 16, 2)[..., 0]
    assert as_wide(odd) is odd and as_wide(strided) is strided


@pytest.mark.parametrize("dtype", ["model", "bfloat16", "int8", "int4"])
def test_store_dtypes_round_trip_within_their_stated_error(dtype):
    """model: exact; bfloat16: relative error <= 2^-8; int8: absolute error <= half a step of absmax / 127 per
    (token, layer, head), plus the float16 scale's rounding (2^-11 relative, times up to 127 steps); int4: half a step
    of (max - min) / 15, plus the float16 rounding of the minimum and the step (times up to 15 steps)."""
    torch.manual_seed(0)
    cache = SlotCache(3, 2, 2, 8, 6, torch.float32, "cpu")
    cache.keys.normal_(mean=2)
    cache.values.normal_(std=3)
    cache.keys[0, 0, 0, 1] = 0.5  # a constant vector: step 0
    store = KVStore(cache, 10, dtype)
    store.write(cache, 0, torch.arange(6).expand(2, -1))
    copy = SlotCache(3, 2, 2, 8, 6, torch.float32, "cpu")
    store.read_into(copy, torch.arange(6).flip(0).expand(2, -1), torch.arange(6).expand(2, -1))
    for stored, original in ((copy.keys, cache.keys.flip(3)), (copy.values, cache.values.flip(3))):
        error = (stored - original).abs()
        top, low = original.amax(-1, keepdim=True), original.amin(-1, keepdim=True)
        bound = {
            "model": 0 * original,
            "bfloat16": original.abs() * 2**-8,
            "int8": original.abs().amax(-1, keepdim=True) * (1 / 254 + 2**-10),
            "int4": (top - low) * (1 / 30 + 2**-10) + low.abs() * 2**-11,
        }[dtype]
        assert (error <= bound + 1e-7).all(), dtype
    if dtype != "int8":  # a constant vector comes back exactly (int8: its scale rounds)
        assert torch.equal(copy.keys[0, 0, 0, 4], cache.keys[0, 0, 0, 1])
    per_token = {"model": 4 * 8, "bfloat16": 2 * 8, "int8": 8 + 2, "int4": 8 // 2 + 4}[dtype]
    assert store.nbytes == 2 * 2 * 10 * 3 * 2 * per_token  # keys and values, B = 2, 10 columns, 3 layers, 2 heads


def test_page_bound_is_above_every_member_and_exact_for_constant_pages():
    """Quest's bound: sum_c max(q_c lo_c, q_c hi_c) >= <q, k> for every key of the page, with equality when a
    page's keys are one vector; so on such keys the page pick equals the exact top pages."""
    torch.manual_seed(0)
    B, T, W, P, H = 2, 40, 8, 4, 2
    keys = torch.randn(B, T, W)
    summary = PageSummary(B, W, P, "cpu")
    summary.add(torch.arange(T), keys, torch.arange(T).expand(B, -1), torch.ones(B, T, dtype=torch.bool), T)
    q = torch.randn(B, W)
    exact = (keys.unflatten(-1, (H, -1)) * q.unflatten(-1, (H, -1))[:, None]).sum(-1)  # (B, T, H)
    bound = summary.upper_bound(q, H, T // P)
    assert (bound.repeat_interleave(P, 1) >= exact - 1e-5).all()
    constant = keys[:, ::P].repeat_interleave(P, 1)
    tight = PageSummary(B, W, P, "cpu")
    tight.add(torch.arange(T), constant, torch.arange(T).expand(B, -1), torch.ones(B, T, dtype=torch.bool), T)
    per_token = (constant.unflatten(-1, (H, -1)) * q.unflatten(-1, (H, -1))[:, None]).sum(-1)
    torch.testing.assert_close(tight.upper_bound(q, H, T // P), per_token.view(B, T // P, P, H).amax(2))
    top_pages = per_token.sum(-1).view(B, T // P, P).amax(2).topk(3).indices
    assert torch.equal(tight.upper_bound(q, H, T // P).sum(-1).topk(3).indices, top_pages)


def test_page_scores_max_and_mass():
    """`max`: a page's best member, cached or released (a page around a wanted token comes back whole); `mass`: the
    log of its released members' summed shares (what recalling it brings back). A page with nothing released is
    -inf under both."""
    from adore.engine.rebuild import PAGE_SCORES
    from adore.methods.base import Method

    shares = torch.tensor([[0.5, 0.01, 0.01, 0.01, 0.1, 0.1, 0.1, 0.05, 0.02, 0.0]])
    released = torch.tensor([[False, True, True, True, True, True, True, False, False, False]])

    class Fixed:
        def rebuild_score(self, state, tokens):
            return shares.log()

    best = Method.page_scores(Fixed(), None, None, 4, released, PAGE_SCORES["max"])  # pages {0-3}, {4-7}, {8, 9}
    mass = Method.page_scores(Fixed(), None, None, 4, released, PAGE_SCORES["mass"])
    torch.testing.assert_close(best, torch.tensor([[0.5, 0.1, 0.0]]).log())
    torch.testing.assert_close(mass, torch.tensor([[0.03, 0.3, 0.0]]).log())


@pytest.mark.parametrize("shortlist", [4, 1])
@pytest.mark.parametrize(
    "picks,candidates",
    [({"page_size": 2, "page_summary": True}, 1), ({"page_summary": 2}, 2)],  # pages of 2; tokens from pages of 2
    ids=["page picks", "token picks"],
)
def test_paged_probe_reads_pages_and_a_bounded_number_of_keys(tiny, picks, candidates, shortlist):
    """With page summaries a step reads the page summaries, the cached tokens' keys and the candidates' keys
    (page_shortlist x R of them for page picks, the members of page_shortlist x R pages for token picks): no op
    takes the whole history of keys, so the cost per step does not grow with every history token."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model, _ = tiny
    m, R = 8, 4
    method = make_method("adore", m, model, R=R, rebuild="recall", page_shortlist=shortlist, **picks, **PROBE)
    session = Session(model, method, 2, 256)
    ids, _ = prompts(batch=2, length=120)
    logits = session.feed(ids)
    z = session.state.tokens["z"]  # (B, T, width): every history token's key

    class Reads(TorchDispatchMode):
        gathered, whole = 0, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            first = args[0] if args else None
            if isinstance(first, torch.Tensor) and first.data_ptr() == z.data_ptr() and first.numel() == z.numel():
                if func is torch.ops.aten.gather.default:
                    Reads.gathered += args[2].numel() // z.shape[2]
                elif func is torch.ops.aten.index.Tensor:  # z[rows, cols]: one key per (row, column) indexed
                    Reads.gathered += torch.broadcast_shapes(*(i.shape for i in args[1] if i is not None)).numel()
                elif func is torch.ops.aten.index_select.default:  # (B x T, width) rows of the flattened keys
                    Reads.gathered += args[2].numel()
                elif func not in (
                    torch.ops.aten.index_put_.default,
                    torch.ops.aten.slice.Tensor,
                    torch.ops.aten.view.default,
                ):
                    Reads.whole.append(str(func))
            return func(*args, **(kwargs or {}))

    with Reads():
        session.feed(logits[:, -1].argmax(-1, keepdim=True))
    assert not Reads.whole, f"ops reading every history key: {Reads.whole}"
    assert 0 < Reads.gathered <= 2 * (m + R + 1 + shortlist * R * candidates)


def test_the_probes_pick_scores_every_column_as_asking_each_does(tiny):
    """The probe's token pick reads its kept scores in column order (`ProbeScoring.pick_scores`): equal, bit for
    bit, to its scores asked column by column."""
    model, _ = tiny
    session = Session(model, make_method("adore", 8, model, R=4, rebuild="recall", **PROBE), 2, 256)
    session.feed(prompts(batch=2, length=40)[0])
    released = session.released_columns(session.length)
    every = session.rebuild_scores(torch.arange(session.length).expand(2, -1))
    assert torch.equal(session.pick_scores(released, 4), every)


@pytest.mark.parametrize("shortlist", [4, 2, 1])
def test_a_shortlisted_token_pick_scores_its_pages_members_exactly(tiny, shortlist):
    """`page_summary=N` with token picks: the pick's scores are the probe's own scores (normalised as the release's)
    on the members of the page_shortlist x R best-bounded pages and -inf elsewhere; when those pages are every page
    the pick scores every released token as the exact one does."""
    model, _ = tiny
    m, P = 32, 4  # R up to m: 32 // shortlist pages of 4 hold every column
    ids, _ = prompts(batch=2, length=60)

    def scores(R):
        method = make_method(
            "adore", m, model, R=R, rebuild="recall", page_summary=P, page_shortlist=shortlist, **PROBE
        )
        session = Session(model, method, 2, 256)
        session.feed(ids)
        released = session.released_columns(session.length)
        every = session.rebuild_scores(torch.arange(session.length).expand(2, -1))
        hide = lambda x: x.masked_fill(~released, float("-inf"))  # noqa: E731
        return hide(session.pick_scores(released, R)), hide(every), session.length

    short, every, seen = scores(2)
    listed = torch.isfinite(short)
    assert 0 < listed.sum(1).max() <= shortlist * 2 * P < seen  # a shortlist, not the history
    torch.testing.assert_close(short[listed], every[listed])  # exact where listed
    short, every, seen = scores(32 // shortlist)
    torch.testing.assert_close(short, every)


@pytest.mark.parametrize("every", [1, 2])
def test_the_paged_release_reads_its_querys_scores_back(tiny, every):
    """With page summaries a query's normaliser is estimated once and the per-head scores of the columns it scored
    (the cache, the pick's candidates, the fed token) are kept: the release after the forward reads the cached
    tokens' scores back, equal to scoring them afresh with that normaliser (on a step without a pick too)."""
    model, _ = tiny
    method = make_method("adore", 8, model, R=4, rebuild="recall", rebuild_every=every, page_summary=4, **PROBE)
    session = Session(model, method, 2, 256)
    logits = session.feed(prompts(batch=2, length=60)[0])
    for _ in range(4):
        logits = session.feed(logits[:, -1].argmax(-1, keepdim=True))
        kept = session.slot_kept
        tokens = session._tokens(session.slot_col.clamp(min=0))
        read_back = method.scoring.release_scores(session.state, tokens)
        afresh = method.scoring.score(session.state, tokens)
        torch.testing.assert_close(read_back[kept], afresh[kept])


def test_the_paged_normaliser_over_the_fed_pages_equals_the_one_over_every_page(tiny):
    """The paged normaliser sums over the pages holding fed columns only (a session of 256 columns holds 64 pages of
    4, 16-17 of them fed here): the pages past them are empty, so it equals the normaliser over every page."""
    model, _ = tiny
    method = make_method("adore", 8, model, R=4, rebuild="recall", page_summary=4, **PROBE)
    session = Session(model, method, 2, 256)
    logits = session.feed(prompts(batch=2, length=60)[0])
    for _ in range(3):
        logits = session.feed(logits[:, -1].argmax(-1, keepdim=True))
        state, tokens = session.state, session._tokens(session.slot_col.clamp(min=0))
        cols = tokens.cached
        z, pos = at_columns(state.tokens["z"], cols.clamp(min=0)), state.tokens["pos"].gather(1, cols.clamp(min=0))
        own = method.net.head_scores(z, pos, tokens.query_pos, state.query)
        fed_pages = -(-session.length // 4)
        assert fed_pages < state.pages.pages
        args = (tokens.query_pos, state.query, own, cols)
        fed = method.net.log_normaliser(state.pages, fed_pages, *args)
        every = method.net.log_normaliser(state.pages, state.pages.pages, *args)
        torch.testing.assert_close(fed, every, rtol=0, atol=1e-6)


@pytest.mark.parametrize("release", ["controller", "attention"])
def test_the_probe_reads_the_history_keys_once_a_step_and_scores_as_afresh(tiny, release):
    """The rebuild pick (before the forward) and the release (after it) ask the probe with one query: the history's
    keys are read by one op a step, up to the columns fed so far (the session's capacity, 256 here, holds more), and
    the scores kept for that query, with the fed token's joined, equal the scores computed afresh from every key. A
    release by attention never asks: the fed token joins only when the scores are read again."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model, _ = tiny
    method = make_method("adore", 8, model, R=4, rebuild="recall", rebuild_every=1, release=release, **PROBE)
    session = Session(model, method, 2, 256)
    ids, _ = prompts(batch=2, length=40)
    logits = session.feed(ids)
    z = session.state.tokens["z"]

    writes = {torch.ops.aten.new_empty.default, torch.ops.aten.index_put_.default}

    class Reads(TorchDispatchMode):
        floats = 0  # read from the history's keys, by any op on z or a view of it (views themselves read nothing)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func not in writes:
                for arg in args:
                    if (
                        isinstance(arg, torch.Tensor)
                        and arg.untyped_storage().data_ptr() == z.untyped_storage().data_ptr()
                    ):
                        Reads.floats += arg.numel()
            return func(*args, **(kwargs or {}))

    for _ in range(3):
        Reads.floats = 0
        with Reads():
            logits = session.feed(logits[:, -1].argmax(-1, keepdim=True))
        filled = z[:, : session.length].numel()
        assert filled <= Reads.floats < 2 * filled < z.numel()
        state, cols = session.state, torch.arange(session.length).expand(2, -1)
        assert (state.joining is None) == (release == "controller")  # joined by the release, or still pending
        kept = method.scoring.score(state, session._tokens(cols))
        afresh = method.net.logits(z, state.tokens["pos"], session.query_pos, state.query[:, None],
                                   key_valid=state.tokens["filled"], columns=cols)  # fmt: skip
        torch.testing.assert_close(kept, afresh, rtol=1e-6, atol=1e-6)
    assert z.stride(1) == 1  # token-minor: the read above is one bmm over contiguous rows of tokens
    grows = Session(model, method, 2, 8)
    grows.feed(ids)  # 40 tokens into a history of 8 columns: it grows, and its keys stay token-minor
    assert grows.state.tokens["z"].shape[1] >= 40 and grows.state.tokens["z"].stride(1) == 1


def test_pick_counts_the_exact_per_token_pick_that_the_pages_hold():
    from adore.engine.diagnostic import pick_counts

    scores = torch.tensor([[9.0, 1.0, 8.0, 7.0, 0.0, 6.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    released = torch.tensor([[True, True, True, False, True, True], [False] * 5 + [True]])
    cols = torch.tensor([[0, 1, 4, 5], [4, 5, 5, 5]])  # row 0: pages {0, 1} and {4, 5}; row 1: {4, 5}
    ok = torch.tensor([[True, True, True, True], [False, True, False, False]])
    hits, wanted = pick_counts(scores, released, cols, ok, R=3)
    assert hits.tolist() == [2, 1]  # row 0 wants 0, 2, 5 (3 is not released) and has 0 and 5; row 1 wants only 5
    assert wanted.tolist() == [3, 1]


@pytest.mark.parametrize("page_size, exact", [(1, True), (4, False)])
def test_diagnose_reports_the_page_picks_recall(tiny, page_size, exact):
    """eval.diagnose: the share of the exact per-token top-R that the page pick brings back; pages of one token
    are the per-token pick itself (1.0)."""
    model, _ = tiny
    method = make_method("adore", 8, model, R=8, rebuild="recall", rebuild_every=1, page_size=page_size, **PROBE)
    session = Session(model, method, 2, 64, diagnose=True)
    ids, _ = prompts(batch=2, length=30)
    logits = session.feed(ids)
    for _ in range(4):
        logits = session.feed(logits[:, -1].argmax(-1, keepdim=True))
    recall = [row["pick_recall"] for row in session.diagnostic.rows()]
    assert all(r == 1.0 for r in recall) if exact else all(0 < r <= 1 for r in recall)


def test_device_kv_stays_within_m_plus_R_plus_1_while_the_store_grows(tiny):
    model, _ = tiny
    m, R = 8, 4
    method = make_method("adore", m, model, R=R, rebuild="recall", rebuild_every=1)
    session = Session(model, method, 2, 16)  # a short history allocation: the store must grow with it
    ids, _ = prompts(batch=2, length=12)
    logits = session.feed(ids)
    stores = []
    for _ in range(30):
        logits = session.feed(logits[:, -1].argmax(-1, keepdim=True))
        assert session.cache.capacity <= m + R + 1
        assert int((session.slot_col >= 0).sum(1).max()) <= m
        stores.append(session.store_bytes)
    assert stores[-1] > stores[0] and session.rebuild.store.length >= session.length


def test_keep_releases_to_m_and_holds_the_next_R_without_a_session():
    keep = Keep(R=2)
    keep.held = torch.zeros(1, 6, dtype=torch.bool)
    scores = torch.tensor([[5.0, 1.0, 4.0, 3.0, 2.0, 0.0]])
    valid = torch.ones(1, 6, dtype=torch.bool)
    kept = keep.release(None, scores, valid, 3)
    assert kept.tolist() == [[True, True, True, True, True, False]]  # the 3 best kept, the next R = 2 held
    assert keep.held.tolist() == [[False, True, False, False, True, False]]
    assert torch.equal(keep.attended(torch.arange(6)[None]), ~keep.held)


def test_top_is_the_old_name_of_recompute_and_identities_keep_their_names():
    from adore.methods import Adore

    old, new = Adore(m=8, R=2, rebuild="top", rebuild_every=1), Adore(m=8, R=2, rebuild="recompute", rebuild_every=1)
    assert old.rebuild == "recompute" and old.tag == new.tag == "adore_m8_R2_untrained_seed0"
    recall = Adore(m=8, R=4, rebuild="recall", page_size=2, store_dtype="int8", rebuild_every=1)
    assert recall.tag == "adore_m8_R4_untrained_seed0_rebuildrecall_page2_storeint8"
    summary = dict(m=8, R=4, rebuild="recall", rebuild_every=1, page_summary=16, **PROBE)
    assert (
        Adore(**summary).tag
        == Adore(**summary, page_shortlist=4).tag
        == ("adore_m8_R4_untrained_seed0_confighead_dim=4-heads=2_rebuildrecall_summary16")
    )  # the default shortlist stays out of the name; another is named
    assert Adore(**summary, page_shortlist=1).tag.endswith("_summary16_shortlist1")


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"page_size": 2}, "method.page_size=2 .*rebuild=recall"),
        ({"rebuild": "recall", "page_size": 3}, "method.R=4 is not a whole number of pages.*R = 3"),
        ({"rebuild": "recall", "page_size": 16}, "method.page_size=16 exceeds method.m=8.*at most 8"),
        ({"rebuild": "recall", "store_dtype": "fp8"}, "method.store_dtype='fp8'"),
        ({"rebuild": "recall", "page_size": 2, "page_summary": True}, "page_summary=True .*probe"),
        ({"rebuild": "recall", "page_summary": True}, "page_size, which is null .*page_summary=16"),
        ({"rebuild": "recall", "page_size": 2, "page_summary": 2}, "page_size=2 picks pages.*page_summary=true"),
        ({"rebuild": "recall", "page_summary": 0}, "page_summary=0 must be a positive integer"),
        ({"rebuild": "recall", "page_summary": 16, "page_shortlist": 0}, "page_shortlist=0 must be a positive integer"),
        ({"page_summary": 16, **PROBE}, "page_summary=16 .*rebuild=recall"),
        ({"rebuild": "recall", "page_size": 0}, "method.page_size=0 must be a positive integer"),
    ],
)
def test_bad_recall_settings_fail_with_the_fix(bad, match):
    from adore.methods import Adore

    with pytest.raises(ValueError, match=match):
        Adore(m=8, R=4, **bad)


def test_recall_in_a_chunked_prefill_brings_back_before_the_answer(tiny):
    """A chunk of a chunked prefill is fed like any step: it picks before its forward, so the chunk holding the
    question recalls before the first answer token is decoded."""
    model, _ = tiny
    method = make_method("adore", 8, model, R=4, rebuild="recall", rebuild_every=1)
    session = Session(model, method, 1, 64)
    ids, _ = prompts(batch=1, length=32)
    for s in range(0, 32, 8):
        session.feed(ids[:, s : s + 8])
    assert session.recalled > 0 and (session.last_rebuilt_cols >= 0).any()


@pytest.mark.parametrize(
    "name,options,chunk,widths",
    [
        ("adore", {"R": 4, "rebuild": "recall"}, 16, [16, 16, 7, 1, 9, 1]),  # chunks, then a later turn
        ("adore", {"R": 4}, None, [40, 9, 1]),  # fed whole into an empty cache: nothing released before it
        ("adore", {"R": 4, "tail_alone": 3}, 16, [16, 16, 5, 1, 1, 1, 7, 1, 1, 1]),  # the question's tokens, each alone
        ("adore", {"R": 4, "tail_alone": 0}, 16, [16, 16, 8, 10]),  # the whole chunk picks by the state before it
        ("oracle", {"R": 4, "tail_alone": 20}, 16, [16, 4] + [1] * 30),  # at most all but the first
        ("window", {}, 16, [16, 16, 8, 10]),  # nothing rebuilt: no pick to make
    ],
)
def test_tokens_over_released_history_end_with_their_last_tokens_fed_alone(tiny, name, options, chunk, widths):
    """The last prompt token's logits give the answer's first token. In a chunk, the pick before the forward is
    made by a query built from the state before the chunk; fed alone, the token picks by its own (`tail_alone` of
    them: the question's tokens each pick what they ask for)."""
    model, _ = tiny
    session = Session(model, make_method(name, 8, model, **options), 1, 64)
    fed, feed = [], session.feed
    session.feed = lambda ids, valid=None, all_logits=False: fed.append(ids.shape[1]) or feed(ids, valid, all_logits)
    ids, _ = prompts(batch=1, length=50)
    prefill(session, ids[:, :40], torch.ones(1, 40, dtype=torch.bool), chunk)
    prefill(session, ids[:, 40:], torch.ones(1, 10, dtype=torch.bool))
    assert fed == widths


def test_the_report_knows_every_setting_only_rebuild_records():
    """The report pairs a rebuilding run with its R = 0 run by every setting but those only R > 0 records
    (`adore.report.significance.REBUILD_SETTINGS`): each key `rebuild_identity` can write must be listed there."""
    from adore.methods.oracle import Oracle
    from adore.report.significance import REBUILD_SETTINGS

    written = set()
    for options in (
        {"rebuild": "keep", "rebuild_forward": 2, "rebuild_every": 2},
        {"rebuild": "recall", "page_size": 4, "store_dtype": "int8", "page_score": "mass"},
        {"rebuild": "survivors", "tail_alone": 48},
    ):
        written |= set(Oracle(m=16, R=4, **options).rebuild_identity())
    assert written and written <= set(REBUILD_SETTINGS)
    assert not Oracle(m=16, R=0).rebuild_identity()


def test_a_label_names_the_rebuild_policy_where_it_is_not_the_papers():
    """A table of recall runs alone names no setting its rows share: the label itself must say recall, or recall
    R = 4 would read as the paper's rule."""
    from adore.methods.oracle import Oracle

    assert Oracle(m=16, R=4).label == "Oracle"
    assert Oracle(m=16, R=4, rebuild="recall", page_size=4).label == "Oracle + recall"
    assert Oracle(m=16, R=4, rebuild="keep").label == "Oracle + keep"
    assert Oracle(m=16, R=0, rebuild="recall").label == "Oracle"  # nothing rebuilt: no policy
