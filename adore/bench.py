"""Decode-throughput benchmark: every method in one process, ratios to full attention measured in the same run.

    python -m adore.bench --prompt-len 4096 --new-tokens 256 --batch 4 --m 256 --R 8

Prefill (the same full-attention work for every method, except H2O's recorded weights) is timed apart from
decode. A warm-up runs first; CUDA is synchronised before every clock read. `--hf-generate` adds
transformers' own `generate` with full attention (decode time = generate(N) - generate(1)).
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
from tqdm.auto import tqdm

from adore.data import data_root
from adore.generate import synchronize
from adore.io import write_json
from adore.methods import H2O, Adore, Full, Oracle, Random, Streaming, Window
from adore.session import Session


def build_model(name: str, dtype: torch.dtype, device: str):
    if name == "llama2-7b-random":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=32, vocab_size=32000, max_position_embeddings=8192)
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


@torch.no_grad()
def run_method(model, method, ids: torch.Tensor, new_tokens: int, progress: bool, cuda_graphs: bool = False) -> dict:
    device = model.device
    B, L = ids.shape
    session = Session(model, method, B, L + new_tokens, cuda_graphs=cuda_graphs)
    synchronize(device)
    start = time.perf_counter()
    logits = session.feed(ids)
    synchronize(device)
    prefill_s = time.perf_counter() - start
    kv_bytes = session.cache.nbytes
    latencies = []
    for _ in tqdm(range(new_tokens - 1), desc=method.tag, disable=not progress, leave=False):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        logits = session.feed(nxt)
        synchronize(device)
        latencies.append(time.perf_counter() - start)
    decode_s = sum(latencies)
    return {
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


def methods_for(names: list[str], m: int, R: int, controller: str | None):
    table = {
        "full": lambda: Full(),
        "window": lambda: Window(m=m),
        "streaming": lambda: Streaming(m=m),
        "h2o": lambda: H2O(m=m),
        "random": lambda: Random(m=m),
        "adore_r0": lambda: Adore(m=m, R=0, controller=controller),
        "adore": lambda: Adore(m=m, R=R, controller=controller),
        "oracle": lambda: Oracle(m=m, R=R),
    }
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {sorted(table)}")
    return [table[n]() for n in names]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="packaged:smollm2", help="packaged:smollm2, a hub id/folder, or llama2-7b-random")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 (CUDA default) | float16")
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--m", type=int, default=256)
    p.add_argument("--R", type=int, default=8)
    p.add_argument("--controller", default=None, help="controller.pt (default: untrained; speed is the same)")
    p.add_argument("--methods", default="full,window,streaming,h2o,adore_r0,adore")
    p.add_argument("--hf-generate", action="store_true", help="also time transformers' generate (full attention)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cuda-graphs", action="store_true", help="replay decode steps as CUDA graphs (GPU; not h2o/oracle)")
    p.add_argument("--out", default="outputs/bench/bench.json")
    args = p.parse_args(argv)
    for key in ("prompt_len", "new_tokens", "batch", "m"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key.replace('_', '-')}={getattr(args, key)} must be positive")
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be at least 2 (the first token comes from prefill)")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    methods = methods_for(args.methods.split(","), args.m, args.R, args.controller)

    model, tokenizer = build_model(args.model, dtype, args.device)
    ids = prompts(tokenizer, model.config.vocab_size, args.batch, args.prompt_len).to(model.device)
    run_method(model, Window(m=min(args.m, 64)), ids[:, :128], 4, progress=False)  # warm-up
    rows = []
    if args.hf_generate:
        rows.append(run_hf_generate(model, ids, args.new_tokens))
    for method in methods:
        rows.append(run_method(model, method, ids, args.new_tokens, progress=True, cuda_graphs=args.cuda_graphs))
    full = next((r for r in rows if r["method"] == "full"), None)
    hf = next((r for r in rows if r["method"] == "hf_generate_full"), None)
    for r in rows:
        r["x_full"] = r["decode_tok_per_s"] / full["decode_tok_per_s"] if full else None
        r["x_hf_generate"] = r["decode_tok_per_s"] / hf["decode_tok_per_s"] if hf else None
    device = torch.cuda.get_device_name() if model.device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    setup = {k: v for k, v in vars(args).items() if k not in ("out",)} | {"device_name": device, "dtype": str(dtype)}
    write_json(args.out, {"setup": setup, "rows": rows, "torch": torch.__version__})
    headers = ["method", "prefill_s", "decode tok/s", "x full", "x hf generate", "ms/token", "p50 ms", "p90 ms", "KV MiB (decode)", "rebuilt"]
    table = [
        [r["method"], r["prefill_s"], r["decode_tok_per_s"], r["x_full"], r["x_hf_generate"], r["latency_ms_mean"],
         r["latency_ms_p50"], r["latency_ms_p90"], None if r["kv_bytes_decode"] is None else r["kv_bytes_decode"] / 2**20, r["rebuilt_tokens"]]
        for r in rows
    ]
    print(f"\n{args.model} on {device}, prompt {args.prompt_len}, {args.new_tokens} new tokens, batch {args.batch}, m={args.m}, R={args.R}")
    print(tabulate(table, headers=headers, floatfmt=".2f", missingval="—"))
    print(f"written to {args.out}")
    return rows


if __name__ == "__main__":
    main()
