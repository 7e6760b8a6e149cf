"""Task perplexity (`task=perplexity`): language modelling with at most m cached tokens (ADORE.md §4).

Each text is read as one stream, teacher-forced one token per `Session.feed`, so the method releases down
to m between tokens and every token is predicted from at most m cached tokens (+ R rebuilt for ADORE).
Long text (data=wikitext2): every document is a stream, its first token (a BOS when the tokenizer adds
one) is fed unscored and every later token scored. Chat data (samsum, chat, math, gsm8k): the chat-template
prompt is prefilled and the tokens of the reference answer are scored — the paper's "natural language
modelling" of each dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from adore.generate import teacher_force
from adore.stats import Bootstrap
from adore.tasks import (
    Context,
    TaskOutput,
    batches_by_length,
    check_counts,
    encode_prompts,
    load_examples,
    sum_stats,
)


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
    diagnose: bool = False  # the release diagnostic (adore.diagnostic) of every scored step, as diagnostic/*

    def __post_init__(self):
        check_counts(
            self,
            ("num_tokens", "max_doc_tokens", "batch_size"),
            ("num_examples", "max_prompt_tokens", "prefill_chunk"),
            own=("num_examples",),
        )

    def load(self, data_spec) -> list[dict]:
        return load_examples(data_spec, self.num_examples)

    def run(self, ctx: Context, method, records: list[dict]) -> TaskOutput:
        kept, contexts, targets = self.texts(ctx.tokenizer, records)
        records = [records[i] for i in kept]
        nll, count, stats = [0.0] * len(targets), [0] * len(targets), []
        release: list[dict] = [{}] * len(targets)
        batches = batches_by_length([len(c) + len(t) for c, t in zip(contexts, targets)], self.batch_size)
        for batch in tqdm(batches, desc=f"{ctx.data_spec.name} {method.tag}", disable=not ctx.progress):
            sums, counts, st = forced_nll(
                ctx.model,
                method,
                [contexts[i] for i in batch],
                [targets[i] for i in batch],
                ctx.tokenizer.pad_token_id,
                self.prefill_chunk,
                self.diagnose and method.m is not None,
            )
            stats.append(st)
            for row, i in enumerate(batch):
                nll[i], count[i] = sums[row], counts[row]
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
        from adore.diagnostic import KEYS

        for key in KEYS if any(release) else ():  # over the examples with a counted step
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
            | {f"release_{k}": v for k, v in release[i].items() if k != "steps"}
            for i, r in enumerate(records)
        ]
        run = {
            "num_examples": len(records),
            "num_tokens": int(count_np.sum()),
            "max_doc_tokens": self.max_doc_tokens,
            "batch_size": self.batch_size,
        }
        return TaskOutput(metrics=metrics, perf=sum_stats(stats), rows=rows, run=run)

    def texts(self, tokenizer, records: list[dict]) -> tuple[list[int], list[list[int]], list[list[int]]]:
        """Records used, and their (context, scored target) token ids, in order until `num_tokens` targets in all."""
        kept, contexts, targets, left = [], [], [], self.num_tokens
        for i, r in enumerate(records):
            if left <= 0:
                break
            if r["messages"]:  # chat data: the prompt is context, the reference answer is scored
                context = encode_prompts(tokenizer, [r], self.max_prompt_tokens)[0][0]
                target = tokenizer(r["reference"], add_special_tokens=False)["input_ids"]
            else:  # a document: its first token (a BOS if the tokenizer adds one) is context, the rest is scored
                ids = tokenizer(r["reference"])["input_ids"]
                context, target = ids[:1], ids[1:]
            target = target[: min(self.max_doc_tokens, left)]
            if target:
                kept.append(i)
                contexts.append(context)
                targets.append(target)
                left -= len(target)
        return kept, contexts, targets


def forced_nll(
    model,
    method,
    contexts: list[list[int]],
    targets: list[list[int]],
    pad_id: int,
    prefill_chunk: int | None = None,
    diagnose: bool = False,
) -> tuple[list[float], list[int], dict]:
    """Summed NLL and token count of each row's targets, one `Session.feed` per target token (`teacher_force`);
    with `diagnose`, the stats carry each row's release diagnostic."""
    nll = torch.zeros(len(contexts), dtype=torch.float64, device=model.device)

    def add(t, logits, ids, valid):
        logp = logits.float().log_softmax(-1).gather(1, ids[:, t : t + 1])[:, 0]
        nll.sub_(torch.where(valid[:, t], logp, 0).double())

    stats = teacher_force(model, method, contexts, targets, pad_id, add, prefill_chunk, diagnose)
    return nll.tolist(), [len(t) for t in targets], stats
