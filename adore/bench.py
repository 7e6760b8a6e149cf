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

Every method decodes through the engine's own loop (`adore.generate.decode_steps`, greedy), prefill timed apart
from decode. The rows of a batch (its floors included) decode in turns, one step each, the order rotated every
step (`decode_in_turns`): each ratio compares steps timed moments apart, so the machine's drift does not land
on one row (run one after the other, the same forward came out at 1.14x and 1.30x its floor). They are alive
together, so a batch holds every row's cache at once; under `--kv-budget-gib` each method decodes in turns with
its own floor only. Methods that prefill alike (the same recordings and residual stream: `Session.prefill_signature`)
share one prompt forward per batch and release it each on their own (`SharedPrefill`); chunked prefills are
each method's own. Each method is warmed up first; CUDA is synchronised before every clock read. `--hf-generate`
adds transformers' own `generate` with full attention and its own cache and SDPA (each step timed inside the call).
`--prefill-ab N` times prefill alone, N rounds in turns with transformers' (one method per prefill signature),
and compares medians: the fair prefill comparison. `--model llama2-7b-random` builds a Llama-2-7B-shaped model
with random weights (speed does not depend on the values) for GPU runs.

The floor: `floor_<n>` is a bare forward, one token per row, over a cache already holding n tokens (m, or the
prompt plus half the new tokens: full attention's mean), with no bookkeeping: the best any engine can do. It
runs the engine's attention kernel (a step of transformers' own `generate`, with its own cache and SDPA, takes
1.1-1.2x the floor's over 4k tokens here). `x_floor` is each row against its own floor (bounded methods: m;
full attention: the context).
`--rebuild` / `--rebuild-every` add rows per rebuild policy for methods that rebuild; `rebuilt/step` is the
tokens rebuilt (forwarded) per row and step, `kept` the share of them the same step's release kept, and
`reused/step` the picks `rebuild=keep` found held in the cache (attended without a forward).

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
from tqdm.auto import tqdm
from transformers import LogitsProcessor

from adore.attention import PLAIN_CAUSAL, register
from adore.cache import SlotCache, kv_bytes_per_slot
from adore.data import data_root
from adore.generate import Generation, decode_steps, synchronize, teacher_force, timed_prefill
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


class Decoder:
    """One row of the table, decoding step by step, so that the rows of a batch can decode in turns
    (`decode_in_turns`). `steps` yields ((B,) tokens, (B,) still going) per step, as `decode_steps` does: its
    first item comes from prefill, every later one feeds the previous token first (the step that is timed)."""

    def __init__(self, row: dict, steps, batch: int, new_tokens: int, device, session: Session | None = None):
        self.row, self.steps, self.session, self.device = row, steps, session, device
        self.tokens = torch.zeros(batch, new_tokens, dtype=torch.long, device=device)
        self.step_s: list[float] = []  # one per fed token
        self.taken = 0
        if session is not None:
            self.rebuilt_before, self.kept_before, self.reused_before = (
                session.rebuilt,
                session.rebuilt_kept,
                session.reused,
            )

    def advance(self) -> None:
        """One step (feed + pick), synchronised and timed unless it is the first (nothing is fed there)."""
        synchronize(self.device)
        start = time.perf_counter()
        token, _ = next(self.steps)
        synchronize(self.device)
        if self.taken:
            self.step_s.append(time.perf_counter() - start)
        self.tokens[:, self.taken] = token
        self.taken += 1

    def finish(self) -> tuple[dict, Generation]:
        """The row, complete: decode speed over the timed steps (the first fed step, which captures a CUDA graph
        of this session's cache, is not counted), rebuild counts, memory; and the greedy tokens."""
        latencies = self.step_s[1:] if len(self.step_s) > 1 else self.step_s
        row = self.row | step_times(latencies, self.tokens.shape[0])
        session = self.session
        if session is not None:
            rebuilt = session.rebuilt - self.rebuilt_before
            B, fed = self.tokens.shape[0], len(self.step_s)
            row |= {
                "kv_bytes_peak": session.peak_kv_bytes,
                "history_bytes": session.history_bytes,
                "rebuilt_tokens": session.rebuilt,
                "rebuilt_per_step": rebuilt / (B * fed) if fed else 0.0,  # every decode feed, the untimed one too
                "rebuilt_kept": (session.rebuilt_kept - self.kept_before) / rebuilt if rebuilt else None,
                "reused_per_step": (session.reused - self.reused_before) / (B * fed) if fed else 0.0,  # keep
            }
        lengths = torch.full((self.tokens.shape[0],), self.taken, dtype=torch.long)
        return row, Generation(self.tokens[:, : self.taken], lengths, {"step_s": self.step_s})


@torch.no_grad()
def decode_in_turns(decoders: list[Decoder], new_tokens: int, progress: bool = False) -> None:
    """Every decoder's `new_tokens` steps, one step of each in turn, the order rotated every step: a row's
    ratio to its floor then compares steps timed within milliseconds of each other, and the machine's drift
    (heat, neighbours: ±15 % between runs a minute apart on a 2-core CPU) spreads over every row alike."""
    for decoder in decoders:
        decoder.advance()  # the first token, from prefill
    for step in tqdm(range(1, new_tokens), desc="decode in turns", disable=not progress, leave=False):
        k = step % len(decoders)
        for decoder in decoders[k:] + decoders[:k]:
            decoder.advance()


def start_method(
    model,
    method,
    ids: torch.Tensor,
    new_tokens: int,
    cuda_graphs: bool = False,
    synthetic: bool = False,
    prefill_chunk: int | None = None,
    shared: SharedPrefill | None = None,
) -> Decoder:
    """Prefill (B, L) `ids` under `method` (`synthetic`: assume it, see the module doc; `prefill_chunk`: in
    chunks, releasing between them; `shared`: settle a forward shared with the methods that prefill alike), and
    return its greedy decode of `new_tokens` per row, not yet run."""
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
    row = {
        "method": method.tag + (f"_chunk{prefill_chunk}" if prefill_chunk else ""),
        "batch": B,
        "prefill_s": prefill_s,
        "prefill_shared_with": shared_with,
        "kv_bytes_decode": session.cache.nbytes,  # after prefill's release: what decode holds
    }
    steps = decode_steps(session, logits, new_tokens, [], 0)
    return Decoder(row, steps, B, new_tokens, session.device, session)


def run_method(model, method, ids: torch.Tensor, new_tokens: int, **kwargs) -> tuple[dict, Generation]:
    """`start_method` (its keyword arguments), decoded alone: the row and the output."""
    decoder = start_method(model, method, ids, new_tokens, **kwargs)
    decode_in_turns([decoder], new_tokens)
    return decoder.finish()


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
    tokens, the newest min(m, L) are cached with random keys and values, and the method's
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
    keep = min(n, session.method.m if session.method.m is not None else n)
    cols = torch.arange(n - keep, n, device=device).expand(B, -1)
    slots = torch.arange(keep, device=device).expand(B, -1)
    session.slot_col[:, :keep], session.slot_pos[:, :keep] = cols, cols
    session.hist_slot.scatter_(1, cols, slots)
    session.occupied = keep
    session.cache.keys.normal_()
    session.cache.values.normal_()
    return session.feed(ids[:, -1:].to(device))


@torch.no_grad()
def start_floor(model, batch: int, cached: int, new_tokens: int) -> Decoder:
    """A bare forward, one token per row, over a cache holding `cached` tokens (random keys and values): no
    release, no bookkeeping, only the model and an argmax. Each step overwrites the same slot, so the cache
    holds the same number of tokens at every step. Returned not yet run, like `start_method`."""
    config, device = model.config, model.device
    cache = SlotCache.for_model(config, batch, cached + 1, model.dtype, device)
    cache.keys.normal_()
    cache.values.normal_()
    cache.write_slots = torch.full((batch, 1), cached, device=device)
    model.set_attn_implementation(register())
    pos = torch.full((batch, 1), cached, device=device)

    def steps():
        token = torch.randint(100, config.vocab_size, (batch, 1), device=device)
        kwargs = dict(attention_mask=PLAIN_CAUSAL, cache=cache, use_cache=True, logits_to_keep=1)  # attend to all
        going = torch.ones(batch, dtype=torch.bool, device=device)
        for step in range(new_tokens + 2):  # two untimed warm-up steps first
            token = model(input_ids=token, position_ids=pos, **kwargs).logits[:, -1].argmax(-1, keepdim=True)
            if step >= 1:
                yield token[:, 0], going

    row = {
        "method": f"floor_{cached}",
        "batch": batch,
        "prefill_s": None,
        "kv_bytes_decode": cache.nbytes,
        "kv_bytes_peak": cache.nbytes,
        "rebuilt_tokens": 0,
        "rebuilt_per_step": 0.0,
        "rebuilt_kept": None,
    }
    return Decoder(row, steps(), batch, new_tokens, device)


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


class StepClock(LogitsProcessor):
    """Stamps the time each time `generate` asks for the next token's scores, once per step, right after that
    step's forward: the first stamp ends prefill, the gaps between stamps are the decode steps."""

    def __init__(self, device):
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores):
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return scores


@torch.no_grad()
def hf_generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, list[float]]:
    """transformers' own greedy `generate` of exactly `new_tokens` per row, full attention over its own cache and
    SDPA: its prefill seconds and the seconds of each decode step (`StepClock`). Timing the steps inside one
    call matters: generate(N) - generate(1) carries two prefills' noise (±10 % of a 4k prefill is more than a
    whole decode of 24 tokens at batch 1)."""
    kwargs = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0, eos_token_id=None)
    clock = StepClock(model.device)
    engine = model.config._attn_implementation
    model.set_attn_implementation("sdpa")  # transformers' attention, not the engine's registered one
    try:
        synchronize(model.device)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, logits_processor=[clock], **kwargs)
    finally:
        model.set_attn_implementation(engine)
    stamps = clock.stamps
    return stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:])]


def run_hf_generate(model, ids: torch.Tensor, new_tokens: int) -> dict:
    prefill_s, latencies = hf_generate(model, ids, new_tokens)
    return {
        "method": "hf_generate_full",
        "batch": ids.shape[0],
        "prefill_s": prefill_s,
        **step_times(latencies[1:] if len(latencies) > 1 else latencies, ids.shape[0]),  # as every row: not the first
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
                times[tag].append(hf_generate(model, ids, 1)[0])
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
    forward: list[int] | None = None,
) -> list[tuple[str, dict]]:
    """(config name, overrides) per row: one per value of `R` for configs with an `R` field, times one per
    rebuild policy and period for configs that rebuild (R > 0; None: the config's), and for `keep` one per cap
    on the picks forwarded."""
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
                policies = [
                    {"rebuild": p, "rebuild_every": k, "rebuild_forward": f}
                    for p in rebuild or [None]
                    for k in every or [None]
                    for f in (forward or [None] if p == "keep" else [None])
                ]
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
    p.add_argument("--rebuild-forward", default=None, help="comma list: with --rebuild keep, picks forwarded per step")
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
    forward = comma_list(args.rebuild_forward, int, "--rebuild-forward") if args.rebuild_forward else None
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    names = args.methods.split(",") if args.methods else [n for n in method_names() if n != "oracle"]
    if args.kl and "full" not in names:
        raise SystemExit("--kl measures the distance to full attention: add full to --methods")
    specs = methods_for(names, args.m, R, args.controller, rebuild, every, forward)
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
    rows, ab = [], []
    for batch, batch_methods in plan:
        ids = prompts(tokenizer, model.config.vocab_size, batch, args.prompt_len).to(model.device)
        if args.prefill_ab:
            ab += prefill_ab(model, batch_methods, ids, args.new_tokens, args.prefill_ab)
        if args.hf_generate:
            rows.append(run_hf_generate(model, ids, args.new_tokens))
        shared = SharedPrefill(model, ids, args.new_tokens) if not synthetic else None
        floors, decoders = {}, []  # (decoder, method, prefill chunk); floors: method None
        for method in batch_methods:
            cached = args.m if method.m is not None else args.prompt_len + args.new_tokens // 2
            if cached not in floors:
                floors[cached] = start_floor(model, batch, cached, args.new_tokens)
                decoders.append((floors[cached], None, None))
            for chunk in chunks if method.m is not None else [None]:
                kwargs = dict(cuda_graphs=args.cuda_graphs, synthetic=synthetic, prefill_chunk=chunk, shared=shared)
                decoder = start_method(model, method, ids, args.new_tokens, **kwargs)
                decoder.row["floor"] = floors[cached]
                decoders.append((decoder, method, chunk))
        del shared  # the prompt-length caches of this batch's forwards
        decode_in_turns([decoder for decoder, _, _ in decoders], args.new_tokens, progress=True)
        full_logp = full_tokens = None
        finished = {}
        for decoder, method, chunk in decoders:  # floors come before the rows that read them
            row, gen = decoder.finish()
            finished[id(decoder)] = row
            if method is not None:
                floor = finished[id(row["floor"])]
                row["floor"], row["x_floor"] = floor["method"], row["decode_tok_per_s"] / floor["decode_tok_per_s"]
            if args.kl and method is not None:
                if method.m is None:
                    full_tokens = gen.tokens
                    full_logp = forced_logp(model, method, ids, full_tokens)
                row["kl_full"] = kl(full_logp, forced_logp(model, method, ids, full_tokens, chunk))
            rows.append(row)
        del decoders, floors
    full = [r for r in rows if r["method"] == "full"]
    for r in rows:
        r.setdefault("x_floor", None)
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
        "KV MiB (decode)", "KV MiB (peak)", "history MiB", "rebuilt/step", "kept", "reused/step", "KL to full",
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
            r.get("reused_per_step"),
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
