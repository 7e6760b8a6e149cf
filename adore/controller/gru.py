"""The paper's controller (ADORE.md §2): z_i = GRU(x_i, z_{i-1}), sigma_i = sigmoid(MLP(p_i + z_i)).

`z_i` is computed once, when token i enters. `p_i` encodes the distance t - i between the current query position
t and token i (bucketed, learned), so scores move as decoding moves on (project default); `position="absolute"`
encodes i itself instead. Two levers beyond the paper, each a config switch (both off: the paper's controller):

* `input_layer`: x_i is the backbone's residual stream after that many decoder layers instead of the input
  embedding (0): a contextual token state the forward computes anyway;
* `query`: the score gains a bilinear term <W_q z_t, W_k z_i> / sqrt(width) between the current query's state
  z_t and token i's, so two queries at the same distance can want different tokens (as attention does).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from adore.controller.base import Controller, ControllerConfig


class GRUScorer(Controller):
    """Scores each token on its own: sigma_i from its state z_i, its distance to the query and (with `query`) the
    query's state z_t. The carried state h is the GRU's, z of each row's newest token."""

    def __init__(self, config: ControllerConfig):
        super().__init__(config)
        self.proj = nn.Linear(config.d_model, config.width)
        self.gru = nn.GRU(config.width, config.width, batch_first=True)
        self.position = nn.Embedding(config.num_buckets, config.width)
        self.mlp = nn.Sequential(nn.Linear(config.width, config.mlp_hidden), nn.GELU(), nn.Linear(config.mlp_hidden, 1))
        if config.query:
            self.q_proj = nn.Linear(config.width, config.width)
            self.k_proj = nn.Linear(config.width, config.width)

    @property
    def distance_embedding(self) -> nn.Embedding:
        return self.position

    @property
    def state_width(self) -> int:
        return self.config.width

    def encode(
        self, embeds: torch.Tensor, valid: torch.Tensor, h: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the GRU over the valid tokens of each row, skipping padding; h: (B, width)."""
        B, T, _ = embeds.shape
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

    def sequence_queries(self, x: torch.Tensor, embeds: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The query of token t is token t itself: its state z_t."""
        return z

    def logits(self, z, token_pos, query_pos, query=None, key_valid=None, columns=None) -> torch.Tensor:
        """Pre-sigmoid scores MLP(p + z) (+ the bilinear term with `query`, the query's state z_t (..., 1, width)
        or broadcastable, read only with `config.query`). Each token's score is its own: `key_valid` changes
        nothing, and `columns` is refused (gather z and positions first)."""
        c = self.config
        if columns is not None:
            raise ValueError("Controller.logits(columns=...) is for the attention probe: gather z and positions first")
        where = query_pos - token_pos if c.position == "relative" else token_pos
        p = self.position(self.buckets(where))
        out = self.mlp(p + z).squeeze(-1)
        if c.query:
            if query is None:
                raise ValueError("a query-dependent controller (query=True) needs the query's state z_t")
            out = out + (self.q_proj(query) * self.k_proj(z)).sum(-1) / math.sqrt(c.width)
        return out
