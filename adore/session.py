"""One batch of sequences fed through a fixed KV budget: the engine's single loop body (ADORE.md §3).

`Session.feed` takes the next tokens of every row (one decode token, a prompt, a teacher-forced token, a
user turn of a stream) and does, in order: pick up to R released tokens to rebuild (highest scores), run
them together with the new tokens in one forward pass at their original positions (causal by position),
then release down to m slots by the method's scores. Generation, perplexity and streaming all call it.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from adore.attention import AttentionRecorder, register
from adore.cache import SlotCache
from adore.methods.base import Entered, Tokens
from adore.models import residual_stream


class Session:
    """Cache, history and method state for B sequences.

    History columns are shared by the batch (column j = the j-th fed token of every row; padding columns
    are invalid). Every fed token keeps its id, position and state there after it is released, so it can
    be rebuilt. `hist_slot` (-1 when released) and `slot_col` (-1 when empty) link history and cache.

    The method's per-session state lives here (`state`); the session computes what the method `needs` (and
    what `record` adds, e.g. for a shadow pass) and hands it over as `Entered` / `Tokens` views.
    """

    def __init__(
        self,
        model,
        method,
        batch_size: int,
        max_len: int,
        cuda_graphs: bool = False,
        record: tuple[str, ...] = (),
        diagnose: bool = False,
    ):
        config = model.config
        self.model, self.method = model, method
        self.batch_size = batch_size
        device = model.device
        self.device = device
        model.set_attn_implementation(register())
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # never more slots than the session can fill: a budget above the whole sequence allocates the sequence
        capacity = max_len if method.m is None else min(method.m, max_len) + method.R + 1
        self.cache = SlotCache(
            config.num_hidden_layers, batch_size, config.num_key_value_heads, head_dim, capacity, model.dtype, device
        )
        self.peak_kv_bytes = self.cache.nbytes
        self.slot_col = torch.full((batch_size, capacity), -1, dtype=torch.long, device=device)
        self.slot_pos = torch.zeros(batch_size, capacity, dtype=torch.long, device=device)
        self.hist_ids = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.hist_pos = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.hist_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.hist_slot = torch.full((batch_size, max_len), -1, dtype=torch.long, device=device)
        self.length = 0  # history columns used
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.rebuilt = 0  # tokens rebuilt so far (all rows)
        self.last_rebuilt_cols: torch.Tensor | None = None  # (B, r) history columns rebuilt by the last feed
        self.needs = frozenset(method.needs) | frozenset(record)
        self.diagnostic = None  # adore.diagnostic: what the kept cache holds of full attention, every step
        if diagnose and method.m is not None:
            from adore.diagnostic import ReleaseDiagnostic

            self.needs |= {"full_attention"}
            self.diagnostic = ReleaseDiagnostic(batch_size, method.m, device)
        rows = max(method.rows if "window_attention" in self.needs else 0, 1 if "last_attention" in self.needs else 0)
        self.recording = ("attention" in self.needs, rows) if "attention" in self.needs or rows else None
        self.shadow = None  # full attention over the same tokens, for methods that score by it
        if "full_attention" in self.needs:
            from adore.methods.full import Full

            self.shadow = Session(model, Full(), batch_size, max_len, record=("last_attention",))
        self.graphed = None
        if cuda_graphs and device.type == "cuda" and self.recording is None and "hidden" not in self.needs:
            from adore.cuda_graph import GraphedForward

            self.graphed = GraphedForward(model, self.cache)
        self.entered: Entered | None = None  # the view of the last forward
        self.state = method.start(batch_size, max_len, device, model)

    # ---- views -------------------------------------------------------------------------------------------
    @property
    def slot_valid(self) -> torch.Tensor:
        return self.slot_col >= 0  # (B, C)

    @property
    def query_pos(self) -> torch.Tensor:
        """(B, 1) position t of each row's newest token: the query that scores are for."""
        return (self.next_pos - 1).clamp(min=0)[:, None]

    def cached_positions(self) -> list[list[int]]:
        """Positions held in the cache, per row (sorted): for tests and inspection."""
        return [sorted(self.slot_pos[b][self.slot_valid[b]].tolist()) for b in range(self.batch_size)]

    # ---- the loop body -----------------------------------------------------------------------------------
    @torch.no_grad()
    def feed(
        self, input_ids: torch.Tensor, valid: torch.Tensor | None = None, all_logits: bool = False
    ) -> torch.Tensor:
        """Feed (B, n) tokens (`valid` False marks padding); return logits (B, n or 1, vocab) for them."""
        B, n = input_ids.shape
        input_ids = input_ids.to(self.device)
        valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid.to(self.device).bool()
        self._grow_history(self.length + n)
        cols = torch.arange(self.length, self.length + n, device=self.device).expand(B, n)
        pos = torch.where(valid, self.next_pos[:, None] + valid.long().cumsum(1) - 1, 0)
        self.hist_ids[:, self.length : self.length + n] = input_ids
        self.hist_pos[:, self.length : self.length + n] = pos
        self.hist_valid[:, self.length : self.length + n] = valid
        self.length += n
        self.next_pos += valid.sum(1)
        self._query_pos = self.query_pos  # once per feed: every view of this step reads it
        if self.shadow is not None:  # first, so that this step's scores see this query's full attention
            self.shadow.feed(input_ids, valid)

        rb_cols, rb_valid = self._pick_rebuild(self.length - n)
        q_cols = torch.cat([rb_cols, cols], 1)  # rebuilt tokens first, new tokens last
        q_valid = torch.cat([rb_valid, valid], 1)
        q_ids = self.hist_ids.gather(1, q_cols)
        q_pos = torch.where(q_valid, self.hist_pos.gather(1, q_cols), 0)
        slots = self._claim_slots(q_cols, q_valid, q_pos)

        # causal by position over the slots; padding queries see only their own slot (no empty softmax rows)
        own = torch.zeros(B, q_cols.shape[1], self.cache.capacity, dtype=torch.bool, device=self.device)
        own.scatter_(2, slots[..., None], True)
        mask = (self.slot_valid[:, None, :] & (self.slot_pos[:, None, :] <= q_pos[:, :, None])) | own
        recorder = AttentionRecorder(*self.recording) if self.recording else None
        extra = {"attention_recorder": recorder} if recorder is not None else {}
        self.cache.write_slots = slots
        hidden = residual_stream(self.model, self.method.input_layer) if "hidden" in self.needs else nullcontext([])
        with hidden as captured:
            if self.graphed is not None and n == 1 and not all_logits:  # decode steps: fixed shapes
                logits = self.graphed(q_ids, q_pos, mask[:, None])
            else:
                logits = self.model(
                    input_ids=q_ids,
                    position_ids=q_pos,
                    attention_mask=mask[:, None],  # (B, 1, q, C)
                    cache=self.cache,
                    use_cache=True,
                    logits_to_keep=n if all_logits else 1,
                    **extra,
                ).logits
        self._update_method(cols, valid, input_ids, pos, slots[:, -n:], recorder, captured)
        if self.method.m is not None:
            self._release(self.method.m)
            if self.cache.capacity > self.method.m + self.method.R + 1:
                self._resize(self.method.m + self.method.R + 1)
        if self.diagnostic is not None:
            T = self.length
            self.diagnostic.observe(
                self.shadow.entered.last_attention[:, :T],
                self.hist_slot[:, :T] >= 0,
                self.hist_valid[:, :T],
                self.hist_pos[:, :T],
                self._query_pos,
                valid[:, -1],
            )
        return logits

    # ---- what the method sees ----------------------------------------------------------------------------
    def _score(self, cols: torch.Tensor) -> torch.Tensor:
        """The method's (B, k) scores of the history tokens `cols` (B, k) for the current query."""
        history = {"ids": self.hist_ids, "positions": self.hist_pos}
        if self.shadow is not None:
            history["full_attention"] = self.shadow.entered.last_attention
        return self.method.score(self.state, Tokens(cols, self._query_pos, history))

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
        out.scatter_add_(-1, index, rows.float() * self.slot_valid[:, None])
        return out[:, 0] if flat else out

    # ---- steps of feed -----------------------------------------------------------------------------------
    def _pick_rebuild(self, seen: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-R released tokens among the first `seen` columns, by score (ADORE.md §3.2); (B, r), r <= R."""
        R = self.method.R if self.method.m is not None else 0
        empty = torch.zeros(self.batch_size, 0, dtype=torch.long, device=self.device)
        self.last_rebuilt_cols = empty
        if R == 0:
            return empty, empty.bool()
        released = self.hist_valid[:, :seen] & (self.hist_slot[:, :seen] < 0)
        if not released.any():
            return empty, empty.bool()
        cols = torch.arange(seen, device=self.device).expand(self.batch_size, -1)
        scores = self._score(cols).masked_fill(~released, float("-inf"))
        top = scores.topk(min(R, seen), dim=1)
        ok = torch.isfinite(top.values)
        self.last_rebuilt_cols = torch.where(ok, top.indices, -1)
        self.rebuilt += int(ok.sum())
        return top.indices, ok

    def _claim_slots(self, q_cols, q_valid, q_pos) -> torch.Tensor:
        """Free slots for the q tokens, lowest first (one index for all layers); records the links."""
        need = q_cols.shape[1]
        free = ~self.slot_valid
        if int(free.sum(1).min()) < need:
            self._resize(int(self.slot_valid.sum(1).max()) + need)
            free = ~self.slot_valid
        slots = torch.argsort((~free).to(torch.int8), dim=1, stable=True)[:, :need]  # (B, q)
        self.slot_col.scatter_(1, slots, torch.where(q_valid, q_cols, -1))
        self.slot_pos.scatter_(1, slots, q_pos)
        rows, j = q_valid.nonzero(as_tuple=True)
        self.hist_slot[rows, q_cols[rows, j]] = slots[rows, j]
        return slots

    def _release(self, m: int) -> None:
        """Keep the m highest-scoring cached tokens of each row; release the rest (ADORE.md §3.3)."""
        valid = self.slot_valid
        if int(valid.sum(1).max()) <= m:
            return
        scores = self._score(self.slot_col.clamp(min=0)).masked_fill(~valid, float("-inf"))
        keep = torch.zeros_like(valid).scatter_(1, scores.topk(m, dim=1).indices, True)
        drop = valid & ~keep
        rows, slots = drop.nonzero(as_tuple=True)
        self.hist_slot[rows, self.slot_col[rows, slots]] = -1
        self.slot_col[rows, slots] = -1

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
        self.hist_slot.fill_(-1)
        rows, slots = self.slot_valid.nonzero(as_tuple=True)
        self.hist_slot[rows, self.slot_col[rows, slots]] = slots
        self.peak_kv_bytes = max(self.peak_kv_bytes, self.cache.nbytes)

    def _grow_history(self, length: int) -> None:
        size = self.hist_ids.shape[1]
        if length <= size:
            return
        extra = max(length, 2 * size) - size
        pad = lambda t, v: torch.cat([t, torch.full((self.batch_size, extra), v, dtype=t.dtype, device=self.device)], 1)  # noqa: E731
        self.hist_ids, self.hist_pos = pad(self.hist_ids, 0), pad(self.hist_pos, 0)
        self.hist_valid, self.hist_slot = pad(self.hist_valid, False), pad(self.hist_slot, -1)
        for key, t in self.state.tokens.items():  # the method's per-token state grows alike, with zeros
            self.state.tokens[key] = torch.cat([t, t.new_zeros(t.shape[0], extra, *t.shape[2:])], 1)
