"""Task generation (`task=generate`): answer each prompt under the method's budget and score the answers.

Reference-based quality (BLEU, ROUGE, BERTScore-F, accuracy for math), fidelity to full attention
(`adore.eval.fidelity`), a bootstrap interval on every quality number, and decode throughput.

Rows of the data with the same prompt (a dialogue listed once per reference summary) are one example
(`adore.eval.tasks.group_by_prompt`): generated once, scored against all of its references (multi-reference
BLEU, the best ROUGE / BERTScore-F over them, a match with any gold answer) and resampled as one unit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar

import numpy as np

from adore.engine.generate import Sampling
from adore.engine.text import PROMPT_HEAD, batches_by_length, encode_prompts, eos_ids
from adore.eval.fidelity import (
    Fidelity,
    Reference,
    build_reference,
    divergence,
    first_divergence,
    load_reference,
    store_reference,
)
from adore.eval.metrics import bertscore_f, quality, repeated_ngram_fraction, rouge
from adore.eval.stats import Bootstrap, corpus_bleu_ci
from adore.eval.tasks import Context, TaskOutput, check_counts, generate_batches, load_examples, sum_stats
from adore.methods import Full


@dataclass
class Generate:
    name: ClassVar[str] = "generate"

    num_examples: int | None = 20
    batch_size: int = 4
    max_new_tokens: int = 64
    max_prompt_tokens: int | None = 2048
    prefill_chunk: int | None = None
    bertscore_model: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    fidelity: Fidelity | None = None
    bootstrap: Bootstrap = field(default_factory=Bootstrap)
    ngram: int = 4  # repeated n-grams of an output (degeneration: a lossy cache loops where full attention does not)

    def __post_init__(self):
        check_counts(
            self, ("batch_size", "max_new_tokens", "ngram"), ("num_examples", "max_prompt_tokens", "prefill_chunk")
        )

    def load(self, data_spec) -> list[dict]:
        return load_examples(data_spec, self.num_examples, group=True)

    def run(self, ctx: Context, method, records: list[dict]) -> TaskOutput:
        prompts, cut = encode_prompts(ctx.tokenizer, records, self.max_prompt_tokens)
        batches = batches_by_length([len(p) for p in prompts], self.batch_size)
        tokens, texts, stats = self._generate(ctx, method, prompts, batches, self.sampling)
        references = [r.get("references") or [r["reference"]] for r in records]
        answers = [r.get("answers") or r["answer"] for r in records]
        summary, per_example = quality(texts, references, answers, self.bertscore_model)
        per_example["repeated_ngram_fraction"] = [repeated_ngram_fraction(list(t), self.ngram) for t in tokens]
        summary["repeated_ngram_fraction"] = float(np.mean(per_example["repeated_ngram_fraction"]))
        metrics = {f"eval/{k}": v for k, v in summary.items()}
        metrics["eval/bleu_ci"] = corpus_bleu_ci(texts, references, self.bootstrap)
        for k, values in per_example.items():
            metrics[f"eval/{k}_ci"] = self.bootstrap.mean_ci(values)
        if self.fidelity is not None and self.fidelity.enabled:
            own = (tokens, texts) if isinstance(method, Full) and not self.sampling.do_sample else None
            ref = self._reference(ctx, records, prompts, batches, any(cut), own)
            scores = self._fidelity(ctx, method, ref, prompts, batches, tokens, texts)
            for k, values in scores.items():  # release_* is None where history never exceeded m: left out
                kept = [v for v in values if v is not None]
                if not kept:
                    continue
                metrics[f"fidelity/{k}"] = float(np.mean(kept))
                metrics[f"fidelity/{k}_ci"] = self.bootstrap.mean_ci(kept)
            per_example |= {f"fidelity_{k}": v for k, v in scores.items()}
            per_example["full_output"] = ref.texts
        rows = [
            {
                "id": r["id"],
                "messages": r["messages"],
                "reference": r["reference"],  # the first of `references` (what files before grouping held)
                "references": references[i],
                "answer": r["answer"],
                "output": texts[i],
                "prompt_cut_tokens": cut[i],
            }
            | ({"ids": r["ids"]} if len(r.get("ids", ())) > 1 else {})  # the data rows merged into this example
            | ({"answers": r["answers"]} if "answers" in r else {})
            | {k: v[i] for k, v in per_example.items()}
            for i, r in enumerate(records)
        ]
        run = {"num_examples": len(records), "max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size,
               "truncated_prompts": sum(c > 0 for c in cut),
               "grouped_rows": sum(len(r.get("ids") or [r["id"]]) - 1 for r in records),  # rows merged into another
               "num_references": sum(len(refs) for refs in references)}  # fmt: skip
        return TaskOutput(metrics=metrics, perf=sum_stats(stats), rows=rows, run=run)

    # ---- steps -------------------------------------------------------------------------------------------
    def _generate(self, ctx: Context, method, prompts, batches, sampling):
        tokens, stats = generate_batches(
            ctx, method, prompts, batches, self.max_new_tokens, sampling, self.prefill_chunk
        )
        texts = [ctx.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
        return tokens, texts, stats

    def reference_key(self, ctx: Context, records, truncated: bool = False) -> dict:
        """Everything full attention's stored outputs depend on (greedy: sampling settings do not count)."""
        from adore.models import model_fingerprint

        data = {k: v for k, v in asdict(ctx.data_spec).items() if k != "root"}  # same data from another folder
        return {
            "model": asdict(ctx.model_spec) | {"fingerprint": model_fingerprint(ctx.model)},
            "data": data,
            "ids": [r["id"] for r in records],
            "max_new_tokens": self.max_new_tokens,
            "max_prompt_tokens": self.max_prompt_tokens,
            **({"prompt_head": PROMPT_HEAD} if truncated else {}),  # how a long prompt is cut (when one is)
            "prefill_chunk": self.prefill_chunk,
            "batch_size": self.batch_size,
            "source": self.fidelity.source,
            "top_k": self.fidelity.top_k,
            "eos": eos_ids(ctx.model, ctx.tokenizer),
        }

    def _reference(self, ctx: Context, records, prompts, batches, truncated, full_outputs=None) -> Reference:
        """Full attention's stored outputs, or computed now (`full_outputs`: a greedy full run's own, reused)."""
        key = self.reference_key(ctx, records, truncated)
        ref = load_reference(self.fidelity, key)
        if ref is not None:
            print(f"[reference] reusing full attention's outputs from {self.fidelity.cache_dir}")
            return ref
        full = Full()
        tokens, texts = full_outputs or self._generate(ctx, full, prompts, batches, Sampling())[:2]
        if self.fidelity.source == "full":
            forced = tokens
        else:
            forced = [
                ctx.tokenizer(r["reference"], add_special_tokens=False)["input_ids"][: self.max_new_tokens]
                for r in records
            ]
        ref = build_reference(
            ctx.model,
            full,
            prompts,
            forced,
            tokens,
            texts,
            batches,
            ctx.tokenizer.pad_token_id,
            self.fidelity,
            self.prefill_chunk,
            ctx.progress,
            key,
        )
        folder = store_reference(self.fidelity, ref)
        print(f"[reference] stored full attention's outputs in {folder}")
        return ref

    def _fidelity(
        self, ctx: Context, method, ref: Reference, prompts, batches, tokens, texts
    ) -> dict[str, list[float]]:
        diagnose = self.fidelity.diagnose and method.m is not None
        if isinstance(method, Full):  # the reference's own forward again: KL 0, top-1 1, exactly; not rerun
            n = len(prompts)
            tail = [float((1 - lp.exp().sum(-1)).clamp(min=0).mean()) if len(lp) else 0.0 for lp in ref.top_logp]
            scores = {"kl": [0.0] * n, "top1": [1.0] * n, "rank": [1.0] * n, "tail": tail}
        else:
            scores = divergence(
                ref, ctx.model, method, prompts, batches, ctx.tokenizer.pad_token_id, self.prefill_chunk,
                ctx.progress, diagnose,
            )  # fmt: skip
        release = {k: v for k, v in scores.items() if k.startswith("release_")}  # the release diagnostic
        scores = {"kl": scores["kl"], "top1": scores["top1"], "rank": scores["rank"], "ref_tail_mass": scores["tail"]}
        scores |= release
        scores["first_divergence"] = [float(first_divergence(a, b)) for a, b in zip(tokens, ref.tokens)]
        scores["identical"] = [float(a == b) for a, b in zip(tokens, ref.tokens)]
        scores["rougeL_vs_full"] = rouge(texts, ref.texts)["rougeL"]
        if self.bertscore_model:
            scores["bertscore_f_vs_full"] = bertscore_f(texts, ref.texts, self.bertscore_model)
        return scores
