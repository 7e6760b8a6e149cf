"""The output: each row against full attention, the JSON written, and the tables printed."""

from __future__ import annotations

import torch
from tabulate import tabulate

from adore.bench.rounds import spread
from adore.io import write_json

HEADERS = [
    "method", "batch", "prefill_s", "decode tok/s", "x floor", "x full", "ms/step", "p90 ms",
    "KV MiB (decode)", "KV MiB (peak)", "store MiB", "history MiB", "rebuilt/step", "kept", "reused/step",
    "recalled/step", "KL to full",
]  # fmt: skip


def compare_to_full(rows: list[dict], budget: bool) -> None:
    """Set each row's `x_full`: its speed over full attention's at the same batch. Under a KV budget each method
    runs a batch of its own, minutes apart, so the ratio goes through each batch's clock (`run_batch`): (row / its
    clock) / (full attention / its clock), the machine's drift divided out; `x_full_raw` keeps the plain ratio."""
    full = [r for r in rows if r["method"] == "full"]
    for r in rows:
        r.setdefault("x_floor", None)
        ref = next((f for f in full if f["batch"] == r["batch"]), full[0] if budget and full else None)
        if r["method"] == "clock" or ref is None:
            r["x_full"] = None
            continue
        r["x_full"] = r["decode_tok_per_s"] / ref["decode_tok_per_s"]
        if budget and r.get("clock_tok_per_s") and ref.get("clock_tok_per_s"):
            r["x_full_raw"] = r["x_full"]
            r["x_full"] *= ref["clock_tok_per_s"] / r["clock_tok_per_s"]


def write(args, rows: list[dict], ab: list[dict], device: str, dtype: torch.dtype) -> None:
    """`args.out`: the flags (but `out`), the device, the rows and the prefill A/B rows."""
    setup = {k: v for k, v in vars(args).items() if k not in ("out",)} | {"device_name": device, "dtype": str(dtype)}
    write_json(args.out, {"setup": setup, "rows": rows, "prefill_ab": ab, "torch": torch.__version__})


def device_is_cuda(device: str) -> bool:
    return "CPU" not in device


def mib(n: int | None) -> float | None:
    return None if n is None else n / 2**20


def print_tables(args, rows: list[dict], ab: list[dict], device: str, synthetic: bool) -> None:
    """The rows' table, which rows shared a prefill forward, and the prefill A/B table."""
    table = [
        [
            r["method"],
            r["batch"],
            r["prefill_s"],
            r["decode_tok_per_s"],
            r["x_floor"],
            r["x_full"],
            r["latency_ms_mean"],
            r["latency_ms_p90"],
            mib(r["kv_bytes_decode"]),
            mib(r["kv_bytes_peak"]),
            mib(r.get("store_bytes")),
            mib(r.get("history_bytes")),
            r["rebuilt_per_step"],
            r["rebuilt_kept"],
            r.get("reused_per_step"),
            r.get("recalled_per_step"),
            r.get("kl_full"),
        ]
        for r in rows
    ]
    headers = HEADERS
    if args.rounds > 1:  # each row's ratios to its floor over the rounds, beside their median
        headers = [*HEADERS[:5], "x floor range", *HEADERS[5:]]
        table = [[*line[:5], spread(r), *line[5:]] for line, r in zip(table, rows, strict=True)]
    budget = ""
    if args.kv_budget_gib:
        budget = f", KV budget {args.kv_budget_gib} GiB (recall's store within {args.store_budget_gib} GiB"
        budget += ", host memory)" if device_is_cuda(device) else ", the same RAM: both charged to it)"
    print(
        f"\n{args.model} on {device}, prompt {args.prompt_len}{' (assumed)' if synthetic else ''}, "
        f"{args.new_tokens} new tokens, m={args.m}, R={args.R}{budget}"
        + (f"; medians of {args.rounds} rounds" if args.rounds > 1 else "")
    )
    print(tabulate(table, headers=headers, floatfmt=".2f", missingval="—"))
    groups: dict[tuple, list[str]] = {}
    for r in rows:
        if r.get("prefill_shared_with"):
            groups.setdefault((r["batch"], r["prefill_shared_with"]), []).append(r["method"])
    for (batch, _), tags in groups.items():
        print(f"batch {batch}: one prefill forward for {', '.join(tags)} (prefill_s = it + each method's release)")
    if ab:
        print(f"\nprefill alone, {args.prefill_ab} rounds in turns (x HF: against transformers' generate of 1 token)")
        print(
            tabulate(
                [[r["contender"], r["batch"], r["median_s"], min(r["times_s"]), r["x_hf"], r["x_full"]] for r in ab],
                headers=["prefill", "batch", "median s", "min s", "x HF", "x full"],
                floatfmt=".3f",
                missingval="—",
            )
        )
    print(f"written to {args.out}")
