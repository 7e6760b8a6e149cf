from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from adore.methods.base import KEEP, Method, positions_of


@dataclass
class Streaming(Method):
    """StreamingLLM: the first `sinks` tokens (attention sinks) plus the most recent."""

    m: int = 128
    sinks: int = 4
    name: ClassVar[str] = "streaming"
    label: ClassVar[str] = "StreamingLLM"
    short: ClassVar[dict] = {"sinks": "s"}

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.sinks < self.m:
            raise ValueError(
                f"method.sinks={self.sinks} must be in [0, m={self.m}): sinks plus at least one recent token"
            )

    def score(self, state, tokens):
        return positions_of(tokens) + KEEP * (tokens.positions < self.sinks)
