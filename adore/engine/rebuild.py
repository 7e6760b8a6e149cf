"""Rebuild policies (ADORE.md §3.2, and "Beyond the paper"): how released tokens come back into the cache.

The session asks its policy at two points of every step, so its loop reads like the paper's:

* `bring_back(session, seen)`, before the forward: pick released tokens among the first `seen` history columns
  by the method's rebuild scores (the query is the token about to be fed), make them attendable, and return the
  ones that must run through the model with the new tokens;
* `release(session, scores, valid, m)`, after it: the cache slots that stay.

Policies, one class each (`method.rebuild` names one):

* `Recompute` (`recompute`, the paper's rule): the top-R released tokens run through the model again with the
  new token, their KV computed against today's bounded cache;
* `Survivors` (`survivors`): `Recompute`, forwarding only the picks that rank within the m best of all tokens;
* `Keep` (`keep`): up to R released tokens stay in R more slots, unattended, with their KV; a pick found there
  is attended again without a forward, the others are forwarded (at most `forward` of them);
* `Recall` (`recall`): every token's KV, as its forward computed it, is kept in a store outside the cache
  (`adore.engine.kvstore`); picks are copied back into free slots, never forwarded (a pick whose KV still lies in the
  free slot it was released from takes that slot, uncopied). With `page_size` the pick is made in pages of that many
  consecutive tokens (scored by `Method.page_scores`), as Quest (Tang et al., ICML 2024) and ArkVale (Chen et al.,
  NeurIPS 2024) select KV pages by a per-page summary.

`Rebuild` itself (R = 0 or no budget) brings nothing back. A step is a tensor program: no host sync under
`static_shapes` (a CUDA store's copies excepted: their indices cross to the host).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adore.engine.diagnostic import pick_counts
from adore.engine.kvstore import KVStore, store_bytes_per_token


@dataclass
class Picks:
    cols: torch.Tensor  # (B, r) history columns picked, best first
    ok: torch.Tensor  # (B, r) False where a row has no pick (padding)
    values: torch.Tensor  # (B, r) their scores
    scores: torch.Tensor  # (B, seen) every column's rebuild score (B, pages for page picks)


class Rebuild:
    """No rebuild; the base of the policies: the top-R pick and the top-m release."""

    name = "none"

    def __init__(self, R: int = 0, every: int = 1, tail: int = 1):
        self.R, self.every, self.tail = R, every, tail
        self.forwarded = self.reused = self.recalled = None  # device counters (all rows), set by `start`
        self.last: torch.Tensor | None = None  # (B, r) columns the last feed brought back (-1: none)

    def slots(self, m: int) -> int:
        """Cache slots of a bounded session: m kept + R brought back + the new token in flight."""
        return m + self.R + 1

    def fed_alone(self, arriving: int, over_released: bool) -> int:
        """How many of the last of `arriving` tokens a prefill feeds one at a time: `tail` (at most all but the
        first) when they arrive over released history and something is rebuilt, else none. A feed's pick is made
        by the query of its newest token from the state before the feed, so inside a chunk the question's tokens
        would pick by a state hundreds of tokens old; fed alone, each picks what it asks for (docs/recall.md)."""
        return min(self.tail, arriving - 1) if self.R and over_released and arriving > 1 else 0

    @property
    def held_slots(self) -> int:
        """Slots beyond m that a settled step may still occupy."""
        return 0

    @property
    def store_bytes(self) -> int:
        """Memory outside the cache that the policy holds (the recall store)."""
        return 0

    def store_bytes_for(self, config, model_dtype: torch.dtype) -> int:
        """Bytes per history token the policy keeps outside the cache, for a model of `config` (memory checks)."""
        return 0

    def start(self, session) -> None:
        zero = lambda: torch.zeros((), dtype=torch.long, device=session.device)  # noqa: E731
        self.forwarded, self.reused, self.recalled = zero(), zero(), zero()

    # ---- before the forward ----------------------------------------------------------------------------
    def due(self, session, seen: int) -> bool:
        """Whether this feed rebuilds: R > 0, something seen, the method has state (not the first forward), and
        the feed is a multiple of `every`."""
        return bool(self.R) and seen > 0 and session.entered is not None and session.feeds % self.every == 0

    def pick(self, session, seen: int) -> Picks:
        """The R best released tokens among the first `seen` columns by the method's rebuild scores."""
        released = session.released_columns(seen)
        scores = session.pick_scores(released, self.R)
        top = scores.masked_fill(~released, float("-inf")).topk(min(self.R, seen), dim=1)  # sorted: picks first
        return Picks(top.indices, torch.isfinite(top.values), top.values, scores)

    def bring_back(self, session, seen: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, r) history columns to forward with the new tokens, and their validity."""
        empty = torch.zeros(session.batch_size, 0, dtype=torch.long, device=session.device)
        self.last = empty
        if not self.due(session, seen):
            return empty, empty.bool()
        cols, ok = self.admit(session, self.pick(session, seen))
        if not session.static_shapes and cols.shape[1]:  # CPU: only as wide as the fullest row (a sync is free)
            width = int(ok.sum(1).max())
            cols, ok = cols[:, :width], ok[:, :width]
        if cols.shape[1]:
            self.last = torch.where(ok, cols, -1)
        self.forwarded += ok.sum()
        return cols, ok

    def admit(self, session, picks: Picks) -> tuple[torch.Tensor, torch.Tensor]:
        """Of the picks, those to forward (the others are brought back otherwise, or not at all)."""
        return picks.cols[:, :0], picks.ok[:, :0]

    # ---- after the forward -----------------------------------------------------------------------------
    def entered(self, session, start: int, slots: torch.Tensor) -> None:
        """The forward wrote the KV of history columns start .. start + n - 1 into `slots` (B, n)."""

    def release(self, session, scores: torch.Tensor, valid: torch.Tensor, m: int) -> torch.Tensor:
        """(B, C) the slots kept: the m highest `scores` (-inf on empty slots)."""
        return torch.zeros_like(valid).scatter_(1, scores.topk(m, dim=1).indices, True)

    def release_nothing(self) -> None:
        """A step with room for every token."""

    # ---- what the session's slot bookkeeping asks --------------------------------------------------------
    def attended(self, slot_col: torch.Tensor) -> torch.Tensor:
        """(B, C) slots of the kept cache, what a step attends (besides its new tokens)."""
        return slot_col >= 0

    def kept(self, session, slot: torch.Tensor) -> torch.Tensor:
        """Of `hist_slot` entries: True where the slot is in the kept cache."""
        return slot >= 0

    def moved(self, src: torch.Tensor, taken: torch.Tensor) -> None:
        """The session moved slot src[b, j] to j (`taken` False: left empty)."""

    def grow(self, length: int) -> None:
        """The history grew to `length` columns."""


class Recompute(Rebuild):
    """The paper's rule: the top-R released tokens run through the model with the new token."""

    name = "recompute"

    def admit(self, session, picks):
        return picks.cols, picks.ok


class Survivors(Recompute):
    """Forward only the picks that rank within the m best of all tokens (cached and released) at this step's
    scores: those the release is expected to keep; the others would be released again in the same step."""

    name = "survivors"

    def pick(self, session, seen):
        picks = super().pick(session, seen)
        competing = picks.scores.masked_fill(~session.hist_valid[:, :seen], float("-inf"))
        kth = competing.topk(min(session.method.m, seen), dim=1).values[:, -1:]
        picks.ok = picks.ok & (picks.values >= kth)
        return picks


class Keep(Rebuild):
    """The release holds up to R of the tokens it drops in R more slots, unattended, with their KV (`held`); a
    pick found held is attended again without a forward, so R bounds the tokens forwarded and they are the picks
    that changed. A held token's KV is the one computed when it was last forwarded. `forward` = F forwards only
    the F best picks not held (the others wait), which bounds a batch's forward width."""

    name = "keep"

    def __init__(self, R: int = 0, every: int = 1, forward: int | None = None, tail: int = 1):
        super().__init__(R, every, tail)
        self.forward = forward
        self.held: torch.Tensor | None = None  # (B, C) released, KV kept

    def slots(self, m):
        return m + 2 * self.R + 1

    @property
    def held_slots(self):
        return self.R

    def start(self, session):
        super().start(session)
        self.held = torch.zeros(session.batch_size, session.cache.capacity, dtype=torch.bool, device=session.device)

    def admit(self, session, picks):
        """Picks found held are attended from their slots (no longer held); the rest, moved to the front (the CPU
        cuts the forward to the fullest row), are forwarded. Held tokens not picked stay held."""
        C = session.cache.capacity
        slot = session.hist_slot.gather(1, picks.cols)
        reuse = picks.ok & (slot >= 0)
        found = torch.zeros(session.batch_size, C + 1, dtype=torch.bool, device=session.device)
        found.scatter_(1, torch.where(reuse, slot, C), True)  # writes True only: race-free; others to the spare
        self.held &= ~found[:, :C]
        self.reused += reuse.sum()
        forward = picks.ok & ~reuse
        if self.forward is not None:  # the best `forward` of the picks not held; the others wait for a later step
            forward &= forward.cumsum(1) <= self.forward
        order = torch.argsort((~forward).to(torch.int8), dim=1, stable=True)  # forwarded picks first, in rank order
        return picks.cols.gather(1, order), forward.gather(1, order)

    def release(self, session, scores, valid, m):
        candidates = scores.masked_fill(self.held, float("-inf"))  # held tokens come back only by a pick
        keep = torch.zeros_like(valid).scatter_(1, candidates.topk(m, dim=1).indices, True) & valid & ~self.held
        rest = scores.masked_fill(keep, float("-inf")).topk(self.R, dim=1)
        C = valid.shape[1]
        hold = torch.zeros(valid.shape[0], C + 1, dtype=torch.bool, device=valid.device)
        hold.scatter_(1, torch.where(torch.isfinite(rest.values), rest.indices, C), True)  # True only: race-free
        self.held = hold[:, :C] & valid & ~keep
        return keep | self.held

    def release_nothing(self):
        self.held.zero_()  # room for every token: none is held outside the kept cache

    def attended(self, slot_col):
        return (slot_col >= 0) & ~self.held

    def kept(self, session, slot):
        return (slot >= 0) & ~self.held.gather(1, slot.clamp(min=0))

    def moved(self, src, taken):
        self.held = taken & self.held.gather(1, src)


class Recall(Rebuild):
    """Released tokens come back by copy from a store of the KV they entered with (module docstring): no forward,
    so R can be large. `page_size` = P picks R // P whole pages of P consecutive history columns by the method's
    page scores (only their released tokens are copied; `page_score`, a PAGE_SCORES name, says how a page's released
    members' scores make its score); None picks R single tokens."""

    name = "recall"

    def __init__(
        self,
        R: int = 0,
        every: int = 1,
        page_size: int | None = None,
        store_dtype: str = "model",
        page_score="max",
        tail: int = 1,
    ):
        super().__init__(R, every, tail)
        self.page_size, self.store_dtype, self.page_score = page_size, store_dtype, PAGE_SCORES[page_score]
        self.store: KVStore | None = None
        # (B, C) the history column whose KV, exactly as a copy from the store would write it, each slot holds,
        # attended or not (-1: none): a released token stays there until the slot is claimed again
        self.holds: torch.Tensor | None = None

    @property
    def store_bytes(self):
        return 0 if self.store is None else self.store.nbytes

    def store_bytes_for(self, config, model_dtype):
        return store_bytes_per_token(config, model_dtype, self.store_dtype) if self.R else 0

    def start(self, session):
        super().start(session)
        self.store = KVStore(session.cache, session.hist_ids.shape[1], self.store_dtype)
        self.holds = torch.full_like(session.slot_col, -1)

    def grow(self, length):
        self.store.grow(length)

    def moved(self, src, taken):
        self.holds = torch.where(taken, self.holds.gather(1, src), -1)

    def entered(self, session, start, slots):
        """The new tokens' KV to the store; their slots hold them (what a copy would write, if the store is exact)."""
        self.store.write(session.cache, start, slots)
        cols = torch.arange(start, start + slots.shape[1], device=slots.device).expand_as(slots)
        held = self.store.exact & session.hist_valid[:, start : start + slots.shape[1]]
        self.holds.scatter_(1, slots, torch.where(held, cols, -1))

    def pick(self, session, seen):
        if self.page_size is None:
            picks = super().pick(session, seen)
            if session.diagnostic is not None:  # eval.diagnose: a shortlisted pick against the exact per-token one
                released = session.released_columns(seen)
                hits = pick_counts(
                    session.rebuild_scores(every_column(session, seen)), released, picks.cols, picks.ok, self.R
                )
                session.diagnostic.observe_pick(*hits)
            return picks
        P = self.page_size
        pages = -(-seen // P)
        cols = every_column(session, seen)
        released = session.released_columns(seen)
        scores = session.page_scores(cols, P, released, self.page_score)  # (B, pages): -inf if none released
        top = scores.topk(min(max(self.R // P, 1), pages), dim=1)
        page_cols = (top.indices[..., None] * P + torch.arange(P, device=session.device)).flatten(1)  # (B, r)
        ok = (page_cols < seen) & torch.isfinite(top.values).repeat_interleave(P, 1)
        page_cols = page_cols.clamp(max=seen - 1)
        ok &= released.gather(1, page_cols)
        if session.diagnostic is not None:  # eval.diagnose: the page pick against the exact per-token one
            session.diagnostic.observe_pick(*pick_counts(session.rebuild_scores(cols), released, page_cols, ok, self.R))
        return Picks(page_cols, ok, top.values.repeat_interleave(P, 1), scores)

    def admit(self, session, picks):
        """Copy the picks' stored KV into free slots: they are attended like cached tokens, nothing is forwarded. A
        pick still in the free slot it was released from (`holds`) takes it back uncopied; on the CPU only the
        other picks are copied, on CUDA (static shapes) every slot claimed is written, the same KV there."""
        cols, ok = picks.cols, picks.ok
        if not session.static_shapes:  # CPU: the fullest row's picks only, valid ones first
            order = torch.argsort((~ok).to(torch.int8), dim=1, stable=True)
            cols, ok = cols.gather(1, order), ok.gather(1, order)
            width = int(ok.sum(1).max())
            cols, ok = cols[:, :width], ok[:, :width]
        session.make_room(cols.shape[1])  # before naming slots: a resize renumbers them
        at = self.resident_slots(cols, ok)
        slots = session.claim_slots(cols, ok, at)
        if session.static_shapes:
            self.store.read_into(session.cache, cols, slots)
            self.holds.scatter_(1, slots, torch.where(ok, cols, -1))
        else:  # only the picks not found, as one list of (row, column) pairs; unclaimed slots keep what they hold
            rows, j = (ok & (at < 0)).nonzero(as_tuple=True)
            self.store.read_into(session.cache, cols[rows, j], slots[rows, j], rows)
            self.holds.scatter_(1, slots, torch.where(ok, cols, self.holds.gather(1, slots)))
        self.recalled += ok.sum()
        self.reused += (at >= 0).sum()
        self.last = torch.where(ok, cols, -1)
        return cols[:, :0], ok[:, :0]

    def resident_slots(self, cols: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """(B, r) the free slot that still holds each pick's KV, -1 where none does (or the pick is not made). A
        slot holding a released column is free: had it been attended, its column would be cached, not picked."""
        found = (self.holds[:, None, :] == cols[..., None]) & ok[..., None]  # (B, r, C): O(R x C), not O(history)
        return torch.where(found.any(2), found.to(torch.int8).argmax(2), -1)


def every_column(session, seen: int) -> torch.Tensor:
    """(B, seen) the history columns seen, every row."""
    return torch.arange(seen, device=session.device).expand(session.batch_size, -1)


POLICIES = {cls.name: cls for cls in (Recompute, Survivors, Keep, Recall)}

# How a page's members' scores (B, pages, P) and which of them are released (B, pages, P) make the page's score:
# `max`, its best member, cached or released (Quest's and ArkVale's bound): a page around a token the query wants
# comes back whole, so a number half kept is completed; `mass`, the log of its released members' summed exp-scores
# (for log-share scorers the attention mass the page brings back): many wanted tokens win (docs/recall.md).
PAGE_SCORES = {
    "max": lambda members, released: members.amax(2),
    "mass": lambda members, released: members.masked_fill(~released, float("-inf")).logsumexp(2),
}
