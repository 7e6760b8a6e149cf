"""The attention function the engine registers with transformers.

Without a recorder it is SDPA over the engine's slot mask: with grouped KV heads `grouped_sdpa`, which never
repeats the cache, for every forward but a plain causal prompt. `PLAIN_CAUSAL`, an empty 4-D mask (transformers
passes any 4-D mask through untouched), says "slot i holds position i": a plain prompt into an empty cache.
Then transformers' SDPA runs its own causal kernel with no dense mask, and a recorder computes each query
chunk's weights over the keys up to that chunk only. Methods that read attention
(H2O, TOVA, SnapKV, the oracle's shadow pass) need the weights, so with a recorder it computes eager attention
(in small query blocks, to bound memory and stay in cache; only the last rows' queries when only those are
wanted) and sums the weights over heads and layers: that extra cost is real and stays visible in the benchmark.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "adore"
QUERY_CHUNK = 64  # queries per eager block: small blocks keep each block's weights in the CPU cache
MAX_ROWS = 256  # attention rows of the last queries a recorder keeps at most
PLAIN_CAUSAL = torch.ones(1, 1, 0, 0, dtype=torch.bool)  # the mask argument meaning "causal, slot i = position i"


def is_plain_causal(mask) -> bool:
    return mask is not None and mask.shape[-1] == 0


class AttentionRecorder:
    """Attention weights summed over heads and layers: the mass each slot got from all queries (`total`) and/or
    the rows of the last `rows` queries (`last_rows`)."""

    def __init__(self, total: bool, rows: int = 0):
        if not total and rows < 1:
            raise ValueError("an AttentionRecorder records the total, the last rows, or both")
        if rows > MAX_ROWS:
            raise ValueError(f"the last {rows} attention rows: at most {MAX_ROWS} can be recorded")
        self.want_total, self.rows = total, rows
        self.total: torch.Tensor | None = None  # (B, C)
        self.last_rows: torch.Tensor | None = None  # (B, rows, C)

    def first_query(self, q_len: int) -> int:
        """The first of `q_len` queries whose weights are recorded (earlier ones run SDPA)."""
        return 0 if self.want_total else max(0, q_len - self.rows)

    def add_decoded(self, weights: torch.Tensor) -> None:
        """`add` for a forward with one query per row, weights (B, H, 1, C): the same sums, bit for bit, in two
        operations a layer instead of six, which were most of what recording costs a decode step over SDPA at
        batch 1 on a CPU (docs/recall.md)."""
        heads = weights.sum(1)  # (B, 1, C)
        if self.want_total:
            total = heads[:, 0].clone() if self.rows else heads[:, 0]
            self.total = total if self.total is None else self.total.add_(total)
        if self.rows:
            self.last_rows = heads if self.last_rows is None else self.last_rows.add_(heads)

    def add(self, weights: torch.Tensor, start: int, q_len: int, slots: int) -> None:
        """weights: (B, H, c, w) softmax weights of one layer for queries start..start+c-1 of q_len, over the
        first w of `slots` slots."""
        width = weights.shape[-1]
        if self.want_total:
            if self.total is None:
                self.total = weights.new_zeros(weights.shape[0], slots)
            self.total[:, :width] += weights.sum(dim=(1, 2))
        first_row = q_len - min(self.rows, q_len)
        lo, hi = max(start, first_row), start + weights.shape[2]
        if self.rows and lo < hi:
            if self.last_rows is None:
                self.last_rows = weights.new_zeros(weights.shape[0], q_len - first_row, slots)
            self.last_rows[:, lo - first_row : hi - first_row, :width] += weights[:, :, lo - start :].sum(dim=1)


def adore_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, attention_recorder=None, **kwargs
):
    plain = is_plain_causal(attention_mask)
    grouped = query.shape[1] > key.shape[1]
    if attention_recorder is None and grouped and attention_mask is not None and (query.shape[2] == 1 or not plain):
        return grouped_sdpa(query, key, value, None if plain else attention_mask, scaling, dropout)
    if attention_recorder is None:
        return sdpa_attention_forward(
            module, query, key, value, None if plain else attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[2] == 1 and not plain:
        return recorded_decode(query, key, value, attention_mask, scaling, attention_recorder), None
    return recorded_blocks(module, query, key, value, attention_mask, scaling, attention_recorder), None


def recorded_blocks(module, query, key, value, attention_mask, scaling, recorder: AttentionRecorder) -> torch.Tensor:
    """Eager attention in query blocks, each block's weights handed to `recorder`; (B, q, H, D)."""
    plain = is_plain_causal(attention_mask)
    B, H, q_len, D = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    first = recorder.first_query(q_len)
    outputs = []
    if first > 0:  # earlier queries need no weights
        early = None if plain else attention_mask[:, :, :first]
        outputs.append(sdpa_attention_forward(module, query[:, :, :first], key, value, early, scaling=scaling)[0])
    groups = H // kv_heads  # query heads grouped by the KV head they share: keys and values are never repeated
    for s in range(first, q_len, QUERY_CHUNK):
        end = min(s + QUERY_CHUNK, q_len)
        c = end - s
        width = end if plain else slots  # plain: keys past the block's last query are all in its future
        block = query[:, :, s:end].reshape(B, kv_heads, groups * c, D)
        scores = torch.matmul(block, key[:, :, :width].transpose(2, 3)).mul_(scaling)
        per_head = scores.view(B, H, c, width)
        if plain:  # only the diagonal block has future keys
            future = torch.ones(c, c, dtype=torch.bool, device=query.device).triu_(1)
            per_head[..., s:end].masked_fill_(future, float("-inf"))
        elif attention_mask.dtype == torch.bool:
            per_head.masked_fill_(~attention_mask[:, :, s:end], float("-inf"))
        else:
            per_head.add_(attention_mask[:, :, s:end])
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        recorder.add(weights.view(B, H, c, width), start=s, q_len=q_len, slots=slots)
        out = torch.matmul(weights, value[:, :, :width])
        outputs.append(out.view(B, H, c, D).transpose(1, 2))  # (B, c, H, D)
    return torch.cat(outputs, dim=1).contiguous()


def recorded_decode(query, key, value, attention_mask, scaling, recorder: AttentionRecorder) -> torch.Tensor:
    """One query per row with its weights recorded, (B, 1, H, D): `recorded_blocks`' arithmetic in a third of its
    operations (no blocks, no concatenation; an additive mask added, not inverted and filled; `bmm` on 3-D views,
    which `matmul` of the 4-D ones reaches through an expand and reshapes per operand), which is most of its cost at
    batch 1. The same weights and outputs as `recorded_blocks`, bit for bit."""
    B, H, _, D = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    folded = query.reshape(B * kv_heads, H // kv_heads, D)  # heads h = k * groups + j share KV head k
    scores = torch.bmm(folded, key.reshape(B * kv_heads, slots, D).transpose(1, 2)).mul_(scaling)
    per_row = scores.view(B, H, slots)
    if attention_mask.dtype == torch.bool:
        per_row.masked_fill_(~attention_mask.view(B, 1, slots), float("-inf"))
    else:
        per_row.add_(attention_mask.view(B, 1, slots))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if weights.dtype != query.dtype:
        weights = weights.to(query.dtype)
    recorder.add_decoded(weights.view(B, H, 1, slots))
    out = torch.bmm(weights, value.reshape(B * kv_heads, slots, D))
    return out.view(B, 1, H, D)  # (B * kv_heads, groups, D) is (B, 1, H, D) in memory


def slot_mask(kept, slot_pos, q_pos, slots, additive: torch.dtype | None = None) -> torch.Tensor:
    """(B, 1, q, C) the slots each query attends: kept slots (B, C) at or before its position q_pos (B, q), and its
    own slot `slots` (B, q), so a padding query sees only itself (no empty softmax row). With `additive`, as 0 / -inf
    of that dtype: SDPA adds a float mask as it is and converts a boolean one in every layer (1 ms a decode step at
    batch 16 on a CPU); a prompt's mask is better boolean (4x smaller)."""
    own = torch.zeros(*slots.shape, kept.shape[1], dtype=torch.bool, device=slots.device)
    own.scatter_(2, slots[..., None], True)
    mask = ((kept[:, None, :] & (slot_pos[:, None, :] <= q_pos[:, :, None])) | own)[:, None]
    if additive is None:
        return mask
    return torch.zeros(mask.shape, dtype=additive, device=mask.device).masked_fill_(~mask, float("-inf"))


def grouped_sdpa(query, key, value, attention_mask, scaling, dropout=0.0):
    """SDPA with grouped KV heads, keys and values never repeated: the query heads that share a KV head become
    extra query rows of it, each with its query's mask row (None: one unmasked query). transformers repeats the
    whole cache per layer for several masked queries, so a rebuild step or a prefill chunk would copy the KV cache
    in every layer; one query without a mask it hands to `enable_gqa`, which is slower than this on the CPU."""
    B, H, q, D = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    groups = H // kv_heads
    folded = query.reshape(B, kv_heads, groups * q, D)  # heads h = k * groups + j share KV head k
    mask = None
    if attention_mask is not None:
        mask = attention_mask.expand(B, 1, q, slots)[:, :, None].expand(B, 1, groups, q, slots)
        mask = mask.reshape(B, 1, groups * q, slots)
    out = torch.nn.functional.scaled_dot_product_attention(
        folded, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
    )
    return out.reshape(B, H, q, D).transpose(1, 2).contiguous(), None  # CUDA kernels may return it strided


def register() -> str:
    """Register the engine's attention (idempotent); returns its name for `set_attn_implementation`."""
    AttentionInterface.register(NAME, adore_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
