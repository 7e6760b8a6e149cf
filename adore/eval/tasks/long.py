"""Task long (`task=long`): generate far past the budget (length_factor x m tokens, eos suppressed) and
measure how much of the output degenerates into repeating itself, and the decode throughput."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from adore.checks import check_positive
from adore.engine.generate import Sampling
from adore.engine.text import batches_by_length, encode_prompts
from adore.eval.metrics import repeated_ngram_fraction
from adore.eval.stats import Bootstrap
from adore.eval.tasks import Context, TaskOutput, check_counts, generate_batches, load_examples, sum_stats


@dataclass
class Long:
    name: ClassVar[str] = "long"

    length_factor: float = 4
    reference_m: int = 128
    ngram: int = 4
    num_examples: int | None = 20
    batch_size: int = 4
    max_prompt_tokens: int | None = 2048
    prefill_chunk: int | None = None
    sampling: Sampling = field(default_factory=Sampling)
    bootstrap: Bootstrap = field(default_factory=Bootstrap)

    def __post_init__(self):
        check_positive("task.length_factor", self.length_factor, fix=": tokens generated = length_factor x m, e.g. 4")
        check_counts(
            self, ("reference_m", "ngram", "batch_size"), ("num_examples", "max_prompt_tokens", "prefill_chunk")
        )

    @staticmethod
    def dir_suffix(node) -> str:
        """Run folders say how long the generation was: full attention's length depends on `reference_m`."""
        return f"{node.length_factor:g}x{node.reference_m}"

    def new_tokens(self, method) -> int:
        """length_factor x m; full attention (m = None) generates as many as a method at `reference_m`."""
        return max(1, round(self.length_factor * (method.m or self.reference_m)))

    def load(self, data_spec) -> list[dict]:
        return load_examples(
            data_spec,
            self.num_examples,
            keep=lambda r: r["messages"],
            fix=f"data={data_spec.name} has no prompts: use data=chat, samsum or math",
        )

    def run(self, ctx: Context, method, records: list[dict]) -> TaskOutput:
        tok = ctx.tokenizer
        new = self.new_tokens(method)
        prompts, cut = encode_prompts(tok, records, self.max_prompt_tokens)
        batches = batches_by_length([len(p) for p in prompts], self.batch_size)
        tokens, stats = generate_batches(
            ctx, method, prompts, batches, new, self.sampling, self.prefill_chunk, past_eos=True
        )
        repeated = [repeated_ngram_fraction(tokens[i], self.ngram) for i in range(len(records))]
        metrics = {
            "eval/repeated_ngram_fraction": float(np.mean(repeated)),
            "eval/repeated_ngram_fraction_ci": self.bootstrap.mean_ci(repeated),
            "eval/new_tokens": float(np.mean([len(tokens[i]) for i in range(len(records))])),
        }
        rows = [
            {
                "id": r["id"],
                "output": tok.decode(tokens[i], skip_special_tokens=True),
                "new_tokens": len(tokens[i]),
                "repeated_ngram_fraction": repeated[i],
                "prompt_cut_tokens": cut[i],
            }
            for i, r in enumerate(records)
        ]
        run = {
            "num_examples": len(records),
            "max_new_tokens": new,
            "length_factor": self.length_factor,
            "reference_m": self.reference_m,
            "ngram": self.ngram,
            "batch_size": self.batch_size,
            "truncated_prompts": sum(c > 0 for c in cut),
        }
        return TaskOutput(metrics=metrics, perf=sum_stats(stats), rows=rows, run=run)
