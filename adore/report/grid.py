"""What every table of the report is made of: a methods x (dataset, metric) grid of means and CI half-widths, read
from the variants of collect.py, and its formatted cells ("mean ± half-width", "—" where a value is missing)."""

from __future__ import annotations

import math
from typing import NamedTuple

import pandas as pd

from adore.report.collect import datasets, identity, variants

DECODE = "perf/decode_tok_per_s"
RATIO = "ratio"  # a metric over full attention's, a column of the throughput and perplexity variants
MISSING = "—"


class Table(NamedTuple):
    name: str
    title: str
    caption: str
    frame: pd.DataFrame  # formatted strings; index: row labels; columns: (dataset, metric)


def fmt(x, digits: int = 2, suffix: str = "") -> str:
    return MISSING if x is None or pd.isna(x) else f"{x:.{digits}f}{suffix}"


def grid(v: pd.DataFrame, columns: list[tuple[str, str, str]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Values and CI half-widths, rows x (dataset, name), of `columns` = [(dataset, name, metric column)]."""
    mi = pd.MultiIndex.from_tuples([(d, n) for d, n, _ in columns], names=["data", "metric"])
    values = pd.DataFrame(math.nan, index=pd.Index(list(dict.fromkeys(v["row"])), name="Method"), columns=mi)
    half = values.copy()
    for _, r in v.iterrows():
        for data, name, col in columns:
            if data != r["data"]:
                continue
            values.loc[r["row"], (data, name)] = r.get(col, math.nan)
            low, high = r.get(f"{col}_ci_low", math.nan), r.get(f"{col}_ci_high", math.nan)
            half.loc[r["row"], (data, name)] = (high - low) / 2
    return values, half


def present(v: pd.DataFrame, metrics: dict[str, str]) -> list[tuple[str, str, str]]:
    """(dataset, label, column) for every metric of `metrics` = {column: label} some run of that dataset reports."""
    return [
        (data, name, col)
        for data in datasets(v)
        for col, name in metrics.items()
        if col in v and v.loc[v["data"] == data, col].notna().any()
    ]


def with_ci(values: pd.DataFrame, half: pd.DataFrame, digits: dict | int = 2) -> pd.DataFrame:
    """Formatted cells: "mean ± half-width" where there is an interval, "—" where there is no value."""
    out = values.astype(object).copy()
    for j, col in enumerate(values.columns):
        d = digits if isinstance(digits, int) else digits.get(col[1], 2)
        out[col] = [
            fmt(x, d) if pd.isna(h) or pd.isna(x) else f"{fmt(x, d)} ± {h:.{d}f}"
            for x, h in zip(values.iloc[:, j], half.iloc[:, j])
        ]
    return out


def metric_table(runs: pd.DataFrame, metrics: dict[str, tuple[str, int]]) -> pd.DataFrame:
    """Formatted methods x (dataset, metric) table of `metrics` = {column: (label, digits)}; empty if none is present."""
    v = variants(runs, identity(runs))
    columns = present(v, {col: name for col, (name, _) in metrics.items()})
    values, half = grid(v, columns)
    return with_ci(values, half, {name: digits for name, digits in metrics.values()})


def reference_values(v: pd.DataFrame, metric: str, keys: tuple[str, ...]) -> pd.Series:
    """Per row of `v`: the mean `metric` of the full-attention rows that share `keys` (and the adapter, if one does)."""

    def key(r, cols) -> tuple:
        return tuple("∅" if pd.isna(r[c]) else str(r[c]) for c in cols)

    exact, loose = {}, {}
    for _, r in v[v["reference"] & v[metric].notna()].iterrows():
        exact.setdefault(key(r, (*keys, "adapter")), []).append(r[metric])
        loose.setdefault(key(r, keys), []).append(r[metric])

    def reference(r) -> float:
        found = exact.get(key(r, (*keys, "adapter"))) or loose.get(key(r, keys))
        return sum(found) / len(found) if found else math.nan

    return v.apply(reference, axis=1) if len(v) else pd.Series([], dtype=float)
