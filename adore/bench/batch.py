"""One batch: its methods' rows and their floors decoding in turns, and each row's KL to full attention."""

from __future__ import annotations

import torch

from adore.bench.floor import start_floor
from adore.bench.prefill import SharedPrefill
from adore.bench.rows import start_method
from adore.bench.turns import decode_in_turns
from adore.engine.generate import teacher_force


def run_batch(
    model,
    methods: list,
    ids: torch.Tensor,
    new_tokens: int,
    m: int,
    chunks: list[int | None],
    synthetic: bool = False,
    cuda_graphs: bool = False,
    with_kl: bool = False,
    clock: bool = False,
) -> list[dict]:
    """The rows of `methods` on the (B, L) prompts `ids`, a floor first for each cache size they hold (m, or L
    plus half the new tokens for full attention), one row per prefill chunk size in `chunks` for bounded methods,
    all decoding in turns. `x_floor` is each row against its own floor; `with_kl` adds `kl_full`, KL(full ||
    method) on full attention's greedy tokens (full attention must come first in `methods`). `clock` adds the
    yardstick of a KV budget's runs, where each method decodes in a batch of its own: one row over m cached tokens
    decoding in turns with them, the same in every batch, so that rows of batches timed minutes apart compare
    through it (`compare_to_full`); each row records its `clock_tok_per_s`."""
    prompt_len = ids.shape[1]
    shared = SharedPrefill(model, ids, new_tokens) if not synthetic else None
    floors, decoders = {}, []  # (decoder, method, prefill chunk); floors: method None
    if clock:
        yardstick = start_floor(model, 1, m, new_tokens)
        yardstick.row["method"] = "clock"
        decoders.append((yardstick, None, None))
    for method in methods:
        cached = m if method.m is not None else prompt_len + new_tokens // 2
        if cached not in floors:
            floors[cached] = start_floor(model, ids.shape[0], cached, new_tokens)
            decoders.append((floors[cached], None, None))
        for chunk in chunks if method.m is not None else [None]:
            kwargs = dict(cuda_graphs=cuda_graphs, synthetic=synthetic, prefill_chunk=chunk, shared=shared)
            decoder = start_method(model, method, ids, new_tokens, **kwargs)
            decoder.row["floor"] = floors[cached]
            decoders.append((decoder, method, chunk))
    del shared  # the prompt-length caches of this batch's forwards
    decode_in_turns([decoder for decoder, _, _ in decoders], new_tokens, progress=True)
    rows, finished = [], {}
    full_logp = full_tokens = None
    for decoder, method, chunk in decoders:  # floors come before the rows that read them
        row, gen = decoder.finish()
        finished[id(decoder)] = row
        if method is not None:
            floor = finished[id(row["floor"])]
            row["floor"], row["x_floor"] = floor["method"], row["decode_tok_per_s"] / floor["decode_tok_per_s"]
        if with_kl and method is not None:
            if method.m is None:
                full_tokens = gen.tokens
                full_logp = forced_logp(model, method, ids, full_tokens)
            row["kl_full"] = kl(full_logp, forced_logp(model, method, ids, full_tokens, chunk))
        rows.append(row)
    if clock:
        for row in rows:
            row["clock_tok_per_s"] = rows[0]["decode_tok_per_s"]
    return rows


@torch.no_grad()
def forced_logp(model, method, ids: torch.Tensor, forced: torch.Tensor, prefill_chunk: int | None = None):
    """Teacher-force `forced` (B, N) after the prompts `ids` under `method` (prefill in one shot unless
    `prefill_chunk`): its (N, B, vocab) log-probabilities (`kl` against full attention's gives the distance)."""
    logps = []
    teacher_force(
        model,
        method,
        ids.tolist(),
        forced.tolist(),
        0,
        lambda t, logits, *_: logps.append(logits.float().log_softmax(-1)),
        prefill_chunk or ids.shape[1],
    )
    return torch.stack(logps)


def kl(full_logp: torch.Tensor, logp: torch.Tensor) -> float:
    """Mean KL(full || method) over steps and rows, in nats."""
    return float((full_logp.exp() * (full_logp - logp)).sum(-1).mean())
