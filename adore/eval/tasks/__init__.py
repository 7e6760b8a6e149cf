"""Evaluation tasks: what `eval.py task=<name>` does with a (model, data, method) triple.

Each task is a dataclass chosen by the config's `_target_` (conf/task/): `load` reads its examples (cheap,
before any model loads, so bad data fails early) and `run` drives the engine's one loop (`Session.feed`)
and returns metrics, perf numbers and per-example rows. `adore.eval.job` owns everything around it:
validation, resume, atomic writing and tracking.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from adore.checks import check_integer


@dataclass
class Context:
    """What a task gets besides its own settings."""

    model: torch.nn.Module
    tokenizer: object
    model_spec: object  # adore.models.ModelSpec
    data_spec: object  # adore.data.DataSpec
    run_dir: Path
    progress: bool = True
    cuda_graphs: bool = False


@dataclass
class TaskOutput:
    metrics: dict  # "eval/<name>" (and "fidelity/<name>") -> value; "<key>_ci" -> [low, high]
    perf: dict  # "perf/<name>" -> value
    rows: list[dict]  # one per example, written to predictions.jsonl
    run: dict = field(default_factory=dict)  # extra fields of results.json's "run" (e.g. num_examples)


EVAL_KEYS = ("num_examples", "batch_size", "max_new_tokens", "max_prompt_tokens", "prefill_chunk")  # set as eval.<key>


def check_counts(task, required=(), optional=(), own=()) -> None:
    """Raise ValueError naming the config key unless each setting is a positive integer (`optional`: or null).

    Settings that tasks share are set as `eval.<key>`; the rest, and keys in `own`, as `task.<key>`.
    """
    for key in (*required, *optional):
        where = "eval" if key in EVAL_KEYS and key not in own else "task"
        check_integer(f"{where}.{key}", getattr(task, key), optional=key in optional)


class Examples(list):
    """The records a run scores, and `excluded`: what was left out and why (recorded in results.json)."""

    excluded: dict[str, list[str]]


def group_by_prompt(records: list[dict]) -> list[dict]:
    """Records with the same prompt (identical `messages`, e.g. one dialogue listed once per reference summary)
    as one record, in the order of their first row: generated once, scored against all the references and
    resampled as one unit. Each record gets `references` (its rows' references, in order) and `ids` (its rows'
    ids); `id`, `reference` and `answer` stay the first row's, and `answers` lists the gold answers where the
    rows disagree. Documents (no messages) are never merged."""
    import json

    groups: dict = {}
    for r in records:
        key = json.dumps(r["messages"], sort_keys=True, ensure_ascii=False) if r["messages"] else ("id", r["id"])
        groups.setdefault(key, []).append(r)
    out = []
    for rows in groups.values():
        g = rows[0] | {"references": [r["reference"] for r in rows], "ids": [r["id"] for r in rows]}
        answers = list(dict.fromkeys(r["answer"] for r in rows if r.get("answer") is not None))
        if len(answers) > 1:
            g["answers"] = answers
        elif answers:
            g["answer"] = answers[0]
        out.append(g)
    return out


def load_examples(
    data_spec, num_examples: int | None, keep=None, fix: str | None = None, group: bool = False
) -> Examples:
    """The first `num_examples` usable records that `keep` accepts; a ValueError with `fix` when none is left.

    Records with an empty reference (nothing to score against) or an empty prompt are excluded, counted and
    named, never scored as 0. `group`: rows with the same prompt are one example (`group_by_prompt`; an empty
    reference leaves its group, a group left with none is gone), and `num_examples` counts examples."""
    from adore.data import load_records

    def blank(text) -> bool:
        return not str(text or "").strip()

    records = [r for r in load_records(data_spec) if keep is None or keep(r)]
    excluded = {
        "empty_reference": [r["id"] for r in records if blank(r.get("reference"))],
        "empty_prompt": [
            r["id"] for r in records if r["messages"] and all(blank(m.get("content")) for m in r["messages"])
        ],
    }
    dropped = {i for ids in excluded.values() for i in ids}
    records = [r for r in records if r["id"] not in dropped]
    if group:
        rows = len(records)
        records = group_by_prompt(records)
        if len(records) < rows:
            print(f"[data] {data_spec.name}: {rows} rows share {len(records)} prompts: each prompt is generated "
                  "once and scored against all of its references")  # fmt: skip
    records = records[:num_examples]
    if dropped:
        print(f"[data] {data_spec.name}: excluded " + ", ".join(f"{len(v)} with an {k.replace('_', ' ')} ({', '.join(v[:3])}"
              + (", ..." if len(v) > 3 else "") + ")" for k, v in excluded.items() if v))  # fmt: skip
    if not records:
        raise ValueError(fix or f"data={data_spec.name} split={data_spec.split} has no usable records")
    out = Examples(records)
    out.excluded = {k: v for k, v in excluded.items() if v}
    return out


def generate_batches(
    ctx: Context,
    method,
    prompts: list[list[int]],
    batches: list[list[int]],
    max_new_tokens: int,
    sampling,
    prefill_chunk: int | None,
    past_eos: bool = False,
) -> tuple[list[list[int]], list[dict]]:
    """Generated ids per prompt (eos included) and the stats of each batch. `past_eos`: eos is suppressed,
    every row generates `max_new_tokens`."""
    from tqdm.auto import tqdm

    from adore.engine.generate import generate, left_pad
    from adore.engine.text import eos_ids

    tok = ctx.tokenizer
    eos = eos_ids(ctx.model, tok)
    tokens: dict[int, list[int]] = {}
    stats = []
    for batch in tqdm(batches, desc=f"{ctx.data_spec.name} {method.tag}", disable=not ctx.progress):
        ids, mask = left_pad([prompts[i] for i in batch], tok.pad_token_id)
        gen = generate(
            ctx.model,
            method,
            ids,
            mask,
            max_new_tokens,
            [] if past_eos else eos,
            tok.pad_token_id,
            sampling,
            prefill_chunk,
            cuda_graphs=ctx.cuda_graphs,
            suppress_token_ids=eos if past_eos else None,
        )
        stats.append(gen.stats)
        for row, i in enumerate(batch):
            tokens[i] = gen.tokens[row, : gen.lengths[row]].tolist()
    return [tokens[i] for i in range(len(prompts))], stats


def sum_stats(stats: list[dict]) -> dict:
    """Throughput over all batches of a run (the `perf/*` keys every task reports)."""
    total = lambda key: sum(s.get(key, 0) for s in stats)  # noqa: E731
    return {
        "perf/prefill_s": total("prefill_s"),
        "perf/decode_s": total("decode_s"),
        "perf/prompt_tokens": total("prompt_tokens"),
        "perf/generated_tokens": total("generated_tokens"),
        "perf/decode_tok_per_s": total("decode_tokens") / max(total("decode_s"), 1e-9),
        "perf/prefill_tok_per_s": total("prompt_tokens") / max(total("prefill_s"), 1e-9),
        "perf/rebuilt_tokens": total("rebuilt_tokens"),
        "perf/rebuilt_per_step": total("rebuilt_tokens") / max(total("decode_tokens"), 1),  # per row and step
        "perf/rebuilt_kept": total("rebuilt_kept_tokens")  # share of the tokens brought back that the release kept
        / max(total("rebuilt_tokens") + total("recalled_tokens"), 1),
        "perf/reused_per_step": total("reused_tokens") / max(total("decode_tokens"), 1),  # rebuild=keep: held picks
        "perf/recalled_per_step": total("recalled_tokens") / max(total("decode_tokens"), 1),  # rebuild=recall: copied
        "perf/peak_kv_bytes": max([s.get("peak_kv_bytes", 0) for s in stats] + [0]),  # device: the cache
        "perf/peak_store_bytes": max([s.get("store_bytes", 0) for s in stats] + [0]),  # recall's store (host on CUDA)
    }
