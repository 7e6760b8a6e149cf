"""Controller labels (ADORE.md §2) and the selections they are scored against. Pure PyTorch.

A key i is a positive for query t when it is among the top-K of the full-attention weights summed over heads
and layers (the paper's "uniform scheduling": one decision for all layers). The labels file keeps, per
sequence, the token ids, the (T, K) top-K key indices of each query (-1 where a query has fewer than K keys)
the (T, K) share of the query's attention each of them holds (the listwise loss's target), and the (T, h2o_k)
ranking of keys by attention accumulated over queries <= t, for the H2O baseline.
"""

from __future__ import annotations

from pathlib import Path

import torch

from adore.io import save_torch

FORMAT = 2  # bumped when the file layout changes (2 added `mass`; format 1 files are still read)
READABLE = (1, 2)


def aggregate_attention(attentions) -> torch.Tensor:
    """Sum the per-layer weights (each (B, H, T, T)) over heads and layers: (B, T, T), float32."""
    total = None
    for layer in attentions:
        mass = layer.float().sum(1)
        total = mass if total is None else total + mass
    return total


def ranked_keys(scores: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of each query's k highest-scoring keys i <= t, best first; -1 where fewer than k exist.

    scores: (B, T, T) with queries on dim 1; valid: (B, T) bool. Returns (B, T, k) long.
    """
    B, T, _ = scores.shape
    causal = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()
    allowed = causal & valid[:, None, :] & valid[:, :, None]  # (B, T, T)
    masked = scores.float().masked_fill(~allowed, float("-inf"))
    top = masked.topk(min(k, T), dim=-1)
    index = top.indices.masked_fill(top.values == float("-inf"), -1)
    if k > T:
        index = torch.cat([index, index.new_full((B, T, k - T), -1)], dim=-1)
    return index


def attention_labels(
    attentions, valid: torch.Tensor, K: int, h2o_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-K labels, their attention shares and the H2O ranking from one batch of full-attention weights.

    attentions: per-layer (B, H, T, T) softmax weights, or their (B, T, T) sum over heads and layers
    (`adore.models.summed_attention`); valid: (B, T) bool (right padding).
    Returns topk (B, T, K) long key indices (-1 padded), mass (B, T, K) the share of the query's attention
    (over heads and layers) each holds (0 where -1), and h2o (B, T, h2o_k) long key indices.
    """
    summed = attentions if isinstance(attentions, torch.Tensor) else aggregate_attention(attentions)
    A = summed.float() * valid[:, :, None]  # (B, T, T): padding queries add nothing
    accumulated = A.cumsum(dim=1)  # (B, T, T): attention key i received from queries s <= t
    topk = ranked_keys(A, valid, K)
    share = A / A.sum(-1, keepdim=True).clamp(min=1e-9)  # each query's weights sum to 1
    mass = share.gather(2, topk.clamp(min=0)) * (topk >= 0)
    return topk, mass, ranked_keys(accumulated, valid, h2o_k)


def index_dtype(max_length: int) -> torch.dtype:
    return torch.int16 if max_length <= torch.iinfo(torch.int16).max else torch.int32


def save_labels(path: str | Path, meta: dict, rows: list[dict]) -> Path:
    """One file for the whole set: meta plus per-sequence `ids` (T,), `topk` (T, K), `mass` (T, K) float16,
    `h2o` (T, h2o_k), `id`."""
    blob = {
        "format": FORMAT,
        "meta": dict(meta),
        **{key: [row[key] for row in rows] for key in ("id", "ids", "topk", "mass", "h2o")},
    }
    save_torch(path, blob)
    return Path(path)


def load_labels(path: str | Path) -> dict:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("format") not in READABLE:
        raise ValueError(
            f"{path} has labels format {blob.get('format')!r}, expected one of {READABLE}: rerun `python train.py stage=labels`"
        )
    if "mass" not in blob:  # format 1: no attention shares; the listwise loss then weighs the top-K alike
        blob["mass"] = [((t >= 0) / (t >= 0).sum(-1, keepdim=True).clamp(min=1)).half() for t in blob["topk"]]
    return blob


def dense_labels(topk: torch.Tensor, T: int) -> torch.Tensor:
    """(T, K) key indices (-1 = none) -> (T, T) bool matrix of positives."""
    index = topk.long()
    dense = torch.zeros(T, T + 1, dtype=torch.bool, device=topk.device)
    dense.scatter_(1, index.masked_fill(index < 0, T), True)  # -1 goes to a spare last column
    return dense[:, :T]


def sample_pairs(
    topk: torch.Tensor, num_pairs: int, pos_fraction: float, min_query: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample (t, i) pairs with i <= t and t >= min_query, about `pos_fraction` of them positives.

    topk: (T, K) labels of one sequence. Returns t, i (long) and y (float) of the same length <= num_pairs
    (fewer when the sequence has too few candidates; empty when T <= min_query).
    """
    T = topk.shape[0]
    positive = dense_labels(topk, T)
    candidate = torch.ones(T, T, dtype=torch.bool).tril()
    candidate[:min_query] = False
    pools = [(positive & candidate).flatten().nonzero()[:, 0], (~positive & candidate).flatten().nonzero()[:, 0]]
    n_pos = round(num_pairs * pos_fraction)
    if len(pools[1]) == 0:
        n_pos = num_pairs
    picked, targets = [], []
    for pool, n, y in ((pools[0], n_pos, 1.0), (pools[1], num_pairs - n_pos, 0.0)):
        if len(pool) == 0 or n == 0:
            continue
        flat = pool[torch.randint(len(pool), (n,), generator=generator)]
        picked.append(flat)
        targets.append(torch.full((n,), y))
    if not picked:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, torch.zeros(0)
    flat = torch.cat(picked)
    return flat // T, flat % T, torch.cat(targets)


# Selections at a budget b, as (T, T) score matrices (higher = kept) so that every method is "top-b of a score".


def recency_scores(T: int, device=None) -> torch.Tensor:
    """Window attention: the most recent keys score highest."""
    return torch.arange(T, dtype=torch.float32, device=device).expand(T, T).clone()


def h2o_scores(ranking: torch.Tensor, budget: int, recent_ratio: float) -> torch.Tensor:
    """H2O: the round(budget * recent_ratio) most recent keys, then heavy hitters by accumulated attention.

    ranking: (T, h2o_k) keys by accumulated attention, best first, -1 padded; needs h2o_k >= budget.
    """
    T, k = ranking.shape
    device = ranking.device
    scores = torch.zeros(T, T + 1, device=device)
    index = ranking.long().masked_fill(ranking < 0, T)
    scores.scatter_(1, index, torch.arange(k, 0, -1, dtype=torch.float32, device=device).expand(T, k))
    scores = scores[:, :T]
    n_recent = round(budget * recent_ratio)
    t, i = torch.arange(T, device=device)[:, None], torch.arange(T, device=device)[None, :]
    return torch.where((t - i < n_recent) & (i <= t), scores + 2 * k + (i - t).float(), scores)


def selection_counts(scores: torch.Tensor, positive: torch.Tensor, budget: int, min_query: int) -> torch.Tensor:
    """Overlap of each query's top-`budget` keys (among i <= t) with its positives, over queries t >= min_query.

    scores, positive: (T, T). Returns [hits, selected, positives] summed over those queries (float).
    """
    T = scores.shape[0]
    causal = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()
    rows = slice(min_query, T)
    s = scores[rows].float().masked_fill(~causal[rows], float("-inf"))
    top = s.topk(min(budget, T), dim=-1)
    chosen = top.values > float("-inf")  # rows with fewer than `budget` keys select them all
    hits = (positive[rows].gather(1, top.indices) & chosen).sum()
    return torch.stack([hits.float(), chosen.sum().float(), (positive[rows] & causal[rows]).sum().float()])
