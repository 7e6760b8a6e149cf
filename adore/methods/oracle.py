from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from adore.methods.rebuilds import Rebuilds


@dataclass
class Oracle(Rebuilds):
    """ADORE's loop (release + rebuild of the top-R) scored by the true full-attention weights of the current query.

    The session runs a shadow full-attention pass over the same tokens ("full_attention"): at every step its
    newest query's attention on every past token, summed over heads and layers, is what the controller learns
    to predict, so its top-m is the ideal cache.
    """

    name: ClassVar[str] = "oracle"
    name_label: ClassVar[str] = "Oracle"
    training_free: ClassVar[bool] = False  # it reads full attention: an upper bound, not a baseline
    needs: ClassVar[frozenset[str]] = frozenset({"full_attention"})

    def identity(self) -> dict:
        return {"name": self.name, "m": self.m, "R": self.R} | self.rebuild_identity()

    def score(self, state, tokens):
        return tokens.full_attention
