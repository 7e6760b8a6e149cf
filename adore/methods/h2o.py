from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from adore.methods.base import KEEP, Method


@dataclass
class H2O(Method):
    """H2O: heavy hitters (largest attention mass accumulated over all queries so far) plus recent tokens.

    One decision for all layers and heads (uniform scheduling, like ADORE), so the mass is summed over both.
    """

    m: int = 128
    recent_ratio: float = 0.5  # share of m reserved for the most recent tokens
    name: ClassVar[str] = "h2o"
    label: ClassVar[str] = "H2O"
    per_token: ClassVar[tuple[str, ...]] = ("mass",)
    needs: ClassVar[frozenset[str]] = frozenset({"attention"})
    short: ClassVar[dict] = {"recent_ratio": "r"}

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"method.recent_ratio={self.recent_ratio} must be in [0, 1]")

    def update(self, state, entered):
        state.tokens["mass"] += entered.attention.float()

    def score(self, state, tokens):
        recent = max(1, int(round(self.m * self.recent_ratio)))
        is_recent = tokens.positions > tokens.query_pos - recent
        return state.tokens["mass"].gather(1, tokens.cols) + KEEP * is_recent
