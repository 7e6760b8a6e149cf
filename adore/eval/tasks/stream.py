"""Task stream (`task=stream data=chat`): each multi-turn dialogue as one stream under a bounded cache.

One `Session` per batch of dialogues lives across all turns: turn k prefills the user-turn segment (the
tokens the chat template puts between the previous reply and the next assistant reply), then `decode`
generates the reply, so the context grows past m while the cache never does. Replies are the model's own
(they, not the dataset's, stay in the stream) and are scored against the dataset's reply of the same turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from adore.engine.generate import Sampling, decode, decode_steps, left_pad, timed_prefill
from adore.engine.session import Session
from adore.engine.text import eos_ids
from adore.eval.metrics import quality
from adore.eval.stats import Bootstrap, corpus_bleu_ci
from adore.eval.tasks import Context, TaskOutput, check_counts, load_examples, sum_stats

PLACEHOLDER = "ADOREREPLYPLACEHOLDER"  # stands for a generated reply when rendering the chat template


def dialogue_turns(record: dict, max_turns: int | None) -> list[tuple[list[dict], str]]:
    """(messages before the reply, reference reply) for each assistant reply that follows a user turn."""
    dialogue = record["messages"] + [{"role": "assistant", "content": record["reference"]}]
    turns = [
        (dialogue[:j], m["content"])
        for j, m in enumerate(dialogue)
        if m["role"] == "assistant" and j and dialogue[j - 1]["role"] == "user"
    ]
    return turns[:max_turns] if max_turns else turns


def segments(tokenizer, turns: list[tuple[list[dict], str]], eos: list[int]) -> list[tuple[list[int], list[int]]]:
    """Token ids fed before each turn's reply: (after a reply cut at the budget, after a reply that ended with eos).

    Turn 0 is the chat-template prompt. Later turns are the template's text after the previous reply
    (rendered with every reply replaced by a placeholder): its end-of-turn text, the user turn and the
    generation prompt. A reply that ended with eos has already put the end-of-turn token in the stream, so
    the second variant drops the template's leading eos text.
    """
    eos_texts = tokenizer.convert_ids_to_tokens(eos)
    out = []
    for k, (messages, _) in enumerate(turns):
        if k == 0:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
            out.append((ids, ids))
            continue
        masked = [m | {"content": PLACEHOLDER} if m["role"] == "assistant" else m for m in messages]
        text = tokenizer.apply_chat_template(masked, add_generation_prompt=True, tokenize=False)
        after = text[text.rindex(PLACEHOLDER) + len(PLACEHOLDER) :]
        after_eos = next((after.lstrip()[len(e) :] for e in eos_texts if after.lstrip().startswith(e)), after)
        encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        out.append((encode(after), encode(after_eos)))
    return out


@dataclass
class Stream:
    name: ClassVar[str] = "stream"

    num_examples: int | None = 20
    batch_size: int = 4
    max_turns: int | None = 4
    max_new_tokens: int = 64
    prefill_chunk: int | None = None
    bertscore_model: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    bootstrap: Bootstrap = field(default_factory=Bootstrap)

    def __post_init__(self):
        check_counts(self, ("batch_size", "max_new_tokens"), ("num_examples", "max_turns", "prefill_chunk"))

    def load(self, data_spec) -> list[dict]:
        return load_examples(
            data_spec,
            self.num_examples,
            keep=lambda r: r["messages"] and dialogue_turns(r, self.max_turns),
            fix=f"data={data_spec.name} has no dialogues (user turns followed by replies): use data=chat",
        )

    def run(self, ctx: Context, method, records: list[dict]) -> TaskOutput:
        tok = ctx.tokenizer
        turns = [dialogue_turns(r, self.max_turns) for r in records]
        segs = [segments(tok, t, eos_ids(ctx.model, tok)) for t in turns]
        rows, stats, streamed = [], [], []
        for start in tqdm(
            range(0, len(records), self.batch_size), desc=f"stream {method.tag}", disable=not ctx.progress
        ):
            batch = list(range(start, min(start + self.batch_size, len(records))))
            out, st, lengths = self._stream(ctx, method, [segs[i] for i in batch])
            stats += st
            streamed += lengths
            for row, i in enumerate(batch):
                for k, turn in enumerate(out[row]):
                    rows.append(
                        {
                            "id": f"{records[i]['id']}-turn{k}",
                            "dialogue": records[i]["id"],
                            "turn": k,
                            "reference": turns[i][k][1],
                            **turn,
                        }
                    )
        outputs = [r["output"] for r in rows]
        references = [r["reference"] for r in rows]
        summary, per_turn = quality(outputs, references, [None] * len(rows), self.bertscore_model)
        metrics = {f"eval/{k}": v for k, v in summary.items()}
        metrics["eval/bleu_ci"] = corpus_bleu_ci(outputs, references, self.bootstrap)
        for k, values in per_turn.items():
            metrics[f"eval/{k}_ci"] = self.bootstrap.mean_ci(values)
        metrics |= {
            "eval/turns": len(rows),
            "eval/dialogues": len(records),
            "eval/context_tokens": float(np.mean(streamed)),
        }
        for i, r in enumerate(rows):
            r |= {k: v[i] for k, v in per_turn.items()}
        perf = sum_stats(stats)
        busy = perf["perf/prefill_s"] + perf["perf/decode_s"]
        perf |= {"perf/stream_tokens": int(sum(streamed)), "perf/stream_tok_per_s": sum(streamed) / max(busy, 1e-9)}
        run = {
            "num_examples": len(records),
            "turns": len(rows),
            "max_turns": self.max_turns,
            "max_new_tokens": self.max_new_tokens,
            "batch_size": self.batch_size,
        }
        return TaskOutput(metrics=metrics, perf=perf, rows=rows, run=run)

    @torch.no_grad()
    def _stream(self, ctx: Context, method, segs: list[list[tuple[list[int], list[int]]]]):
        """Stream B dialogues turn by turn through one session; per row, per turn: the reply and what was fed."""
        tok, B = ctx.tokenizer, len(segs)
        eos = eos_ids(ctx.model, tok)
        max_len = max(sum(len(s[0]) + self.max_new_tokens + 1 for s in row) for row in segs)
        session = Session(ctx.model, method, B, max_len, cuda_graphs=ctx.cuda_graphs)
        fed = [[] for _ in range(B)]  # every token fed so far, per row
        pending = [[] for _ in range(B)]  # the last reply token, which decode does not feed
        ended_eos = [False] * B
        out, stats = [[] for _ in range(B)], []
        for k in range(max(len(s) for s in segs)):
            active = [k < len(segs[b]) for b in range(B)]
            feed = [pending[b] + segs[b][k][ended_eos[b]] if active[b] else [] for b in range(B)]
            ids, mask = left_pad(feed, tok.pad_token_id)
            logits, prefill_s = timed_prefill(session, ids, mask.bool(), self.prefill_chunk)
            steps = decode_steps(session, logits, self.max_new_tokens, eos, tok.pad_token_id, self.sampling,
                                 active=torch.tensor(active))  # fmt: skip
            gen = decode(session, steps, self.max_new_tokens, tok.pad_token_id)
            stats.append(gen.stats | {"prefill_s": prefill_s, "prompt_tokens": int(mask.sum())})
            for b in range(B):
                if not active[b]:
                    continue
                fed[b] += feed[b]
                reply = gen.tokens[b, : gen.lengths[b]].tolist()
                out[b].append(
                    {
                        "output": tok.decode(reply, skip_special_tokens=True).strip(),
                        "context_ids": list(fed[b]),
                        "output_ids": reply,
                        "context_tokens": len(fed[b]),
                    }
                )
                fed[b] += reply[:-1]
                pending[b], ended_eos[b] = reply[-1:], reply[-1] in eos
        return out, stats, [len(fed[b]) + len(pending[b]) for b in range(B)]
