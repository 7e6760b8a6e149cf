"""The attention function the engine registers with transformers.

Without a recorder it is transformers' own SDPA over the engine's slot mask. `PLAIN_CAUSAL`, an empty 4-D mask
(transformers passes any 4-D mask through untouched), says "slot i holds position i": a plain prompt into an
empty cache. Then SDPA runs its own causal kernel with no dense mask, and a recorder computes each query
chunk's weights over the keys up to that chunk only. Methods that read attention
(H2O, TOVA, SnapKV, the oracle's shadow pass) need the weights, so with a recorder it computes eager attention
(in query chunks, to bound memory; only the last chunk when only the last rows are wanted) and sums the
weights over heads and layers: that extra cost is real and stays visible in the benchmark.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "adore"
QUERY_CHUNK = 256
PLAIN_CAUSAL = torch.ones(1, 1, 0, 0, dtype=torch.bool)  # the mask argument meaning "causal, slot i = position i"


def is_plain_causal(mask) -> bool:
    return mask is not None and mask.shape[-1] == 0


class AttentionRecorder:
    """Attention weights summed over heads and layers: the mass each slot got from all queries (`total`) and/or
    the rows of the last `rows` queries (`last_rows`)."""

    def __init__(self, total: bool, rows: int = 0):
        if not total and rows < 1:
            raise ValueError("an AttentionRecorder records the total, the last rows, or both")
        if rows > QUERY_CHUNK:
            raise ValueError(f"the last {rows} attention rows: at most {QUERY_CHUNK} can be recorded")
        self.want_total, self.rows = total, rows
        self.total: torch.Tensor | None = None  # (B, C)
        self.last_rows: torch.Tensor | None = None  # (B, rows, C)

    def add(self, weights: torch.Tensor, last_chunk: bool, slots: int) -> None:
        """weights: (B, H, q, w) softmax weights of one layer and one query chunk over the first w of `slots` slots."""
        width = weights.shape[-1]
        if self.want_total:
            if self.total is None:
                self.total = weights.new_zeros(weights.shape[0], slots)
            self.total[:, :width] += weights.sum(dim=(1, 2))
        if self.rows and last_chunk:
            if self.last_rows is None:
                self.last_rows = weights.new_zeros(weights.shape[0], min(self.rows, weights.shape[2]), slots)
            self.last_rows[..., :width] += weights[:, :, -self.rows :].sum(dim=1)


def adore_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, attention_recorder=None, **kwargs
):
    plain = is_plain_causal(attention_mask)
    if attention_recorder is None:
        return sdpa_attention_forward(
            module, query, key, value, None if plain else attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    B, H, q_len, D = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    starts = list(range(0, q_len, QUERY_CHUNK)) if attention_recorder.want_total else [max(0, q_len - QUERY_CHUNK)]
    outputs = []
    if starts[0] > 0:  # earlier queries need no weights
        early = None if plain else attention_mask[:, :, : starts[0]]
        outputs.append(sdpa_attention_forward(module, query[:, :, : starts[0]], key, value, early, scaling=scaling)[0])
    groups = H // kv_heads  # query heads grouped by the KV head they share: keys and values are never repeated
    for s in starts:
        end = min(s + QUERY_CHUNK, q_len)
        c = end - s
        width = end if plain else slots  # plain: keys past the chunk's last query are all in its future
        chunk = query[:, :, s:end].reshape(B, kv_heads, groups * c, D)
        scores = torch.matmul(chunk, key[:, :, :width].transpose(2, 3)).view(B, H, c, width) * scaling
        if plain:
            allowed = torch.arange(width, device=query.device) <= torch.arange(s, end, device=query.device)[:, None]
        else:
            allowed = attention_mask[:, :, s:end]
        weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")).float(), dim=-1).to(query.dtype)
        attention_recorder.add(weights, last_chunk=s == starts[-1], slots=slots)
        out = torch.matmul(weights.view(B, kv_heads, groups * c, width), value[:, :, :width])
        outputs.append(out.view(B, H, c, D).transpose(1, 2))  # (B, c, H, D)
    return torch.cat(outputs, dim=1).contiguous(), None


def register() -> str:
    """Register the engine's attention (idempotent); returns its name for `set_attn_implementation`."""
    AttentionInterface.register(NAME, adore_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
