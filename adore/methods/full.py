from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from adore.methods.base import Method, positions_of


@dataclass
class Full(Method):
    """No budget: every token stays (the reference all others are compared with)."""

    name: ClassVar[str] = "full"
    label: ClassVar[str] = "Full attention"

    def __post_init__(self):
        if self.m is not None:
            raise ValueError(f"method=full keeps every token; got method.m={self.m}: use method=window for a budget")
        super().__post_init__()

    def score(self, state, tokens):
        return positions_of(tokens)
