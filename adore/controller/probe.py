"""The attention probe (`heads` > 0 in place of the GRU and MLP): the score of token i for query t is the log of
a mixture of `heads` softmax attention heads over every past token,

    log sigma_t(i) = log sum_h w_h softmax_{j <= t}(<q_{t,h}, k_{j,h}> / sqrt(head_dim) + b_h(t - j))_i,

the shape of the label itself (attention summed over the backbone's heads and layers). k_i reads x_i; q_t reads
x_{t-1} and the input embedding of token t, both known *before* token t's forward, so the rebuild pick of the
step that feeds token t is scored for token t itself (a query that needed token t's own forward would pick for
the previous query: one step late).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from adore.controller.base import Controller, ControllerConfig, head_dots, newest_valid, token_logsumexp


class AttentionProbe(Controller):
    """Keys k_i = W_k LN(x_i) and queries q_t = W_q LN([x_{t-1}; e_t]), `heads` x `head_dim` wide. The carried
    state h is x of each row's newest valid token: the next query reads it. Scores are normalised over every past
    token, so scoring needs all of them (or, paged, summaries of the released ones: `log_normaliser`)."""

    def __init__(self, config: ControllerConfig):
        super().__init__(config)
        D, width = config.d_model, config.heads * config.head_dim
        self.key_norm, self.key = nn.LayerNorm(D), nn.Linear(D, width)
        self.query_norm, self.query = nn.LayerNorm(2 * D), nn.Linear(2 * D, width)
        self.head_bias = nn.Embedding(config.num_buckets, config.heads)  # b_h(t - j)
        self.head_mix = nn.Parameter(torch.zeros(config.heads))  # log w_h, before normalisation

    @property
    def distance_embedding(self) -> nn.Embedding:
        return self.head_bias

    @property
    def state_width(self) -> int:
        return self.config.heads * self.config.head_dim

    def encode(
        self, embeds: torch.Tensor, valid: torch.Tensor, h: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One key per token; h: (B, d_model) x of each row's newest valid token (kept where a row has none)."""
        z = self.key(self.key_norm(embeds)) * valid[..., None]  # (B, T, heads * head_dim)
        has, last = newest_valid(valid)
        newest = embeds.gather(1, last[:, None, None].expand(-1, 1, embeds.shape[-1]))[:, 0]
        h_new = newest if h is None else torch.where(has[:, None], newest, h)
        return z, h_new

    def queries(self, previous: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """The query of token t from x_{t-1} (`previous`, zeros for the first token) and token t's input
        embedding: (..., d_model) each -> (..., heads * head_dim)."""
        return self.query(self.query_norm(torch.cat([previous, embeds], -1)))

    def sequence_queries(self, x: torch.Tensor, embeds: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        previous = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)  # x_{t-1} at t (zeros at t = 0)
        return self.queries(previous, embeds)

    def logits(self, z, token_pos, query_pos, query=None, key_valid=None, columns=None) -> torch.Tensor:
        """Log attention shares, normalised over the k tokens given: they must be all tokens <= t. `query`: (..., 1,
        heads * head_dim) from `queries`. Tokens after t and those where `key_valid` (..., k) is False get -inf.
        With `columns` (B, c), indices into the k tokens: only their scores, (B, c), normalised over all k as ever
        (the release asks for the m cached tokens of a history of thousands)."""
        c = self.config
        keys = z.unflatten(-1, (c.heads, c.head_dim))  # (..., k, heads, head_dim)
        query = needed(query).unflatten(-1, (c.heads, c.head_dim))  # (..., 1, heads, head_dim)
        bias = self.distance_bias(query_pos - token_pos)  # (..., k, heads)
        # (..., k, heads); q = 1. In place: at long histories x many rows each copy is large, every step
        s = self._head_dots(z, keys, query).div_(math.sqrt(c.head_dim)).add_(bias)
        return self.normalised_shares(s, token_pos, query_pos, key_valid, columns)

    def normalised_shares(self, s, token_pos, query_pos, key_valid=None, columns=None) -> torch.Tensor:
        """`logits` from the per-head scores s (..., k, heads) (`head_scores`), which it overwrites: the heads'
        log softmax over all k tokens, mixed by the learnt head weights."""
        allowed = self.allowed(token_pos, query_pos, key_valid)
        s.masked_fill_(~allowed[..., None], -1e9)  # finite: no NaN in the gradients of masked keys
        shares = s.log_softmax(-2)  # (..., k, heads): log softmax_h over all k
        if columns is not None:
            shares = shares.gather(1, columns[..., None].expand(-1, -1, self.config.heads))
            allowed = allowed.gather(1, columns)
        return self.mixed(shares, allowed)

    @staticmethod
    def allowed(token_pos, query_pos, key_valid=None) -> torch.Tensor:
        """The keys a query may read: at or before it, and valid where `key_valid` is given."""
        allowed = token_pos <= query_pos
        return allowed if key_valid is None else allowed & key_valid

    def mixed(self, shares, allowed) -> torch.Tensor:
        """log sum_h w_h share_h from per-head log shares (..., k, heads), -inf where not `allowed` (..., k)."""
        return torch.logsumexp(shares + self.head_mix.log_softmax(0), -1).masked_fill(~allowed, float("-inf"))

    def mixed_normalised_(self, shares) -> torch.Tensor:
        """`mixed` without the mask, for log shares normalised over a set that holds each token (all <= 0), which it
        overwrites (the caller's temporary: one allocation of the history's size fewer a step): the heads mixed in
        exp space, one matrix-vector product (4x faster than a logsumexp over the heads on a CPU, 16 rows of 4k
        tokens). exp cannot overflow there, and a mixture below the float's range reads as the log of its smallest
        normal number: finite, still above an empty slot's -inf."""
        w = self.head_mix.softmax(0).to(shares.dtype)
        return torch.matmul(shares.exp_(), w).clamp_(min=torch.finfo(shares.dtype).tiny).log_()

    def page_logits(self, summary, pages: int, query_pos: torch.Tensor, query: torch.Tensor, log_norm) -> torch.Tensor:
        """(B, pages) log attention share of each page's best member, bounded from the page summaries
        (adore.engine.pages): each head's score is the page's upper bound on <q, k> plus the bias at the page's mean
        distance, normalised by `log_norm` (B, 1, heads) (`log_normaliser`). O(pages): no per-token key is read."""
        c = self.config
        bias = self.distance_bias((query_pos - summary.centre(pages)).round().long())  # (B, pages, heads)
        upper = summary.upper_bound(query, c.heads, pages) / math.sqrt(c.head_dim) + bias
        return self.mixed(upper - log_norm, summary.filled(pages))

    def log_normaliser(self, summary, pages: int, query_pos, query, cached_scores, cached_cols) -> torch.Tensor:
        """(B, 1, heads) log of each head's softmax normaliser over the history: exact over the cached tokens
        (their `head_scores` (B, C, heads), history columns cached_cols, -1: empty slot), and for the released
        rest of each of the first `pages` pages (those holding every fed column) its count times exp of the page's
        mean-key score (adore.engine.pages). O(C + pages)."""
        c = self.config
        own = cached_scores.masked_fill((cached_cols < 0)[..., None], float("-inf"))
        page = cached_cols.clamp(min=0) // summary.page_size
        count = summary.count[:, :pages]
        in_cache = torch.zeros_like(count).scatter_add_(1, page, (cached_cols >= 0).float())  # (B, pages)
        released = (count - in_cache).clamp(min=0)
        bias = self.distance_bias((query_pos - summary.centre(pages)).round().long())
        typical = summary.mean_dot(query, c.heads, pages) / math.sqrt(c.head_dim) + bias + released.log()[..., None]
        return torch.logaddexp(token_logsumexp(own), token_logsumexp(typical))

    def paged_logits(self, z, token_pos, query_pos, query, log_norm) -> torch.Tensor:
        """`logits` for the k tokens of z (B, k, width) only, normalised by `log_norm` (B, 1, heads)
        (`log_normaliser`) in place of the exact sum over every history token: O(k) per query. (B, k)."""
        return self.mixed(self.head_scores(z, token_pos, query_pos, query) - log_norm, token_pos <= query_pos)

    def head_scores(self, z, token_pos, query_pos, query) -> torch.Tensor:
        """(B, k, heads) <q_h, k_h> / sqrt(head_dim) + b_h(t - j) for the keys z (B, k, width), one query per row
        (the engine's scoring). One pass after the dots: `addcdiv` computes bias + 1 * dots /
        sqrt(head_dim), rounded as a division then an addition are."""
        c = self.config
        keys = z.unflatten(-1, (c.heads, c.head_dim))
        q = needed(query).unflatten(-1, (c.heads, c.head_dim))[:, None]  # (B, 1, heads, head_dim)
        dots = self._head_dots(z, keys, q)
        root = torch.tensor(math.sqrt(c.head_dim), dtype=dots.dtype, device=dots.device)
        return self.distance_bias(query_pos - token_pos).addcdiv_(dots, root)  # the bias is a fresh tensor

    def distance_bias(self, distance: torch.Tensor) -> torch.Tensor:
        """b_h(d), (..., heads), of integer distances. Without gradients, one lookup in a table of every distance's
        bias, made afresh each call from the weights as they are (a few thousand rows), where `head_bias(buckets(d))`
        takes two lookups over every history token of every row, every decode step; the same values."""
        weight = self.head_bias.weight
        if torch.is_grad_enabled() and weight.requires_grad:
            return self.head_bias(self.buckets(distance))
        buckets = self._bucket_table(distance.device)
        table = weight.index_select(0, buckets)  # (distances, heads)
        # rows gathered whole (advanced indexing would copy value by value), into a fresh tensor, not a view of one
        return nn.functional.embedding(distance.clamp(0, buckets.shape[0] - 1), table)

    def _head_dots(self, z, keys, query) -> torch.Tensor:
        """<q_h, k_{i,h}> per head, (..., k, heads): `head_dots` for one query per row (the engine's case, z (B, k,
        width)); other shapes (training's broadcast queries) by einsum."""
        if z.dim() == 3 and query.dim() == 4 and query.shape[:2] == (z.shape[0], 1):
            return head_dots(z, query[:, 0].flatten(1), self.config.heads)
        return torch.einsum("...khd,...qhd->...kh", keys, query)


def needed(query):
    """The probe scores for a query: without one (a session that never called `queries`) it cannot score."""
    if query is None:
        raise ValueError("an attention-probe controller (heads > 0) needs the query from Controller.queries")
    return query
