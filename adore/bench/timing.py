"""Clocks: a call timed with CUDA synchronised around it, the row of timed steps, and transformers' own `generate`
timed step by step inside one call."""

from __future__ import annotations

import statistics
import time

import torch
from transformers import LogitsProcessor

from adore.engine.generate import synchronize


def timed(device, fn, *args):
    """`fn(*args)` and its seconds, CUDA synchronised before and after: unsynchronised, the clock times launches."""
    synchronize(device)
    start = time.perf_counter()
    out = fn(*args)
    synchronize(device)
    return out, time.perf_counter() - start


def step_times(latencies: list[float], batch: int) -> dict:
    """Decode time, tokens/s and per-step latency (mean, p50, p90) of timed steps of `batch` rows."""
    decode_s = sum(latencies)
    return {
        "decode_s": decode_s,
        "decode_tok_per_s": batch * len(latencies) / decode_s,
        "latency_ms_mean": 1000 * decode_s / len(latencies),
        "latency_ms_p50": 1000 * statistics.median(latencies),
        "latency_ms_p90": 1000 * sorted(latencies)[int(0.9 * (len(latencies) - 1))],
    }


class StepClock(LogitsProcessor):
    """Stamps the time each time `generate` asks for the next token's scores, once per step, right after that
    step's forward: the first stamp ends prefill, the gaps between stamps are the decode steps."""

    def __init__(self, device):
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores):
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return scores


@torch.no_grad()
def hf_generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, list[float]]:
    """transformers' own greedy `generate` of exactly `new_tokens` per row, full attention over its own cache and
    SDPA: its prefill seconds and the seconds of each decode step (`StepClock`). The steps are timed inside one
    call: generate(N) - generate(1) would carry two prefills' noise, more than a short decode."""
    kwargs = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0, eos_token_id=None)
    clock = StepClock(model.device)
    engine = model.config._attn_implementation
    model.set_attn_implementation("sdpa")  # transformers' attention, not the engine's registered one
    try:
        synchronize(model.device)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, logits_processor=[clock], **kwargs)
    finally:
        model.set_attn_implementation(engine)
    stamps = clock.stamps
    return stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:])]


def run_hf_generate(model, ids: torch.Tensor, new_tokens: int) -> dict:
    """The `hf_generate_full` row (`--hf-generate`)."""
    prefill_s, latencies = hf_generate(model, ids, new_tokens)
    return {
        "method": "hf_generate_full",
        "batch": ids.shape[0],
        "prefill_s": prefill_s,
        **step_times(latencies[1:] if len(latencies) > 1 else latencies, ids.shape[0]),  # as every row: not the first
        "kv_bytes_decode": None,
        "kv_bytes_peak": None,
        "rebuilt_tokens": 0,
        "rebuilt_per_step": 0.0,
        "rebuilt_kept": None,
    }
