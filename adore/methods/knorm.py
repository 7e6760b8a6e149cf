from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from adore.methods.base import KEEP, Method


@dataclass
class Knorm(Method):
    """Key norm (Devoto et al., 2024; kvpress `KnormPress`): keys with a small L2 norm tend to draw more attention,
    so the lowest-norm keys are kept. One decision for all layers: the norm averaged over layers and KV heads,
    computed once, when the token enters. The newest token is always kept.
    """

    m: int = 128
    name: ClassVar[str] = "knorm"
    label: ClassVar[str] = "Key norm"
    per_token: ClassVar[tuple[str, ...]] = ("norm",)
    needs: ClassVar[frozenset[str]] = frozenset({"keys"})

    def update(self, state, entered):
        norm = entered.keys.float().norm(dim=-1).mean(dim=(2, 3))  # (B, n, layers, kv_heads) -> (B, n)
        state.tokens["norm"][:, entered.cols[0]] = norm

    def score(self, state, tokens):
        return -state.tokens["norm"].gather(1, tokens.cols) + KEEP * (tokens.positions == tokens.query_pos)
