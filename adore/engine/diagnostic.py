"""Where release goes wrong: after each step, how much of what full attention wants the cache kept.

For the newest query t of every row, with a(i) its full-attention weights (a shadow full-attention pass,
summed over heads and layers, normalised to 1 over the tokens i <= t):

* `recall`: the share of a's top-m tokens that the kept m hold (1 for a perfect release);
* `mass`: the share of a that the kept tokens hold;
* per age bucket (age = t - position; the first SINKS positions apart, as "sink"): the share of a in the
  bucket (`mass_<bucket>`) and the share of a that is kept there (`kept_<bucket>`), so that the lost mass of
  a bucket is the difference and the kept shares sum to `mass`.

Only steps where the history holds more than m tokens count (before that nothing is released). With a page
pick (`rebuild=recall` with `page_size`) also `pick_recall`: of the R released tokens the exact per-token pick
would bring back (the method's own rebuild scores), the share the picked pages hold. Pure PyTorch.
"""

from __future__ import annotations

import torch

SINKS = 4  # positions shown apart as attention sinks (StreamingLLM's default)
AGE_EDGES = (16, 64, 256)  # age buckets [0, 16), [16, 64), [64, 256), [256, inf)
BUCKETS = ("sink", "age0_15", "age16_63", "age64_255", "age256_")
KEYS = ("recall", "mass", *(f"mass_{b}" for b in BUCKETS), *(f"kept_{b}" for b in BUCKETS))
REPORTED = (*KEYS, "pick_recall")  # a row's statistics; pick_recall only where pages were picked


def pick_counts(
    scores: torch.Tensor, released: torch.Tensor, cols: torch.Tensor, ok: torch.Tensor, R: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hits, wanted), each (B,): of the R released columns with the best `scores` (B, seen) (the exact per-token
    pick), how many the picked columns `cols` (B, r) (valid where `ok`) hold, and how many there were."""
    top = scores.masked_fill(~released, float("-inf")).topk(min(R, scores.shape[1]), dim=1)
    wanted = torch.isfinite(top.values)
    picked = torch.zeros(released.shape, dtype=torch.int32, device=released.device).scatter_add_(1, cols, ok.int()) > 0
    return (picked.gather(1, top.indices) & wanted).sum(1), wanted.sum(1)


def release_stats(
    attention: torch.Tensor,
    kept: torch.Tensor,
    valid: torch.Tensor,
    positions: torch.Tensor,
    query_pos: torch.Tensor,
    m: int,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-row statistics of one step, and which rows count (history > m).

    attention: (B, T) full attention of each row's newest query over the history columns; kept, valid: (B, T)
    bool; positions: (B, T) original positions; query_pos: (B, 1). Returns ({key: (B,)}, (B,) bool).
    """
    share = attention.float() * valid
    share = share / share.sum(1, keepdim=True).clamp(min=1e-12)
    counted = valid.sum(1) > m
    top = share.masked_fill(~valid, -1.0).topk(min(m, share.shape[1]), dim=1).indices  # (B, m)
    stats = {"recall": kept.gather(1, top).float().mean(1), "mass": (share * kept).sum(1)}
    age = query_pos - positions
    bucket = torch.bucketize(age, torch.tensor(AGE_EDGES, device=age.device), right=True) + 1
    bucket = torch.where(positions < SINKS, 0, bucket)  # (B, T) index into BUCKETS
    one_hot = torch.nn.functional.one_hot(bucket, len(BUCKETS)).float() * valid[..., None]  # (B, T, buckets)
    in_bucket = torch.einsum("bt,btk->bk", share, one_hot)
    kept_in_bucket = torch.einsum("bt,btk->bk", share * kept, one_hot)
    for k, name in enumerate(BUCKETS):
        stats[f"mass_{name}"] = in_bucket[:, k]
        stats[f"kept_{name}"] = kept_in_bucket[:, k]
    return stats, counted


class ReleaseDiagnostic:
    """Accumulates `release_stats` of every step of a session, per row (the session calls `observe`)."""

    def __init__(self, batch_size: int, m: int, device=None):
        self.m = m
        self.sums = {key: torch.zeros(batch_size, device=device) for key in KEYS}
        self.steps = torch.zeros(batch_size, device=device)
        self.pick_hits = torch.zeros(batch_size, device=device)
        self.pick_wanted = torch.zeros(batch_size, device=device)

    def observe(self, attention, kept, valid, positions, query_pos, live) -> None:
        """One step; `live` (B,) bool marks rows whose newest token is real (not padding)."""
        stats, counted = release_stats(attention, kept, valid, positions, query_pos, self.m)
        counted = counted & live
        for key, value in stats.items():
            self.sums[key] += value * counted
        self.steps += counted

    def observe_pick(self, hits: torch.Tensor, wanted: torch.Tensor) -> None:
        """One page pick's `pick_counts`."""
        self.pick_hits += hits
        self.pick_wanted += wanted

    def rows(self) -> list[dict[str, float]]:
        """Per row: the mean of every statistic over its counted steps (NaN-free: rows with none are empty), and
        `pick_recall` over every page pick (hits / wanted) where there was one."""
        means = {key: (s / self.steps.clamp(min=1)).tolist() for key, s in self.sums.items()}
        steps = self.steps.tolist()
        hits, wanted = self.pick_hits.tolist(), self.pick_wanted.tolist()
        return [
            ({key: means[key][row] for key in KEYS} if steps[row] else {})
            | {"steps": steps[row]}
            | ({"pick_recall": hits[row] / wanted[row]} if wanted[row] else {})
            for row in range(len(steps))
        ]
