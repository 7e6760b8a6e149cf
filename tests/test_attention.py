"""The engine's attention with a recorder: blocked eager attention must equal plain softmax attention, and the
recorded mass and last rows must be its weights, whatever the blocks (adore/engine/attention.py)."""

import pytest
import torch

from adore.engine.attention import PLAIN_CAUSAL, QUERY_CHUNK, AttentionRecorder, adore_attention, recorded_blocks


class _Module:  # what transformers' SDPA forward reads off the attention module
    num_key_value_groups = 3
    is_causal = True
    training = False


def _reference(query, key, value, allowed):
    """Softmax attention with KV heads repeated, and its weights summed over heads: (B, q, H, D), (B, q, S)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = query @ key.transpose(2, 3) * query.shape[-1] ** -0.5
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return (weights @ value).transpose(1, 2), weights.sum(dim=1)


@pytest.mark.parametrize("plain", [True, False])
@pytest.mark.parametrize("total,rows", [(True, 0), (False, 100), (True, 5)])
def test_blocked_eager_attention_equals_softmax_attention(plain, total, rows):
    B, H, KV, L, D = 2, 6, 2, 2 * QUERY_CHUNK + 22, 16  # three query blocks, the last one partial
    gen = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(B, h, L, D, generator=gen) for h in (H, KV, KV))
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    if plain:
        mask, allowed = PLAIN_CAUSAL, causal
    else:  # a slot mask that also hides a few past keys of row 1
        allowed = causal[None, None].repeat(B, 1, 1, 1)
        allowed[1, :, 10:, 3:7] = False
        mask = allowed
    recorder = AttentionRecorder(total, rows)
    out, _ = adore_attention(_Module(), query, key, value, mask, scaling=D**-0.5, attention_recorder=recorder)
    expected_out, expected_weights = _reference(query, key, value, allowed)
    torch.testing.assert_close(out, expected_out, rtol=1e-4, atol=1e-5)
    if total:
        torch.testing.assert_close(recorder.total, expected_weights.sum(dim=1), rtol=1e-4, atol=1e-4)
    if rows:
        torch.testing.assert_close(recorder.last_rows, expected_weights[:, -rows:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("additive", [False, True])
def test_a_recorded_decode_step_equals_the_blocked_path_bit_for_bit(additive):
    """One query per row takes its own short path; its output and recorded weights are the blocked path's exactly,
    with a boolean mask or the additive one the session builds for decode steps."""
    B, H, KV, S, D = 3, 6, 2, 40, 16
    gen = torch.Generator().manual_seed(1)
    query, key, value = torch.randn(B, H, 1, D, generator=gen), *(torch.randn(B, KV, S, D, generator=gen) for _ in "kv")
    allowed = torch.rand(B, 1, 1, S, generator=gen) > 0.3
    allowed[..., 0] = True
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf")) if additive else allowed
    decoded, blocked = AttentionRecorder(True, 1), AttentionRecorder(True, 1)
    out, _ = adore_attention(_Module(), query, key, value, mask, scaling=D**-0.5, attention_recorder=decoded)
    expected = recorded_blocks(_Module(), query, key, value, allowed, D**-0.5, blocked)
    assert torch.equal(out, expected)
    assert torch.equal(decoded.total, blocked.total) and torch.equal(decoded.last_rows, blocked.last_rows)
    for kind in [(True, 0), (False, 1), (True, 1)]:  # summed over layers as the blocked path sums them
        decoded, blocked = AttentionRecorder(*kind), AttentionRecorder(*kind)
        for _ in range(4):
            layer = torch.randn(B, H, 1, D, generator=gen)
            adore_attention(_Module(), layer, key, value, mask, scaling=D**-0.5, attention_recorder=decoded)
            recorded_blocks(_Module(), layer, key, value, allowed, D**-0.5, blocked)
        assert kind[1] or torch.equal(decoded.total, blocked.total)
        assert not kind[1] or torch.equal(decoded.last_rows, blocked.last_rows)
    three = torch.randn(B, H, 3, D, generator=gen)  # a rebuild step's queries get the decode step's mask too
    blocks = [
        recorded_blocks(_Module(), three, key, value, m.expand(-1, -1, 3, -1), D**-0.5, AttentionRecorder(True))
        for m in (mask, allowed)
    ]
    assert torch.equal(*blocks)


def test_more_rows_than_the_recorder_keeps_fail_with_a_message():
    with pytest.raises(ValueError, match="at most 256"):
        AttentionRecorder(False, 257)


def test_masked_queries_with_grouped_heads_equal_transformers_sdpa():
    """Several masked queries and grouped KV heads (a rebuild step, a prefill chunk): the engine folds the query
    heads that share a KV head into its rows instead of repeating the cache per layer; the output is the same."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, H, KV, q, S, D = 2, 6, 2, 5, 23, 16
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(B, q, H, D, generator=gen).transpose(1, 2)  # transposed, as the model hands it over
    key, value = (torch.randn(B, KV, S, D, generator=gen) for _ in range(2))
    allowed = torch.rand(B, 1, q, S, generator=gen) > 0.4
    allowed[..., 0] = True
    out, _ = adore_attention(_Module(), query, key, value, allowed, scaling=D**-0.5)
    theirs, _ = sdpa_attention_forward(_Module(), query, key, value, allowed, scaling=D**-0.5)
    torch.testing.assert_close(out, theirs, rtol=0, atol=0)
    torch.testing.assert_close(out, _reference(query, key, value, allowed)[0], rtol=1e-4, atol=1e-5)


def test_one_unmasked_query_with_grouped_heads_is_folded_like_a_masked_one():
    """The floor's forward (one query, no mask, PLAIN_CAUSAL) runs the same folded SDPA as an engine decode step
    (transformers' `enable_gqa` is slower on the CPU over a long cache); the output is full attention's."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, H, KV, S, D = 2, 6, 2, 23, 16
    gen = torch.Generator().manual_seed(1)
    query = torch.randn(B, 1, H, D, generator=gen).transpose(1, 2)
    key, value = (torch.randn(B, KV, S, D, generator=gen) for _ in range(2))
    everything = torch.ones(B, 1, 1, S, dtype=torch.bool)
    out, _ = adore_attention(_Module(), query, key, value, PLAIN_CAUSAL, scaling=D**-0.5)
    masked, _ = adore_attention(_Module(), query, key, value, everything, scaling=D**-0.5)
    theirs, _ = sdpa_attention_forward(_Module(), query, key, value, None, scaling=D**-0.5)
    torch.testing.assert_close(out, masked, rtol=0, atol=0)
    torch.testing.assert_close(out, theirs, rtol=1e-5, atol=1e-6)
