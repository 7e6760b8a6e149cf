from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from adore.checks import check_integer
from adore.methods.base import Method, positions_of
from adore.methods.guarantees import protect


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
        check_integer("method.sinks", self.sinks, 0)
        if self.sinks >= self.m:
            raise ValueError(
                f"method.sinks={self.sinks} must be in [0, m={self.m}): sinks plus at least one recent token"
            )

    def score(self, state, tokens):
        return protect(positions_of(tokens), tokens, sinks=self.sinks)
