"""Tokens a release never drops, whatever a method scores them: the first `sinks` positions (StreamingLLM's
attention sinks) and the newest `recent` tokens (H2O's recent share). StreamingLLM, H2O and ADORE all compose
their scores with `protect`, so "sink" and "recent" mean one thing everywhere."""

from __future__ import annotations

import torch

from adore.methods.base import KEEP


def recent_tokens(m: int, ratio: float | None) -> int:
    """The newest round(ratio * m) tokens; 0 when the share is off (None)."""
    return 0 if ratio is None else int(round(ratio * m))


def protect(scores: torch.Tensor, tokens, sinks: int = 0, recent: int = 0) -> torch.Tensor:
    """`scores` (B, k) of a `Tokens` view, lifted by KEEP where the token is a sink (position < sinks) or
    among the `recent` newest (query position - position < recent), so the session keeps them."""
    if sinks:
        scores = scores + KEEP * (tokens.positions < sinks)
    if recent:
        scores = scores + KEEP * (tokens.query_pos - tokens.positions < recent)
    return scores
