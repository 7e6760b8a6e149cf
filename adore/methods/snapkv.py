from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from adore.checks import check_integer, is_integer
from adore.engine.attention import MAX_ROWS
from adore.methods.base import KEEP, Method, State

MAX_WINDOW = MAX_ROWS  # attention rows the engine records at most (adore.engine.attention)


@dataclass
class SnapKV(Method):
    """SnapKV (Li et al., 2024): the attention of an observation window (the last `window` queries), summed,
    smoothed by average pooling over neighbouring keys (`kernel`), picks the tokens to keep; the window's own
    tokens are always kept. One decision for all layers (summed over heads and layers, like the others).

    SnapKV compresses a prompt once; under a fixed budget the window slides with decoding: the last `window`
    queries seen (the end of the prompt at first, then the newest generated tokens) score every token.
    """

    m: int = 128
    window: int | None = None  # queries in the observation window; None: m // 8, at most MAX_WINDOW (kvpress: 64)
    kernel: int = 5  # average-pooling width over keys (odd)
    name: ClassVar[str] = "snapkv"
    label: ClassVar[str] = "SnapKV"
    needs: ClassVar[frozenset[str]] = frozenset({"window_attention"})
    short: ClassVar[dict] = {"window": "w", "kernel": "k"}

    def __post_init__(self):
        super().__post_init__()
        if self.m is None:
            raise ValueError(
                "method.m=null: SnapKV releases down to a budget; pass method.m (e.g. 128), or use method=full"
            )
        check_integer("method.window", self.window, optional=True, fix=": queries in the observation window, e.g. 64")
        if not 1 <= self.rows < min(self.m, MAX_WINDOW + 1):
            fits = min(self.m - 1, MAX_WINDOW)
            raise ValueError(
                f"method.window={self.rows} must be in [1, min(m={self.m}, {MAX_WINDOW + 1})): the window's tokens are "
                f"always kept and the engine records at most {MAX_WINDOW} attention rows; pass method.window="
                f"{min(64, fits)} (kvpress's default) or any value up to {fits}"
                if fits >= 1
                else f"method.m={self.m}: SnapKV keeps its window and at least one more token, so use method.m=2 or more"
            )
        if not is_integer(self.kernel) or self.kernel % 2 == 0:
            raise ValueError(f"method.kernel={self.kernel!r} must be a positive odd integer: the pooling width, e.g. 5")

    @property
    def rows(self) -> int:
        """Queries in the observation window: `window`, or m // 8 when unset (one setting across an m sweep), capped
        at the MAX_WINDOW rows the engine records (m > 2,048; kvpress uses 64 at such budgets)."""
        return self.window or min(max(1, self.m // 8), MAX_WINDOW)

    def start(self, batch_size, length, device, model):
        rows = torch.zeros(batch_size, length, self.rows, device=device)  # (B, T, window): the window's rows
        return State(tokens={"rows": rows, "score": torch.zeros(batch_size, length, device=device)})

    def update(self, state, entered):
        rows = torch.cat([state.tokens["rows"], entered.window_attention.transpose(1, 2)], dim=2)[..., -self.rows :]
        state.tokens["rows"] = rows
        pooled = F.avg_pool1d(rows.sum(2)[:, None], self.kernel, stride=1, padding=self.kernel // 2)
        state.tokens["score"] = pooled[:, 0]  # (B, T)

    def score(self, state, tokens):
        in_window = tokens.positions > tokens.query_pos - self.rows
        return state.tokens["score"].gather(1, tokens.cols) + KEEP * in_window
