from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from adore.methods.base import Method


@dataclass
class Oracle(Method):
    """ADORE's loop (release + rebuild of the top-R) scored by the true full-attention weights of the current query.

    The session runs a shadow full-attention pass over the same tokens ("full_attention"): at every step its
    newest query's attention on every past token, summed over heads and layers, is what the controller learns
    to predict, so its top-m is the ideal cache.
    """

    m: int = 128
    R: int = 4
    name: ClassVar[str] = "oracle"
    label: ClassVar[str] = "Oracle"
    training_free: ClassVar[bool] = False  # it reads full attention: an upper bound, not a baseline
    needs: ClassVar[frozenset[str]] = frozenset({"full_attention"})

    def __post_init__(self):
        super().__post_init__()
        check_R(self.R, self.m)

    def score(self, state, tokens):
        return tokens.full_attention


def check_R(R, m: int) -> None:
    if isinstance(R, bool) or not isinstance(R, int) or R < 0:
        raise ValueError(f"method.R={R!r} must be a non-negative integer (tokens rebuilt per step)")
    if R > m:
        raise ValueError(
            f"method.R={R} exceeds method.m={m}: a step keeps only m tokens, so at most m rebuilt ones can stay; use R <= m"
        )
