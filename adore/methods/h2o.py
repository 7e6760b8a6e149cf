from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from adore.checks import check_share
from adore.methods.base import Method
from adore.methods.guarantees import protect, recent_tokens


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
        check_share("method.recent_ratio", self.recent_ratio, closed=True)

    def update(self, state, entered):
        state.tokens["mass"] += entered.attention.float()

    def score(self, state, tokens):
        recent = max(1, recent_tokens(self.m, self.recent_ratio))  # the newest token is always kept
        return protect(state.tokens["mass"].gather(1, tokens.cols), tokens, recent=recent)
