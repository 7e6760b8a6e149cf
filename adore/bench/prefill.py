"""One prompt forward per batch for the methods that prefill alike, each releasing it on its own."""

from __future__ import annotations

import torch

from adore.bench.timing import timed
from adore.engine.session import Session


class SharedPrefill:
    """One timed prompt forward per prefill signature (`Session.prefill_signature`: the same recordings and
    residual stream), kept for the methods of a batch that prefill alike: each settles (releases) it on its own.
    A method's `prefill_s` is the shared forward's time plus its own settle's; the copy of the forward's state into
    its session is not timed (an engine serving one method never makes it)."""

    def __init__(self, model, ids: torch.Tensor, new_tokens: int):
        self.model, self.ids, self.new_tokens = model, ids, new_tokens
        self.forwards: dict = {}  # signature -> (source session, its unsettled forward, seconds, first method's tag)

    @torch.no_grad()
    def prefill(self, session: Session) -> tuple[torch.Tensor, float, str]:
        """Settle the shared forward in `session`: its last logits, prefill seconds and the tag of the method
        whose session ran the forward."""
        key = session.prefill_signature
        if key not in self.forwards:
            B, L = self.ids.shape
            source = Session(self.model, session.method, B, L + self.new_tokens)
            step, forward_s = timed(
                source.device, lambda: source.forward(self.ids, torch.ones_like(self.ids, dtype=torch.bool))
            )
            self.forwards[key] = (source, step, forward_s, session.method.tag)
        source, step, forward_s, first = self.forwards[key]
        step = session.adopt(source, step)
        logits, settle_s = timed(session.device, session.settle, step)
        return logits, forward_s + settle_s, first
