"""Decode-throughput benchmark: every method in one process, ratios to full attention measured in the same run.

    python -m adore.bench --prompt-len 4096 --new-tokens 256 --batch 4 --m 256 --R 0,8

Methods are the configs of conf/method/ (`adore.registry`), built as `eval.py method=<name> budget=<m>`
builds them: `--methods` takes their names (default: every one but `oracle`, whose shadow full-attention
session makes it slow by design). `--R` is a comma list: a method whose config has an `R` field gives one
row per value (`--R 0,8`: ADORE without rebuild and with 8 rebuilt tokens), the others one row. A method
that cannot run on the model (e.g. `adore_trained`, whose controller fits SmolLM2's width) is skipped with
a note.

Every method decodes through the engine's own loop (`adore.generate.decode`, greedy), prefill timed apart
from decode. Each method is warmed up first; CUDA is synchronised before every clock read. `--hf-generate`
adds transformers' own `generate` with full attention (decode time = generate(N) - generate(1)).
`--model llama2-7b-random` builds a Llama-2-7B-shaped model with random weights (speed does not depend on
the values) for GPU runs.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from tabulate import tabulate

from adore.data import data_root
from adore.generate import Generation, decode, decode_steps, synchronize, timed_prefill
from adore.io import write_json
from adore.registry import build_method, method_config, method_names
from adore.session import Session


def build_model(name: str, dtype: torch.dtype, device: str):
    if name == "llama2-7b-random":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
            max_position_embeddings=8192,
        )
        with torch.device(device):
            model = LlamaForCausalLM(config).to(dtype)
        return model.eval(), None
    from adore.models import ModelSpec, load

    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    model, tokenizer = load(ModelSpec(name_or_path=name, dtype=dtype_name, device=device))
    return model, tokenizer


def prompts(tokenizer, vocab_size: int, batch: int, length: int) -> torch.Tensor:
    """Real text (WikiText-2 slices) when the tokenizer and the offline copy are there, else random ids."""
    path = data_root() / "wikitext-2/wiki.test.raw"
    if tokenizer is not None and path.exists():
        ids = tokenizer(path.read_text(encoding="utf-8")[: batch * length * 8], add_special_tokens=False)["input_ids"]
        if len(ids) >= batch * length:
            return torch.tensor(ids[: batch * length]).view(batch, length)
    return torch.randint(100, vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))


def run_method(
    model, method, ids: torch.Tensor, new_tokens: int, progress: bool = False, cuda_graphs: bool = False
) -> tuple[dict, Generation]:
    """Prefill (B, L) `ids`, then greedy-decode `new_tokens` per row with `decode`: the row and the output."""
    B, L = ids.shape
    session = Session(model, method, B, L + new_tokens, cuda_graphs=cuda_graphs)
    logits, prefill_s = timed_prefill(session, ids, torch.ones_like(ids, dtype=torch.bool))
    kv_bytes = session.cache.nbytes  # after prefill's release: what decode holds
    gen = decode(session, decode_steps(session, logits, new_tokens, [], 0), new_tokens, 0, progress, latencies=True)
    latencies = gen.stats["step_s"]  # one per fed token: new_tokens - 1 (the first token comes from prefill)
    decode_s = sum(latencies)
    row = {
        "method": method.tag,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "decode_tok_per_s": B * len(latencies) / decode_s,
        "latency_ms_mean": 1000 * decode_s / len(latencies),
        "latency_ms_p50": 1000 * statistics.median(latencies),
        "latency_ms_p90": 1000 * sorted(latencies)[int(0.9 * (len(latencies) - 1))],
        "kv_bytes_decode": kv_bytes,
        "kv_bytes_peak": session.peak_kv_bytes,
        "rebuilt_tokens": session.rebuilt,
    }
    return row, gen


@torch.no_grad()
def run_hf_generate(model, ids: torch.Tensor, new_tokens: int) -> dict:
    device = model.device
    mask = torch.ones_like(ids)
    kwargs = dict(do_sample=False, attention_mask=mask, pad_token_id=0, eos_token_id=None)
    times = {}
    for n in (1, new_tokens):
        synchronize(device)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        synchronize(device)
        times[n] = time.perf_counter() - start
    decode_s = times[new_tokens] - times[1]
    steps = new_tokens - 1
    return {
        "method": "hf_generate_full",
        "prefill_s": times[1],
        "decode_s": decode_s,
        "decode_tok_per_s": ids.shape[0] * steps / decode_s,
        "latency_ms_mean": 1000 * decode_s / steps,
        "latency_ms_p50": None,
        "latency_ms_p90": None,
        "kv_bytes_decode": None,
        "kv_bytes_peak": None,
        "rebuilt_tokens": 0,
    }


def methods_for(names: list[str], m: int, R: list[int], controller: str | None) -> list[tuple[str, dict]]:
    """(config name, overrides) per row: one per value of `R` for configs with an `R` field."""
    unknown = [n for n in names if n not in method_names()]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {method_names()}")
    rows = []
    for name in names:
        fields = method_config(name, m)
        extra = {"controller": controller} if controller and "controller" in fields else {}
        rows += [(name, extra | {"R": r}) for r in R] if "R" in fields else [(name, extra)]
    return rows


def runnable(model, specs: list[tuple[str, dict]], m: int, ids: torch.Tensor, cuda_graphs: bool) -> list:
    """Build each method and warm it up on a short prompt; skip (with a note) those that fail on this model."""
    methods = []
    for name, overrides in specs:
        try:
            method = build_method(name, m, **overrides)
            run_method(model, method, ids[:, :128], 4, cuda_graphs=cuda_graphs)
        except (ValueError, RuntimeError) as err:
            settings = "".join(f" {k}={v}" for k, v in overrides.items())
            print(f"[skip] method={name}{settings}: {type(err).__name__}: {str(err).splitlines()[0]}")
            continue
        methods.append(method)
    if not methods:
        raise SystemExit("no method could run on this model: see the [skip] notes above")
    return methods


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="packaged:smollm2", help="packaged:smollm2, a hub id/folder, or llama2-7b-random")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 (CUDA default) | float16")
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--m", type=int, default=256)
    p.add_argument("--R", default="0,8", help="comma list: one row per value for methods with an R field")
    p.add_argument(
        "--controller", default=None, help="controller.pt for methods with a controller field (default: the config's)"
    )
    p.add_argument("--methods", default=None, help=f"comma list of {method_names()} (default: all but oracle)")
    p.add_argument("--hf-generate", action="store_true", help="also time transformers' generate (full attention)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--cuda-graphs", action="store_true", help="replay decode steps as CUDA graphs (GPU; not h2o/oracle)"
    )
    p.add_argument("--out", default="outputs/bench/bench.json")
    args = p.parse_args(argv)
    for key in ("prompt_len", "new_tokens", "batch", "m"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key.replace('_', '-')}={getattr(args, key)} must be positive")
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be at least 2 (the first token comes from prefill)")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        R = [int(r) for r in args.R.split(",")]
    except ValueError:
        raise SystemExit(f"--R={args.R!r} must be a comma list of integers, e.g. 0,8") from None
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    names = args.methods.split(",") if args.methods else [n for n in method_names() if n != "oracle"]
    specs = methods_for(names, args.m, R, args.controller)

    model, tokenizer = build_model(args.model, dtype, args.device)
    ids = prompts(tokenizer, model.config.vocab_size, args.batch, args.prompt_len).to(model.device)
    methods = runnable(model, specs, args.m, ids, args.cuda_graphs)
    rows = []
    if args.hf_generate:
        rows.append(run_hf_generate(model, ids, args.new_tokens))
    for method in methods:
        rows.append(run_method(model, method, ids, args.new_tokens, progress=True, cuda_graphs=args.cuda_graphs)[0])
    full = next((r for r in rows if r["method"] == "full"), None)
    hf = next((r for r in rows if r["method"] == "hf_generate_full"), None)
    for r in rows:
        r["x_full"] = r["decode_tok_per_s"] / full["decode_tok_per_s"] if full else None
        r["x_hf_generate"] = r["decode_tok_per_s"] / hf["decode_tok_per_s"] if hf else None
    device = (
        torch.cuda.get_device_name()
        if model.device.type == "cuda"
        else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    setup = {k: v for k, v in vars(args).items() if k not in ("out",)} | {"device_name": device, "dtype": str(dtype)}
    write_json(args.out, {"setup": setup, "rows": rows, "torch": torch.__version__})
    headers = [
        "method",
        "prefill_s",
        "decode tok/s",
        "x full",
        "x hf generate",
        "ms/token",
        "p50 ms",
        "p90 ms",
        "KV MiB (decode)",
        "rebuilt",
    ]
    table = [
        [
            r["method"],
            r["prefill_s"],
            r["decode_tok_per_s"],
            r["x_full"],
            r["x_hf_generate"],
            r["latency_ms_mean"],
            r["latency_ms_p50"],
            r["latency_ms_p90"],
            None if r["kv_bytes_decode"] is None else r["kv_bytes_decode"] / 2**20,
            r["rebuilt_tokens"],
        ]
        for r in rows
    ]
    print(
        f"\n{args.model} on {device}, prompt {args.prompt_len}, {args.new_tokens} new tokens, batch {args.batch}, m={args.m}, R={args.R}"
    )
    print(tabulate(table, headers=headers, floatfmt=".2f", missingval="—"))
    print(f"written to {args.out}")
    return rows


if __name__ == "__main__":
    main()
