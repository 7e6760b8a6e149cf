"""Which methods, with which settings, become rows: the configs of conf/method/, built as eval.py builds them."""

from __future__ import annotations

import itertools

import torch

from adore.bench.rows import run_method
from adore.registry import build_method, method_config, method_names


def methods_for(
    names: list[str],
    m: int,
    R: list[int] | None,
    controller: str | None,
    rebuild: list[str] | None = None,
    every: list[int] | None = None,
    forward: list[int] | None = None,
    pages: list[int] | None = None,
    stores: list[str] | None = None,
    extra: dict | None = None,
) -> list[tuple[str, dict]]:
    """(config name, overrides) per row: one per value of `R` (None: the config's own) for configs with an `R`
    field, times one per rebuild policy and period for configs that rebuild (R > 0; None: the config's), for
    `keep` one per cap on the picks forwarded, for `recall` one per page size (0: token picks) and store dtype.
    `extra`: overrides of every config that has those fields (e.g. an untrained controller's shape). A page size
    pairs only with the R values it divides (`--R 4,64 --page-size 0,16`: R = 4 as tokens, R = 64 as tokens and
    in pages of 16), and so does a config's own page size (`adore_late`)."""
    unknown = [n for n in names if n not in method_names()]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {method_names()}")
    configs = {name: method_config(name, m) for name in names}
    every_R = R if R is not None else [fields["R"] for fields in configs.values() if "R" in fields]
    for g in pages or []:
        if g and not any(r > 0 and r % g == 0 for r in every_R):
            raise SystemExit(f"--page-size={g} divides no R in {every_R}: give an R of whole pages, e.g. --R {4 * g}")
    rows = []
    for name in names:
        fields = configs[name]
        given = ({"controller": controller} if controller else {}) | (extra or {})
        own = {k: v for k, v in given.items() if k in fields}
        if "R" not in fields:
            rows.append((name, own))
            continue
        own_page = fields.get("page_size")  # a config that recalls pages (adore_late) takes R of whole pages
        for r in R if R is not None else [fields["R"]]:
            if r > 0 and own_page and not pages and r % own_page:
                print(f"[skip] method={name} R={r}: not a whole number of its pages of {own_page}")
                continue
            policies = rebuild_policies(r, fields.get("rebuild"), rebuild, every, forward, pages, stores) if r else [{}]
            rows += [(name, own | {"R": r} | policy) for policy in policies]
    for flag, values, field in (("--page-size", pages, "page_size"), ("--store-dtype", stores, "store_dtype")):
        if values and any(values) and not any(field in overrides for _, overrides in rows):
            raise SystemExit(
                f"{flag}={','.join(map(str, values))} sets recall's {field}, but no row recalls: add --rebuild recall "
                "or a method that recalls (adore_trained), with R > 0"
            )
    return rows


def rebuild_policies(r: int, own: str | None, rebuild, every, forward, pages, stores) -> list[dict]:
    """The rebuild overrides of a config's rows at R = r: one per policy and period, times for `keep` one per cap on
    the picks forwarded, for `recall` one per page size that divides r (0: token picks) and store dtype. A policy
    not given is the config's `own`, which takes the policy's flags (adore_trained: recall)."""
    policies = []
    for p in rebuild or [None]:
        policy = p or own
        caps = forward if policy == "keep" and forward else [None]
        sizes = [g for g in pages if not g or r % g == 0] if policy == "recall" and pages else [None]
        dtypes = stores if policy == "recall" and stores else [None]
        for k, f, g, d in itertools.product(every or [None], caps, sizes, dtypes):
            chosen = {"rebuild": p, "rebuild_every": k, "rebuild_forward": f, "page_size": g or None, "store_dtype": d}
            policies.append({key: v for key, v in chosen.items() if v is not None})
    return policies


def runnable(model, specs: list[tuple[str, dict]], m: int, ids: torch.Tensor, cuda_graphs: bool) -> list:
    """Build each method and warm it up on a short prompt; skip (with a note) those that fail on this model."""
    methods = []
    for name, overrides in specs:
        try:
            method = build_method(name, m, **overrides)
            run_method(model, method, ids[:, :128], 4, cuda_graphs=cuda_graphs)
        except (ValueError, RuntimeError) as err:
            settings = "".join(f" {k}={v}" for k, v in overrides.items())
            print(f"[skip] method={name}{settings}: {type(err).__name__}: {str(err).splitlines()[0]}")
            continue
        methods.append(method)
    if not methods:
        raise SystemExit("no method could run on this model: see the [skip] notes above")
    return methods
