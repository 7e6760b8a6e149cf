"""What a release method is (ADORE.md §3): a score over history tokens; the session keeps the m highest.

A method is a dataclass of its knobs (the config) with these functions:

* `start(batch_size, length, device, model)` -> `State`: its per-session state (the session owns it);
* `arrive(state, arriving)`: optional, before each forward, with an `Entered` view of the tokens about to be
  fed (ids, positions; nothing computed yet): for scores that depend on the current query token;
* `update(state, entered)`: after each forward, with an `Entered` view of the tokens just fed and whatever
  the method declared in `needs` (attention mass, keys, embeddings);
* `score(state, tokens)` -> (B, k): how much to keep each history token of a `Tokens` view; higher = keep;
* `rebuild_score(state, tokens)`: optional, the rebuild pick's scores of released tokens (default: `score`);
* `page_scores(state, tokens, page_size, released, reduce)`: optional, scores of pages of consecutive tokens for a page pick
  (default: each page's best `rebuild_score`);
* `rebuild_policy()`: how released tokens come back (adore.engine.rebuild; default: never).

The session (adore/engine/session.py) computes only what some method `needs`, so methods never reach into it.
`m=None` means no budget (full attention).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import torch

from adore.checks import check_integer

KEEP = 1e9  # a score bonus no learned or accumulated score reaches: "always keep"

# What a method may ask the session for (`Method.needs`); each costs something, so nothing is computed unasked.
NEEDS = {
    "attention": "Entered.attention: attention mass each history token received in this forward (all queries)",
    "last_attention": "Entered.last_attention: the newest query's attention over the history tokens",
    "window_attention": "Entered.window_attention: the last `rows` queries' attention rows",
    "keys": "Entered.keys: the new tokens' cached keys, all layers",
    "embeddings": "Entered.embeddings: the new tokens' input embeddings",
    "hidden": "Entered.hidden: the new tokens' residual stream after `method.input_layer` decoder layers",
    "full_attention": "Tokens.full_attention: the newest query's attention under full attention (a shadow pass)",
}


@dataclass
class State:
    """A method's per-session state. `tokens` holds per-history-token tensors (B, T, ...) that the session
    grows with the history; anything else (a recurrent state, say) is an attribute."""

    tokens: dict[str, torch.Tensor] = field(default_factory=dict)


class Tokens:
    """The history tokens being scored, all (B, k); ids, positions and full attention are gathered when read."""

    def __init__(
        self, cols: torch.Tensor, query_pos: torch.Tensor, history: dict[str, torch.Tensor], length: int, cached=None
    ):
        self.cols = cols  # history columns (the session's index of fed tokens)
        self.length = length  # history columns fed so far (known on the host): per-token state past it is unfilled
        self.query_pos = query_pos  # (B, 1) position t of the newest token: the query the scores are for
        self._history = history  # (B, T) per-column tensors of the session: ids, positions[, full_attention]
        self._cached = cached  # () -> (B, C) history columns in the cache's slots (-1: empty), computed when read

    @cached_property
    def cached(self) -> torch.Tensor:
        """(B, C) history columns of the tokens in the cache (-1 for an empty slot): scores that need the cache's
        own tokens (e.g. an exact part of a normaliser) read it."""
        return self._cached()

    def _gather(self, name: str) -> torch.Tensor:
        return self._history[name].gather(1, self.cols)

    @cached_property
    def ids(self) -> torch.Tensor:
        return self._gather("ids")

    @cached_property
    def positions(self) -> torch.Tensor:
        """Original positions."""
        return self._gather("positions")

    @cached_property
    def full_attention(self) -> torch.Tensor:
        """With needs "full_attention": the newest query's weights under full attention, summed over heads/layers."""
        return self._gather("full_attention")


@dataclass
class Entered:
    """The tokens of the last forward; attention tensors are indexed by history column, (B, T)."""

    cols: torch.Tensor  # (B, n) history columns of the new tokens
    valid: torch.Tensor  # (B, n) False for padding
    ids: torch.Tensor  # (B, n)
    positions: torch.Tensor  # (B, n)
    query_pos: torch.Tensor  # (B, 1)
    attention: torch.Tensor | None = None  # (B, T) mass received from every query of this forward
    last_attention: torch.Tensor | None = None  # (B, T) the newest query's weights
    window_attention: torch.Tensor | None = None  # (B, w, T) the last w queries' weights
    keys: torch.Tensor | None = None  # (layers, B, kv_heads, n, head_dim)
    embeddings: torch.Tensor | None = None  # (B, n, d_model)
    hidden: torch.Tensor | None = None  # (B, n, d_model) residual stream after method.input_layer layers


@dataclass
class Method:
    m: int | None = None

    name: ClassVar[str] = "method"  # the config name (conf/method/<name>.yaml) and run-directory prefix
    label: ClassVar[str] = "Method"  # the name tables show
    R: ClassVar[int] = 0  # released tokens rebuilt per step (a field of methods that rebuild)
    training_free: ClassVar[bool] = True  # a heuristic baseline (False: learned, or an oracle)
    needs: ClassVar[frozenset[str]] = frozenset()
    rows: ClassVar[int] = 1  # queries in `Entered.window_attention`
    per_token: ClassVar[tuple[str, ...]] = ()  # names of (B, T) float state tensors `start` allocates (zeros)
    short: ClassVar[dict[str, str]] = {}  # field -> its prefix in run-directory names (default: the field name)

    def __post_init__(self):
        check_integer("method.m", self.m, optional=True, fix=": the KV budget, e.g. method.m=128 (null: no budget)")
        unknown = set(self.needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"{type(self).__name__}.needs has {sorted(unknown)}: choose from {sorted(NEEDS)}")

    def check(self, model_config) -> None:
        """Raise ValueError if this method cannot run on a model of `model_config` (before the model loads)."""

    def start(self, batch_size: int, length: int, device, model) -> State:
        """Per-session state for `batch_size` rows and `length` history columns."""
        return State(tokens={name: torch.zeros(batch_size, length, device=device) for name in self.per_token})

    def assume(self, state: State, cols: torch.Tensor, positions: torch.Tensor, length: int) -> None:
        """Random per-token state for history columns `cols` (n,) at `positions` (B, n), as if they had been fed
        (Session.assume_prefilled, for benchmarks): floats uniform, flags set, integer state the positions.
        `length`: the history's column capacity."""
        # in pieces of 1,024 columns: whole, the random values of the probe's z_i at 341 rows x 4k tokens are 1.4 GiB
        # more peak memory, which a benchmark under a memory budget does not have
        for start in range(0, cols.shape[0], 1024):
            piece, at = cols[start : start + 1024], positions[:, start : start + 1024]
            for tensor in state.tokens.values():  # e.g. H2O's mass, the probe's z_i, its positions and flags
                if tensor.dtype == torch.bool:
                    tensor[:, piece] = True
                elif tensor.dtype == torch.long:
                    tensor[:, piece] = at
                else:
                    tensor[:, piece] = torch.rand(
                        tensor.shape[0], piece.shape[0], *tensor.shape[2:], dtype=tensor.dtype, device=tensor.device
                    )

    def arrive(self, state: State, arriving: Entered) -> None:
        """Called before every forward (before the rebuild pick) with the tokens about to be fed."""

    def update(self, state: State, entered: Entered) -> None:
        """Called after every forward (before release)."""

    def score(self, state: State, tokens: Tokens) -> torch.Tensor:
        """(B, k) scores of `tokens` for the current query; higher = keep."""
        raise NotImplementedError

    def rebuild_score(self, state: State, tokens: Tokens) -> torch.Tensor:
        """(B, k) scores of released `tokens` for the rebuild pick (before the forward); higher = rebuild first.
        The same as `score` unless a method picks rebuilds and releases by different rules."""
        return self.score(state, tokens)

    def pick_scores(self, state: State, tokens: Tokens, released: torch.Tensor, R: int) -> torch.Tensor:
        """(B, seen) rebuild scores of `tokens` (all columns seen) for a pick of R of the `released` (B, seen) ones:
        `rebuild_score` of every one. A method with a per-page summary may score a shortlist only (-inf elsewhere)
        so that a token pick costs O(pages)."""
        return self.rebuild_score(state, tokens)

    def page_scores(self, state: State, tokens: Tokens, page_size: int, released: torch.Tensor, reduce) -> torch.Tensor:
        """(B, pages) scores of the pages of `page_size` consecutive columns of `tokens` (all columns seen, in
        order; the last page may be short) for a pick of the `released` (B, seen) columns: `reduce`
        (adore.engine.rebuild.PAGE_SCORES) makes each page's score of its members' rebuild scores, -inf for a page
        with nothing released. A method with a per-page summary overrides it so that a pick costs O(pages)."""
        from adore.engine.pages import by_page

        members = by_page(self.rebuild_score(state, tokens), page_size, float("-inf"))  # (B, pages, page_size)
        released = by_page(released, page_size, False)
        return reduce(members, released).masked_fill(~released.any(2), float("-inf"))

    def rebuild_policy(self):
        """A fresh adore.engine.rebuild policy for one session (methods without rebuild: none)."""
        from adore.engine.rebuild import Rebuild

        return Rebuild()

    # ---- identity: what results.json records and run directories are named from -------------------------
    def identity(self) -> dict:
        """Every setting that changes results, by name (`name` first)."""
        return {"name": self.name} | {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def tag(self) -> str:
        """Run-directory name: the method and every setting, e.g. `h2o_m64_r0.5`."""
        parts = [self.name]
        for key, value in self.identity().items():
            if key == "name" or value is None or value == {}:
                continue
            parts.append(f"{self.short.get(key, key)}{_compact(value)}")
        return "_".join(parts)


def _compact(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return "-".join(f"{k}={_compact(v)}" for k, v in sorted(value.items()))
    return str(value).replace("/", "-").replace(" ", "")


def file_identity(path: str | Path) -> str:
    """`<stem>-<sha256 prefix>` of a checkpoint: two files of the same name never share an identity."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:8]
    return f"{Path(path).stem}-{digest}"


def positions_of(tokens: Tokens) -> torch.Tensor:
    return tokens.positions.float()
