"""Batched generation under a method's budget: prefill, then one `Session.feed` per new token."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from adore.session import Session


@dataclass
class Sampling:
    """Greedy by default; `do_sample` draws with temperature / top-k / top-p from a seeded generator."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"sampling.temperature={self.temperature} must be > 0 (use do_sample=false for greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p={self.top_p} must be in (0, 1]")

    def pick(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Next token per row from (B, vocab) logits."""
        if not self.do_sample:
            return logits.argmax(-1)
        logits = logits.float() / self.temperature
        if self.top_k > 0:
            kth = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) > self.top_p  # keep the smallest prefix reaching top_p
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@dataclass
class Generation:
    tokens: torch.Tensor  # (B, steps) generated ids, pad after a row's end
    lengths: torch.Tensor  # (B,) generated tokens per row (eos included)
    stats: dict = field(default_factory=dict)


def synchronize(device) -> None:
    """Wait for queued GPU work before reading a clock (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(
    model,
    method,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int,
    sampling: Sampling | None = None,
    prefill_chunk: int | None = None,
    progress: bool = False,
    cuda_graphs: bool = False,
) -> Generation:
    """Decode B left-padded prompts. Prefill is timed apart from decode (ADORE's gains are in decode)."""
    sampling = sampling or Sampling()
    B, L = input_ids.shape
    device = model.device
    generator = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.do_sample else None
    session = Session(model, method, B, L + max_new_tokens, cuda_graphs=cuda_graphs)
    valid = attention_mask.bool().to(device)
    input_ids = input_ids.to(device)
    eos = torch.tensor(eos_token_ids, device=device)

    synchronize(device)
    start = time.perf_counter()
    chunk = prefill_chunk or L
    for s in range(0, L, chunk):
        logits = session.feed(input_ids[:, s : s + chunk], valid[:, s : s + chunk])
    synchronize(device)
    prefill_s = time.perf_counter() - start

    tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    start = time.perf_counter()
    steps = 0
    for step in tqdm(range(max_new_tokens), desc=f"decode {method.tag}", disable=not progress, leave=False):
        nxt = torch.where(done, pad_token_id, sampling.pick(logits[:, -1], generator))
        tokens[:, step] = nxt
        lengths += ~done
        done |= torch.isin(nxt, eos)
        steps = step + 1
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = session.feed(nxt[:, None], ~done[:, None])
    synchronize(device)
    decode_s = time.perf_counter() - start
    generated = int(lengths.sum())
    stats = {
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "decode_steps": steps,
        "prompt_tokens": int(valid.sum()),
        "generated_tokens": generated,
        "decode_tokens": generated - int((lengths > 0).sum()),  # the first token of a row comes from prefill
        "rebuilt_tokens": session.rebuilt,
        "peak_kv_bytes": session.peak_kv_bytes,
    }
    return Generation(tokens[:, :steps], lengths, stats)
