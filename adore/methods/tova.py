from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from adore.methods.base import Method


@dataclass
class TOVA(Method):
    """TOVA (Oren et al., 2024, "Transformers are multi-state RNNs"): keep the tokens the current query attends to
    most. One decision for all layers: the newest query's attention summed over heads and layers.
    """

    m: int = 128
    name: ClassVar[str] = "tova"
    label: ClassVar[str] = "TOVA"
    needs: ClassVar[frozenset[str]] = frozenset({"last_attention"})

    def update(self, state, entered):
        state.tokens["attention"] = entered.last_attention  # replaced every step: only the newest query counts

    def score(self, state, tokens):
        return state.tokens["attention"].gather(1, tokens.cols)
