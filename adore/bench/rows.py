"""A method's row: its session prefilled (its own forward, a shared one, or assumed), then its greedy decode."""

from __future__ import annotations

import torch

from adore.bench.prefill import SharedPrefill
from adore.bench.turns import Decoder, decode_in_turns
from adore.engine.generate import Generation, decode_steps, timed_prefill
from adore.engine.session import Session


def start_method(
    model,
    method,
    ids: torch.Tensor,
    new_tokens: int,
    cuda_graphs: bool = False,
    synthetic: bool = False,
    prefill_chunk: int | None = None,
    shared: SharedPrefill | None = None,
) -> Decoder:
    """Prefill (B, L) `ids` under `method` (`synthetic`: assume it, `Session.assume_prefilled`; `prefill_chunk`: in
    chunks, releasing between them; `shared`: settle a forward shared with the methods that prefill alike), and
    return its greedy decode of `new_tokens` per row, not yet run."""
    B, L = ids.shape
    session = Session(model, method, B, L + new_tokens, cuda_graphs=cuda_graphs)
    shared_with = None
    if synthetic:
        logits, prefill_s = session.assume_prefilled(ids), None
    elif shared is not None and not prefill_chunk and session.prefill_signature is not None:
        logits, prefill_s, shared_with = shared.prefill(session)
    else:
        chunk = prefill_chunk or L  # None: one shot
        logits, prefill_s = timed_prefill(session, ids, torch.ones_like(ids, dtype=torch.bool), chunk)
    row = {
        "method": method.tag + (f"_chunk{prefill_chunk}" if prefill_chunk else ""),
        "batch": B,
        "prefill_s": prefill_s,
        "prefill_shared_with": shared_with,
        "kv_bytes_decode": session.cache.nbytes,  # after prefill's release: what decode holds
    }
    steps = decode_steps(session, logits, new_tokens, [], 0)
    return Decoder(row, steps, B, new_tokens, session.device, session)


def run_method(model, method, ids: torch.Tensor, new_tokens: int, **kwargs) -> tuple[dict, Generation]:
    """`start_method` (its keyword arguments), decoded alone: the row and the output."""
    decoder = start_method(model, method, ids, new_tokens, **kwargs)
    decode_in_turns([decoder], new_tokens)
    return decoder.finish()
