"""Invariants every release method satisfies (ADORE.md): one parametrized suite, one line per method."""

from __future__ import annotations

import pytest
import torch
from conftest import make_method, method_names
from transformers import DynamicCache

from adore.controller import Controller, ControllerConfig, bucketize, token_logsumexp, token_minor
from adore.controller.base import head_dots
from adore.engine.columns import grown
from adore.engine.generate import generate
from adore.engine.session import Session
from adore.methods import H2O, Adore, Full, Streaming, Window

METHODS = method_names()  # every conf/method/*.yaml, as eval.py builds it


def prompts(batch=2, length=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 1000, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding on the first row
    return ids, mask


@pytest.mark.parametrize("name", METHODS)
def test_large_budget_equals_full_attention_generate(tiny, name):
    """m >= prompt + generated: every method yields transformers' own greedy tokens."""
    model, _ = tiny
    ids, mask = prompts()
    new = 12
    ref = model.generate(
        ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    out = generate(
        model, make_method(name, ids.shape[1] + new, model), ids, mask, new, eos_token_ids=[], pad_token_id=0
    )
    assert torch.equal(out.tokens, ref[:, ids.shape[1] :])


@pytest.mark.parametrize("name", [n for n in METHODS if n != "full"])
def test_cache_invariants_at_small_budget(tiny, name):
    model, _ = tiny
    ids, mask = prompts()
    m = 6
    method = make_method(name, m, model)
    session = Session(model, method, 2, 64)
    logits = session.feed(ids, mask.bool())
    rebuilt_total = 0
    for _ in range(20):
        released_before = (session.hist_valid & (session.hist_slot[:, : session.trash] < 0)).clone()
        logits = session.feed(logits[:, -1].argmax(-1, keepdim=True))
        for b, positions in enumerate(session.cached_positions()):
            assert len(positions) <= m
            assert len(positions) == len(set(positions)), "a token is cached twice"
            assert max(positions) < int(session.next_pos[b])
        # links between history and slots agree both ways
        rows, slots = session.slot_valid.nonzero(as_tuple=True)
        assert torch.equal(session.hist_slot[rows, session.slot_col[rows, slots]], slots)
        assert int((session.hist_slot[:, : session.trash] >= 0).sum()) == int(session.slot_valid.sum())
        # a rebuilt token had been released before this step
        rb = session.last_rebuilt_cols
        for b in range(rb.shape[0]):
            for col in rb[b][rb[b] >= 0].tolist():
                assert released_before[b, col]
                rebuilt_total += 1
    if method.R > 0:
        assert rebuilt_total > 0, "R > 0 but nothing was ever rebuilt"


@pytest.mark.parametrize("name", METHODS)
def test_batched_equals_one_at_a_time(tiny, name):
    model, _ = tiny
    ids, mask = prompts(batch=3, length=16, seed=1)
    mask[2, :7] = 0
    batched = generate(model, make_method(name, 8, model), ids, mask, 10, eos_token_ids=[], pad_token_id=0)
    for b in range(3):
        keep = mask[b].bool()
        alone = generate(
            model,
            make_method(name, 8, model),
            ids[b : b + 1, keep],
            mask[b : b + 1, keep],
            10,
            eos_token_ids=[],
            pad_token_id=0,
        )
        assert torch.equal(batched.tokens[b], alone.tokens[0]), f"row {b}"


def reference_decode(model, ids, keep, steps):
    """Independent reference: transformers' DynamicCache, cropped after every step to the kept positions."""
    cache = DynamicCache(config=model.config)
    logits = model(ids, cache=cache, use_cache=True).logits
    positions = list(range(ids.shape[1]))
    out = []
    for _ in range(steps):
        kept = keep(positions)
        index = torch.tensor([positions.index(p) for p in kept])
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, index], layer.values[:, :, index]
        positions = kept
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(nxt))
        t = len(out) + ids.shape[1] - 1
        mask = torch.ones(1, 1, 1, len(positions) + 1, dtype=torch.bool)
        logits = model(nxt, position_ids=torch.tensor([[t]]), attention_mask=mask, cache=cache, use_cache=True).logits
        positions = positions + [t]
    return out


@pytest.mark.parametrize(
    "method, keep",
    [
        (Window(m=5), lambda pos: pos[-5:]),
        (Streaming(m=5, sinks=2), lambda pos: sorted(set(pos[:2] + pos[-3:]))),
    ],
    ids=["window", "streaming"],
)
def test_window_and_streaming_match_reference(tiny, method, keep):
    model, _ = tiny
    ids, _ = prompts(batch=1, length=12, seed=3)
    steps = 15
    ours = generate(model, method, ids, torch.ones_like(ids), steps, eos_token_ids=[], pad_token_id=0)
    assert ours.tokens[0].tolist() == reference_decode(model, ids, keep, steps)
    session = Session(model, method, 1, 64)
    logits = session.feed(ids)
    for _ in range(steps):
        assert session.cached_positions()[0] == keep(list(range(int(session.next_pos[0]))))
        logits = session.feed(logits[:, -1].argmax(-1, keepdim=True))


@pytest.mark.parametrize("shape", [{"width": 8}, {"heads": 2, "head_dim": 4}], ids=["gru", "probe"])
def test_controller_sees_only_the_past(shape):
    torch.manual_seed(0)
    net = Controller(ControllerConfig(d_model=16, **shape)).eval()
    x = torch.randn(1, 10, 16)
    y = x.clone()
    y[:, 6:] = torch.randn(1, 4, 16)  # change tokens after t = 5
    valid = torch.ones(1, 10, dtype=torch.bool)
    zx, _ = net.encode(x, valid)
    zy, _ = net.encode(y, valid)
    pos = torch.arange(10)[None]
    t = torch.tensor([[5]])
    query = net.queries(x[:, 4:5], x[:, 5:6]) if net.config.heads else None  # x_{t-1} and token t
    a, b = net.logits(zx, pos, t, query), net.logits(zy, pos, t, query)
    torch.testing.assert_close(a[:, :6], b[:, :6])  # the probe normalises over every token: the later ones included
    assert torch.isinf(a[:, 6:]).all() if net.config.heads else True
    assert not torch.allclose(zx[:, 6:], zy[:, 6:])


def test_probe_scores_are_a_mixture_of_attention_heads():
    """log sigma_t(i) = log sum_h w_h softmax_j(<q_h, k_jh> / sqrt(d) + b_h(t - j))_i, by hand."""
    torch.manual_seed(0)
    net = Controller(ControllerConfig(d_model=16, heads=3, head_dim=4, num_buckets=8)).eval()
    with torch.no_grad():
        net.head_mix.copy_(torch.randn(3))
        x, valid = torch.randn(1, 7, 16), torch.ones(1, 7, dtype=torch.bool)
        z = net.encode(x, valid)[0]
        query = net.queries(x[:, 5], x[:, 6])[:, None]
        got = net.logits(z, torch.arange(7)[None], torch.tensor([[6]]), query)[0]
        k, q = z[0].view(7, 3, 4), query[0, 0].view(3, 4)
        bias = net.head_bias(bucketize(6 - torch.arange(7), 8, net.config.max_distance))  # (7, 3)
        heads = ((k * q).sum(-1) / 2 + bias).softmax(0)  # (7, 3): each head's weights over the 7 tokens
        want = (heads * net.head_mix.softmax(0)).sum(-1).log()
    torch.testing.assert_close(got, want)
    assert torch.allclose(got.exp().sum(), torch.tensor(1.0))


def test_the_probes_distance_bias_from_its_table_equals_the_bucketed_embedding_after_every_change():
    """Without gradients the probe reads b_h(d) from one table of every distance's bias: equal to
    `head_bias(buckets(d))` for every distance, also after the weights change in place (a training step) and after
    the trained distance moves; with gradients it is the embedding itself."""
    net = Controller(ControllerConfig(d_model=8, heads=3, head_dim=4, num_buckets=8, max_distance=64,
                                      trained_distance=16))  # fmt: skip
    distance = torch.arange(-3, 200).view(1, -1).expand(2, -1)
    for change in (
        lambda: None,
        lambda: net.head_bias.weight.data.mul_(2).add_(1),
        lambda: net.extend_trained_distance(40),
    ):
        change()
        with torch.no_grad():
            assert torch.equal(net.distance_bias(distance), net.head_bias(net.buckets(distance)))
    assert net.distance_bias(distance).requires_grad  # training reaches the embedding through it


@pytest.mark.parametrize("heads", [0, 3])
def test_distances_past_the_trained_ones_use_the_last_trained_bucket(heads):
    """A bucket no training distance reached holds its random init: scores of older tokens read the bucket of the
    longest distance trained instead, and scores within it are unchanged."""
    torch.manual_seed(0)
    config = dict(d_model=16, heads=heads, head_dim=4, num_buckets=8, max_distance=64)
    free, capped = (
        Controller(ControllerConfig(**config)).eval(),
        Controller(ControllerConfig(**config, trained_distance=10)),
    )
    capped.load_state_dict(free.state_dict())
    T = 40
    x, valid = torch.randn(1, T, 16), torch.ones(1, T, dtype=torch.bool)
    pos, now = torch.arange(T)[None], torch.tensor([[T - 1]])
    with torch.no_grad():
        z = free.encode(x, valid)[0]
        query = free.queries(x[:, -2], x[:, -1])[:, None] if heads else z[:, -1:]
        got, uncapped = capped.logits(z, pos, now, query), free.logits(z, pos, now, query)
        torch.testing.assert_close(got, free.logits(z, pos.clamp(min=T - 1 - 10), now, query))  # capped by hand
    assert not torch.allclose(got, uncapped)
    if not heads:  # the GRU's scores are per token (the probe's normalise over all of them)
        torch.testing.assert_close(got[:, -11:], uncapped[:, -11:])
    with pytest.raises(ValueError, match="trained_distance=-1"):
        ControllerConfig(d_model=16, trained_distance=-1)


@pytest.mark.parametrize("num_buckets,max_distance", [(8, 64), (32, 4096), (4, 3)])
def test_buckets_looked_up_equal_the_formula_also_after_the_trained_distance_moves(num_buckets, max_distance):
    """`Controller.buckets` reads a table: for every distance (negative, past the trained cap, past max_distance)
    it gives `bucketize` of the capped distance, and a trained distance extended later is looked up anew."""
    distance = torch.arange(-3, 2 * max_distance + 50).view(1, -1)

    def formula(config):
        capped = distance if config.trained_distance is None else distance.clamp(max=config.trained_distance)
        return bucketize(capped, config.num_buckets, config.max_distance)

    for trained in (None, 0, 2, max_distance // 2, max_distance, 3 * max_distance):
        net = Controller(ControllerConfig(d_model=8, num_buckets=num_buckets, max_distance=max_distance,
                                          trained_distance=trained))  # fmt: skip
        assert torch.equal(net.buckets(distance), formula(net.config))
        net.extend_trained_distance(2 * max_distance)
        assert torch.equal(net.buckets(distance), formula(net.config))


@pytest.mark.parametrize("heads", [0, 3])
def test_extending_the_trained_distance_keeps_the_scores_until_training_moves_them(heads):
    """A controller trained further on longer sequences starts where it was: the buckets past its old trained
    distance take the capped bucket's values, so its scores at every distance equal the capped ones."""
    torch.manual_seed(0)
    config = dict(d_model=16, heads=heads, head_dim=4, num_buckets=8, max_distance=64)
    before = Controller(ControllerConfig(**config, trained_distance=10)).eval()
    after = Controller(ControllerConfig(**config, trained_distance=10)).eval()
    after.load_state_dict(before.state_dict())
    after.extend_trained_distance(63)
    assert after.config.trained_distance == 63
    T = 60
    x, valid = torch.randn(1, T, 16), torch.ones(1, T, dtype=torch.bool)
    pos, now = torch.arange(T)[None], torch.tensor([[T - 1]])
    with torch.no_grad():
        z = before.encode(x, valid)[0]
        query = before.queries(x[:, -2], x[:, -1])[:, None] if heads else z[:, -1:]
        torch.testing.assert_close(after.logits(z, pos, now, query), before.logits(z, pos, now, query))
    after.extend_trained_distance(20)  # never shrinks
    assert after.config.trained_distance == 63
    fresh = Controller(ControllerConfig(**config))
    fresh.extend_trained_distance(30)  # a fresh controller records the distance, nothing copied
    assert fresh.config.trained_distance == 30


@pytest.mark.parametrize("tokens", [1, 7, 8, 4139])
def test_the_token_logsumexp_is_torchs_bit_for_bit(tokens):
    """The normaliser's blocked max changes the speed, not one bit: masked (-1e9, -inf) and all--inf rows included."""
    torch.manual_seed(0)
    scores = torch.randn(3, tokens, 8) * 30
    scores[0, : tokens // 2] = -1e9
    scores[1] = float("-inf")
    scores[2, -1] = float("-inf")
    assert torch.equal(token_logsumexp(scores), scores.logsumexp(1, keepdim=True))
    assert torch.equal(token_logsumexp(scores[..., :3]), scores[..., :3].logsumexp(1, keepdim=True))  # 64 % 3 != 0


def test_head_dots_read_token_minor_keys_as_row_major_ones_and_growth_keeps_the_layout():
    """Keys laid out token-minor (the exact probe's history) give the per-head dot products of the same keys
    row-major, sliced to any number of fed columns; a history that grows keeps each tensor's layout."""
    torch.manual_seed(0)
    keys, query = token_minor(3, 10, 12), torch.randn(3, 12)
    keys[:] = torch.randn(3, 10, 12)
    for fed in (1, 7, 10):
        torch.testing.assert_close(head_dots(keys[:, :fed], query, 3), head_dots(keys[:, :fed].contiguous(), query, 3))
    more = grown(keys, 6)
    assert more.shape == (3, 16, 12) and more.stride(1) == 1  # still token-minor
    assert torch.equal(more[:, :10], keys) and not more[:, 10:].any()
    row_major = grown(keys.contiguous(), 6)
    assert row_major.is_contiguous() and torch.equal(row_major, more)
    flags = grown(torch.ones(3, 10, dtype=torch.bool), 2)
    assert flags.dtype == torch.bool and flags[:, :10].all() and not flags[:, 10:].any()


def test_probe_scores_one_query_per_row_as_broadcast_queries():
    """The engine's shape (one query per row: a bmm against block-diagonal queries) scores as training's
    broadcast shape (einsum) does, and asking for a few columns gives exactly their scores among all."""
    torch.manual_seed(0)
    net = Controller(ControllerConfig(d_model=16, heads=3, head_dim=4, num_buckets=8)).eval()
    z, query = torch.randn(4, 9, 12), torch.randn(4, 1, 12)
    pos, t = torch.arange(9).expand(4, 9), torch.tensor([[8], [7], [8], [3]])
    valid = torch.rand(4, 9) > 0.2
    with torch.no_grad():
        engine = net.logits(z, pos, t, query, key_valid=valid)
        broadcast = net.logits(z[:, None], pos[:, None], t[:, None], query[:, None], key_valid=valid[:, None])[:, 0]
    torch.testing.assert_close(engine, broadcast)
    columns = torch.tensor([[0, 5, 8], [7, 1, 2], [3, 3, 0], [2, 4, 6]])  # the release asks for a few tokens only
    with torch.no_grad():
        asked = net.logits(z, pos, t, query, key_valid=valid, columns=columns)
    assert torch.equal(asked, engine.gather(1, columns))  # normalised over all 9 tokens, exactly as before
    with pytest.raises(ValueError, match="columns=.... is for the attention probe"):
        Controller(ControllerConfig(d_model=12, width=8)).logits(z[..., :8], pos, t, columns=columns)
    for score in (lambda: net.logits(z, pos, t), lambda: net.head_scores(z, pos, t, None)):
        with pytest.raises(ValueError, match="needs the query from Controller.queries"):
            score()


def test_controller_checkpoint_round_trip(tmp_path, tiny):
    model, _ = tiny
    net = Controller(ControllerConfig(d_model=model.config.hidden_size, width=16))
    path = tmp_path / "controller.pt"
    net.save(path)
    ids, mask = prompts()
    a = generate(model, Adore(m=6, R=2, controller=str(path)), ids, mask, 8, [], 0)
    method = Adore(m=6, R=2)
    method.net = net  # the same weights, not read from a file
    b = generate(model, method, ids, mask, 8, [], 0)
    assert torch.equal(a.tokens, b.tokens)


def test_rebuilt_tokens_attend_causally(tiny):
    """Rebuilt tokens come back at their original (earlier) positions, never at the current query's."""
    model, _ = tiny
    ids, mask = prompts(batch=1, length=14)
    session = Session(model, Adore(m=5, R=2, rebuild_every=1), 1, 64)
    logits = session.feed(ids, mask.bool())
    for _ in range(6):
        logits = session.feed(logits[:, -1].argmax(-1, keepdim=True))
    rb = session.last_rebuilt_cols[0]
    assert (rb >= 0).any()
    for col in rb[rb >= 0].tolist():
        assert int(session.hist_pos[0, col]) < int(session.next_pos[0]) - 1


def test_prefill_chunks_keep_the_budget(tiny):
    model, _ = tiny
    ids, mask = prompts(batch=2, length=20)
    out = generate(model, Window(m=6), ids, mask, 5, [], 0, prefill_chunk=4)
    assert out.stats["peak_kv_bytes"] < generate(model, Window(m=6), ids, mask, 5, [], 0).stats["peak_kv_bytes"]


@pytest.mark.parametrize(
    "bad",
    [
        lambda: Window(m=0),
        lambda: Streaming(m=4, sinks=4),
        lambda: H2O(m=8, recent_ratio=2.0),
        lambda: Adore(m=8, R=-1),
        lambda: Adore(m=4, R=5),
        lambda: Adore(m=8, controller="/nonexistent.pt"),
        lambda: Adore(m=8, sinks=0),
        lambda: Adore(m=8, sinks=4, recent_ratio=0.5),
        lambda: Adore(m=8, recent_ratio=1.0),
        lambda: Adore(m=8, recent_ratio=0.01),
        lambda: Full(m=8),
    ],
)
def test_bad_method_values_fail_with_a_message(bad):
    with pytest.raises(ValueError, match="method"):
        bad()


def test_snapkv_default_window_is_valid_at_every_budget():
    """SnapKV's default window (m // 8) is capped at the attention rows the engine records, so a long-context sweep
    over m builds at every budget; a window out of range names the value to pass."""
    from adore.methods.snapkv import MAX_WINDOW, SnapKV

    for m in (2, 16, 128, 2048, 4096, 32768):
        assert 1 <= SnapKV(m=m).rows <= min(m - 1, MAX_WINDOW)
    assert SnapKV(m=128).rows == 16 and SnapKV(m=4096).rows == MAX_WINDOW  # runs below m = 2,056 are unchanged
    assert make_method("snapkv", 4096).rows == MAX_WINDOW  # conf/method/snapkv.yaml, as eval.py builds it
    with pytest.raises(ValueError, match="pass method.window=64"):
        SnapKV(m=4096, window=512)
    with pytest.raises(ValueError, match="pass method.window=7"):
        SnapKV(m=8, window=8)
    with pytest.raises(ValueError, match="method.m=null: SnapKV releases down to a budget"):
        SnapKV(m=None)


@pytest.mark.slow
def test_packaged_model_large_budget_equals_generate(packaged):
    """The real SmolLM2 backbone: every method with m >= total length gives transformers' greedy tokens."""
    model, tokenizer = packaged
    chats = [
        [{"role": "user", "content": "Name three colours."}],
        [{"role": "user", "content": "Summarize: Anna: lunch at 1? Ben: sure, see you at the cafe."}],
    ]
    batch = tokenizer.apply_chat_template(
        chats, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    new = 16
    ref = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=None,
    )
    for name in METHODS:
        out = generate(
            model,
            make_method(name, ids.shape[1] + new, model),
            ids,
            mask,
            new,
            eos_token_ids=[],
            pad_token_id=tokenizer.pad_token_id,
        )
        assert torch.equal(out.tokens, ref[:, ids.shape[1] :]), name


@pytest.mark.slow
def test_packaged_model_small_budget_invariants(packaged):
    model, tokenizer = packaged
    text = "The quick brown fox jumps over the lazy dog. " * 6
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    for name in ("window", "h2o", "adore"):
        session = Session(model, make_method(name, 16, model), 1, 128)
        logits = session.feed(ids)
        for _ in range(6):
            logits = session.feed(logits[:, -1].argmax(-1, keepdim=True))
            positions = session.cached_positions()[0]
            assert len(positions) == 16 and len(set(positions)) == 16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_equals_eager():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    model = LlamaForCausalLM(config).cuda().eval()
    ids = torch.randint(10, 1000, (3, 64), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :10] = 0
    for name in ("full", "window", "streaming", "adore"):
        eager = generate(model, make_method(name, 16, model), ids, mask, 40, [], 0)
        graphed = generate(model, make_method(name, 16, model), ids, mask, 40, [], 0, cuda_graphs=True)
        assert torch.equal(eager.tokens, graphed.tokens), name


def test_capacity_is_clamped_to_what_the_session_can_hold(tiny):
    """A budget far above the sequence allocates the sequence's slots, not m (budget=10**9 once tried 46 TB)."""
    model, _ = tiny
    session = Session(model, Window(m=10**9), 2, 40)
    assert session.cache.capacity == 40 + 1
    assert Session(model, Adore(m=10**9, R=3), 2, 40).cache.capacity == 40 + 3 + 1


@pytest.mark.parametrize("query", [False, True])
def test_adore_guarantees_keep_sinks_and_recent_tokens(tiny, query):
    """method.sinks / method.recent_ratio: those tokens are never released, whatever the (random) controller says."""
    model, _ = tiny
    ids, mask = prompts(batch=1, length=20)
    method = Adore(m=8, R=2, sinks=2, recent_ratio=0.375, config={"query": query})  # round(0.375 x 8) = 3 recent
    assert method.recent == 3 and method.tag.endswith("_sinks2_recent0.375")
    session = Session(model, method, 1, 30)
    session.feed(ids, mask.bool())
    for step in range(4):
        session.feed(torch.tensor([[17 + step]]))
        kept = session.cached_positions()[0]
        newest = int(session.next_pos[0]) - 1
        assert {0, 1, newest - 2, newest - 1, newest} <= set(kept) and len(kept) <= 8


PROBE = {"heads": 2, "head_dim": 4, "input_layer": 1}  # an untrained attention probe on the tiny model's layer 1


def test_attention_release_without_rebuild_is_tova(tiny):
    """release=attention keeps what this step's query attends to: with nothing rebuilt, that is TOVA exactly."""
    from adore.methods.tova import TOVA

    model, _ = tiny
    ids, mask = prompts()
    ours = generate(model, Adore(m=6, R=0, config=PROBE, release="attention"), ids, mask, 10, [], 0)
    assert torch.equal(ours.tokens, generate(model, TOVA(m=6), ids, mask, 10, [], 0).tokens)
    rebuilding = Adore(m=6, R=2, rebuild_every=1, config=PROBE, release="attention")
    assert "release" in rebuilding.identity() and "release" not in Adore(m=6).identity()  # older runs keep names
    out = generate(model, rebuilding, ids, mask, 10, [], 0)
    assert out.stats["rebuilt_tokens"] > 0


def test_mass_release_without_rebuild_is_h2o(tiny):
    """release=mass keeps what every query so far attended to most: with nothing rebuilt, that is H2O exactly; with
    rebuilds, recalled tokens keep their mass and add to it."""
    from adore.methods.h2o import H2O

    model, _ = tiny
    ids, mask = prompts()
    ours = generate(model, Adore(m=6, R=0, config=PROBE, release="mass", recent_ratio=0.5), ids, mask, 10, [], 0)
    assert torch.equal(ours.tokens, generate(model, H2O(m=6, recent_ratio=0.5), ids, mask, 10, [], 0).tokens)
    recalling = Adore(m=6, R=2, rebuild="recall", rebuild_every=1, config=PROBE, release="mass", recent_ratio=0.5)
    assert recalling.identity()["release"] == "mass"
    assert generate(model, recalling, ids, mask, 10, [], 0).stats["recalled_tokens"] > 0
    with pytest.raises(ValueError, match="method.release=mass .* pass method.recent_ratio=0.5"):
        Adore(m=6, release="mass")


def test_probe_scores_in_the_engine_are_those_it_was_trained_on(tiny):
    """With nothing released, the engine's rebuild scores in the step that feeds token t equal the training-side
    scores of the same sequence (keys from x_i, query from x_{t-1} and token t's embedding), though token t's
    own forward has not run when they are computed."""
    from adore.models import residual_after

    model, _ = tiny
    ids = prompts(batch=1, length=12)[0]
    method = Adore(m=64, R=2, rebuild_every=1, config=PROBE)
    session = Session(model, method, 1, 16)
    session.feed(ids[:, :10])
    session.feed(ids[:, 10:11])
    seen = []
    score = method.pick_scores
    method.pick_scores = lambda *args: seen.append(score(*args)) or seen[-1]
    session.feed(ids[:, 11:12])
    net = method.net
    with torch.no_grad():
        x = residual_after(model, 1, ids, torch.ones_like(ids)).float()
        z = net.encode(x, torch.ones(1, 12, dtype=torch.bool))[0]
        query = net.queries(x[:, 10], model.get_input_embeddings()(ids[:, 11]).float())[:, None]
        want = net.logits(z[:, :11], torch.arange(11)[None], torch.tensor([[11]]), query)[0]
    torch.testing.assert_close(seen[0][0], want, atol=1e-4, rtol=1e-4)
