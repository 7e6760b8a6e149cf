"""Per-row columns of a (rows, columns, ...) tensor: the history's per-token state, the store of released KV, and the
cache slots they are copied into."""

from __future__ import annotations

import torch


def at_columns(values: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """(B, k, ...) entries of `values` (B, T, ...) at history columns `cols` (B, k), each row its own: one
    `index_select` over the B x T leading entries, whose trailing values are contiguous (on a CPU several times
    faster than advanced indexing `values[rows, cols]`, which copies element by element; docs/recall.md). With
    `rows` (N,) and `cols` (N,): the N entries (rows[i], cols[i]). `values` must be contiguous in its first two
    dimensions."""
    B, T = values.shape[:2]
    if rows is None:
        rows = torch.arange(B, device=values.device)[:, None]
    flat = values.view(B * T, -1).index_select(0, (rows * T + cols).flatten())
    return flat.view(*cols.shape, *values.shape[2:])


def grown(values: torch.Tensor, extra: int) -> torch.Tensor:
    """`values` (B, T, ...) with `extra` more columns of zeros, in its own memory layout (a token-minor tensor,
    `adore.controller.base.token_minor`, stays token-minor: its reads depend on it)."""
    order = sorted(range(values.dim()), key=lambda d: (values.stride(d), values.shape[d]), reverse=True)
    shape = list(values.shape)
    shape[1] += extra
    out = values.new_zeros([shape[d] for d in order]).permute([order.index(d) for d in range(values.dim())])
    out[:, : values.shape[1]] = values
    return out


def as_wide(values: torch.Tensor) -> torch.Tensor:
    """`values` on a CPU seen as 16-byte elements along its last dimension (the same memory, bit for bit), where its
    layout allows; else `values`. Advanced indexing copies element by element on a CPU, so a key vector of 64 floats
    moves in 16 copies, not 64: recall's copies back into the cache a sixth faster in a batch-16 step
    (docs/recall.md). Both sides of a copy must be seen alike. Not worth it for a few vectors (a decode step's cache
    write): the views cost more than they save."""
    if values.device.type != "cpu" or values.dtype.is_complex or (values.shape[-1] * values.element_size()) % 16:
        return values
    try:
        return values.view(torch.complex128)
    except RuntimeError:  # a stride or offset not a multiple of 16 bytes
        return values
