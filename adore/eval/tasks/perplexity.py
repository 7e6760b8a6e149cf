"""Task perplexity (`task=perplexity`): language modelling with at most m cached tokens (ADORE.md §4).

Each text is read as one stream, teacher-forced one token per `Session.feed`, so the method releases down
to m between tokens and every token is predicted from at most m cached tokens (+ R rebuilt for ADORE).
Long text (data=wikitext2): every document is a stream, its first token (a BOS when the tokenizer adds
one) is fed unscored and every later token scored. Chat data (samsum, chat, math, gsm8k): the chat-template
prompt is prefilled and the tokens of the reference answer are scored — the paper's "natural language
modelling" of each dataset. `join_tokens` joins documents into streams that long (long-document perplexity,
past the distances a controller was trained on); `position_bin` reports perplexity by position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from tqdm.auto import tqdm

from adore.engine.generate import forced_nll
from adore.engine.text import batches_by_length, encode_prompts
from adore.eval.stats import Bootstrap
from adore.eval.tasks import Context, TaskOutput, check_counts, load_examples, sum_stats


@dataclass
class Perplexity:
    name: ClassVar[str] = "perplexity"

    num_tokens: int = 8192
    max_doc_tokens: int = 2048
    num_examples: int | None = None
    batch_size: int = 4
    max_prompt_tokens: int | None = 2048
    prefill_chunk: int | None = None
    bootstrap: Bootstrap = field(default_factory=Bootstrap)
    diagnose: bool = False  # the release diagnostic (adore.engine.diagnostic) of every scored step, as diagnostic/*
    join_tokens: int | None = None  # documents joined (in order, a blank line between) into streams this long
    position_bin: int | None = None  # perplexity per bin of this many positions, as eval/ppl_pos<first position>

    def __post_init__(self):
        check_counts(
            self,
            ("num_tokens", "max_doc_tokens", "batch_size"),
            ("num_examples", "max_prompt_tokens", "prefill_chunk", "join_tokens", "position_bin"),
            own=("num_examples",),
        )

    def check_window(self, window: int) -> None:
        """A joined stream (join_tokens + its unscored first token), or a chat prompt, fits the context window."""
        if self.join_tokens and self.join_tokens + 1 > window:
            raise ValueError(
                f"task.join_tokens={self.join_tokens}: a stream of {self.join_tokens + 1} tokens is past the model's "
                f"context window of {window} (max_position_embeddings): set task.join_tokens={window - 1} or less"
            )
        if self.max_prompt_tokens and self.max_prompt_tokens > window:
            raise ValueError(
                f"eval.max_prompt_tokens={self.max_prompt_tokens} passes the model's context window of {window} "
                f"tokens (max_position_embeddings): set eval.max_prompt_tokens={window} or less"
            )

    def load(self, data_spec) -> list[dict]:
        return load_examples(data_spec, self.num_examples)

    def run(self, ctx: Context, method, records: list[dict]) -> TaskOutput:
        records, contexts, targets = self.texts(ctx.tokenizer, records)
        nll, count, stats = [0.0] * len(targets), [0] * len(targets), []
        by_position: list[list[float]] = [[] for _ in targets]
        release: list[dict] = [{}] * len(targets)
        batches = batches_by_length([len(c) + len(t) for c, t in zip(contexts, targets)], self.batch_size)
        for batch in tqdm(batches, desc=f"{ctx.data_spec.name} {method.tag}", disable=not ctx.progress):
            sums, counts, st = forced_nll(
                ctx.model,
                method,
                [contexts[i] for i in batch],
                [targets[i] for i in batch],
                ctx.tokenizer.pad_token_id,
                self.position_bin,
                prefill_chunk=self.prefill_chunk,
                diagnose=self.diagnose and method.m is not None,
            )
            stats.append(st)
            for row, i in enumerate(batch):
                nll[i], count[i] = sums[row], counts[row]
                by_position[i] = st.get("nll_by_position", [[]] * len(batch))[row]
                if "diagnostic" in st:
                    release[i] = st["diagnostic"][row]
        nll_np, count_np = np.array(nll), np.array(count, dtype=float)
        mean_nll = float(nll_np.sum() / count_np.sum())
        metrics = {
            "eval/ppl": math.exp(mean_nll),
            "eval/nll": mean_nll,
            "eval/ppl_ci": self.bootstrap.statistic_ci(
                len(nll), lambda idx: math.exp(nll_np[idx].sum() / count_np[idx].sum())
            ),
            "eval/tokens": int(count_np.sum()),
        }
        if self.position_bin:
            metrics["eval/position_bin"] = self.position_bin
            for k, ppl in enumerate(ppl_by_position(by_position, count, self.position_bin)):
                metrics[f"eval/ppl_pos{k * self.position_bin}"] = ppl  # scored tokens k * bin .. (k + 1) * bin - 1
        from adore.engine.diagnostic import REPORTED

        for key in REPORTED if any(release) else ():  # over the examples with a counted step
            values = [r[key] for r in release if key in r]
            if values:
                metrics[f"fidelity/release_{key}"] = float(np.mean(values))
                metrics[f"fidelity/release_{key}_ci"] = self.bootstrap.mean_ci(values)
        rows = [
            {
                "id": r["id"],
                "context_tokens": len(contexts[i]),
                "tokens": count[i],
                "nll": nll[i],
                "ppl": math.exp(nll[i] / max(count[i], 1)),
            }
            | ({"nll_by_position": by_position[i]} if self.position_bin else {})
            | {f"release_{k}": v for k, v in release[i].items() if k != "steps"}
            for i, r in enumerate(records)
        ]
        run = {
            "num_examples": len(records),
            "num_tokens": int(count_np.sum()),
            "max_doc_tokens": self.max_doc_tokens,
            "join_tokens": self.join_tokens,
            "batch_size": self.batch_size,
        }
        return TaskOutput(metrics=metrics, perf=sum_stats(stats), rows=rows, run=run)

    def texts(self, tokenizer, records: list[dict]) -> tuple[list[dict], list[list[int]], list[list[int]]]:
        """The examples used, and their (context, scored target) token ids, in order until `num_tokens` targets
        in all. With `join_tokens`, the examples are streams of joined documents (`joined`)."""
        kept, contexts, targets, left = [], [], [], self.num_tokens
        for r in self.joined(tokenizer, records) if self.join_tokens else records:
            if left <= 0:
                break
            if r["messages"]:  # chat data: the prompt is context, the reference answer is scored
                context = encode_prompts(tokenizer, [r], self.max_prompt_tokens)[0][0]
                target = tokenizer(r["reference"], add_special_tokens=False)["input_ids"]
            else:  # a document: its first token (a BOS if the tokenizer adds one) is context, the rest is scored
                ids = r.get("ids") or tokenizer(r["reference"])["input_ids"]
                context, target = ids[:1], ids[1:]
            target = target[: min(self.max_doc_tokens, left)]
            if target:
                kept.append({k: v for k, v in r.items() if k != "ids"})
                contexts.append(context)
                targets.append(target)
                left -= len(target)
        return kept, contexts, targets

    def joined(self, tokenizer, records: list[dict]) -> list[dict]:
        """Documents joined in order (a blank line between) and cut into streams of `join_tokens` + 1 token ids
        (the first is context); a short last stream is dropped, so every stream reaches the full length. Its id
        names the documents it holds."""
        if any(r["messages"] for r in records):
            raise ValueError(
                f"task.join_tokens={self.join_tokens} joins documents: use data=wikitext2, or join_tokens=null"
            )
        streams, ids, names, size = [], [], [], self.join_tokens + 1
        for r in records:
            ids += tokenizer(("\n\n" if ids else "") + r["reference"], add_special_tokens=not ids)["input_ids"]
            names.append(str(r["id"]))
            while len(ids) >= size:
                streams.append({"id": "+".join(names), "messages": [], "reference": "", "ids": ids[:size]})
                ids, names = ids[size:], names[-1:] if len(ids) > size else []
        return streams


def ppl_by_position(nll_by_position: list[list[float]], counts: list[int], position_bin: int) -> list[float]:
    """Perplexity over every example's tokens in each bin of `position_bin` positions (token-weighted)."""
    width = max(map(len, nll_by_position))
    nll, tokens = np.zeros(width), np.zeros(width)
    for row, count in zip(nll_by_position, counts):
        nll[: len(row)] += row
        tokens[: len(row)] += np.diff(np.minimum(np.arange(len(row) + 1) * position_bin, count))
    return [math.exp(n / c) for n, c in zip(nll, tokens) if c > 0]
