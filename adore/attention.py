"""The attention function the engine registers with transformers.

Without a recorder it is transformers' own SDPA over the engine's slot mask. Methods that read attention
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

    def add(self, weights: torch.Tensor, last_chunk: bool) -> None:
        """weights: (B, H, q, C) softmax weights of one layer and one query chunk."""
        if self.want_total:
            mass = weights.sum(dim=(1, 2))
            self.total = mass if self.total is None else self.total + mass
        if self.rows and last_chunk:
            rows = weights[:, :, -self.rows :].sum(dim=1)
            self.last_rows = rows if self.last_rows is None else self.last_rows + rows


def adore_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, attention_recorder=None, **kwargs
):
    if attention_recorder is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    keys = key.repeat_interleave(groups, dim=1)  # (B, H, C, D)
    values = value.repeat_interleave(groups, dim=1)
    q_len = query.shape[2]
    starts = list(range(0, q_len, QUERY_CHUNK)) if attention_recorder.want_total else [max(0, q_len - QUERY_CHUNK)]
    outputs = []
    if starts[0] > 0:  # earlier queries need no weights
        outputs.append(
            sdpa_attention_forward(
                module, query[:, :, : starts[0]], key, value, attention_mask[:, :, : starts[0]], scaling=scaling
            )[0]
        )
    for s in starts:
        scores = torch.matmul(query[:, :, s : s + QUERY_CHUNK], keys.transpose(2, 3)) * scaling  # (B, H, c, C)
        scores = scores.masked_fill(~attention_mask[:, :, s : s + QUERY_CHUNK], float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).to(query.dtype)
        attention_recorder.add(weights, last_chunk=s == starts[-1])
        outputs.append(torch.matmul(weights, values).transpose(1, 2))  # (B, c, H, D)
    return torch.cat(outputs, dim=1).contiguous(), None


def register() -> str:
    """Register the engine's attention (idempotent); returns its name for `set_attn_implementation`."""
    AttentionInterface.register(NAME, adore_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
