"""Which batches run: every method at each batch size, or under a KV budget each method at its largest batch."""

from __future__ import annotations

from adore.engine.cache import kv_bytes_per_slot
from adore.engine.session import capacity_for


def plan(
    model, methods: list, batches: list[int], kv_budget_gib: float | None, context: int, store_budget_gib: float = 16
) -> list[tuple]:
    """(batch, [methods]) in run order. Under `kv_budget_gib` each method alone, at the largest batch whose KV
    cache of `context` tokens fits (bounded methods hold min(m, context) + R + 1 slots per row, full attention
    the whole context): how a bounded cache becomes throughput. The budget counts device KV slots; a method that
    keeps released KV outside the cache (`rebuild=recall`) must also fit its store of `context` tokens per row
    in `store_budget_gib` (host memory on CUDA; on a CPU the same RAM, so both budgets are charged to it)."""
    if kv_budget_gib is None:
        return [(b, methods) for b in batches]
    budget, store_budget = int(kv_budget_gib * 2**30), int(store_budget_gib * 2**30)
    per_slot = kv_bytes_per_slot(model.config, model.dtype)
    batches_of = []
    for method in methods:
        batch = budget // (per_slot * capacity_for(method, context))
        per_row_store = 0 if method.m is None else method.rebuild_policy().store_bytes_for(model.config, model.dtype)
        if per_row_store:
            batch = min(batch, store_budget // (per_row_store * context))
        batches_of.append((batch, [method]))
    if any(b < 1 for b, _ in batches_of):
        raise SystemExit(
            f"--kv-budget-gib={kv_budget_gib} / --store-budget-gib={store_budget_gib} do not hold one row of some "
            "method: raise them"
        )
    return batches_of
