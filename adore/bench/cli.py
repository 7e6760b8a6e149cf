"""`python -m adore.bench`: the flags, checked before the model loads, then one run."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch

import adore.bench
from adore.bench.batch import run_batch
from adore.bench.budget import plan
from adore.bench.model import build_model, prompts
from adore.bench.prefill_ab import prefill_ab
from adore.bench.report import compare_to_full, print_tables, write
from adore.bench.rounds import merge_rounds
from adore.bench.specs import methods_for, runnable
from adore.bench.timing import run_hf_generate
from adore.engine.rebuild import POLICIES
from adore.models import device_name
from adore.registry import build_method, method_names


def model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="packaged:smollm2", help="packaged:smollm2, a hub id/folder, or llama2-7b-random")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 (CUDA default) | float16")


def workload_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch", default="4", help="comma list: rows per batch size, e.g. 1,4,16")


def method_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--m", type=int, default=256)
    p.add_argument(
        "--R", default=None, help="comma list: one row per value for methods with an R field (default: each config's R)"
    )
    policies = ", ".join(POLICIES)
    p.add_argument("--rebuild", default=None, help=f"comma list of rebuild policies ({policies}) for R > 0")
    p.add_argument("--rebuild-every", default=None, help="comma list: rebuild on every k-th step, for R > 0")
    p.add_argument("--rebuild-forward", default=None, help="comma list: with --rebuild keep, picks forwarded per step")
    p.add_argument("--page-size", default=None, help="comma list: with --rebuild recall, tokens per page (0: tokens)")
    p.add_argument("--store-dtype", default=None, help="comma list: recall's store, model | bfloat16 | int8 | int4")
    p.add_argument(
        "--method-options",
        default=None,
        help="JSON of method fields set wherever a config has them, e.g. '{\"page_summary\": true}' or an untrained "
        'controller\'s shape \'{"config": {"heads": 8, "head_dim": 32, "input_layer": 20}}\'',
    )
    p.add_argument(
        "--controller", default=None, help="controller.pt for methods with a controller field (default: the config's)"
    )
    p.add_argument("--methods", default=None, help=f"comma list of {method_names()} (default: all but oracle)")


def mode_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf-generate", action="store_true", help="also time transformers' generate (full attention)")
    p.add_argument("--kv-budget-gib", type=float, default=None, help="each method at the largest batch whose KV fits")
    p.add_argument(
        "--store-budget-gib",
        type=float,
        default=16,
        help="with --kv-budget-gib: recall's store of released KV must fit this too (host memory; the same RAM on a CPU)",
    )
    p.add_argument("--synthetic-prompt", action="store_true", help="decode from an assumed prefill (random KV)")
    p.add_argument(
        "--prefill-chunk",
        default="0",
        help="comma list: bounded methods prefill in chunks of N (0: one shot, whatever the length)",
    )
    p.add_argument(
        "--kl", action="store_true", help="KL(full || method) with full attention's greedy output teacher-forced"
    )
    p.add_argument(
        "--prefill-ab",
        type=int,
        default=0,
        help="also time prefill alone, N rounds in turns with transformers' (median of each; 0: off)",
    )


def run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure each batch N times over: each row at its median, with its ratios' range (x floor range)",
    )
    p.add_argument(
        "--cuda-graphs", action="store_true", help="replay decode steps as CUDA graphs (GPU; not h2o/oracle)"
    )
    p.add_argument("--out", default="outputs/bench/bench.json")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m adore.bench",
        description=adore.bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for add in (model_flags, workload_flags, method_flags, mode_flags, run_flags):
        add(p)
    return p


@dataclass
class Options:
    """The flags that need parsing, parsed: batch sizes, prefill chunks (None: one shot), a (config name,
    overrides) per method row, full attention first, the dtype, and whether prefill is assumed."""

    batches: list[int]
    chunks: list[int | None]
    specs: list[tuple[str, dict]]
    dtype: torch.dtype
    synthetic: bool


def comma_list(text: str, kind, flag: str) -> list:
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"{flag}={text!r} must be a comma list of {kind.__name__}, e.g. {flag} 1,4") from None
    return values


def check(args) -> Options:
    """Raise SystemExit on a bad flag or combination of flags, before the model loads."""
    for key in ("prompt_len", "new_tokens", "m"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key.replace('_', '-')}={getattr(args, key)} must be positive")
    if args.rounds < 1:
        raise SystemExit(f"--rounds={args.rounds} must be at least 1 (each batch measured that many times)")
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be at least 2 (the first token comes from prefill)")
    batches = comma_list(args.batch, int, "--batch")
    chunks = [c or None for c in comma_list(args.prefill_chunk, int, "--prefill-chunk")]
    if min(batches) < 1:
        raise SystemExit(f"--batch={args.batch!r}: every batch size must be positive")
    if args.kv_budget_gib is not None and args.kv_budget_gib <= 0:
        raise SystemExit(f"--kv-budget-gib={args.kv_budget_gib} must be positive (GiB of KV cache)")
    if args.kv_budget_gib is not None and args.hf_generate:
        raise SystemExit("--hf-generate times one batch: drop it with --kv-budget-gib")
    if args.kl and (args.synthetic_prompt or args.kv_budget_gib is not None):
        raise SystemExit("--kl needs real prompts: drop --synthetic-prompt / --kv-budget-gib")
    if args.prefill_ab < 0 or (args.prefill_ab and (args.synthetic_prompt or args.kv_budget_gib is not None)):
        raise SystemExit(
            f"--prefill-ab={args.prefill_ab} times real prefills: give N >= 1 rounds without --synthetic-prompt / "
            "--kv-budget-gib (0: off)"
        )
    synthetic = args.synthetic_prompt or args.kv_budget_gib is not None
    return Options(batches, chunks, row_specs(args), dtype_of(args), synthetic)


def row_specs(args) -> list[tuple[str, dict]]:
    """`--methods` with `--R` and the rebuild flags: (config name, overrides) per row, full attention first
    (`--kl` needs its output), each built once so that a bad policy value fails here."""
    R = comma_list(args.R, int, "--R") if args.R else None  # None: each config's own R
    rebuild = args.rebuild.split(",") if args.rebuild else None  # None: the method config's
    every = comma_list(args.rebuild_every, int, "--rebuild-every") if args.rebuild_every else None
    forward = comma_list(args.rebuild_forward, int, "--rebuild-forward") if args.rebuild_forward else None
    pages = comma_list(args.page_size, int, "--page-size") if args.page_size else None
    stores = args.store_dtype.split(",") if args.store_dtype else None
    try:
        extra = json.loads(args.method_options) if args.method_options else None
    except json.JSONDecodeError as err:
        raise SystemExit(
            f"--method-options={args.method_options!r} is not JSON ({err}): e.g. '{{\"sinks\": 4}}'"
        ) from None
    names = args.methods.split(",") if args.methods else [n for n in method_names() if n != "oracle"]
    if args.kl and "full" not in names:
        raise SystemExit("--kl measures the distance to full attention: add full to --methods")
    specs = methods_for(names, args.m, R, args.controller, rebuild, every, forward, pages, stores, extra)
    specs.sort(key=lambda spec: spec[0] != "full")
    for name, overrides in specs:
        try:
            build_method(name, args.m, **overrides)
        except ValueError as err:
            settings = "".join(f" {k}={v}" for k, v in overrides.items())
            raise SystemExit(f"method={name}{settings}: {err}") from None
    return specs


def dtype_of(args) -> torch.dtype:
    return getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))


def main(argv=None) -> list[dict]:
    """Run the benchmark the flags in `argv` (default: the command line) describe; return its rows."""
    args = parser().parse_args(argv)
    opts = check(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = build_model(args.model, opts.dtype, args.device)
    warm = prompts(tokenizer, model.config.vocab_size, 2, min(args.prompt_len, 128)).to(model.device)
    methods = runnable(model, opts.specs, args.m, warm, args.cuda_graphs)
    rows, ab = [], []
    for batch, batch_methods in plan(
        model, methods, opts.batches, args.kv_budget_gib, args.prompt_len + args.new_tokens, args.store_budget_gib
    ):
        ids = prompts(tokenizer, model.config.vocab_size, batch, args.prompt_len).to(model.device)
        if args.prefill_ab:
            ab += prefill_ab(model, batch_methods, ids, args.new_tokens, args.prefill_ab)
        if args.hf_generate:
            rows.append(run_hf_generate(model, ids, args.new_tokens))
        kwargs = dict(synthetic=opts.synthetic, cuda_graphs=args.cuda_graphs, clock=args.kv_budget_gib is not None)
        rounds = [  # KL is the same every round: measured in the first
            run_batch(
                model, batch_methods, ids, args.new_tokens, args.m, opts.chunks, with_kl=args.kl and not i, **kwargs
            )
            for i in range(args.rounds)
        ]
        rows += merge_rounds(rounds)
    compare_to_full(rows, budget=bool(args.kv_budget_gib))
    device = device_name(model.device)
    write(args, rows, ab, device, opts.dtype)
    print_tables(args, rows, ab, device, opts.synthetic)
    return rows
