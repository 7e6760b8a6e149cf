"""Decoding in turns: the rows of a batch (their floors included) step one at a time, the order rotated every
step, so that a row's ratio to its floor compares steps timed moments apart and the machine's drift spreads over
every row alike."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from adore.bench.timing import step_times, timed
from adore.engine.generate import Generation
from adore.engine.session import Session


class Decoder:
    """One row of the table, decoding step by step, so that the rows of a batch can decode in turns
    (`decode_in_turns`). `steps` yields ((B,) tokens, (B,) still going) per step, as `decode_steps` does: its
    first item comes from prefill, every later one feeds the previous token first (the step that is timed)."""

    def __init__(self, row: dict, steps, batch: int, new_tokens: int, device, session: Session | None = None):
        self.row, self.steps, self.session, self.device = row, steps, session, device
        self.tokens = torch.zeros(batch, new_tokens, dtype=torch.long, device=device)
        self.step_s: list[float] = []  # one per fed token
        self.taken = 0
        if session is not None:
            self.before = session.rebuilt, session.rebuilt_kept, session.reused, session.recalled

    def advance(self) -> None:
        """One step (feed + pick), synchronised and timed unless it is the first (nothing is fed there)."""
        (token, _), seconds = timed(self.device, next, self.steps)
        if self.taken:
            self.step_s.append(seconds)
        self.tokens[:, self.taken] = token
        self.taken += 1

    def finish(self) -> tuple[dict, Generation]:
        """The row, complete: decode speed over the timed steps (the first fed step, which captures a CUDA graph
        of this session's cache, is not counted), rebuild counts, memory; and the greedy tokens."""
        latencies = self.step_s[1:] if len(self.step_s) > 1 else self.step_s
        row = self.row | step_times(latencies, self.tokens.shape[0])
        session = self.session
        if session is not None:
            rebuilt, kept, reused, recalled = (
                now - before
                for now, before in zip(
                    (session.rebuilt, session.rebuilt_kept, session.reused, session.recalled), self.before, strict=True
                )
            )
            B, fed = self.tokens.shape[0], len(self.step_s)
            per_step = lambda n: n / (B * fed) if fed else 0.0  # noqa: E731  every decode feed, the untimed one too
            row |= {
                "kv_bytes_peak": session.peak_kv_bytes,
                "store_bytes": session.store_bytes,  # recall's store: host memory on CUDA, the same RAM on a CPU
                "history_bytes": session.history_bytes,
                "rebuilt_tokens": session.rebuilt,
                "rebuilt_per_step": per_step(rebuilt),
                "rebuilt_kept": kept / (rebuilt + recalled) if rebuilt + recalled else None,
                "reused_per_step": per_step(reused),  # keep: picks found held
                "recalled_per_step": per_step(recalled),  # recall: copied back from the store
            }
        lengths = torch.full((self.tokens.shape[0],), self.taken, dtype=torch.long)
        return row, Generation(self.tokens[:, : self.taken], lengths, {"step_s": self.step_s})


@torch.no_grad()
def decode_in_turns(decoders: list[Decoder], new_tokens: int, progress: bool = False) -> None:
    """Every decoder's `new_tokens` steps, one step of each in turn, the order rotated every step: a row's
    ratio to its floor then compares steps timed within milliseconds of each other, and the machine's drift
    (heat, neighbours) spreads over every row alike."""
    for decoder in decoders:
        decoder.advance()  # the first token, from prefill
    for step in tqdm(range(1, new_tokens), desc="decode in turns", disable=not progress, leave=False):
        k = step % len(decoders)
        for decoder in decoders[k:] + decoders[:k]:
            decoder.advance()
