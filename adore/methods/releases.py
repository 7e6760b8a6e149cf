"""What ADORE releases by (`method.release`): the controller's scores (the paper), this step's attention over the
cache (TOVA's rule) or the attention gathered over every step (H2O's). Rebuild picks are always the controller's:
released tokens have no attention in the cache to be scored by."""

from __future__ import annotations

import torch

from adore.methods.scoring import Scoring


class ReleaseRule:
    """One release rule: what it asks the forward for (`needs`), what it adds to a run's identity, what it records
    when tokens enter, and how it scores the cache's tokens for the release."""

    needs: frozenset[str] = frozenset()
    identity: dict = {}

    def start(self, state, batch_size, length, device) -> None:
        """Allocate what the rule records per token (nothing by default)."""

    def update(self, state, entered) -> None:
        """Record what the tokens just fed tell the rule (nothing by default)."""

    def score(self, state, tokens, scoring: Scoring) -> torch.Tensor:
        raise NotImplementedError


class ByController(ReleaseRule):
    """Release by the controller's scores (the paper). Runs written before the release rules existed released
    this way: its identity is empty, so their names stay."""

    def score(self, state, tokens, scoring: Scoring) -> torch.Tensor:
        return scoring.release_scores(state, tokens)


class ByAttention(ReleaseRule):
    """Release by the newest query's attention over the cache in this step's forward, rebuilt tokens included
    (TOVA's rule), so that a wrong rebuild pick is dropped again instead of displacing a token the query reads."""

    needs = frozenset({"last_attention"})
    identity = {"release": "attention"}

    def update(self, state, entered) -> None:
        state.tokens["attention"] = entered.last_attention  # (B, T): only the newest query counts

    def score(self, state, tokens, scoring: Scoring) -> torch.Tensor:
        return state.tokens["attention"].gather(1, tokens.cols)


class ByMass(ReleaseRule):
    """Release by the attention mass each token has received from every query so far, summed over layers and heads
    (H2O's heavy hitters): a count of how often the context came back to a token, which is what a question about the
    context's most frequent words needs. A recalled token keeps its mass and adds to it. A new token has little mass
    yet, so the rule needs `recent_ratio` (H2O's recent share) to keep the newest tokens."""

    needs = frozenset({"attention"})
    identity = {"release": "mass"}

    def start(self, state, batch_size, length, device) -> None:
        state.tokens["mass"] = torch.zeros(batch_size, length, device=device)

    def update(self, state, entered) -> None:
        state.tokens["mass"] += entered.attention.float()

    def score(self, state, tokens, scoring: Scoring) -> torch.Tensor:
        return state.tokens["mass"].gather(1, tokens.cols)


RELEASES = {"controller": ByController, "attention": ByAttention, "mass": ByMass}  # what `Adore.release` may be
