"""Decode-throughput benchmark: every method in one process, ratios to the floor and to full attention measured
in the same run.

    python -m adore.bench --prompt-len 4096 --new-tokens 256 --batch 1,4,16 --m 256 --R 0,8
    python -m adore.bench --kv-budget-gib 4 --m 256 --R 8          # the largest batch of each method in 4 GiB of KV

Methods are the configs of conf/method/ (`adore.registry`), built as `eval.py method=<name> budget=<m>`
builds them: `--methods` takes their names (default: every one but `oracle`, whose shadow full-attention
session makes it slow by design). `--R` is a comma list: a method whose config has an `R` field gives one
row per value (`--R 0,8`: ADORE without rebuild and with 8 rebuilt tokens), the others one row. A method
that cannot run on the model (e.g. `adore_trained`, whose controller fits SmolLM2's width) is skipped with
a note.

Every method decodes through the engine's own loop (`adore.generate.decode`, greedy), prefill timed apart
from decode. Methods that prefill alike (the same recordings and residual stream: `Session.prefill_signature`)
share one prompt forward per batch and release it each on their own (`SharedPrefill`); chunked prefills are
each method's own. Each method is warmed up first; CUDA is synchronised before every clock read. `--hf-generate`
adds transformers' own `generate` with full attention (decode time = generate(N) - generate(1)).
`--prefill-ab N` times prefill alone, N rounds in turns with transformers' (one method per prefill signature),
and compares medians: the fair prefill comparison. `--model llama2-7b-random` builds a Llama-2-7B-shaped model
with random weights (speed does not depend on the values) for GPU runs.

The floor: `floor_m<m>` and `floor_ctx<L>` are a bare forward, one token per row, over a cache already holding m
tokens / the prompt plus half the new tokens (full attention's mean), with no bookkeeping: the best any engine
can do. `x_floor` is each row against its own floor (bounded methods: m; full attention: the context).
`--rebuild` / `--rebuild-every` add rows per rebuild policy for methods that rebuild; `rebuilt/step` is the
tokens rebuilt per row and step and `kept` the share of them the same step's release kept.

`--kv-budget-gib`: each method runs the largest batch whose KV cache fits the budget (bounded methods hold
min(m, context) + R + 1 slots per row, full attention the whole context): how a bounded cache becomes
throughput, and how the paper's +221.8 % reads. A batch of hundreds cannot prefill 4k tokens on a CPU in
reasonable time, so this mode (and `--synthetic-prompt`) starts decoding from the state a prefill leaves, with
random keys and values: history of L tokens, the newest ones cached. Decode cost depends on shapes, not values;
prefill is then not timed. The budget counts KV slots only: `history MiB` is what a session holds besides, per
fed token and for rebuild (ids, positions and the method's per-token state, e.g. the probe controller's 256
floats per token), and it grows with the context.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from tabulate import tabulate

from adore.attention import PLAIN_CAUSAL, register
from adore.cache import SlotCache, kv_bytes_per_slot
from adore.data import data_root
from adore.generate import Generation, decode, decode_steps, synchronize, teacher_force, timed_prefill
from adore.io import write_json
from adore.registry import build_method, method_config, method_names
from adore.session import Session, capacity_for


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
    model,
    method,
    ids: torch.Tensor,
    new_tokens: int,
    progress: bool = False,
    cuda_graphs: bool = False,
    synthetic: bool = False,
    prefill_chunk: int | None = None,
    shared: SharedPrefill | None = None,
) -> tuple[dict, Generation]:
    """Prefill (B, L) `ids` (`synthetic`: assume it, see the module doc; `prefill_chunk`: in chunks, releasing
    between them; `shared`: settle a forward shared with the methods that prefill alike), then greedy-decode
    `new_tokens` per row with `decode`: the row and the output."""
    B, L = ids.shape
    session = Session(model, method, B, L + new_tokens, cuda_graphs=cuda_graphs)
    shared_with = None
    if synthetic:
        logits, prefill_s = assume_prefilled(session, ids), None
    elif shared is not None and not prefill_chunk and session.prefill_signature is not None:
        logits, prefill_s, shared_with = shared.prefill(session)
    else:
        chunk = prefill_chunk or L  # None: one shot
        logits, prefill_s = timed_prefill(session, ids, torch.ones_like(ids, dtype=torch.bool), chunk)
    kv_bytes = session.cache.nbytes  # after prefill's release: what decode holds
    rebuilt_before, kept_before = session.rebuilt, session.rebuilt_kept
    gen = decode(session, decode_steps(session, logits, new_tokens, [], 0), new_tokens, 0, progress, latencies=True)
    # one per fed token: new_tokens - 1 (the first token comes from prefill); the first step, which captures the
    # CUDA graphs of this session's cache, is not timed
    latencies = gen.stats["step_s"][1:] if len(gen.stats["step_s"]) > 1 else gen.stats["step_s"]
    rebuilt = session.rebuilt - rebuilt_before
    row = {
        "method": method.tag + (f"_chunk{prefill_chunk}" if prefill_chunk else ""),
        "batch": B,
        "prefill_s": prefill_s,
        "prefill_shared_with": shared_with,
        **step_times(latencies, B),
        "kv_bytes_decode": kv_bytes,
        "kv_bytes_peak": session.peak_kv_bytes,
        "history_bytes": session.history_bytes,
        "rebuilt_tokens": session.rebuilt,
        "rebuilt_per_step": rebuilt / (B * len(gen.stats["step_s"])),  # every decode feed, the untimed one too
        "rebuilt_kept": (session.rebuilt_kept - kept_before) / rebuilt if rebuilt else None,
    }
    return row, gen


class SharedPrefill:
    """One timed prompt forward per prefill signature (`Session.prefill_signature`), kept for the methods of a
    batch that prefill alike: each settles (releases) it on its own. A method's `prefill_s` is the shared
    forward's time plus its own settle's; the copy of the forward's state into its session is not timed (an
    engine serving one method never makes it)."""

    def __init__(self, model, ids: torch.Tensor, new_tokens: int):
        self.model, self.ids, self.new_tokens = model, ids, new_tokens
        self.forwards: dict = {}  # signature -> (source session, its unsettled forward, seconds, first method's tag)

    @torch.no_grad()
    def prefill(self, session: Session) -> tuple[torch.Tensor, float, str]:
        """Settle the shared forward in `session`: its last logits, prefill seconds and the tag of the method
        whose session ran the forward."""
        key = session.prefill_signature
        if key not in self.forwards:
            B, L = self.ids.shape
            source = Session(self.model, session.method, B, L + self.new_tokens)
            synchronize(source.device)
            start = time.perf_counter()
            step = source.forward(self.ids, torch.ones_like(self.ids, dtype=torch.bool))
            synchronize(source.device)
            self.forwards[key] = (source, step, time.perf_counter() - start, session.method.tag)
        source, step, forward_s, first = self.forwards[key]
        step = session.adopt(source, step)
        synchronize(session.device)
        start = time.perf_counter()
        logits = session.settle(step)
        synchronize(session.device)
        return logits, forward_s + time.perf_counter() - start, first


def step_times(latencies: list[float], batch: int) -> dict:
    """Decode time, tokens/s and per-step latency (mean, p50, p90) of timed steps of `batch` rows."""
    decode_s = sum(latencies)
    return {
        "decode_s": decode_s,
        "decode_tok_per_s": batch * len(latencies) / decode_s,
        "latency_ms_mean": 1000 * decode_s / len(latencies),
        "latency_ms_p50": 1000 * statistics.median(latencies),
        "latency_ms_p90": 1000 * sorted(latencies)[int(0.9 * (len(latencies) - 1))],
    }


def assume_prefilled(session: Session, ids: torch.Tensor) -> torch.Tensor:
    """Put `session` in the state a prefill of `ids` (B, L) leaves, without running it: the history holds the L
    tokens, the newest min(capacity - R - 1, L) are cached with random keys and values, and the method's
    per-token state is random too (flags set, positions true), so that a controller ranks and rebuilds the
    assumed tokens as it would prefilled ones. Then one real feed (the last prompt token) sets up the method's
    running state; its logits are returned."""
    B, L = ids.shape
    device = session.device
    first = ids[:, :-1].to(device)
    n = first.shape[1]
    session._grow_history(n)
    session.hist_ids[:, :n] = first
    session.hist_pos[:, :n] = torch.arange(n, device=device)
    session.hist_valid[:, :n] = True
    session.length, session.next_pos[:] = n, n
    for state in session.state.tokens.values():  # e.g. H2O's mass, the probe's z_i, its positions and flags
        if state.dtype == torch.bool:
            state[:, :n] = True
        elif state.dtype == torch.long:
            state[:, :n] = session.hist_pos[:, :n]
        else:
            state[:, :n].uniform_()
    keep = min(n, session.cache.capacity - session.method.R - 1 if session.method.m is not None else n)
    cols = torch.arange(n - keep, n, device=device).expand(B, -1)
    slots = torch.arange(keep, device=device).expand(B, -1)
    session.slot_col[:, :keep], session.slot_pos[:, :keep] = cols, cols
    session.hist_slot.scatter_(1, cols, slots)
    session.occupied = keep
    session.cache.keys.normal_()
    session.cache.values.normal_()
    return session.feed(ids[:, -1:].to(device))


@torch.no_grad()
def run_floor(model, batch: int, cached: int, new_tokens: int) -> dict:
    """A bare forward, one token per row, over a cache holding `cached` tokens (random keys and values): no
    release, no bookkeeping, only the model and an argmax. Each step overwrites the same slot, so the cache
    holds the same number of tokens at every step."""
    config, device = model.config, model.device
    cache = SlotCache.for_model(config, batch, cached + 1, model.dtype, device)
    cache.keys.normal_()
    cache.values.normal_()
    cache.write_slots = torch.full((batch, 1), cached, device=device)
    model.set_attn_implementation(register())
    pos = torch.full((batch, 1), cached, device=device)
    token = torch.randint(100, config.vocab_size, (batch, 1), device=device)

    def step(t):  # PLAIN_CAUSAL with one query: attend to every slot, no mask
        kwargs = dict(attention_mask=PLAIN_CAUSAL, cache=cache, use_cache=True, logits_to_keep=1)
        return model(input_ids=t, position_ids=pos, **kwargs).logits[:, -1].argmax(-1, keepdim=True)

    for _ in range(2):
        token = step(token)
    latencies = []
    for _ in range(new_tokens - 1):
        synchronize(device)
        start = time.perf_counter()
        token = step(token)
        synchronize(device)
        latencies.append(time.perf_counter() - start)
    return {
        "method": f"floor_{cached}",
        "batch": batch,
        "prefill_s": None,
        **step_times(latencies, batch),
        "kv_bytes_decode": cache.nbytes,
        "kv_bytes_peak": cache.nbytes,
        "rebuilt_tokens": 0,
        "rebuilt_per_step": 0.0,
        "rebuilt_kept": None,
    }


@torch.no_grad()
def forced_logp(model, method, ids: torch.Tensor, forced: torch.Tensor, prefill_chunk: int | None = None):
    """Teacher-force `forced` (B, N) after the prompts `ids` under `method` (prefill in one shot unless
    `prefill_chunk`): its (N, B, vocab) log-probabilities (`kl` against full attention's gives the distance)."""
    logps = []
    teacher_force(
        model,
        method,
        ids.tolist(),
        forced.tolist(),
        0,
        lambda t, logits, *_: logps.append(logits.float().log_softmax(-1)),
        prefill_chunk or ids.shape[1],
    )
    return torch.stack(logps)


def kl(full_logp: torch.Tensor, logp: torch.Tensor) -> float:
    """Mean KL(full || method) over steps and rows, in nats."""
    return float((full_logp.exp() * (full_logp - logp)).sum(-1).mean())


@torch.no_grad()
def hf_generate_s(model, ids: torch.Tensor, new_tokens: int) -> float:
    """Seconds of transformers' own greedy `generate` of exactly `new_tokens` per row, full attention."""
    kwargs = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0, eos_token_id=None)
    synchronize(model.device)
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    synchronize(model.device)
    return time.perf_counter() - start


def run_hf_generate(model, ids: torch.Tensor, new_tokens: int) -> dict:
    times = {n: hf_generate_s(model, ids, n) for n in (1, new_tokens)}
    decode_s = times[new_tokens] - times[1]
    steps = new_tokens - 1
    return {
        "method": "hf_generate_full",
        "batch": ids.shape[0],
        "prefill_s": times[1],
        "decode_s": decode_s,
        "decode_tok_per_s": ids.shape[0] * steps / decode_s,
        "latency_ms_mean": 1000 * decode_s / steps,
        "latency_ms_p50": None,
        "latency_ms_p90": None,
        "kv_bytes_decode": None,
        "kv_bytes_peak": None,
        "rebuilt_tokens": 0,
        "rebuilt_per_step": 0.0,
        "rebuilt_kept": None,
    }


@torch.no_grad()
def prefill_ab(model, methods, ids: torch.Tensor, new_tokens: int, repeats: int) -> list[dict]:
    """Prefill alone, timed in turns: transformers' (`generate` of one token, as `--hf-generate` times it) and
    the first method of each prefill signature (a fresh session, one-shot prefill), `repeats` rounds, each
    round in a rotated order. Drift of the machine (heat, neighbours) then spreads over every contender, and
    medians compare fairly: one prefill per method, timed once in its row, swings by 15 % run to run. One row
    per contender: its times, their median, and that against transformers' and against full attention's."""
    B, L = ids.shape
    valid = torch.ones_like(ids, dtype=torch.bool)
    contenders, seen = {"hf_generate_full": None}, set()
    for method in methods:
        signature = Session(model, method, B, L + new_tokens).prefill_signature or method.tag  # None: its own
        if signature not in seen:
            seen.add(signature)
            contenders[method.tag] = method
    times = {tag: [] for tag in contenders}
    tags = list(contenders)
    for round_ in range(repeats):
        for tag in tags[round_ % len(tags) :] + tags[: round_ % len(tags)]:
            method = contenders[tag]
            if method is None:
                times[tag].append(hf_generate_s(model, ids, 1))
            else:
                session = Session(model, method, B, L + new_tokens)
                times[tag].append(timed_prefill(session, ids, valid, L)[1])
                del session
    medians = {tag: statistics.median(t) for tag, t in times.items()}
    full = next((m.tag for m in contenders.values() if m is not None and m.m is None), None)
    return [
        {
            "contender": tag,
            "batch": B,
            "times_s": times[tag],
            "median_s": medians[tag],
            "x_hf": medians[tag] / medians["hf_generate_full"],
            "x_full": medians[tag] / medians[full] if full else None,
        }
        for tag in tags
    ]


def methods_for(
    names: list[str],
    m: int,
    R: list[int],
    controller: str | None,
    rebuild: list[str] | None = None,
    every: list[int] | None = None,
) -> list[tuple[str, dict]]:
    """(config name, overrides) per row: one per value of `R` for configs with an `R` field, times one per
    rebuild policy and period for configs that rebuild (R > 0; None: the config's)."""
    unknown = [n for n in names if n not in method_names()]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {method_names()}")
    rows = []
    for name in names:
        fields = method_config(name, m)
        extra = {"controller": controller} if controller and "controller" in fields else {}
        if "R" not in fields:
            rows.append((name, extra))
            continue
        for r in R:
            policies = [{}]
            if r > 0:  # None: the config's value
                policies = [{"rebuild": p, "rebuild_every": k} for p in rebuild or [None] for k in every or [None]]
                policies = [{key: v for key, v in policy.items() if v is not None} for policy in policies]
            rows += [(name, extra | {"R": r} | policy) for policy in policies]
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


def comma_list(text: str, kind, flag: str) -> list:
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"{flag}={text!r} must be a comma list of {kind.__name__}, e.g. {flag} 1,4") from None
    return values


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="packaged:smollm2", help="packaged:smollm2, a hub id/folder, or llama2-7b-random")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 (CUDA default) | float16")
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch", default="4", help="comma list: rows per batch size, e.g. 1,4,16")
    p.add_argument("--m", type=int, default=256)
    p.add_argument("--R", default="0,8", help="comma list: one row per value for methods with an R field")
    p.add_argument("--rebuild", default=None, help="comma list of rebuild policies (top, survivors) for R > 0")
    p.add_argument("--rebuild-every", default=None, help="comma list: rebuild on every k-th step, for R > 0")
    p.add_argument(
        "--controller", default=None, help="controller.pt for methods with a controller field (default: the config's)"
    )
    p.add_argument("--methods", default=None, help=f"comma list of {method_names()} (default: all but oracle)")
    p.add_argument("--hf-generate", action="store_true", help="also time transformers' generate (full attention)")
    p.add_argument("--kv-budget-gib", type=float, default=None, help="each method at the largest batch whose KV fits")
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
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--cuda-graphs", action="store_true", help="replay decode steps as CUDA graphs (GPU; not h2o/oracle)"
    )
    p.add_argument("--out", default="outputs/bench/bench.json")
    args = p.parse_args(argv)
    for key in ("prompt_len", "new_tokens", "m"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key.replace('_', '-')}={getattr(args, key)} must be positive")
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
    if args.threads:
        torch.set_num_threads(args.threads)
    R = comma_list(args.R, int, "--R")
    rebuild = args.rebuild.split(",") if args.rebuild else None  # None: the method config's
    every = comma_list(args.rebuild_every, int, "--rebuild-every") if args.rebuild_every else None
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    names = args.methods.split(",") if args.methods else [n for n in method_names() if n != "oracle"]
    if args.kl and "full" not in names:
        raise SystemExit("--kl measures the distance to full attention: add full to --methods")
    specs = methods_for(names, args.m, R, args.controller, rebuild, every)
    specs.sort(key=lambda spec: spec[0] != "full")  # full attention first: --kl needs its output
    for _, overrides in specs:  # bad policy values fail before the model loads
        build_method(_, args.m, **overrides)

    model, tokenizer = build_model(args.model, dtype, args.device)
    context = args.prompt_len + args.new_tokens
    synthetic = args.synthetic_prompt or args.kv_budget_gib is not None
    warm = prompts(tokenizer, model.config.vocab_size, 2, min(args.prompt_len, 128)).to(model.device)
    methods = runnable(model, specs, args.m, warm, args.cuda_graphs)
    plan = []  # (batch, [methods]) in run order
    if args.kv_budget_gib is None:
        plan = [(b, methods) for b in batches]
    else:
        budget = int(args.kv_budget_gib * 2**30)
        for method in methods:
            plan.append(
                (budget // (kv_bytes_per_slot(model.config, model.dtype) * capacity_for(method, context)), [method])
            )
        if any(b < 1 for b, _ in plan):
            raise SystemExit(f"--kv-budget-gib={args.kv_budget_gib} does not hold one row of some method: raise it")
    rows, floors, ab = [], {}, []
    for batch, batch_methods in plan:
        ids = prompts(tokenizer, model.config.vocab_size, batch, args.prompt_len).to(model.device)
        if args.prefill_ab:
            ab += prefill_ab(model, batch_methods, ids, args.new_tokens, args.prefill_ab)
        if args.hf_generate:
            rows.append(run_hf_generate(model, ids, args.new_tokens))
        full_logp = full_tokens = None
        shared = SharedPrefill(model, ids, args.new_tokens) if not synthetic else None
        for method in batch_methods:
            cached = args.m if method.m is not None else args.prompt_len + args.new_tokens // 2
            if (batch, cached) not in floors:
                floors[batch, cached] = run_floor(model, batch, cached, args.new_tokens)
                rows.append(floors[batch, cached])
            for chunk in chunks if method.m is not None else [None]:
                row, gen = run_method(
                    model, method, ids, args.new_tokens, True, args.cuda_graphs, synthetic, chunk, shared
                )
                row["floor"] = floors[batch, cached]["method"]
                if args.kl:
                    if method.m is None:
                        full_tokens = gen.tokens
                        full_logp = forced_logp(model, method, ids, full_tokens)
                    row["kl_full"] = kl(full_logp, forced_logp(model, method, ids, full_tokens, chunk))
                rows.append(row)
        del shared  # the prompt-length caches of this batch's forwards
    by_name = {(r["method"], r["batch"]): r for r in rows}
    full = [r for r in rows if r["method"] == "full"]
    for r in rows:
        floor = by_name.get((r.get("floor"), r["batch"]))
        r["x_floor"] = r["decode_tok_per_s"] / floor["decode_tok_per_s"] if floor else None
        ref = next((f for f in full if f["batch"] == r["batch"]), full[0] if args.kv_budget_gib and full else None)
        r["x_full"] = r["decode_tok_per_s"] / ref["decode_tok_per_s"] if ref else None
    device = (
        torch.cuda.get_device_name()
        if model.device.type == "cuda"
        else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    setup = {k: v for k, v in vars(args).items() if k not in ("out",)} | {"device_name": device, "dtype": str(dtype)}
    write_json(args.out, {"setup": setup, "rows": rows, "prefill_ab": ab, "torch": torch.__version__})
    headers = [
        "method", "batch", "prefill_s", "decode tok/s", "x floor", "x full", "ms/step", "p90 ms",
        "KV MiB (decode)", "KV MiB (peak)", "history MiB", "rebuilt/step", "kept", "KL to full",
    ]  # fmt: skip
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
            None if r["kv_bytes_decode"] is None else r["kv_bytes_decode"] / 2**20,
            None if r["kv_bytes_peak"] is None else r["kv_bytes_peak"] / 2**20,
            None if r.get("history_bytes") is None else r["history_bytes"] / 2**20,
            r["rebuilt_per_step"],
            r["rebuilt_kept"],
            r.get("kl_full"),
        ]
        for r in rows
    ]
    budget = f", KV budget {args.kv_budget_gib} GiB" if args.kv_budget_gib else ""
    print(
        f"\n{args.model} on {device}, prompt {args.prompt_len}{' (assumed)' if synthetic else ''}, "
        f"{args.new_tokens} new tokens, m={args.m}, R={args.R}{budget}"
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
    return rows


if __name__ == "__main__":
    main()
