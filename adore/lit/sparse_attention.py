"""Top-K sparse attention (ADORE.md §1), registered with transformers as `attn_implementation="topk"`.

For every query, in every layer and head, the K largest pre-softmax scores among the keys the mask allows
(causal and padding) are kept, the rest set to -inf, then softmax over what is kept. K is read from
`module.config.topk_k` (set by `enable_topk_attention`); a `topk_k=` keyword passed to `model(...)` overrides
it, since transformers forwards extra keywords down to every attention call. Memory is O(T^2) per head, like
eager attention: a training-time tool (the paper's known limitation), not the inference engine.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.llama.modeling_llama import repeat_kv

from adore.checks import check_integer, is_integer

NAME = "topk"


def topk_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, topk_k=None, **kwargs):
    """Drop-in for transformers' `eager_attention_forward` that keeps each query's K best keys.

    query: (B, H, T, D); key, value: (B, KV, S, D) with H a multiple of KV (GQA); attention_mask: the additive
    (B, 1, T, S) float mask of `eager_mask` (0 = allowed, dtype min = masked), or a bool mask, or None (causal).
    Returns the output (B, T, H, D) and the attention weights (B, H, T, S), at most K nonzeros per row.
    """
    K = topk_k if topk_k is not None else getattr(module.config, "topk_k", None)
    if not is_integer(K):
        raise ValueError(f"topk_k={K!r} must be a positive integer: call enable_topk_attention(model, K)")
    key = repeat_kv(key, module.num_key_value_groups)  # (B, H, S, D)
    value = repeat_kv(value, module.num_key_value_groups)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, T, S)
    T, S = scores.shape[-2:]
    if attention_mask is None:  # plain causal; queries are the last T positions of the S keys
        allowed = torch.ones(T, S, dtype=torch.bool, device=scores.device).tril(S - T)
        attention_mask = torch.zeros(T, S, dtype=scores.dtype, device=scores.device).masked_fill(
            ~allowed, torch.finfo(scores.dtype).min
        )
    elif attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros_like(attention_mask, dtype=scores.dtype).masked_fill(
            ~attention_mask, torch.finfo(scores.dtype).min
        )
    # masked keys sit at the dtype's minimum, so top-K picks them only when a query has fewer than K allowed
    # keys, and then softmax gives them exactly zero weight
    scores = scores + attention_mask[..., :S]
    if K < S:
        top = scores.topk(K, dim=-1)
        scores = torch.full_like(scores, float("-inf")).scatter(-1, top.indices, top.values)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, T, H, D)
    return output, weights


def register() -> str:
    """Register `topk` with transformers' attention and mask interfaces (idempotent); returns the name."""
    AttentionInterface.register(NAME, topk_attention)
    AttentionMaskInterface.register(NAME, eager_mask)  # an additive float mask, always materialised
    return NAME


def enable_topk_attention(model, K: int):
    """Switch a transformers (or PEFT-wrapped) model to top-K attention with this K; returns the model.

    `model.set_attn_implementation("sdpa")` switches back to full attention; K stays in `config.topk_k`.
    """
    check_integer("K", K, fix=": top-K attention keeps K keys per query, e.g. K=64")
    model.config.topk_k = K
    model.set_attn_implementation(register())
    return model
