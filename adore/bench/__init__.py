"""Decode-throughput benchmark: every method in one process, each row's speed as a ratio to its floor and to
full attention measured in the same run.

    python -m adore.bench --prompt-len 4096 --new-tokens 256 --batch 1,4,16 --m 256 --R 0,8
    python -m adore.bench --kv-budget-gib 4 --m 256 --R 8          # the largest batch of each method in 4 GiB of KV

Methods are the configs of conf/method/ (`adore.registry`), built as `eval.py method=<name> budget=<m>`
builds them: `--methods` takes their names (default: every one but `oracle`, whose shadow full-attention
session makes it slow by design). `--R` is a comma list: a method whose config has an `R` field gives one
row per value, the others one row; `--rebuild` / `--rebuild-every` / `--rebuild-forward` add rows per rebuild
policy for R > 0. A method that cannot run on the model is skipped with a note.

Every method decodes through the engine's own loop (`adore.engine.generate.decode_steps`, greedy), prefill timed apart
from decode, CUDA synchronised before every clock read, after a warm-up. The rows of a batch and their floors
decode in turns, one step each, the order rotated every step (`decode_in_turns`): a ratio then compares steps
timed moments apart, so the machine's drift does not land on one row. Methods that prefill alike share one
prompt forward per batch and release it each on their own (`SharedPrefill`).

The floor: `floor_<n>` is a bare forward, one token per row, over a cache already holding n tokens (m, or the
prompt plus half the new tokens: full attention's mean), with no bookkeeping: the best any engine can do.
`x floor` is each row against its own floor, `x full` against full attention at the same batch. `--rounds N`
measures each batch N times over and reports each row at its median with the range of its ratios (`adore.bench.rounds`).
`rebuilt/step` is the tokens rebuilt (forwarded) per row and step, `kept` the share of them the same step's
release kept, `reused/step` the picks `rebuild=keep` found held in the cache (attended without a forward).

`--kv-budget-gib`: each method runs, in turns with its own floor only, the largest batch whose KV cache fits the
budget (bounded methods hold min(m, context) + R + 1 slots per row, full attention the whole context): how a
bounded cache becomes throughput. Those batches run minutes apart, so each also decodes a `clock` (one row over m
cached tokens, the same in every batch) in turns, and `x full` is the ratio of the two rows' speeds over their
clocks' (`x_full_raw` in the JSON: the plain ratio, which carries the machine's drift). This mode (and
`--synthetic-prompt`) decodes from an assumed prefill, random keys and values in the state a prefill leaves
(decode cost depends on shapes, not values); prefill is then not timed. `history MiB` is what a session holds besides the KV slots, per fed token (ids, positions, the method's
per-token state). docs/throughput.md says more and gives the measurements behind these choices.
"""

from adore.bench.cli import main
from adore.bench.floor import start_floor
from adore.bench.prefill import SharedPrefill
from adore.bench.rows import run_method, start_method
from adore.bench.timing import hf_generate
from adore.bench.turns import Decoder, decode_in_turns

__all__ = [
    "Decoder",
    "SharedPrefill",
    "decode_in_turns",
    "hf_generate",
    "main",
    "run_method",
    "start_floor",
    "start_method",
]
