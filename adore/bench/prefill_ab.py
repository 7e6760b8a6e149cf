"""Prefill alone, timed in turns with transformers': the fair prefill comparison (`--prefill-ab N`)."""

from __future__ import annotations

import statistics

import torch

from adore.bench.timing import hf_generate
from adore.engine.generate import timed_prefill
from adore.engine.session import Session


@torch.no_grad()
def prefill_ab(model, methods, ids: torch.Tensor, new_tokens: int, repeats: int) -> list[dict]:
    """Prefill alone, timed in turns: transformers' (`generate` of one token, as `--hf-generate` times it) and
    the first method of each prefill signature (a fresh session, one-shot prefill), `repeats` rounds, each
    round in a rotated order. Drift of the machine (heat, neighbours) then spreads over every contender, and
    medians compare fairly, where one prefill per method, timed once in its row, swings from run to run. One row
    per contender: its times, their median, and that against transformers' and against full attention's."""
    B, L = ids.shape
    valid = torch.ones_like(ids, dtype=torch.bool)
    contenders, seen = {"hf_generate_full": None}, set()
    for method in methods:
        signature = Session(model, method, B, L + new_tokens).prefill_signature or method.tag  # None: its own
        if signature not in seen:
            seen.add(signature)
            contenders[method.tag] = method
    times = {tag: [] for tag in contenders}
    tags = list(contenders)
    for round_ in range(repeats):
        for tag in tags[round_ % len(tags) :] + tags[: round_ % len(tags)]:
            method = contenders[tag]
            if method is None:
                times[tag].append(hf_generate(model, ids, 1)[0])
            else:
                session = Session(model, method, B, L + new_tokens)
                times[tag].append(timed_prefill(session, ids, valid, L)[1])
                del session
    medians = {tag: statistics.median(t) for tag, t in times.items()}
    full = next((m.tag for m in contenders.values() if m is not None and m.m is None), None)
    return [
        {
            "contender": tag,
            "batch": B,
            "times_s": times[tag],
            "median_s": medians[tag],
            "x_hf": medians[tag] / medians["hf_generate_full"],
            "x_full": medians[tag] / medians[full] if full else None,
        }
        for tag in tags
    ]
