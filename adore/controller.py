"""The ADORE controller (ADORE.md §2): z_i = GRU(x_i, z_{i-1}), sigma_i = sigmoid(MLP(p_i + z_i)).

`z_i` is computed once, when token i enters. `p_i` encodes the distance t - i between the current query
position t and token i (bucketed, learned), so scores move as decoding moves on (project default);
`position="absolute"` encodes i itself instead. Pure PyTorch: no Lightning, no transformers.

Two levers beyond the paper (issue 12), each a config switch; both off is the paper's controller:

* `input_layer`: x_i is the backbone's residual stream after that many decoder layers instead of the input
  embedding (0): a contextual token state the forward computes anyway;
* `query`: the score gains a bilinear term <W_q z_t, W_k z_i> / sqrt(width) between the current query's state
  z_t and token i's, so two queries at the same distance can want different tokens (as attention does).

`heads` > 0 replaces the GRU and MLP by an attention probe (issue 12): the score of token i for query t is the
log of a mixture of `heads` softmax attention heads over every past token,

    log sigma_t(i) = log sum_h w_h softmax_{j <= t}(<q_{t,h}, k_{j,h}> / sqrt(head_dim) + b_h(t - j))_i,

the shape of the label itself (attention summed over the backbone's heads and layers). k_i reads x_i; q_t reads
x_{t-1} and the input embedding of token t, both known *before* token t's forward, so the rebuild pick of the
step that feeds token t is scored for token t itself (a query that needed token t's own forward would pick
for the previous query: one step late).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


@dataclass
class ControllerConfig:
    d_model: int  # the LLM's embedding width (input of the projection)
    width: int = 64  # GRU state and position-embedding width
    mlp_hidden: int = 64
    num_buckets: int = 32
    max_distance: int = 4096  # distances beyond this share the last bucket
    # the longest distance (or, absolute, position) training saw; beyond it the bucket of this one: the buckets
    # past it were never trained and hold their random init. None: every bucket (checkpoints written before)
    trained_distance: int | None = None
    position: str = "relative"  # relative: p encodes t - i; absolute: p encodes i
    input_layer: int = 0  # x_i: 0 = the LLM's input embedding (paper); k = its residual stream after k layers
    query: bool = False  # add a query-dependent bilinear term (False: the paper's query-independent score)
    heads: int = 0  # > 0: an attention probe of that many heads instead of the GRU + MLP (module docstring)
    head_dim: int = 32  # the probe's query/key width per head

    def __post_init__(self):
        if isinstance(self.input_layer, bool) or not isinstance(self.input_layer, int) or self.input_layer < 0:
            raise ValueError(
                f"controller input_layer={self.input_layer!r} must be an integer >= 0 (0: input embeddings)"
            )
        if self.position not in ("relative", "absolute"):
            raise ValueError(f"controller position={self.position!r}: use 'relative' or 'absolute'")
        for key in ("heads", "head_dim"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (key == "head_dim" and value < 1):
                raise ValueError(f"controller {key}={value!r} must be an integer >= {int(key == 'head_dim')}")
        if self.heads and self.query:
            raise ValueError("controller heads > 0 (an attention probe) is query-dependent already: set query=false")
        if self.trained_distance is not None and (
            isinstance(self.trained_distance, bool)
            or not isinstance(self.trained_distance, int)
            or self.trained_distance < 0
        ):
            raise ValueError(f"controller trained_distance={self.trained_distance!r} must be an integer >= 0 or null")
        if self.num_buckets < 4 or self.width < 1:
            raise ValueError(f"controller needs num_buckets >= 4 and width >= 1, got {self.num_buckets}, {self.width}")


def bucketize(distance: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Log-spaced buckets (as T5's relative positions): exact below num_buckets/2, logarithmic above."""
    distance = distance.clamp(min=0)
    exact = num_buckets // 2
    log_bucket = (
        exact
        + (
            torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (num_buckets - exact)
        ).long()
    )
    return torch.where(distance < exact, distance, log_bucket.clamp(max=num_buckets - 1))


class Controller(nn.Module):
    """Scores how likely each past token is among the current query's top-K keys."""

    def __init__(self, config: ControllerConfig):
        super().__init__()
        self.config = config
        if config.heads:  # the attention probe: no GRU, no MLP
            D, width = config.d_model, config.heads * config.head_dim
            self.key_norm, self.key = nn.LayerNorm(D), nn.Linear(D, width)
            self.query_norm, self.query = nn.LayerNorm(2 * D), nn.Linear(2 * D, width)
            self.head_bias = nn.Embedding(config.num_buckets, config.heads)  # b_h(t - j)
            self.head_mix = nn.Parameter(torch.zeros(config.heads))  # log w_h, before normalisation
            return
        self.proj = nn.Linear(config.d_model, config.width)
        self.gru = nn.GRU(config.width, config.width, batch_first=True)
        self.position = nn.Embedding(config.num_buckets, config.width)
        self.mlp = nn.Sequential(nn.Linear(config.width, config.mlp_hidden), nn.GELU(), nn.Linear(config.mlp_hidden, 1))
        if config.query:
            self.q_proj = nn.Linear(config.width, config.width)
            self.k_proj = nn.Linear(config.width, config.width)

    @property
    def state_width(self) -> int:
        """Width of the per-token state z_i the engine stores for every history token."""
        return self.config.heads * self.config.head_dim if self.config.heads else self.config.width

    def encode(
        self, embeds: torch.Tensor, valid: torch.Tensor, h: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the GRU over the valid tokens of each row, skipping padding (the probe: one key per token).

        embeds: (B, T, d_model) x_i (input embeddings or residual stream); valid: (B, T) bool; h: (B, width)
        state before them. Returns z: (B, T, state_width) (zeros at invalid columns) and the new state h:
        (B, width); the probe's h is x of each row's newest valid token (B, d_model), what the next query reads.
        """
        B, T, _ = embeds.shape
        if self.config.heads:
            z = self.key(self.key_norm(embeds)) * valid[..., None]  # (B, T, heads * head_dim)
            has, last = newest_valid(valid)
            newest = embeds.gather(1, last[:, None, None].expand(-1, 1, embeds.shape[-1]))[:, 0]
            h_new = newest if h is None else torch.where(has[:, None], newest, h)
            return z, h_new
        x = self.proj(embeds)  # (B, T, width)
        h0 = torch.zeros(B, self.config.width, dtype=x.dtype, device=x.device) if h is None else h
        if T == 1:  # the decode step: no packing needed
            out = self.gru(x, h0[None])[0][:, 0]
            h_new = torch.where(valid[:, :1], out, h0)
            return torch.where(valid[..., None], out[:, None], torch.zeros_like(x)), h_new
        # move each row's valid tokens to the front (stable), run packed, scatter back
        order = torch.argsort((~valid).int(), dim=1, stable=True)
        lengths = valid.sum(1)
        xs = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
        packed = pack_padded_sequence(xs, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        out, h_last = self.gru(packed, h0[None].contiguous())
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=T)
        z = torch.zeros_like(out).scatter(1, order[..., None].expand(-1, -1, out.shape[-1]), out)
        z = z * valid[..., None]
        h_new = torch.where((lengths > 0)[:, None], h_last[0], h0)
        return z, h_new

    def queries(self, previous: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """The probe's query of token t from x_{t-1} (`previous`, zeros for the first token) and token t's input
        embedding: (..., d_model) each -> (..., heads * head_dim)."""
        return self.query(self.query_norm(torch.cat([previous, embeds], -1)))

    def logits(
        self,
        z: torch.Tensor,
        token_pos: torch.Tensor,
        query_pos: torch.Tensor,
        query_z: torch.Tensor | None = None,
        key_valid: torch.Tensor | None = None,
        columns: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pre-sigmoid scores (the probe: log attention shares).

        z: (..., k, width) states of the scored tokens; token_pos: (..., k) their positions;
        query_pos: (..., 1) or broadcastable, the current query position t; query_z: (..., 1, width) or
        broadcastable, the query's own state z_t (read only with `config.query`; the probe's query from
        `queries`). The probe normalises over the k tokens given, so they must be all tokens <= t; tokens
        after t and those where `key_valid` (..., k) is False get -inf. Returns (..., k); the probe with
        `columns` (B, c), indices into the k tokens: only their scores, (B, c), normalised over all k as ever (the
        release asks for the m cached tokens of a history of thousands).
        """
        c = self.config
        if c.heads:
            return self._log_attention(z, token_pos, query_pos, query_z, key_valid, columns)
        if columns is not None:
            raise ValueError("Controller.logits(columns=...) is for the attention probe: gather z and positions first")
        where = query_pos - token_pos if c.position == "relative" else token_pos
        p = self.position(self.buckets(where))
        out = self.mlp(p + z).squeeze(-1)
        if c.query:
            if query_z is None:
                raise ValueError("a query-dependent controller (query=True) needs the query's state query_z")
            out = out + (self.q_proj(query_z) * self.k_proj(z)).sum(-1) / math.sqrt(c.width)
        return out

    def buckets(self, distance: torch.Tensor) -> torch.Tensor:
        """The learned bucket of each distance, capped at the longest one training saw."""
        c = self.config
        if c.trained_distance is not None:
            distance = distance.clamp(max=c.trained_distance)
        return bucketize(distance, c.num_buckets, c.max_distance)

    def _log_attention(self, z, token_pos, query_pos, query, key_valid, columns=None) -> torch.Tensor:
        c = self.config
        if query is None:
            raise ValueError("an attention-probe controller (heads > 0) needs the query from Controller.queries")
        keys = z.unflatten(-1, (c.heads, c.head_dim))  # (..., k, heads, head_dim)
        query = query.unflatten(-1, (c.heads, c.head_dim))  # (..., 1, heads, head_dim)
        bias = self.head_bias(self.buckets(query_pos - token_pos))  # (..., k, heads)
        # (..., k, heads); q = 1. In place: at 4k history x hundreds of rows each copy is tens of MB per step
        s = self._head_dots(z, keys, query).div_(math.sqrt(c.head_dim)).add_(bias)
        allowed = token_pos <= query_pos
        if key_valid is not None:
            allowed = allowed & key_valid
        s.masked_fill_(~allowed[..., None], -1e9)  # finite: no NaN in the gradients of masked keys
        shares = s.log_softmax(-2)  # (..., k, heads): log softmax_h over all k
        if columns is not None:
            shares = shares.gather(1, columns[..., None].expand(-1, -1, c.heads))
            allowed = allowed.gather(1, columns)
        shares = shares + self.head_mix.log_softmax(0)  # log w_h softmax_h
        return torch.logsumexp(shares, -1).masked_fill(~allowed, float("-inf"))

    def page_logits(self, summary, pages: int, query_pos: torch.Tensor, query: torch.Tensor, log_norm) -> torch.Tensor:
        """The probe's (B, pages) log attention share of each page's best member, bounded from the page summaries
        (adore.engine.pages): each head's score is the page's upper bound on <q, k> plus the bias at the page's mean
        distance, normalised by `log_norm` (B, 1, heads) (`log_normaliser`). O(pages): no per-token key is read."""
        c = self.config
        bias = self.head_bias(self.buckets((query_pos - summary.centre(pages)).round().long()))  # (B, pages, heads)
        upper = summary.upper_bound(query, c.heads, pages) / math.sqrt(c.head_dim) + bias
        shares = upper - log_norm + self.head_mix.log_softmax(0)
        return torch.logsumexp(shares, -1).masked_fill(~summary.filled(pages), float("-inf"))

    def log_normaliser(self, summary, query_pos, query, cached_z, cached_pos, cached_cols) -> torch.Tensor:
        """(B, 1, heads) log of each head's softmax normaliser over the history: exact over the cached tokens
        (cached_z (B, C, width) at cached_pos, history columns cached_cols, -1: empty slot), and for the released
        rest of each page its count times exp of the page's mean-key score (adore.engine.pages). O(C + pages)."""
        c = self.config
        pages = summary.pages
        own = self._dots(cached_z, cached_pos, query_pos, query).masked_fill(
            (cached_cols < 0)[..., None], float("-inf")
        )
        page = cached_cols.clamp(min=0) // summary.page_size
        in_cache = torch.zeros_like(summary.count).scatter_add_(1, page, (cached_cols >= 0).float())  # (B, pages)
        released = (summary.count - in_cache).clamp(min=0)
        bias = self.head_bias(self.buckets((query_pos - summary.centre(pages)).round().long()))
        typical = summary.mean_dot(query, c.heads, pages) / math.sqrt(c.head_dim) + bias + released.log()[..., None]
        return torch.logaddexp(own.logsumexp(1, keepdim=True), typical.logsumexp(1, keepdim=True))

    def paged_logits(self, z, token_pos, query_pos, query, log_norm) -> torch.Tensor:
        """`logits` of the probe for the k tokens of z (B, k, width) only, normalised by `log_norm` (B, 1, heads)
        (`log_normaliser`) in place of the exact sum over every history token: O(k) per query. (B, k)."""
        shares = self._dots(z, token_pos, query_pos, query) - log_norm + self.head_mix.log_softmax(0)
        return torch.logsumexp(shares, -1).masked_fill(token_pos > query_pos, float("-inf"))

    def _dots(self, z, token_pos, query_pos, query) -> torch.Tensor:
        """(B, k, heads) <q_h, k_h> / sqrt(head_dim) + b_h(t - j) for the keys z (B, k, width), one query per row."""
        c = self.config
        keys = z.unflatten(-1, (c.heads, c.head_dim))
        q = query.unflatten(-1, (c.heads, c.head_dim))[:, None]  # (B, 1, heads, head_dim)
        bias = self.head_bias(self.buckets(query_pos - token_pos))
        return self._head_dots(z, keys, q).div_(math.sqrt(c.head_dim)).add_(bias)

    def _head_dots(self, z, keys, query) -> torch.Tensor:
        """<q_h, k_{i,h}> per head, (..., k, heads). One query per row (the engine's case, z (B, k, width)): one
        bmm of z against a block-diagonal query matrix, reading z in place; einsum first copies z into a
        head-major layout, which made scoring a 4k history 2.4x slower. Other shapes (training's broadcast
        queries): einsum."""
        c = self.config
        if z.dim() == 3 and query.dim() == 4 and query.shape[:2] == (z.shape[0], 1):
            B = z.shape[0]
            eye = torch.eye(c.heads, dtype=z.dtype, device=z.device)
            block = (query[:, 0, :, :, None] * eye[None, :, None, :]).reshape(B, c.heads * c.head_dim, c.heads)
            return torch.bmm(z, block)
        return torch.einsum("...khd,...qhd->...kh", keys, query)

    def save(self, path, meta: dict | None = None) -> None:
        """`meta`: how it was trained (e.g. the labels' K), read back by `Controller.meta`."""
        torch.save({"config": asdict(self.config), "state_dict": self.state_dict(), "meta": meta or {}}, path)

    @staticmethod
    def meta(path) -> dict:
        return _read(path).get("meta", {})

    @staticmethod
    def config_of(path) -> ControllerConfig:
        return ControllerConfig(**_read(path)["config"])

    @classmethod
    def load(cls, path, map_location="cpu") -> Controller:
        blob = _read(path, map_location)
        controller = cls(ControllerConfig(**blob["config"]))
        try:
            controller.load_state_dict(blob["state_dict"])
        except RuntimeError as err:
            raise ValueError(
                f"{path}: its weights do not fit its own config ({str(err).splitlines()[0]}); retrain it"
            ) from None
        return controller.eval()


def _read(path, map_location="cpu") -> dict:
    """A controller checkpoint's contents, or a ValueError naming the file (weights only: nothing is executed)."""
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a corrupt or truncated file; torch's message advises unsafe loading: not repeated
        raise ValueError(
            f"{path} is not a readable controller checkpoint ({type(err).__name__}): rebuild it with "
            "`python train.py stage=controller` or restore the file"
        ) from None
    if not isinstance(blob, dict) or not {"config", "state_dict"} <= set(blob):
        raise ValueError(
            f"{path} is not a controller checkpoint (no config / state_dict): pass controller.pt of a controller run"
        )
    return blob


def newest_valid(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) whether each row has a valid column, and the index of its last one (0 if none); no host sync."""
    index = (valid.long() * torch.arange(1, valid.shape[1] + 1, device=valid.device)).argmax(1)
    return valid.any(1), index
