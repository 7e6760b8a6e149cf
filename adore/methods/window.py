from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from adore.methods.base import Method, positions_of


@dataclass
class Window(Method):
    """Window attention: the m most recent tokens."""

    m: int = 128
    name: ClassVar[str] = "window"
    label: ClassVar[str] = "Window"

    def score(self, state, tokens):
        return positions_of(tokens)
