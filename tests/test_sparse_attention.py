"""Top-K sparse attention: equal to full attention when K covers the sequence, sparse when it does not."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import eager_attention_forward

from adore.lit.sparse_attention import enable_topk_attention, topk_attention
from adore.models import ModelSpec, load_model


@pytest.fixture()
def model(tiny_model_dir):
    return load_model(ModelSpec(name_or_path=tiny_model_dir))  # a private copy: attention is switched below


@pytest.fixture()
def batch(packaged_tokenizer):
    """Two prompts of different lengths, padded on the right."""
    packaged_tokenizer.padding_side = "right"
    enc = packaged_tokenizer(
        ["The cat sat on the mat and looked at the dog for a long time.", "Hello there, friend."],
        return_tensors="pt",
        padding=True,
    )
    packaged_tokenizer.padding_side = "left"
    return enc


class _Module(torch.nn.Module):
    """What the attention function reads from a transformers attention module."""

    def __init__(self, groups: int, K: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.config = type("Config", (), {"topk_k": K})()


def _logits(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch, **kwargs).logits


def test_function_equals_eager_attention_when_K_covers_all_keys():
    torch.manual_seed(0)
    B, H, KV, T, D = 2, 6, 2, 7, 8  # GQA: 3 query heads per key/value head
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, KV, T, D), torch.randn(B, KV, T, D)
    mask = torch.zeros(B, 1, T, T).masked_fill(
        ~torch.ones(T, T, dtype=torch.bool).tril(), torch.finfo(torch.float32).min
    )
    module = _Module(H // KV, K=T)
    module.eval()
    out, weights = topk_attention(module, q, k, v, mask, scaling=D**-0.5)
    ref_out, ref_weights = eager_attention_forward(module, q, k, v, mask, scaling=D**-0.5)
    assert out.shape == (B, T, H, D)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(weights, ref_weights)
    # no mask at all means causal; a boolean mask works like the additive one
    torch.testing.assert_close(topk_attention(module, q, k, v, None, scaling=D**-0.5)[0], ref_out)
    torch.testing.assert_close(topk_attention(module, q, k, v, mask == 0, scaling=D**-0.5)[0], ref_out)


@pytest.mark.parametrize("K", [64, 1000])
def test_model_topk_equals_full_attention_when_K_covers_the_sequence(model, batch, K):
    assert batch["input_ids"].shape[1] <= K
    full = _logits(model, batch)
    enable_topk_attention(model, K)
    assert model.config._attn_implementation == "topk"
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(_logits(model, batch)[valid], full[valid], atol=1e-4, rtol=1e-4)


def test_small_K_differs_and_keeps_at_most_K_keys(model, batch):
    full = _logits(model, batch)
    K = 3
    enable_topk_attention(model, K)
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    valid = batch["attention_mask"].bool()
    assert not torch.allclose(out.logits[valid], full[valid], atol=1e-3)
    T = batch["input_ids"].shape[1]
    for weights in out.attentions:  # (B, H, T, T) per layer
        nonzero = (weights > 0).sum(-1)  # (B, H, T)
        assert nonzero.max() <= K
        assert torch.equal(nonzero[0, 0], torch.arange(1, T + 1).clamp(max=K))  # causal: query t sees t + 1 keys
        assert torch.allclose(weights.sum(-1), torch.ones_like(weights.sum(-1)))
        assert (weights.triu(1) == 0).all()  # never a future key


def test_topk_keyword_overrides_config_and_gradients_flow(model, batch):
    enable_topk_attention(model, 64)
    with torch.no_grad():
        weights = model(**batch, topk_k=2, output_attentions=True).attentions[0]
    assert (weights > 0).sum(-1).max() <= 2
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_bad_K_is_refused(model):
    with pytest.raises(ValueError, match="K=0"):
        enable_topk_attention(model, 0)
