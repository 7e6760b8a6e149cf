"""One batch of sequences fed through a fixed KV budget: the engine's single loop body (ADORE.md §3).

`Session.feed` takes the next tokens of every row (a decode token, a prompt, a teacher-forced token, a user
turn) and, in order: the rebuild policy brings back up to R released tokens (`adore.engine.rebuild`: recompute
runs them through the model again, recall copies their stored KV into free slots), one forward runs the new
tokens (and those to recompute) at their original positions, then the policy releases down to m slots by the
method's scores. Its halves `forward` and `settle` are apart so that one prompt forward can serve every
method that prefills alike (`adopt`, in `adore.engine.prefilled`).

A decode step under a budget is tensor work only: no `.item()`, `nonzero` or `int(tensor)` (host syncs on a
GPU). With `static_shapes` (the default on CUDA) every decode forward has one shape, R rebuild columns + the new
token (padded), so its CUDA graph is captured once; on the CPU the rebuild is cut to the rows' largest count.
The bookkeeping around the forward indexes the history with host counters (`length`): it runs eagerly.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from adore.engine.attention import PLAIN_CAUSAL, AttentionRecorder, register, slot_mask
from adore.engine.cache import SlotCache
from adore.engine.columns import grown
from adore.engine.prefilled import Prefilled
from adore.engine.rebuild import Rebuild
from adore.methods.base import Entered, Tokens
from adore.models import residual_stream


@dataclass
class Forward:
    """One forward of `Session.forward`, not yet settled: what the method is handed and what `settle` returns."""

    logits: torch.Tensor  # (B, n or 1, vocab)
    cols: torch.Tensor  # (B, n) history columns of the new tokens
    valid: torch.Tensor  # (B, n)
    ids: torch.Tensor  # (B, n)
    positions: torch.Tensor  # (B, n)
    slots: torch.Tensor  # (B, n) the new tokens' cache slots
    recorder: AttentionRecorder | None
    hidden: list  # the residual stream captured at method.input_layer, if the method needs it
    start: int  # the history column of the first new token


def capacity_for(method, length: int) -> int:
    """KV slots per row a session of `length` tokens holds: never more than it can fill, so a budget above the
    whole sequence allocates the sequence (+ what the rebuild policy brings back + the new token in flight)."""
    if method.m is None:
        return length
    return method.rebuild_policy().slots(min(method.m, length))


class Session(Prefilled):
    """Cache, history and method state for B sequences.

    History columns are shared by the batch (column j = the j-th fed token of every row; padding columns
    are invalid). Every fed token keeps its id, position and state there after it is released, so it can
    be rebuilt. `hist_slot` (-1 when released) and `slot_col` (-1 when empty) link history and cache. The
    method's state lives here (`state`); the session computes what the method `needs` (and what `record` adds,
    e.g. for a shadow pass) and hands it over as `Entered` / `Tokens` views."""

    def __init__(
        self,
        model,
        method,
        batch_size: int,
        max_len: int,
        cuda_graphs: bool = False,
        record: tuple[str, ...] = (),
        diagnose: bool = False,
        static_shapes: bool | None = None,
    ):
        config = model.config
        self.model, self.method = model, method
        self.batch_size = batch_size
        device = model.device
        self.device = device
        model.set_attn_implementation(register())
        capacity = capacity_for(method, max_len)
        self.cache = SlotCache.for_model(config, batch_size, capacity, model.dtype, device)
        self.peak_kv_bytes = self.cache.nbytes
        self.slot_col = torch.full((batch_size, capacity), -1, dtype=torch.long, device=device)
        self.slot_pos = torch.zeros(batch_size, capacity, dtype=torch.long, device=device)
        self.rebuild = method.rebuild_policy() if method.m is not None else Rebuild()  # adore.engine.rebuild
        self.hist_ids = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.hist_pos = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.hist_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        # one trailing column more: a scatter's target for entries that must write nowhere (no nonzero needed)
        self.hist_slot = torch.full((batch_size, max_len + 1), -1, dtype=torch.long, device=device)
        self.length = 0  # history columns used
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.occupied = 0  # an upper bound, known on the host, of any row's occupied slots (no sync to know it)
        self.feeds = 0  # feed calls so far (rebuild_every counts them)
        self._rebuilt_kept = torch.zeros((), dtype=torch.long, device=device)  # brought back and still cached after
        self.needs = frozenset(method.needs) | frozenset(record)
        self.diagnostic = None  # adore.engine.diagnostic: what the kept cache holds of full attention, every step
        if diagnose and method.m is not None:
            from adore.engine.diagnostic import ReleaseDiagnostic

            self.needs |= {"full_attention"}
            self.diagnostic = ReleaseDiagnostic(batch_size, method.m, device)
        rows = max(method.rows if "window_attention" in self.needs else 0, 1 if "last_attention" in self.needs else 0)
        self.recording = ("attention" in self.needs, rows) if "attention" in self.needs or rows else None
        self.shadow = None  # full attention over the same tokens, for methods that score by it
        if "full_attention" in self.needs:
            from adore.methods.full import Full

            self.shadow = Session(model, Full(), batch_size, max_len, record=("last_attention",))
        self.static_shapes = device.type == "cuda" if static_shapes is None else static_shapes
        self.graphed = None
        if cuda_graphs and device.type == "cuda" and self.recording is None and "hidden" not in self.needs:
            from adore.engine.cuda_graph import GraphedForward

            self.graphed = GraphedForward(model, self.cache)
        self.entered: Entered | None = None  # the view of the last forward
        self.state = method.start(batch_size, max_len, device, model)
        self.rebuild.start(self)

    # ---- views -------------------------------------------------------------------------------------------
    @property
    def history_bytes(self) -> int:
        """What the session holds per history column besides the KV cache: ids, positions, slots and the
        method's per-token state (the controller's z_i). Unlike the cache it grows with the context: it is what
        rebuilding any released token costs in memory."""
        tensors = [self.hist_ids, self.hist_pos, self.hist_valid, self.hist_slot, *self.state.tokens.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def store_bytes(self) -> int:
        """Memory the rebuild policy holds outside the cache (the recall store: host memory on CUDA)."""
        return self.rebuild.store_bytes

    @property
    def rebuilt(self) -> int:
        """Released tokens run through the model again so far, all rows (reading it syncs: read it after the loop)."""
        return int(self.rebuild.forwarded)

    @property
    def reused(self) -> int:
        """Rebuild picks found in the cache, attended without a forward or a copy (all rows): `keep`'s held ones,
        `recall`'s still in the free slot they were released from."""
        return int(self.rebuild.reused)

    @property
    def recalled(self) -> int:
        """Released tokens that `rebuild=recall` brought back (all rows): copied from its store, or found still in a
        free slot (`reused`)."""
        return int(self.rebuild.recalled)

    @property
    def last_rebuilt_cols(self) -> torch.Tensor | None:
        """(B, r) history columns the last feed brought back (forwarded or recalled; -1: none)."""
        return self.rebuild.last

    @property
    def rebuilt_kept(self) -> int:
        """Tokens brought back that the same step's release kept (the rest informed one step, released again)."""
        return int(self._rebuilt_kept)

    @property
    def trash(self) -> int:
        """The spare last column of `hist_slot`."""
        return self.hist_slot.shape[1] - 1

    @property
    def slot_valid(self) -> torch.Tensor:
        """(B, C) slots holding a token (held ones too)."""
        return self.slot_col >= 0

    @property
    def slot_kept(self) -> torch.Tensor:
        """(B, C) slots of the kept cache: what a step attends (besides its rebuilt and new tokens)."""
        return self.rebuild.attended(self.slot_col)

    def kept_columns(self, upto: int) -> torch.Tensor:
        """(B, upto) True where the history column's token is in the kept cache (not released, not held)."""
        return self.rebuild.kept(self, self.hist_slot[:, :upto])

    def released_columns(self, upto: int) -> torch.Tensor:
        """(B, upto) True where a fed token is not in the kept cache: what a rebuild may bring back."""
        return self.hist_valid[:, :upto] & ~self.kept_columns(upto)

    def rebuild_scores(self, cols: torch.Tensor) -> torch.Tensor:
        """The method's (B, k) rebuild-pick scores of history columns `cols` for the token being fed."""
        return self._score(cols, rebuild=True)

    def pick_scores(self, released: torch.Tensor, R: int) -> torch.Tensor:
        """The method's (B, seen) scores for a pick of R of the `released` (B, seen) columns (`Method.pick_scores`)."""
        cols = torch.arange(released.shape[1], device=self.device).expand(self.batch_size, -1)
        return self.method.pick_scores(self.state, self._tokens(cols), released, R)

    def page_scores(self, cols: torch.Tensor, page_size: int, released: torch.Tensor, reduce) -> torch.Tensor:
        """The method's (B, pages) scores of the pages of `page_size` columns among `cols` (all columns seen) for a
        pick of the `released` (B, seen) ones, each page's members reduced by `reduce` (-inf for a page with none)."""
        return self.method.page_scores(self.state, self._tokens(cols), page_size, released, reduce)

    @property
    def query_pos(self) -> torch.Tensor:
        """(B, 1) position t of each row's newest token: the query that scores are for."""
        return (self.next_pos - 1).clamp(min=0)[:, None]

    def cached_positions(self) -> list[list[int]]:
        """Positions held in the cache, per row (sorted): for tests and inspection."""
        return [sorted(self.slot_pos[b][self.slot_kept[b]].tolist()) for b in range(self.batch_size)]

    # ---- the loop body -----------------------------------------------------------------------------------
    @torch.no_grad()
    def feed(
        self, input_ids: torch.Tensor, valid: torch.Tensor | None = None, all_logits: bool = False
    ) -> torch.Tensor:
        """Feed (B, n) tokens (`valid` False marks padding); return logits (B, n or 1, vocab) for them."""
        return self.settle(self.forward(input_ids, valid, all_logits))

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, valid: torch.Tensor | None = None, all_logits: bool = False) -> Forward:
        """The first half of `feed`: record the tokens, pick the rebuild, claim slots, run the model. Nothing is
        released until `settle`, so one prompt's forward can serve several methods (`adopt`)."""
        B, n = input_ids.shape
        first = self.length == 0
        input_ids = input_ids.to(self.device)
        valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid.to(self.device).bool()
        self._grow_history(self.length + n)
        cols = torch.arange(self.length, self.length + n, device=self.device).expand(B, n)
        pos = torch.where(valid, self.next_pos[:, None] + valid.long().cumsum(1) - 1, 0)
        self.hist_ids[:, self.length : self.length + n] = input_ids
        self.hist_pos[:, self.length : self.length + n] = pos
        self.hist_valid[:, self.length : self.length + n] = valid
        self.length += n
        self.feeds += 1
        self.next_pos += valid.sum(1)
        self._query_pos = self.query_pos  # once per feed: every view of this step reads it
        self.method.arrive(self.state, Entered(cols, valid, input_ids, pos, self._query_pos))
        if self.shadow is not None:  # first, so that this step's scores see this query's full attention
            self.shadow.feed(input_ids, valid)

        rb_cols, rb_valid = self.rebuild.bring_back(self, self.length - n)  # recall: copied in, none to forward
        q_cols = torch.cat([rb_cols, cols], 1)  # rebuilt tokens first, new tokens last
        q_valid = torch.cat([rb_valid, valid], 1)
        q_ids = self.hist_ids.gather(1, q_cols)
        q_pos = torch.where(q_valid, self.hist_pos.gather(1, q_cols), 0)
        slots = self.claim_slots(q_cols, q_valid)

        recorder = AttentionRecorder(*self.recording) if self.recording else None
        if self._plain_prompt(first, valid):
            mask = PLAIN_CAUSAL  # SDPA's own causal kernel, no dense mask
        else:  # causal by position over the slots; a decode step's mask additive
            additive = self.model.dtype if n == 1 else None
            mask = slot_mask(self.slot_kept, self.slot_pos, q_pos, slots, additive)
        extra = {"attention_recorder": recorder} if recorder is not None else {}
        self.cache.write_slots = slots
        hidden = residual_stream(self.model, self.method.input_layer) if "hidden" in self.needs else nullcontext([])
        with hidden as captured:
            if self.graphed is not None and n == 1 and not all_logits:  # decode steps: fixed shapes
                logits = self.graphed(q_ids, q_pos, mask)
            else:
                logits = self.model(
                    input_ids=q_ids,
                    position_ids=q_pos,
                    attention_mask=mask,  # (B, 1, q, C), or PLAIN_CAUSAL
                    cache=self.cache,
                    use_cache=True,
                    logits_to_keep=n if all_logits else 1,
                    **extra,
                ).logits
        return Forward(logits, cols, valid, input_ids, pos, slots[:, -n:], recorder, captured, self.length - n)

    @torch.no_grad()
    def settle(self, step: Forward) -> torch.Tensor:
        """The second half of `feed`: hand the method what `step` computed, release down to m; its logits."""
        self._update_method(step.cols, step.valid, step.ids, step.positions, step.slots, step.recorder, step.hidden)
        self.rebuild.entered(self, step.start, step.slots)  # recall: the new tokens' KV to the store
        if self.method.m is not None:
            self._release(self.method.m)
            self.occupied = min(self.occupied, self.method.m + self.rebuild.held_slots)
            self._count_kept_rebuilt()
            bounded = self.rebuild.slots(self.method.m)  # m + R + 1 (+ R held)
            if self.cache.capacity > bounded:
                self._resize(bounded)
        if self.diagnostic is not None:
            T = self.length
            self.diagnostic.observe(
                self.shadow.entered.last_attention[:, :T],
                self.kept_columns(T),
                self.hist_valid[:, :T],
                self.hist_pos[:, :T],
                self._query_pos,
                step.valid[:, -1],
            )
        return step.logits

    def _plain_prompt(self, first: bool, valid: torch.Tensor) -> bool:
        """A prompt without padding into an empty cache: slot i holds token i (the lowest free slots, in order),
        so plain causal attention is the mask."""
        return first and valid.shape[1] > 1 and bool(valid.all())

    # ---- what the method sees ----------------------------------------------------------------------------
    def _score(self, cols: torch.Tensor, rebuild: bool = False) -> torch.Tensor:
        """The method's (B, k) scores of the history tokens `cols` (B, k) for the current query (`rebuild`: its
        scores for the rebuild pick)."""
        score = self.method.rebuild_score if rebuild else self.method.score
        return score(self.state, self._tokens(cols))

    def _tokens(self, cols: torch.Tensor) -> Tokens:
        history = {"ids": self.hist_ids, "positions": self.hist_pos}
        if self.shadow is not None:
            history["full_attention"] = self.shadow.entered.last_attention
        cached = lambda: torch.where(self.slot_kept, self.slot_col, -1)  # noqa: E731
        return Tokens(cols, self._query_pos, history, self.length, cached=cached)

    def _update_method(self, cols, valid, ids, pos, new_slots, recorder, hidden) -> None:
        entered = Entered(cols, valid, ids, pos, self._query_pos)
        if recorder is not None:
            if recorder.want_total:
                entered.attention = self._on_columns(recorder.total)
            if recorder.rows:
                rows = self._on_columns(recorder.last_rows)  # (B, w, T)
                entered.window_attention = rows
                entered.last_attention = rows[:, -1]
        if "keys" in self.needs:
            entered.keys = self.cache.keys[:, self.cache.rows, :, new_slots]  # (B, n, layers, kv_heads, head_dim)
        if "embeddings" in self.needs:
            entered.embeddings = self.model.get_input_embeddings()(ids)  # (B, n, d_model)
        if hidden:
            entered.hidden = hidden[0][:, -ids.shape[1] :]  # (B, n, d_model): the new tokens come last
        self.entered = entered
        self.method.update(self.state, entered)

    def _on_columns(self, per_slot: torch.Tensor) -> torch.Tensor:
        """(B, [w,] C) values of the cache slots -> (B, [w,] T) values of the history columns they hold (0 elsewhere)."""
        flat = per_slot.dim() == 2
        rows = per_slot[:, None] if flat else per_slot  # (B, w, C)
        index = self.slot_col.clamp(min=0)[:, None].expand_as(rows)
        out = rows.new_zeros(*rows.shape[:-1], self.hist_ids.shape[1], dtype=torch.float32)
        out.scatter_add_(-1, index, rows.float() * self.slot_kept[:, None])
        return out[:, 0] if flat else out

    # ---- steps of feed -----------------------------------------------------------------------------------
    def _count_kept_rebuilt(self) -> None:
        cols = self.rebuild.last
        if cols is not None and cols.shape[1]:
            cached = self.rebuild.kept(self, self.hist_slot.gather(1, torch.where(cols >= 0, cols, self.trash)))
            self._rebuilt_kept += ((cols >= 0) & cached).sum()

    def claim_slots(self, q_cols: torch.Tensor, q_valid: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:
        """(B, q) free slots for the tokens of history columns `q_cols`, lowest first (one index for all layers);
        records the links. Invalid entries claim a slot that stays empty. `at` (B, q): a free slot that already
        holds the token's KV, taken instead of a fresh one (-1: a fresh one; `recall` finds released tokens there).

        Columns within a row are distinct (rebuilt ones are released, new ones are new), so the scatters are
        race-free; padding writes to the spare column. The host bound `occupied` says when a resize might be
        needed: a decode step under a budget never asks the device.
        """
        need = q_cols.shape[1]
        self.make_room(need)
        self.occupied += need
        q_pos = torch.where(q_valid, self.hist_pos.gather(1, q_cols), 0)
        free = ~self.slot_valid
        C = free.shape[1]
        if at is not None:  # the slots named are not fresh; the other entries take the fresh ones in order
            named = torch.zeros(self.batch_size, C + 1, dtype=torch.bool, device=self.device)
            free &= ~named.scatter_(1, torch.where(at >= 0, at, C), True)[:, :C]
        slots = torch.argsort((~free).to(torch.int8), dim=1, stable=True)[:, :need]  # (B, q)
        if at is not None:
            fresh = slots.gather(1, ((at < 0).cumsum(1) - 1).clamp(min=0))
            slots = torch.where(at >= 0, at, fresh)
        self.slot_col.scatter_(1, slots, torch.where(q_valid, q_cols, -1))
        self.slot_pos.scatter_(1, slots, q_pos)
        self.hist_slot.scatter_(1, torch.where(q_valid, q_cols, self.trash), slots)
        return slots

    def make_room(self, need: int) -> None:
        """Resize the cache if `need` more tokens might not fit (slots are renumbered: ask before naming any)."""
        if self.occupied + need > self.cache.capacity:
            self.occupied = int(self.slot_valid.sum(1).max())  # exact, once: the bound may be loose
            if self.occupied + need > self.cache.capacity:
                self._resize(self.occupied + need)

    def _release(self, m: int) -> None:
        """Keep the m highest-scoring cached tokens of each row; release the rest (ADORE.md §3.3), as the rebuild
        policy decides (`keep` holds some of the released in the cache)."""
        if self.occupied <= m:  # the host bound: nothing to release, no scores needed
            self.rebuild.release_nothing()
            return
        valid = self.slot_valid
        scores = self._score(self.slot_col.clamp(min=0)).masked_fill(~valid, float("-inf"))
        drop = valid & ~self.rebuild.release(self, scores, valid, m)
        self.hist_slot.scatter_(1, torch.where(drop, self.slot_col, self.trash), -1)
        self.slot_col.masked_fill_(drop, -1)

    def _resize(self, capacity: int) -> None:
        """Move the cached tokens (in slot order) into a cache of `capacity` slots: one gather, all layers."""
        order = torch.argsort((~self.slot_valid).to(torch.int8), dim=1, stable=True)[:, :capacity]
        if capacity > order.shape[1]:
            pad = torch.full((self.batch_size, capacity - order.shape[1]), -1, dtype=torch.long, device=self.device)
            order = torch.cat([order, pad], 1)
        taken = order >= 0
        src = order.clamp(min=0)
        self.cache.select(torch.where(taken, order, -1))
        self.slot_col = torch.where(taken, self.slot_col.gather(1, src), -1)
        self.slot_pos = torch.where(taken, self.slot_pos.gather(1, src), 0)
        self.rebuild.moved(src, taken)
        self.hist_slot.fill_(-1)
        slots = torch.arange(capacity, device=self.device).expand(self.batch_size, -1)
        self.hist_slot.scatter_(1, torch.where(self.slot_col >= 0, self.slot_col, self.trash), slots)
        self.peak_kv_bytes = max(self.peak_kv_bytes, self.cache.nbytes)

    def _grow_history(self, length: int) -> None:
        size = self.hist_ids.shape[1]
        if length <= size:
            return
        extra = max(length, 2 * size) - size
        self.hist_slot[:, size] = -1  # the spare column becomes a history column; a new spare comes last
        pad = lambda t, v: torch.cat([t, torch.full((self.batch_size, extra), v, dtype=t.dtype, device=self.device)], 1)  # noqa: E731
        self.hist_ids, self.hist_pos = pad(self.hist_ids, 0), pad(self.hist_pos, 0)
        self.hist_valid, self.hist_slot = pad(self.hist_valid, False), pad(self.hist_slot, -1)  # the spare moves last
        for key, t in self.state.tokens.items():  # the method's per-token state grows alike, with zeros
            self.state.tokens[key] = grown(t, extra)
        self.rebuild.grow(size + extra)
