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
    suppress_token_ids: list[int] | None = None,
) -> Generation:
    """Decode B left-padded prompts. Prefill is timed apart from decode (ADORE's gains are in decode)."""
    B, L = input_ids.shape
    session = Session(model, method, B, L + max_new_tokens, cuda_graphs=cuda_graphs)
    valid = attention_mask.bool()
    synchronize(session.device)
    start = time.perf_counter()
    logits = prefill(session, input_ids, valid, prefill_chunk)
    synchronize(session.device)
    prefill_s = time.perf_counter() - start
    gen = decode(session, logits, max_new_tokens, eos_token_ids, pad_token_id, sampling, progress, suppress_token_ids)
    gen.stats.update(prefill_s=prefill_s, prompt_tokens=int(valid.sum()), peak_kv_bytes=session.peak_kv_bytes)
    return gen


def prefill(session: Session, input_ids: torch.Tensor, valid: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Feed (B, L) tokens in chunks of `chunk` (None: at once), releasing to m between chunks; last logits."""
    L = input_ids.shape[1]
    chunk = chunk or max(L, 1)
    logits = None
    for s in range(0, L, chunk):
        logits = session.feed(input_ids[:, s : s + chunk], valid[:, s : s + chunk])
    return logits


def teacher_force(session: Session, logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor):
    """Yield (t, (B, vocab) logits predicting ids[:, t]) for every column t of right-padded (B, T) `ids`.

    ids[:, t-1] is fed before step t, one `feed` per token, so the method releases between any two
    predictions; `logits` are the last feed's (the context's). Perplexity and fidelity both read this.
    """
    for t in range(ids.shape[1]):
        if t > 0:
            logits = session.feed(ids[:, t - 1 : t], valid[:, t - 1 : t])
        yield t, logits[:, -1]


@torch.no_grad()
def decode(
    session: Session,
    logits: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int,
    sampling: Sampling | None = None,
    progress: bool = False,
    suppress_token_ids: list[int] | None = None,
    active: torch.Tensor | None = None,
) -> Generation:
    """Generate up to `max_new_tokens` per row from the logits of the last feed, one `feed` per token.

    The last token of a row (its eos, or the last of the budget) is not fed, as in `generate`: a stream
    that goes on feeds it with its next turn. Rows with `active` False generate nothing.
    """
    sampling = sampling or Sampling()
    device, B = session.device, session.batch_size
    generator = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.do_sample else None
    eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device)
    suppress = torch.tensor(suppress_token_ids or [], dtype=torch.long, device=device)
    tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device) if active is None else ~active.to(device).bool()
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    rebuilt_before = session.rebuilt
    synchronize(device)
    start = time.perf_counter()
    steps = 0
    for step in tqdm(range(max_new_tokens), desc=f"decode {session.method.tag}", disable=not progress, leave=False):
        if bool(done.all()):
            break
        last = logits[:, -1]
        if len(suppress):
            last = last.index_fill(-1, suppress, float("-inf"))
        nxt = torch.where(done, pad_token_id, sampling.pick(last, generator))
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
        "decode_s": decode_s,
        "decode_steps": steps,
        "generated_tokens": generated,
        "decode_tokens": generated - int((lengths > 0).sum()),  # the first token of a row comes from the last feed
        "rebuilt_tokens": session.rebuilt - rebuilt_before,
        "peak_kv_bytes": session.peak_kv_bytes,
    }
    return Generation(tokens[:, :steps], lengths, stats)
