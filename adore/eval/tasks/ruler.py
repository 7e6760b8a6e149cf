"""Task ruler (`task=ruler data=noise|wikitext2`): RULER's synthetic long-context tasks under a bounded cache.

The examples are generated (`adore.ruler`, offline and seeded: every method sees the same prompts) at each target
length, from the haystack of the data config: `data=noise` (RULER's repeated noise passage) or `data=wikitext2`
(essay-like WikiText-2 prose). Each is scored as RULER scores it: the share of its reference strings found in the
output, case-insensitively (`string_match_all`).

How the prompt reaches the cache is the `arrival` (conf/task/arrival/, chosen by `_target_`), a setting with its
own run folder: `OneShot` (the whole prompt in one forward, so the question is read while every context token is
cached), `Chunked` (chunks of c tokens, released to m after each: the needle may be gone before the question
comes) and `Turns` (the context is one user turn, the model replies, and the question is a later turn, as
`task=stream` streams a dialogue). The two last are where a released token has to come back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from adore.checks import check_integer, is_share
from adore.engine.generate import Sampling, decode, decode_steps, left_pad, timed_prefill
from adore.engine.session import Session
from adore.engine.text import batches_by_length, eos_ids
from adore.eval.stats import Bootstrap
from adore.eval.tasks import Context, TaskOutput, check_counts, sum_stats
from adore.eval.tasks.stream import segments
from adore.ruler import (
    DEPTHS,
    NEEDLE_PARTS,
    VARIANTS,
    Example,
    accuracy_metrics,
    check_variants_and_lengths,
    haystack_sentences,
    make_example,
    needle_tokens,
    string_match_all,
)


# ------------------------------------------------------------------------------------------------- arrivals
@dataclass
class Arrival:
    """How an example's prompt is fed: its segments (one per user turn) and the chunk each is fed in.

    `segments` gives, per turn, the token ids fed before the model speaks, as (after a reply cut at its budget,
    after a reply that ended with eos) like `adore.eval.tasks.stream.segments`; the last ends with the answer prefix.
    Between two turns the model generates a reply of at most `reply_tokens`."""

    name: ClassVar[str] = ""
    reply_tokens: ClassVar[int] = 0

    @property
    def tag(self) -> str:
        """The run folder's suffix: the regime and any setting that is not the default."""
        return self.name

    def chunk_for(self, m: int | None, length: int) -> int:
        """Tokens per forward when feeding a segment of `length` tokens: the whole segment (never auto-chunked)."""
        return max(length, 1)

    def messages(self, ex: Example) -> list[list[dict]]:
        """The chat messages before each reply: one user turn holding context and question."""
        return [[{"role": "user", "content": ex.text()}]]

    def segments(self, tokenizer, ex: Example, eos: list[int]) -> list[tuple[list[int], list[int]]]:
        turns = [(m, "") for m in self.messages(ex)]
        segs = segments(tokenizer, turns, eos)
        prefix = tokenizer(ex.answer_prefix, add_special_tokens=False)["input_ids"]
        return segs[:-1] + [(segs[-1][0] + prefix, segs[-1][1] + prefix)]

    def occupies(self, tokenizer, ex: Example, eos: list[int], new_tokens: int) -> int:
        """Tokens the example takes at most in the stream: its segments, the replies between them and the answer."""
        segs = self.segments(tokenizer, ex, eos)
        return sum(len(s[0]) for s in segs) + self.reply_tokens * (len(segs) - 1) + new_tokens


@dataclass
class OneShot(Arrival):
    """(a) The whole prompt in one forward, then released to m: the question is read with every token cached."""

    name: ClassVar[str] = "oneshot"


@dataclass
class Chunked(Arrival):
    """(b) The prompt in chunks of `chunk` tokens (default: the method's m), released to m after each chunk, so
    prefill holds at most m + chunk (+ R + 1) slots and the needle may be released before the question comes."""

    name: ClassVar[str] = "chunked"
    chunk: int | None = None  # tokens per chunk; None: the method's m (full attention: the whole prompt)

    def __post_init__(self):
        check_integer("task.arrival.chunk", self.chunk, optional=True, fix=": tokens per chunk (null: the method's m)")

    @property
    def tag(self) -> str:
        return self.name + (f"{self.chunk}" if self.chunk else "")

    def chunk_for(self, m: int | None, length: int) -> int:
        return self.chunk or m or max(length, 1)


@dataclass
class Turns(Arrival):
    """(c) Two user turns in one stream: the instruction and context first, the model's reply to it (at most
    `reply_tokens`, kept in the stream), then the question as a later turn. Each turn is fed whole."""

    name: ClassVar[str] = "turns"
    reply_tokens: int = 16

    def __post_init__(self):
        check_integer("task.arrival.reply_tokens", self.reply_tokens, fix=": the reply's token cap, e.g. 16")

    @property
    def tag(self) -> str:
        return self.name + ("" if self.reply_tokens == 16 else f"{self.reply_tokens}")

    def messages(self, ex: Example) -> list[list[dict]]:
        context = {"role": "user", "content": f"{ex.instruction}\n{ex.context}"}
        reply = {"role": "assistant", "content": ""}  # the model's own reply is fed (stream.segments masks it)
        return [[context], [context, reply, {"role": "user", "content": ex.question}]]


# ----------------------------------------------------------------------------------------------------- task
@dataclass
class Ruler:
    name: ClassVar[str] = "ruler"

    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    num_examples: int = 20  # per variant and length
    depths: list[float] = field(default_factory=lambda: list(DEPTHS))
    seed: int = 0
    arrival: Arrival = field(default_factory=OneShot)
    batch_size: int = 4
    max_new_tokens: int = 64
    sampling: Sampling = field(default_factory=Sampling)
    bootstrap: Bootstrap = field(default_factory=Bootstrap)

    def __post_init__(self):
        self.variants, self.lengths, self.depths = list(self.variants), list(self.lengths), list(self.depths)
        check_counts(self, ("num_examples", "batch_size", "max_new_tokens"))
        check_variants_and_lengths("task", self.variants, self.lengths)
        if not self.depths or not all(is_share(d, closed=True) for d in self.depths):
            raise ValueError(
                f"task.depths={self.depths} must be a non-empty list of fractions in [0, 1], e.g. [0.1,0.5,0.9]"
            )
        if not isinstance(self.arrival, Arrival):
            raise ValueError(f"task.arrival={self.arrival!r}: use task/arrival=oneshot, chunked or turns")

    @staticmethod
    def dir_suffix(node) -> str:
        """Run folders say how the prompt arrived: `noise-ruler-oneshot`, `noise-ruler-chunked`, `noise-ruler-turns`."""
        from adore.config import build

        return f"-{build(node.arrival).tag}"

    def check_window(self, window: int) -> None:
        """Every length (the prompt and its answer budget, as RULER counts it) fits the model's context window."""
        if max(self.lengths) > window:
            raise ValueError(
                f"task.lengths={self.lengths}: {max(self.lengths)} tokens is past the model's context window of "
                f"{window} (max_position_embeddings): use lengths of at most {window}"
            )

    def load(self, data_spec) -> list[dict]:
        """One record per (variant, length, index), and the haystack's sentences (`haystack`) from the data."""
        from adore.data import load_records

        documents = load_records(data_spec)
        if any(r["messages"] for r in documents):
            raise ValueError(
                f"task=ruler reads its haystack from documents, and data={data_spec.name} holds conversations: "
                "use data=noise (RULER's noise passage) or data=wikitext2 (essay-like prose)"
            )
        out = _Records(
            {"id": f"{v}-{n}-{i}", "variant": v, "length": n, "index": i}
            for v in self.variants
            for n in self.lengths
            for i in range(self.num_examples)
        )
        out.haystack = haystack_sentences([r["reference"] for r in documents])
        out.excluded = {}
        return out

    def examples(self, tokenizer, eos: list[int], records) -> list[Example]:
        """The records' prompts, each fitted to its length in this arrival (tokens counted with `tokenizer`)."""

        def count(ex: Example) -> int:
            return self.arrival.occupies(tokenizer, ex, eos, self.max_new_tokens)

        out, hints = [], {}
        for r in records:
            key = (r["variant"], r["length"])
            ex = make_example(r["variant"], r["length"], r["index"], records.haystack, count, self.seed,
                              tuple(self.depths), hints.get(key))  # fmt: skip
            hints[key] = ex.units
            out.append(ex)
        return out

    def run(self, ctx: Context, method, records) -> TaskOutput:
        tok = ctx.tokenizer
        eos = eos_ids(ctx.model, tok)
        examples = self.examples(tok, eos, records)
        segs = [self.arrival.segments(tok, ex, eos) for ex in examples]
        # the context is turn one's; per example, its needles' parts whose share in the cache each row reports
        needles = [{p: needle_tokens(tok, seg[0][0], ex, p) for p in NEEDLE_PARTS} for seg, ex in zip(segs, examples)]
        batches = batches_by_length([sum(len(s[0]) for s in seg) for seg in segs], self.batch_size)
        answers, stats = {}, []
        for batch in tqdm(batches, desc=f"ruler {self.arrival.tag} {method.tag}", disable=not ctx.progress):
            out, st = self._answer(ctx, method, [segs[i] for i in batch], [needles[i] for i in batch], eos)
            stats += st
            answers |= dict(zip(batch, out))
        rows = []
        for i, ex in enumerate(examples):
            a = answers[i]
            rows.append(
                {"id": ex.id, "variant": ex.variant, "length": ex.length, "index": ex.index, "depth": ex.depth,
                 "needle_depths": ex.needle_depths, "prompt_tokens": a["prompt_tokens"], "references": ex.references,
                 "output": a["output"], "score": string_match_all(a["output"], ex.references),
                 "needle_kept": a["needle_kept"], "key_kept": a["key_kept"]}
                | ({"reply": a["reply"]} if "reply" in a else {})
            )  # fmt: skip
        run = {
            "num_examples": len(rows),
            "arrival": self.arrival.tag,
            "haystack": ctx.data_spec.name,
            "variants": self.variants,
            "lengths": self.lengths,
            "examples_per_setting": self.num_examples,
            "max_new_tokens": self.max_new_tokens,
            "batch_size": self.batch_size,
            "prompt_tokens_mean": float(np.mean([r["prompt_tokens"] for r in rows])),
        }
        return TaskOutput(metrics=self.metrics(rows), perf=sum_stats(stats), rows=rows, run=run)

    def metrics(self, rows: list[dict]) -> dict:
        """eval/ruler_accuracy overall, per variant, length and (variant, length), with intervals, and the heatmap's
        depth cells (`adore.ruler.accuracy_metrics`)."""
        return accuracy_metrics(rows, self.bootstrap.mean_ci)

    @torch.no_grad()
    def _answer(
        self, ctx: Context, method, segs: list[list[tuple[list[int], list[int]]]], needles: list, eos: list[int]
    ):
        """Feed B examples' segments through one session, a reply between two; per row: the answer, what was fed,
        and the share of each part of its `needles` ({"value": token indices into its first segment, "key": ...},
        None: not measured) cached when the answer starts: what the release kept of what the answer copies
        (`needle_kept`) and of the words that say which needle is asked (`key_kept`)."""
        tok, B = ctx.tokenizer, len(segs)
        turns = len(segs[0])
        max_len = max(sum(len(s[0]) for s in row) for row in segs) + self.arrival.reply_tokens * turns
        session = Session(ctx.model, method, B, max_len + self.max_new_tokens + 1, cuda_graphs=ctx.cuda_graphs)
        pending, ended_eos = [[] for _ in range(B)], [False] * B  # the reply's last token, which decode does not feed
        fed, replies, stats, kept = [0] * B, [[] for _ in range(B)], [], [dict.fromkeys(NEEDLE_PARTS)] * B
        for k in range(turns):
            feed = [pending[b] + segs[b][k][ended_eos[b]] for b in range(B)]
            ids, mask = left_pad(feed, tok.pad_token_id)
            chunk = self.arrival.chunk_for(method.m, ids.shape[1])
            logits, prefill_s = timed_prefill(session, ids, mask.bool(), chunk)
            if k == turns - 1:  # positions count each row's tokens from 0, so turn one's index i is position i
                cached = [set(row) for row in session.cached_positions()]
                kept = [{p: share_in(n, c) for p, n in parts.items()} for parts, c in zip(needles, cached)]
            budget = self.max_new_tokens if k == turns - 1 else self.arrival.reply_tokens
            steps = decode_steps(session, logits, budget, eos, tok.pad_token_id, self.sampling)
            gen = decode(session, steps, budget, tok.pad_token_id)
            stats.append(gen.stats | {"prefill_s": prefill_s, "prompt_tokens": int(mask.sum())})
            for b in range(B):
                out = gen.tokens[b, : gen.lengths[b]].tolist()
                fed[b] += len(feed[b])
                if k < turns - 1:
                    replies[b].append(out)
                    fed[b] += len(out) - 1
                    pending[b], ended_eos[b] = out[-1:], bool(out) and out[-1] in eos
                else:
                    pending[b] = out
        rows = []
        for b in range(B):
            row = {
                "output": tok.decode(pending[b], skip_special_tokens=True).strip(),
                "prompt_tokens": fed[b],
                "needle_kept": kept[b]["value"],
                "key_kept": kept[b]["key"],
            }
            if replies[b]:
                row["reply"] = " | ".join(tok.decode(r, skip_special_tokens=True).strip() for r in replies[b])
            rows.append(row)
        return rows, stats


def share_in(tokens: list[int] | None, cached: set[int]) -> float | None:
    """The share of `tokens` (positions; None: not measured) that `cached` holds."""
    return None if tokens is None else sum(i in cached for i in tokens) / len(tokens)


class _Records(list):
    """The records of a run, with the haystack sentences they are generated from."""

    haystack: list[str]
    excluded: dict[str, list[str]]
