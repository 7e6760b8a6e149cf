"""Per-page summaries of per-token keys, so that a query scores pages in O(pages), not O(tokens).

A page is `page_size` consecutive history columns. For each page and row the summary holds the channel-wise
minimum and maximum of its keys (Quest's bound, Tang et al. ICML 2024; ArkVale's bounding box, Chen et al.
NeurIPS 2024), their sum, their count and the sum of their positions. For a query q,
sum_c max(q_c min_c, q_c max_c) >= <q, k_i> for every key of the page (the page's upper bound), and <q, mean k>
stands for a typical member (a normaliser's estimate). Summaries are updated as tokens enter, once each.
"""

from __future__ import annotations

import torch

from adore.controller.base import head_dots


def by_page(values: torch.Tensor, page_size: int, fill) -> torch.Tensor:
    """(B, seen) per-column values as (B, pages, page_size), the last page padded with `fill`."""
    B, seen = values.shape
    pages = -(-seen // page_size)
    return torch.nn.functional.pad(values, (0, pages * page_size - seen), value=fill).view(B, pages, page_size)


class PageSummary:
    def __init__(self, batch_size: int, width: int, page_size: int, device):
        self.page_size, self.width = page_size, width
        self.lo = torch.empty(batch_size, 0, width, device=device)  # (B, pages, width)
        self.hi = torch.empty(batch_size, 0, width, device=device)
        self.total = torch.empty(batch_size, 0, width, device=device)
        self.count = torch.empty(batch_size, 0, device=device)  # (B, pages) keys entered
        self.position = torch.empty(batch_size, 0, device=device)  # (B, pages) sum of their positions

    @property
    def pages(self) -> int:
        return self.lo.shape[1]

    def _grow(self, pages: int) -> None:
        extra = pages - self.pages
        if extra <= 0:
            return
        extra = max(extra, self.pages)  # amortised: double
        B = self.lo.shape[0]
        new = lambda fill, *tail: torch.full((B, extra, *tail), fill, device=self.lo.device)  # noqa: E731
        self.lo = torch.cat([self.lo, new(float("inf"), self.width)], 1)
        self.hi = torch.cat([self.hi, new(float("-inf"), self.width)], 1)
        self.total = torch.cat([self.total, new(0.0, self.width)], 1)
        self.count = torch.cat([self.count, new(0.0)], 1)
        self.position = torch.cat([self.position, new(0.0)], 1)

    def add(
        self, cols: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, length: int
    ) -> None:
        """Enter the keys (B, n, width) of history columns `cols` (n,), at `positions` (B, n), where `valid`;
        `length`: the history's column capacity, known on the host (no sync to size the summaries)."""
        self._grow(-(-length // self.page_size))
        page = (cols // self.page_size).expand(keys.shape[0], -1)  # (B, n)
        index = page[..., None].expand_as(keys)
        keys = keys.float()
        mask = valid[..., None]
        self.lo.scatter_reduce_(1, index, keys.masked_fill(~mask, float("inf")), "amin")
        self.hi.scatter_reduce_(1, index, keys.masked_fill(~mask, float("-inf")), "amax")
        self.total.scatter_add_(1, index, keys * mask)
        self.count.scatter_add_(1, page, valid.float())
        self.position.scatter_add_(1, page, positions.float() * valid)

    def upper_bound(self, query: torch.Tensor, heads: int, pages: int) -> torch.Tensor:
        """(B, pages, heads) sum_c max(q_c lo_c, q_c hi_c) per head, for the query (B, width); >= any member's dot.
        As lo <= hi, it is <max(q, 0), hi> + <min(q, 0), lo>: two dot products read in place, no page-sized
        temporaries. Meaningless for an empty page (mask by `filled`)."""
        upper = head_dots(self.hi[:, :pages], query.clamp(min=0), heads)
        return upper.add_(head_dots(self.lo[:, :pages], query.clamp(max=0), heads))

    def filled(self, pages: int) -> torch.Tensor:
        """(B, pages) pages holding at least one key."""
        return self.count[:, :pages] > 0

    def mean_dot(self, query: torch.Tensor, heads: int, pages: int) -> torch.Tensor:
        """(B, pages, heads) <q_h, mean key_h> of each page (0 for an empty page)."""
        return head_dots(self.total[:, :pages], query, heads) / self.count[:, :pages, None].clamp(min=1)

    def centre(self, pages: int) -> torch.Tensor:
        """(B, pages) mean position of each page's keys."""
        return self.position[:, :pages] / self.count[:, :pages].clamp(min=1)
