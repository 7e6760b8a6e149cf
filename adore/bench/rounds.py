"""Rounds: the same batch measured N times over, each row reported at its median with the spread of its ratio.

On a shared CPU a row's ratio to its floor moves by 0.03-0.05 from one run to the next, even in turns
(docs/throughput.md), which is wider than most levers; a target such as 0.9x its floor is read from the median of
several rounds and the range they span, not from one run."""

from __future__ import annotations

import statistics

# the fields a round times; the others (memory, counts, KL) are the same in every round and taken from the first
TIMED = (
    "prefill_s",
    "decode_s",
    "decode_tok_per_s",
    "latency_ms_mean",
    "latency_ms_p50",
    "latency_ms_p90",
    "x_floor",
    "clock_tok_per_s",
)


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """The rows of N rounds of one batch (the same rows in the same order each round) as one row each: the timed
    fields at their medians over the rounds, `x_floor_rounds` every round's ratio to its floor, `rounds` N."""
    if len(rounds) == 1:
        return rounds[0]
    merged = []
    for same in zip(*rounds, strict=True):
        row = dict(same[0], rounds=len(same))
        for key in TIMED:
            values = [r[key] for r in same if r.get(key) is not None]
            if values:
                row[key] = statistics.median(values)
        if row.get("x_floor") is not None:
            row["x_floor_rounds"] = [r["x_floor"] for r in same]
        merged.append(row)
    return merged


def spread(row: dict) -> str | None:
    """'lowest-highest' of a row's ratios to its floor over the rounds, None for one round or a floor."""
    ratios = row.get("x_floor_rounds")
    return f"{min(ratios):.3f}-{max(ratios):.3f}" if ratios else None
