"""The engine's loops over `Session.feed`: batched generation (prefill, then one feed per new token) and
teacher forcing (prefill, then one feed per given token), with the padding and timing helpers they share."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from adore.checks import check_positive
from adore.engine.session import Session


@dataclass
class Sampling:
    """Greedy by default; `do_sample` draws with temperature / top-k / top-p from a seeded generator."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        check_positive("sampling.temperature", self.temperature, fix=" (use do_sample=false for greedy)")
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


def left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, width) ids and 0/1 mask, padding on the left so every row's last token is its newest."""
    width = max(len(x) for x in batch)
    ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in batch], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], dtype=torch.long)
    return ids, mask


def right_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, width) ids and bool validity, padding on the right (for tokens fed after a common start)."""
    width = max([len(x) for x in batch] + [0])
    ids = torch.tensor([x + [pad_id] * (width - len(x)) for x in batch], dtype=torch.long).reshape(len(batch), width)
    valid = torch.tensor([[True] * len(x) + [False] * (width - len(x)) for x in batch], dtype=torch.bool).reshape(
        len(batch), width
    )
    return ids, valid


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
    logits, prefill_s = timed_prefill(session, input_ids, valid, prefill_chunk)
    steps = decode_steps(session, logits, max_new_tokens, eos_token_ids, pad_token_id, sampling, suppress_token_ids)
    gen = decode(session, steps, max_new_tokens, pad_token_id, progress)
    gen.stats.update(prefill_s=prefill_s, prompt_tokens=int(valid.sum()), peak_kv_bytes=session.peak_kv_bytes,
                     store_bytes=session.store_bytes)  # fmt: skip
    return gen


AUTO_CHUNK_ABOVE = (16, 2048)  # chunked prefill by default for prompts longer than 16 m and 2,048 tokens
AUTO_CHUNK = 4  # ... in chunks of 4 m


def prefill_chunk_for(m: int | None, length: int, chunk: int | None = None) -> int:
    """The chunk a prompt of `length` tokens is fed in: `chunk` when given; else the whole prompt, unless a
    bounded method's prompt exceeds m by a wide margin (16 m, and 2,048 tokens: below that the prompt's KV is
    small), which is fed in chunks of 4 m so that prefill holds 5 m + R + 1 slots instead of the prompt."""
    if chunk:
        return chunk
    factor, floor = AUTO_CHUNK_ABOVE
    if m is not None and length > max(factor * m, floor):
        return AUTO_CHUNK * m
    return max(length, 1)


def prefill(session: Session, input_ids: torch.Tensor, valid: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Feed (B, L) tokens in chunks (`prefill_chunk_for`), releasing to m between chunks; last logits.

    Tokens that arrive over history already released (a later chunk, a later turn) end with their last few
    (`Rebuild.fed_alone`, `method.tail_alone`) fed one at a time when the method rebuilds, so that the question's
    tokens and the answer's first word pick their rebuilds by their own queries."""
    L = input_ids.shape[1]
    chunk = prefill_chunk_for(session.method.m, L, chunk)
    stop = L - session.rebuild.fed_alone(L, over_released=session.length > 0 or chunk < L)
    logits = None
    for s in range(0, stop, chunk):
        logits = session.feed(input_ids[:, s : min(s + chunk, stop)], valid[:, s : min(s + chunk, stop)])
    for s in range(stop, L):
        logits = session.feed(input_ids[:, s : s + 1], valid[:, s : s + 1])
    return logits


def timed_prefill(session: Session, input_ids: torch.Tensor, valid: torch.Tensor, chunk: int | None = None):
    """`prefill`, and the seconds it took (the device synchronised before both clock reads)."""
    synchronize(session.device)
    start = time.perf_counter()
    logits = prefill(session, input_ids, valid, chunk)
    synchronize(session.device)
    return logits, time.perf_counter() - start


@torch.no_grad()
def teacher_force(
    model,
    method,
    contexts: list[list[int]],
    targets: list[list[int]],
    pad_id: int,
    step,
    prefill_chunk: int | None = None,
    diagnose: bool = False,
) -> dict:
    """Prefill each row's context, then feed its targets one `feed` per token under `method`'s budget.

    Contexts are left-padded (every row's last context token is its newest), targets right-padded: a row
    whose targets have ended feeds padding (valid False) until the longest ends. Before feeding column t,
    `step(t, logits, ids, valid)` gets the (B, vocab) logits predicting ids[:, t], with the (B, T) target
    ids and validity on the session's device, so the method releases between any two predictions.
    Perplexity and fidelity both read this. Returns the stats of `generate` (decode = the targets), and with
    `diagnose` the release diagnostic of each row (`adore.engine.diagnostic`) under "diagnostic".
    """
    ctx_ids, ctx_mask = left_pad(contexts, pad_id)  # (B, Lc)
    ids, valid = right_pad(targets, pad_id)  # (B, T)
    session = Session(model, method, len(contexts), ctx_ids.shape[1] + ids.shape[1], diagnose=diagnose)
    ids, valid = ids.to(session.device), valid.to(session.device)
    logits, prefill_s = timed_prefill(session, ctx_ids, ctx_mask.bool(), prefill_chunk)
    start = time.perf_counter()
    for t in range(ids.shape[1]):
        if t > 0:
            logits = session.feed(ids[:, t - 1 : t], valid[:, t - 1 : t])
        step(t, logits[:, -1], ids, valid)
    synchronize(session.device)
    return {
        "prefill_s": prefill_s,
        "prompt_tokens": int(ctx_mask.sum()),
        "decode_s": time.perf_counter() - start,
        "decode_tokens": int((valid.sum(1) - 1).clamp(min=0).sum()),  # targets fed one at a time (the last is not fed)
        "rebuilt_tokens": session.rebuilt,
        "rebuilt_kept_tokens": session.rebuilt_kept,
        "reused_tokens": session.reused,
        "recalled_tokens": session.recalled,
        "peak_kv_bytes": session.peak_kv_bytes,
        "store_bytes": session.store_bytes,
    } | ({"diagnostic": session.diagnostic.rows()} if session.diagnostic is not None else {})


def forced_nll(model, method, contexts, targets, pad_id: int, position_bin: int | None = None, **options):
    """(summed NLL, token count) of each row's targets and the loop's stats, one `Session.feed` per target token
    (`teacher_force`, which takes `options`: prefill_chunk, diagnose). With `position_bin`, the stats carry each
    row's summed NLL per bin of that many target positions (under "nll_by_position")."""
    bins = position_bin or max(map(len, targets), default=1)
    nll = torch.zeros(
        len(contexts), -(-max(map(len, targets), default=1) // bins), dtype=torch.float64, device=model.device
    )

    def add(t, logits, ids, valid):
        logp = logits.float().log_softmax(-1).gather(1, ids[:, t : t + 1])[:, 0]
        nll[:, t // bins].sub_(torch.where(valid[:, t], logp, 0).double())

    stats = teacher_force(model, method, contexts, targets, pad_id, add, **options)
    if position_bin:
        stats["nll_by_position"] = [row[: -(-len(t) // bins)] for row, t in zip(nll.tolist(), targets)]
    return nll.sum(1).tolist(), [len(t) for t in targets], stats


def decode_steps(
    session: Session,
    logits: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int,
    sampling: Sampling | None = None,
    suppress_token_ids: list[int] | None = None,
    active: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The decode loop, one step per `next`: yield ((B,) picked tokens, (B,) True for rows that were still going).

    Each picked token is fed when the next step is asked for; the last token of a row (its eos, or the last
    of the budget) is not fed: a stream that goes on feeds it with its next turn. Rows with `active` False
    generate nothing. `decode` runs it to the end; a streaming caller reads the tokens as they come.
    """
    sampling = sampling or Sampling()
    device = session.device
    generator = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.do_sample else None
    eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device)
    suppress = torch.tensor(suppress_token_ids or [], dtype=torch.long, device=device)
    done = (
        torch.zeros(session.batch_size, dtype=torch.bool, device=device)
        if active is None
        else ~active.to(device).bool()
    )
    for step in range(max_new_tokens):
        if bool(done.all()):
            return
        last = logits[:, -1]
        if len(suppress):
            last = last.index_fill(-1, suppress, float("-inf"))
        nxt = torch.where(done, pad_token_id, sampling.pick(last, generator))
        going = ~done
        done = done | torch.isin(nxt, eos)
        yield nxt, going
        if bool(done.all()) or step == max_new_tokens - 1:
            return
        logits = session.feed(nxt[:, None], ~done[:, None])


@torch.no_grad()
def decode(
    session: Session,
    steps: Iterator,
    max_new_tokens: int,
    pad_token_id: int,
    progress: bool = False,
) -> Generation:
    """Run `steps` (a `decode_steps` of this session) to the end and collect its tokens and decode stats."""
    device, B = session.device, session.batch_size
    tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    before = session.rebuilt, session.rebuilt_kept, session.reused, session.recalled
    synchronize(device)
    start = time.perf_counter()
    done_steps = 0
    bar = tqdm(steps, total=max_new_tokens, desc=f"decode {session.method.tag}", disable=not progress, leave=False)
    for step, (nxt, going) in enumerate(bar):
        tokens[:, step] = nxt
        lengths += going
        done_steps = step + 1
    synchronize(device)
    decode_s = time.perf_counter() - start
    generated = int(lengths.sum())
    stats = {
        "decode_s": decode_s,
        "decode_steps": done_steps,
        "generated_tokens": generated,
        "decode_tokens": generated - int((lengths > 0).sum()),  # the first token of a row comes from the last feed
        "rebuilt_tokens": session.rebuilt - before[0],
        "rebuilt_kept_tokens": session.rebuilt_kept - before[1],
        "reused_tokens": session.reused - before[2],
        "recalled_tokens": session.recalled - before[3],
        "peak_kv_bytes": session.peak_kv_bytes,
        "store_bytes": session.store_bytes,
    }
    return Generation(tokens[:, :done_steps], lengths, stats)
