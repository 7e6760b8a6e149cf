"""Two ways a session starts without running its own prompt forward, for measurements at scale: `adopt` takes
another session's unsettled prompt forward (methods that prefill alike share one), `assume_prefilled` puts a
fresh session in the state a long prefill leaves (decode cost depends on shapes, not values). Both are
methods of `Session` (this class is its base), since they set its history, slots and cache as a feed would."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from adore.methods.base import Entered

if TYPE_CHECKING:
    from adore.engine.session import Forward, Session


class Prefilled:
    """The `Session` methods that fill a fresh session from something other than its own prompt forward."""

    @property
    def prefill_signature(self) -> tuple | None:
        """What a prompt's forward computes for this session's method: sessions with equal signatures prefill
        alike (the same KV, recordings and residual stream), whatever they release. None: not shareable (a
        shadow pass or the diagnostic rides along). Keys and embeddings are read after the forward."""
        if self.shadow is not None or self.diagnostic is not None:
            return None
        layer = self.method.input_layer if "hidden" in self.needs else None
        return self.batch_size, self.hist_ids.shape[1], self.recording, layer

    @torch.no_grad()
    def adopt(self, source: Session, step: Forward) -> Forward:
        """Take `source`'s state after its unsettled first forward `step` (a prompt into an empty cache) as this
        fresh session's own, and return the step for this session to `settle`: methods that prefill alike share
        one forward (adore.bench). `source` is left as it was."""
        if self.length or source.feeds != 1 or source.entered is not None:
            raise ValueError("adopt takes a fresh session and a source whose only feed is an unsettled prompt forward")
        if self.prefill_signature is None or self.prefill_signature != source.prefill_signature:
            raise ValueError(
                f"method {self.method.tag} does not prefill like {source.method.tag}: "
                f"{self.prefill_signature} != {source.prefill_signature}"
            )
        taken = source.occupied  # a first forward fills the lowest slots: 0 .. occupied - 1
        self.cache.take_prefix(source.cache, taken)  # grown as this session's own prefill would have grown it
        capacity = self.cache.capacity
        self.slot_col = torch.full((self.batch_size, capacity), -1, dtype=torch.long, device=self.device)
        self.slot_col[:, :taken] = source.slot_col[:, :taken]
        self.slot_pos = torch.zeros_like(self.slot_col)
        self.slot_pos[:, :taken] = source.slot_pos[:, :taken]
        none = torch.zeros_like(self.slot_col, dtype=torch.bool)  # a first forward releases nothing
        self.rebuild.moved(torch.zeros_like(self.slot_col), none)
        for name in ("hist_ids", "hist_pos", "hist_valid", "hist_slot", "next_pos"):
            setattr(self, name, getattr(source, name).clone())
        self.length, self.occupied, self.feeds = source.length, source.occupied, source.feeds
        self._query_pos = source._query_pos
        self.peak_kv_bytes = max(self.peak_kv_bytes, self.cache.nbytes)
        self.method.arrive(self.state, Entered(step.cols, step.valid, step.ids, step.positions, self._query_pos))
        return step

    @torch.no_grad()
    def assume_prefilled(self, ids: torch.Tensor) -> torch.Tensor:
        """Put this fresh session in the state a prefill of `ids` (B, L) leaves, without running it, for benchmarks
        of decode at scale (decode cost depends on shapes, not values): the history holds the first L - 1 tokens,
        the newest min(m, L - 1) are cached with random keys and values, and the method assumes random per-token
        state (`Method.assume`), so that it ranks and rebuilds them as prefilled ones. Then one real feed (the last
        prompt token) sets up the method's running state; its logits are returned."""
        if self.length:
            raise ValueError("assume_prefilled takes a fresh session")
        B = ids.shape[0]
        first = ids[:, :-1].to(self.device)
        n = first.shape[1]
        self._grow_history(n)
        self.hist_ids[:, :n] = first
        self.hist_pos[:, :n] = torch.arange(n, device=self.device)
        self.hist_valid[:, :n] = True
        self.length, self.next_pos[:] = n, n
        cols = torch.arange(n, device=self.device)
        self.method.assume(self.state, cols, self.hist_pos[:, :n], self.hist_ids.shape[1])
        keep = min(n, self.method.m if self.method.m is not None else n)
        cached = cols[n - keep :].expand(B, -1)
        slots = torch.arange(keep, device=self.device).expand(B, -1)
        self.slot_col[:, :keep], self.slot_pos[:, :keep] = cached, cached
        self.hist_slot.scatter_(1, cached, slots)
        self.occupied = keep
        self.cache.fill_random()
        return self.feed(ids[:, -1:].to(self.device))
