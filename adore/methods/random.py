from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from adore.methods.base import KEEP, Method


@dataclass
class Random(Method):
    """Random release (the newest token is always kept): a floor every policy should beat.

    Each token gets a fixed pseudo-random priority from (seed, position, id), so a row's choices do not
    depend on the other rows of its batch.
    """

    m: int = 128
    seed: int = 0
    name: ClassVar[str] = "random"
    label: ClassVar[str] = "Random"

    def score(self, state, tokens):
        pos, ids = tokens.positions, tokens.ids
        priority = ((pos * 1103515245 + ids * 12345 + self.seed * 2654435761 + 1013904223) % 2**31).float() / 2**31
        return priority + KEEP * (pos == tokens.query_pos)
