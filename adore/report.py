"""Tables and plots shaped like the paper's, from a sweep's results.json files (see ../shared/ADORE.md, "What the paper reports").

    python -m adore.report <sweep_dir> [--out DIR] [--paper] [--wandb offline|online|disabled]

The report reads only results.json files, so it can be rebuilt at any time without rerunning anything.
Writes `<out>/tables.md`, `<out>/tables.tex`, `<out>/summary.csv` and PNG plots (default out: `<sweep_dir>/report`).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import re
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import pandas as pd
from matplotlib.figure import Figure

from adore.io import read_json

# Row order of the paper's tables. "adore_r0" is ADORE with R = 0: the no-rebuild ablation.
METHODS = {
    "full": "Full attention",
    "window": "Window",
    "streaming": "StreamingLLM",
    "h2o": "H2O",
    "random": "Random",
    "adore_r0": "ADORE w/o rebuild",
    "adore": "ADORE",
    "oracle": "Oracle",
}
DATASETS = ("chat", "math", "gsm8k", "samsum")  # column-group order; other datasets follow, sorted
QUALITY = {
    "eval/bleu": "BLEU",
    "eval/rouge1": "ROUGE-1",
    "eval/rouge2": "ROUGE-2",
    "eval/rougeL": "ROUGE-L",
    "eval/bertscore_f": "BERT-F",
    "eval/accuracy": "Acc",
}
ACCURACY_DATASETS = ("math", "gsm8k")
DECODE = "perf/decode_tok_per_s"
# Distance to full attention (adore/fidelity.py); digits shown per metric.
FIDELITY = {
    "fidelity/kl": ("KL", 3),
    "fidelity/top1": ("top-1", 2),
    "fidelity/identical": ("identical", 2),
    "fidelity/first_divergence": ("1st div.", 1),
    "fidelity/rougeL_vs_full": ("ROUGE-L vs full", 2),
    "fidelity/bertscore_f_vs_full": ("BERT-F vs full", 2),
}
STREAM = {"eval/bleu": ("BLEU", 2), "eval/rougeL": ("ROUGE-L", 2), "eval/bertscore_f": ("BERT-F", 2), DECODE: ("tok/s", 1)}
LONG = {"eval/repeated_ngram_fraction": ("rep. n-gram", 3), DECODE: ("tok/s", 1)}
# Perplexity of chat data (the reference answers given their prompts) is the paper's "natural language modelling".
CHAT_DATASETS = ("chat", "math", "gsm8k", "samsum")
BASELINES = ("window", "streaming", "h2o", "random")
# Per-example scores (predictions.jsonl) tested in pairs: key -> (label, +1 if higher is better, tested against full).
TESTS = {
    "rougeL": ("ROUGE-L", 1, True),
    "bertscore_f": ("BERT-F", 1, True),
    "accuracy": ("Acc", 1, True),
    "fidelity_kl": ("KL", -1, False),
    "fidelity_top1": ("top-1", 1, False),
}
# Two runs are compared only when they share these (and the baseline the cache size m).
PAIRED = ("data", "model", "adapter", "max_new_tokens")
RUN_FIELDS = (
    "task",
    "method",
    "data",
    "model",
    "adapter",
    "m",
    "R",
    "K",
    "sinks",
    "num_examples",
    "max_new_tokens",
    "batch_size",
)
NUMERIC_FIELDS = ("m", "R", "K", "sinks", "num_examples", "max_new_tokens", "batch_size")
# What makes two runs of a method different rows; batch size only matters for throughput.
VARIANT = ("m", "R", "K", "sinks", "adapter", "model", "num_examples", "max_new_tokens")
THROUGHPUT_VARIANT = (*VARIANT, "batch_size")
# A full-attention run is the throughput reference of the runs that share these (and, if one exists, the adapter).
REFERENCE = ("data", "model", "num_examples", "max_new_tokens", "batch_size")
SHORT = {"num_examples": "n", "max_new_tokens": "new", "batch_size": "bs"}
METRIC_PREFIXES = ("eval/", "fidelity/", "perf/")
MISSING = "—"

# Numbers the paper reports, shown by --paper next to ours (docs/report.md says how to add more; never guess one).
PAPER_BACKBONE = "Llama-2-7B"
PAPER_LABEL = f"paper ({PAPER_BACKBONE})"
PAPER = {
    # method family -> decode throughput / full attention. Abstract: "221.8% higher throughput" (best case; its
    # dataset, m and R are not those of our runs).
    "throughput_ratio": {"adore": 3.218},
    # (method family, dataset, metric label in QUALITY) -> value, e.g. ("adore", "samsum", "ROUGE-L"): ...
    "quality": {},
}


class Table(NamedTuple):
    name: str
    title: str
    caption: str
    frame: pd.DataFrame  # formatted strings; index: method labels; columns: (dataset, metric)


class NoAxis(Exception):
    """A plot needs an axis (m, R) that the sweep does not vary."""


# ----------------------------------------------------------------------------------------------------------- collect


def collect(root: str | os.PathLike) -> pd.DataFrame:
    """One flat row per results.json below root: run fields, every numeric eval/, fidelity/, perf/ value, `path`.

    A `<name>_ci` [low, high] pair becomes the columns `<name>_ci_low` and `<name>_ci_high`. Unreadable or
    partial files are skipped with a warning.
    """
    root = Path(root)
    if not root.is_dir():
        warnings.warn(f"{root} is not a directory: no results", stacklevel=2)
    rows = []
    for path in sorted(root.rglob("results.json")):
        try:
            rows.append(_flatten(read_json(path), path.parent))
        except (OSError, ValueError, TypeError, AttributeError) as err:  # json.JSONDecodeError is a ValueError
            warnings.warn(f"skipping {path}: {err}", stacklevel=2)
    df = pd.DataFrame(rows)
    for col in RUN_FIELDS:
        if col not in df:
            df[col] = None
    for col in NUMERIC_FIELDS:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    metrics = sorted(c for c in df.columns if c.startswith(METRIC_PREFIXES))
    rest = [c for c in df.columns if c not in RUN_FIELDS and c not in metrics and c != "path"]
    return df[[*RUN_FIELDS, *rest, *metrics, "path"]] if len(df) else df[[*RUN_FIELDS]]


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _flatten(result: dict, run_dir: Path) -> dict:
    if not isinstance(result, dict) or not isinstance(result.get("run"), dict):
        raise ValueError("no 'run' section (partial file?)")
    row = {k: (v if v is None or isinstance(v, str | int | float) else str(v)) for k, v in result["run"].items()}
    config = result.get("config") if isinstance(result.get("config"), dict) else {}
    if row.get("K") is None and _is_number(config.get("K")):  # experiment=ablation_K: the controller's K is top-level
        row["K"] = config["K"]
    for section, values in result.items():
        if section in ("run", "config", "versions") or not isinstance(values, dict):
            continue
        for key, v in values.items():
            if _is_number(v):
                row[key] = float(v)
            elif key.endswith("_ci") and isinstance(v, list | tuple) and len(v) == 2 and all(map(_is_number, v)):
                row[f"{key}_low"], row[f"{key}_high"] = float(v[0]), float(v[1])
    for k, v in (result.get("versions") or {}).items():
        row[f"versions/{k}"] = str(v)
    row["finished_at"] = result.get("finished_at")
    row["path"] = str(run_dir)
    return row


# ---------------------------------------------------------------------------------------------------------- variants


def _generate_runs(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["task"].isna() | (df["task"] == "generate")] if "task" in df else df


def _metric_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith(METRIC_PREFIXES) and pd.api.types.is_numeric_dtype(df[c])]


def _with_family(df: pd.DataFrame, split_r0: bool = True) -> pd.DataFrame:
    """A copy with `family` (the method, ADORE with R = 0 as adore_r0) and full attention's m, R, sinks cleared."""
    d = df.copy()
    d["family"] = d["method"].astype(object).where(d["method"].notna(), "?")
    d["data"] = d["data"].astype(object).where(d["data"].notna(), "?")
    if split_r0:
        d.loc[(d["family"] == "adore") & (d["R"] == 0), "family"] = "adore_r0"
    # full attention has no budget: an m or R recorded by a shared config would only split its row
    d.loc[d["family"] == "full", ["m", "R", "sinks"]] = math.nan
    return d


def _in_paper_order(v: pd.DataFrame, keys) -> pd.DataFrame:
    rank = {f: i for i, f in enumerate(METHODS)}
    v = v.assign(_rank=v["family"].map(lambda f: rank.get(f, len(rank))))
    v = v.sort_values(["_rank", "family", *keys], na_position="first", kind="stable", key=_sort_key)
    return v.drop(columns="_rank").reset_index(drop=True)


def _variants(df: pd.DataFrame, keys: tuple[str, ...], split_r0: bool = True) -> pd.DataFrame:
    """Mean of every metric per (method family, variant keys, dataset), in the paper's row order."""
    d = _with_family(df, split_r0)
    groups = ["family", *keys, "data"]
    v = d.groupby(groups, dropna=False, sort=False)[_metric_columns(d)].mean().reset_index()
    return _in_paper_order(v, keys)


def _sort_key(s: pd.Series) -> pd.Series:
    return s.astype(str) if not pd.api.types.is_numeric_dtype(s) else s


def _fmt_value(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


BUDGET = ("m", "R", "sinks")  # method-specific: a missing value means "not this method's knob", not a difference


def _varies(v: pd.DataFrame, key: str) -> bool:
    if key not in BUDGET:
        return v[key].nunique(dropna=False) > 1
    if v[key].dropna().nunique() > 1:
        return True
    return bool(v.groupby("family")[key].agg(lambda s: 0 < s.notna().sum() < len(s)).any())


def _labels(v: pd.DataFrame, keys: tuple[str, ...] | list[str]) -> pd.Series:
    """'ADORE (m=128, R=4)': the method's name and the variant keys that vary in this frame."""
    shown = [k for k in keys if _varies(v, k)]

    def label(r) -> str:
        parts = [f"{SHORT.get(k, k)}={_fmt_value(r[k])}" for k in shown if pd.notna(r[k])]
        base = METHODS.get(r["family"], r["family"])
        return f"{base} ({', '.join(parts)})" if parts else base

    return v.apply(label, axis=1) if len(v) else pd.Series([], dtype=object)


def _fixed(v: pd.DataFrame, keys: tuple[str, ...]) -> str:
    """'m=128, model=packaged:smollm2': the variant keys no row label shows because they do not vary, for a caption."""
    parts = []
    for k in keys:
        values = v[k].dropna().unique()
        if len(values) and not _varies(v, k):
            parts.append(f"{SHORT.get(k, k)}={_fmt_value(values[0])}")
    return ", ".join(parts)


def _datasets(df: pd.DataFrame) -> list[str]:
    present = set(df["data"].dropna().astype(str)) if "data" in df else set()
    return [d for d in DATASETS if d in present] + sorted(present - set(DATASETS))


def _models(df: pd.DataFrame) -> str:
    models = sorted(set(df["model"].dropna().astype(str))) if "model" in df else []
    return ", ".join(models) or "unknown"


# ------------------------------------------------------------------------------------------------------------ tables


def _grid(v: pd.DataFrame, columns: list[tuple[str, str, str]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Values and CI half-widths, labels x (dataset, name), of `columns` = [(dataset, name, metric column)]."""
    mi = pd.MultiIndex.from_tuples([(d, n) for d, n, _ in columns], names=["data", "metric"])
    values = pd.DataFrame(math.nan, index=pd.Index(list(dict.fromkeys(v["label"])), name="Method"), columns=mi)
    half = values.copy()
    for _, r in v.iterrows():
        for data, name, col in columns:
            if data != r["data"]:
                continue
            values.loc[r["label"], (data, name)] = r.get(col, math.nan)
            low, high = r.get(f"{col}_ci_low", math.nan), r.get(f"{col}_ci_high", math.nan)
            half.loc[r["label"], (data, name)] = (high - low) / 2
    return values, half


def _present(v: pd.DataFrame, metrics) -> list[tuple[str, str, str]]:
    """(dataset, label, column) for every metric some run of that dataset reports."""
    return [
        (data, name, col)
        for data in _datasets(v)
        for col, name in metrics.items()
        if col in v and v.loc[v["data"] == data, col].notna().any()
    ]


def _with_ci(values: pd.DataFrame, half: pd.DataFrame, digits: dict | int = 2) -> pd.DataFrame:
    """Formatted cells: "mean ± half-width" where there is an interval, "—" where there is no value."""
    out = values.astype(object).copy()
    for j, col in enumerate(values.columns):
        d = digits if isinstance(digits, int) else digits.get(col[1], 2)
        out[col] = [
            _fmt(x, d) if pd.isna(h) or pd.isna(x) else f"{_fmt(x, d)} ± {h:.{d}f}"
            for x, h in zip(values.iloc[:, j], half.iloc[:, j])
        ]
    return out


def _quality(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    """Numeric quality table, the half-widths of the metrics that carry a `_ci`, and each row's family."""
    runs = _generate_runs(df)
    v = _variants(runs, VARIANT)
    v["label"] = _labels(v, VARIANT)
    columns = []
    for data in _datasets(v):
        has = v[v["data"] == data]
        for col, name in QUALITY.items():
            if name != "Acc" or data in ACCURACY_DATASETS or (col in has and has[col].notna().any()):
                columns.append((data, name, col))
    values, half = _grid(v, columns)
    return values, half, v.drop_duplicates("label").set_index("label")["family"]


def quality_values(df: pd.DataFrame) -> pd.DataFrame:
    """Methods x (dataset, metric) means; NaN where a run or metric is missing."""
    return _quality(df)[0]


def _throughput(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    runs = _generate_runs(df)
    v = _variants(runs, THROUGHPUT_VARIANT)
    if DECODE not in v:
        v[DECODE] = math.nan
    v["label"] = _labels(v, THROUGHPUT_VARIANT)

    def key(r, cols) -> tuple:
        return tuple("∅" if pd.isna(r[c]) else str(r[c]) for c in cols)

    full = v[(v["family"] == "full") & v[DECODE].notna()]
    exact, loose = {}, {}
    for _, r in full.iterrows():
        exact.setdefault(key(r, (*REFERENCE, "adapter")), []).append(r[DECODE])
        loose.setdefault(key(r, REFERENCE), []).append(r[DECODE])

    def reference(r) -> float:
        ref = exact.get(key(r, (*REFERENCE, "adapter"))) or loose.get(key(r, REFERENCE))
        return sum(ref) / len(ref) if ref else math.nan

    v["ratio"] = v[DECODE] / v.apply(reference, axis=1) if len(v) else []
    datasets = _datasets(v)
    mi = pd.MultiIndex.from_tuples([(d, c) for d in datasets for c in ("tok/s", "× full")], names=["data", "metric"])
    values = pd.DataFrame(math.nan, index=pd.Index(list(dict.fromkeys(v["label"])), name="Method"), columns=mi)
    for _, r in v.iterrows():
        values.loc[r["label"], (r["data"], "tok/s")] = r[DECODE]
        values.loc[r["label"], (r["data"], "× full")] = r["ratio"]
    return values, v.drop_duplicates("label").set_index("label")["family"]


def throughput_values(df: pd.DataFrame) -> pd.DataFrame:
    """Methods x (dataset, 'tok/s' | '× full'): decode throughput and its ratio to full attention in the same sweep."""
    return _throughput(df)[0]


def _fmt(x, digits: int = 2, suffix: str = "") -> str:
    return MISSING if x is None or pd.isna(x) else f"{x:.{digits}f}{suffix}"


def quality_table(df: pd.DataFrame, paper: bool = False) -> pd.DataFrame:
    """The formatted quality table: "—" where missing, "mean ± half-width" where the metric has a `_ci`."""
    values, half, family = _quality(df)
    out = _with_ci(values, half)
    if paper and PAPER["quality"]:
        for data, name in list(values.columns)[::-1]:
            cells = [PAPER["quality"].get((family[label], data, name)) for label in out.index]
            if any(c is not None for c in cells):
                out.insert(
                    out.columns.get_loc((data, name)) + 1, (data, f"{name} {PAPER_LABEL}"), [_fmt(c) for c in cells]
                )
    return out


def throughput_table(df: pd.DataFrame, paper: bool = False) -> pd.DataFrame:
    values, family = _throughput(df)
    out = values.copy().astype(object)
    for col in values.columns:
        out[col] = [_fmt(x, 1) if col[1] == "tok/s" else _fmt(x, 2, "×") for x in values[col]]
    if paper:
        cells = [PAPER["throughput_ratio"].get(family[label]) for label in out.index]
        if any(c is not None for c in cells):
            out[(PAPER_LABEL, "× full")] = [_fmt(c, 3, "×") for c in cells]
    return out


def _metric_table(runs: pd.DataFrame, metrics: dict[str, tuple[str, int]], drop_full: bool = False) -> pd.DataFrame:
    """Formatted methods x (dataset, metric) table of `metrics` = {column: (label, digits)}; empty if none is present."""
    v = _variants(runs, VARIANT)
    if drop_full:
        v = v[v["family"] != "full"].reset_index(drop=True)
    v["label"] = _labels(v, VARIANT)
    columns = _present(v, {col: name for col, (name, _) in metrics.items()})
    values, half = _grid(v, columns)
    return _with_ci(values, half, {name: digits for name, digits in metrics.values()})


def fidelity_table(df: pd.DataFrame) -> pd.DataFrame:
    """Bounded methods x (dataset, KL | top-1 | identical | 1st div. | ROUGE-L vs full ...): distance to full attention."""
    return _metric_table(_generate_runs(df), FIDELITY, drop_full=True)


def _perplexity(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """PPL, its CI half-width and its ratio to full attention: methods x (dataset, "m=<m>")."""
    keys = tuple(k for k in VARIANT if k not in ("m", "num_examples", "max_new_tokens"))
    v = _variants(runs, (*keys, "m"))
    if "eval/ppl" not in v:
        v["eval/ppl"] = math.nan
    v["label"] = _labels(v, keys)

    def ref_key(r, cols) -> tuple:
        return tuple("∅" if pd.isna(r[c]) else str(r[c]) for c in cols)

    full = v[(v["family"] == "full") & v["eval/ppl"].notna()]
    exact = {ref_key(r, ("data", "model", "adapter")): r["eval/ppl"] for _, r in full.iterrows()}
    loose = {ref_key(r, ("data", "model")): r["eval/ppl"] for _, r in full.iterrows()}
    columns = []
    for data in _datasets(v):
        ms = sorted(v.loc[(v["data"] == data) & v["m"].notna(), "m"].unique())
        columns += [(data, f"m={_fmt_value(float(m))}", m) for m in ms] or [(data, "PPL", math.nan)]
    mi = pd.MultiIndex.from_tuples([(d, n) for d, n, _ in columns], names=["data", "metric"])
    index = pd.Index(list(dict.fromkeys(v["label"])), name="Method")
    ppl, half, ratio = (pd.DataFrame(math.nan, index=index, columns=mi) for _ in range(3))
    for _, r in v.iterrows():
        ref = exact.get(ref_key(r, ("data", "model", "adapter")), loose.get(ref_key(r, ("data", "model"))))
        for data, name, m in columns:
            # full attention has no budget: its perplexity stands in every column, as the reference of that column
            if data == r["data"] and (pd.isna(r["m"]) or r["m"] == m):
                ppl.loc[r["label"], (data, name)] = r["eval/ppl"]
                half.loc[r["label"], (data, name)] = (r.get("eval/ppl_ci_high", math.nan) - r.get("eval/ppl_ci_low", math.nan)) / 2
                ratio.loc[r["label"], (data, name)] = r["eval/ppl"] / ref if ref else math.nan
    return ppl, half, ratio


def perplexity_values(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Perplexity runs: PPL and its ratio to full attention (same data and model), methods x (dataset, m=<m>)."""
    runs = df[df["task"] == "perplexity"] if "task" in df else df.iloc[:0]
    ppl, _, ratio = _perplexity(runs)
    return ppl, ratio


def perplexity_table(df: pd.DataFrame, chat: bool | None = None) -> pd.DataFrame:
    """Formatted "PPL ± half-width (ratio× full)"; chat=True keeps chat datasets, False the others, None all."""
    runs = df[df["task"] == "perplexity"] if "task" in df else df.iloc[:0]
    if chat is not None:
        runs = runs[runs["data"].isin(CHAT_DATASETS) == chat]
    ppl, half, ratio = _perplexity(runs)
    out = ppl.astype(object).copy()
    for j, col in enumerate(ppl.columns):
        cells = []
        for x, h, q in zip(ppl.iloc[:, j], half.iloc[:, j], ratio.iloc[:, j]):
            cell = _fmt(x) if pd.isna(h) or pd.isna(x) else f"{_fmt(x)} ± {h:.2f}"
            cells.append(cell if pd.isna(x) or pd.isna(q) else f"{cell} ({q:.2f}×)")
        out[col] = cells
    return out


def _task_runs(df: pd.DataFrame, task: str) -> pd.DataFrame:
    return df[df["task"] == task] if "task" in df else df.iloc[:0]


def stream_table(df: pd.DataFrame) -> pd.DataFrame:
    """Stream generation (task=stream): methods x (dataset, BLEU | ROUGE-L | BERT-F | decode tok/s)."""
    return _metric_table(_task_runs(df, "stream"), STREAM)


def long_table(df: pd.DataFrame) -> pd.DataFrame:
    """Long generation (task=long): methods x (dataset, repeated n-gram fraction | decode tok/s)."""
    return _metric_table(_task_runs(df, "long"), LONG)


# ------------------------------------------------------------------------------------------------- paired tests


def _scores(path: str, cache: dict) -> dict[str, dict]:
    """id -> predictions.jsonl row of a run ({} when the file is missing or unreadable)."""
    if path not in cache:
        from adore.io import read_jsonl

        try:
            cache[path] = {str(r["id"]): r for r in read_jsonl(Path(path) / "predictions.jsonl") if "id" in r}
        except (OSError, ValueError, KeyError, TypeError) as err:
            if not isinstance(err, FileNotFoundError):
                warnings.warn(f"skipping {path}/predictions.jsonl: {err}", stacklevel=3)
            cache[path] = {}
    return cache[path]


def _per_example(rows: dict[str, dict], key: str) -> dict[str, float]:
    return {i: float(r[key]) for i, r in rows.items() if _is_number(r.get(key))}


def _aligned(a: dict[str, float], b: dict[str, float]) -> tuple[list[float], list[float]]:
    ids = sorted(set(a) & set(b))
    return [a[i] for i in ids], [b[i] for i in ids]


def paired_tests(df: pd.DataFrame, bootstrap=None) -> pd.DataFrame:
    """Paired bootstrap tests on per-example scores (predictions.jsonl, aligned by id), one row per test.

    Every bounded method against full attention (quality metrics; full attention is the fidelity reference) and
    every method that is not a baseline against the best baseline (window, StreamingLLM, H2O, random; highest
    mean ROUGE-L) at the same dataset, model, adapter, max_new_tokens and cache size m. Columns: data, method
    (row label), family, vs, metric, diff (method - other), low, high, significant, n.
    """
    from adore.stats import Bootstrap

    bootstrap = bootstrap or Bootstrap()
    runs = _with_family(_generate_runs(df))
    columns = ["data", "method", "family", "vs", "metric", "diff", "low", "high", "significant", "n"]
    if runs.empty or "path" not in runs:
        return pd.DataFrame(columns=columns)
    runs = runs.assign(label=_labels(runs, VARIANT).values)
    runs = _in_paper_order(runs.drop_duplicates(["label", "data"]), VARIANT)
    cache: dict = {}

    def same(r, cols) -> pd.Series:
        mask = pd.Series(True, index=runs.index)
        for c in cols:
            mask &= runs[c].isna() if pd.isna(r[c]) else runs[c] == r[c]
        return mask

    def mean_rouge(row) -> float:
        values = list(_per_example(_scores(row["path"], cache), "rougeL").values())
        return sum(values) / len(values) if values else -math.inf

    out = []
    for _, r in runs[runs["family"] != "full"].iterrows():
        mine = _scores(r["path"], cache)
        if not mine:
            continue
        others = []
        full = runs[same(r, PAIRED) & (runs["family"] == "full")]
        if len(full):
            others.append(("full", full.iloc[0], [k for k, (_, _, vs_full) in TESTS.items() if vs_full]))
        baselines = runs[same(r, (*PAIRED, "m")) & runs["family"].isin(BASELINES)]
        if r["family"] not in BASELINES and len(baselines):
            best = max((b for _, b in baselines.iterrows()), key=mean_rouge)
            others.append((f"best baseline: {best['label']}", best, list(TESTS)))
        for vs, other, keys in others:
            theirs = _scores(other["path"], cache)
            for key in keys:
                a, b = _aligned(_per_example(mine, key), _per_example(theirs, key))
                if not a:
                    continue
                t = bootstrap.paired(a, b)
                out.append([r["data"], r["label"], r["family"], vs, TESTS[key][0], t["diff"], *t["ci"], t["significant"], t["n"]])
    return pd.DataFrame(out, columns=columns)


def significance_table(tests: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, dataset, comparison); cells "diff [low, high] ✓|✗" per metric ("—": not tested)."""
    if tests.empty:
        return pd.DataFrame()
    metrics = [name for name, _, _ in TESTS.values() if name in set(tests["metric"])]
    rows = {}
    for _, t in tests.iterrows():
        key = (t["method"], t["data"], t["vs"])
        d = 3 if t["metric"] == "KL" else 2
        cell = f"{t['diff']:+.{d}f} [{t['low']:.{d}f}, {t['high']:.{d}f}] {'✓' if t['significant'] else '✗'}"
        rows.setdefault(key, {})[t["metric"]] = cell
    out = pd.DataFrame(
        [[data, vs, *(cells.get(m, MISSING) for m in metrics)] for (_, data, vs), cells in rows.items()],
        index=pd.Index([k[0] for k in rows], name="Method"),
        columns=["data", "vs", *metrics],
    )
    return out


def _other_task_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Methods x (dataset, metric) for any task but generate (e.g. perplexity): every eval/ metric it has."""
    v = _variants(runs, VARIANT)
    v["label"] = _labels(v, VARIANT)
    metrics = [
        c
        for c in _metric_columns(v)
        if c.startswith("eval/") and v[c].notna().any() and not c.endswith(("_ci_low", "_ci_high"))
    ]
    columns = [(d, c) for d in _datasets(v) for c in metrics if v.loc[v["data"] == d, c].notna().any()]
    mi = pd.MultiIndex.from_tuples([(d, c.removeprefix("eval/")) for d, c in columns], names=["data", "metric"])
    out = pd.DataFrame(MISSING, index=pd.Index(list(dict.fromkeys(v["label"])), name="Method"), columns=mi)
    for _, r in v.iterrows():
        for d, c in columns:
            if d == r["data"] and pd.notna(r[c]):
                out.loc[r["label"], (d, c.removeprefix("eval/"))] = _fmt(r[c])
    return out


def build_tables(df: pd.DataFrame, paper: bool = False, tests: bool = True) -> list[Table]:
    """Every table of the report, formatted; empty when the sweep has no runs. `tests`: the paired bootstrap tests
    (they read each run's predictions.jsonl)."""
    tables = []
    runs = _generate_runs(df)
    paper_note = (
        f" Columns '{PAPER_LABEL}' hold numbers reported by the paper, whose backbone was {PAPER_BACKBONE}; "
        f"ours used {_models(runs)}. The paper's settings (cache size, R, data, hardware) differ from ours: "
        "compare trends, not cells."
    )
    if len(runs):
        fixed = _fixed(_variants(runs, VARIANT), VARIANT)
        caption = (
            "Quality of the generated text (BLEU, ROUGE and BERTScore-F in %; Acc: exact-match accuracy as "
            f"reported), mean over duplicate runs; {MISSING} where a run or metric is missing."
            + (f" Shared by every row (where it applies): {fixed}." if fixed else "")
        )
        frame = quality_table(df, paper)
        has_paper = any(PAPER_LABEL in c[1] for c in frame.columns)
        tables.append(Table("quality", "Quality", caption + (paper_note if has_paper else ""), frame))
    if len(runs) and DECODE in runs and runs[DECODE].notna().any():
        fixed = _fixed(_variants(runs, THROUGHPUT_VARIANT), THROUGHPUT_VARIANT)
        caption = (
            "Decode throughput (generated tokens per second, prefill excluded) and its ratio to full attention "
            "measured in the same sweep on the same data, model and generation settings (batch size, "
            f"max_new_tokens, num_examples); {MISSING} where the sweep has no such full-attention run."
            + (f" Shared by every row (where it applies): {fixed}." if fixed else "")
        )
        frame = throughput_table(df, paper)
        if PAPER_LABEL in frame.columns.get_level_values(0):
            caption += (
                paper_note + " The paper's figure is its headline: 221.8 % higher throughput than full attention."
            )
        tables.append(Table("throughput", "Throughput", caption, frame))
    if len(runs) and any(c in runs and runs[c].notna().any() for c in FIDELITY):
        tables.append(Table("fidelity", "Fidelity to full attention", (
            "Distance of each bounded method to full attention on the same prompts (adore/fidelity.py): KL(full || "
            "method) in nats and top-1 agreement of the next-token distributions with full attention's output "
            "teacher-forced; identical: share of outputs equal to full attention's; 1st div.: tokens generated "
            "before the first difference; ROUGE-L / BERT-F vs full: the two outputs scored against each other (%). "
            f"mean ± half-width of the bootstrap interval; {MISSING} where a run or metric is missing."
        ), fidelity_table(df)))
    if tests:
        frame = significance_table(paired_tests(df))
        if len(frame):
            tables.append(Table("significance", "Paired bootstrap tests", (
                "Difference of the per-example mean (this method - the other), its 95 % paired bootstrap interval "
                "over the examples both runs scored (aligned by id), and ✓ when the interval excludes 0. vs full: "
                "full attention on the same data, model and generation length (quality only: full attention is the "
                "fidelity reference). vs best baseline: the window / StreamingLLM / H2O / random run with the "
                f"highest mean ROUGE-L at the same cache size m. KL: lower is better. {MISSING}: not tested."
            ), frame))
    ppl_note = (
        "Teacher-forced perplexity under each method's cache, one token per step (task=perplexity), "
        "mean ± half-width of its bootstrap interval, and in brackets its ratio to full attention's perplexity on the "
        "same data and model. Full attention has no budget: its perplexity stands in every m column."
    )
    for chat, name, title, what in (
        (False, "perplexity", "Language modelling (perplexity)", " Long documents (e.g. WikiText-2), each one stream."),
        (True, "nlm", "Natural language modelling", " Chat data: perplexity of the reference answers given their prompts, "
         "the paper's natural-language-modelling task (CNN/DailyMail, SAMSum)."),
    ):
        frame = perplexity_table(df, chat=chat)
        if frame.shape[0] and frame.shape[1]:
            tables.append(Table(name, title, ppl_note + what, frame))
    for task, frame, title, caption in (
        ("stream", stream_table(df), "Stream generation", (
            "Each multi-turn dialogue as one stream with a bounded cache (task=stream): every reply scored against the "
            f"dataset's reply (BLEU, ROUGE-L, BERT-F in %, mean ± half-width), and decode tokens/s; {MISSING} where missing."
        )),
        ("long", long_table(df), "Long generation", (
            "Generations several times longer than the cache (task=long): share of repeated n-grams (degeneration, "
            f"lower is better; mean ± half-width) and decode tokens/s; {MISSING} where missing."
        )),
    ):
        if frame.shape[0] and frame.shape[1]:
            tables.append(Table(task, title, caption, frame))
    known = ("generate", "perplexity", "stream", "long")
    others = df[df["task"].notna() & ~df["task"].isin(known)] if "task" in df else df.iloc[:0]
    for task in sorted(set(others["task"].astype(str))):
        frame = _other_task_table(others[others["task"] == task])
        if frame.shape[1]:
            tables.append(Table(f"task_{task}", f"Task: {task}", f"Every eval/ metric of the `{task}` runs.", frame))
    return tables


# ---------------------------------------------------------------------------------------------------------- renderers


def to_markdown(tables: list[Table], notes: list[str] = (), plots: list[str] = (), title: str = "Report") -> str:
    parts = [f"# {title}", ""]
    for t in tables:
        flat = t.frame.copy()
        flat.columns = [" ".join(c) if isinstance(c, tuple) else c for c in flat.columns]
        # disable_numparse: tabulate would otherwise reprint "25.00" as "25"
        parts += [f"## {t.title}", "", t.caption, "", flat.to_markdown(disable_numparse=True), ""]
    if not tables:
        parts += ["No evaluation runs found.", ""]
    if plots or notes:
        parts += ["## Plots", ""]
        parts += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
        parts += [f"- {n}" for n in notes]
        parts.append("")
    return "\n".join(parts)


def _tex_escape(s: str) -> str:
    s = re.sub(r"([&%$#_{}])", r"\\\1", s)
    return s.replace("~", r"\textasciitilde{}").replace("^", r"\textasciicircum{}").replace("—", "--")


def _tex_symbols(s: str) -> str:
    s = s.replace("±", r"$\pm$").replace("×", r"$\times$").replace("—", "--")
    return s.replace("✓", r"$\checkmark$").replace("✗", "--")


def to_latex(tables: list[Table]) -> str:
    parts = ["% Generated by `python -m adore.report`; needs \\usepackage{booktabs} (and amssymb for \\checkmark).", ""]
    for t in tables:
        # the column levels' names head the label column, so no extra header row holds the index name
        multi = isinstance(t.frame.columns, pd.MultiIndex)
        frame = t.frame.rename_axis(index=None, columns=[None, "Method"]) if multi else t.frame.reset_index()
        tex = frame.to_latex(
            index=multi,
            caption=_tex_escape(t.caption).replace("×", r"$\times$"),
            label=f"tab:{t.name}",
            multicolumn=True,
            multicolumn_format="c",
            column_format="l" * (1 if multi else 3) + "r" * (t.frame.shape[1] - (0 if multi else 2)),
            escape=True,
        )
        parts += [_tex_symbols(tex), ""]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------------------- plots


def _colors(lines) -> dict:
    return {line: f"C{i % 10}" for i, line in enumerate(dict.fromkeys(lines))}


# One colour per method family and a marker/line style per variant of it, so a dozen lines stay readable.
FAMILY_COLORS = {
    "window": "C0",
    "streaming": "C1",
    "h2o": "C2",
    "random": "C7",
    "adore_r0": "C4",
    "adore": "C3",
    "oracle": "C9",
}
STYLES = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("P", "--"), ("X", "-."), ("*", ":")]


def _styles(v: pd.DataFrame) -> dict:
    colors, spare = dict(FAMILY_COLORS, full="black"), itertools.cycle(["C5", "C6", "C8"])
    out, count = {}, {}
    for family, line in dict.fromkeys(zip(v["family"], v["line"])):
        if family not in colors:
            colors[family] = next(spare)
        marker, ls = STYLES[count.get(family, 0) % len(STYLES)]
        count[family] = count.get(family, 0) + 1
        out[line] = {"color": colors[family], "marker": marker, "ls": ls}
    return out


def _new_figure(n: int) -> tuple[Figure, list]:
    fig = Figure(figsize=(4.2 * n + 2.4, 3.4), layout="constrained")
    return fig, list(fig.subplots(1, n, squeeze=False)[0])


def _legend(fig: Figure, axes: list, extra: list = ()) -> None:
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    for h in extra:
        handles.setdefault(h.get_label(), h)
    fig.legend(list(handles.values()), list(handles.keys()), loc="outside right upper", fontsize="small")


def _plot_vs_m(df: pd.DataFrame, metric: str, keys: tuple[str, ...], ylabel: str) -> Figure:
    runs = _generate_runs(df)
    if metric not in runs or not runs[metric].notna().any():
        raise NoAxis(f"no run has {metric}")
    v = _variants(runs, keys)
    v = v[v[metric].notna()].copy()
    if v.loc[v["family"] != "full", "m"].nunique() < 2:
        raise NoAxis("the sweep has a single cache size m")
    v["line"] = _labels(v, [k for k in keys if k != "m"])
    styles = _styles(v)
    datasets = _datasets(v)
    fig, axes = _new_figure(len(datasets))
    for ax, data in zip(axes, datasets):
        for line, g in v[v["data"] == data].groupby("line", sort=False):
            if g["m"].isna().all():  # full attention: no budget, a reference line
                ax.axhline(g[metric].mean(), ls="--", color=styles[line]["color"], label=line)
            else:
                g = g.dropna(subset=["m"]).sort_values("m")
                ax.plot(g["m"], g[metric], label=line, **styles[line])
        ms = sorted(v["m"].dropna().unique())
        ax.set_xscale("log", base=2)
        ax.set_xticks(ms, [_fmt_value(float(m)) for m in ms])
        ax.minorticks_off()
        ax.set(title=data, xlabel="cache size m", ylabel=ylabel)
        ax.grid(alpha=0.3)
    _legend(fig, axes)
    return fig


def plot_quality_vs_m(df: pd.DataFrame, metric: str = "eval/rougeL") -> Figure:
    """ROUGE-L (or `metric`) against the cache size m, one line per method, one panel per dataset."""
    return _plot_vs_m(df, metric, VARIANT, QUALITY.get(metric, metric))


def plot_throughput_vs_m(df: pd.DataFrame) -> Figure:
    """Decode tok/s against the cache size m, one line per method, one panel per dataset."""
    return _plot_vs_m(df, DECODE, THROUGHPUT_VARIANT, "decode tok/s")


def plot_R_tradeoff(df: pd.DataFrame, metric: str = "eval/rougeL") -> Figure:
    """The rebuild trade-off of ADORE (and the oracle): ROUGE-L (solid, left axis) and decode tok/s (dashed, right
    axis) against R."""
    from matplotlib.lines import Line2D

    runs = _generate_runs(df)
    runs = runs[runs["method"].isin(["adore", "oracle"])]
    if runs.groupby("method")["R"].nunique().max(skipna=True) < 2 if len(runs) else True:
        raise NoAxis("the sweep has fewer than two values of R for adore or oracle")
    v = _variants(runs, THROUGHPUT_VARIANT, split_r0=False).dropna(subset=["R"])
    for col in (metric, DECODE):
        if col not in v:
            v[col] = math.nan
    v["line"] = _labels(v, [k for k in THROUGHPUT_VARIANT if k != "R"])
    colors = _colors(v["line"])
    datasets = _datasets(v)
    fig, axes = _new_figure(len(datasets))
    for ax, data in zip(axes, datasets):
        twin = ax.twinx()
        for line, g in v[v["data"] == data].groupby("line", sort=False):
            g = g.sort_values("R")
            ax.plot(g["R"], g[metric], marker="o", color=colors[line], label=line)
            twin.plot(g["R"], g[DECODE], marker="s", ls="--", color=colors[line])
        ax.set(title=data, xlabel="rebuilt tokens R", ylabel=QUALITY.get(metric, metric))
        twin.set_ylabel("decode tok/s")
        ax.grid(alpha=0.3)
    styles = [
        Line2D([], [], color="gray", marker="o", label=f"{QUALITY.get(metric, metric)} (left)"),
        Line2D([], [], color="gray", marker="s", ls="--", label="decode tok/s (right)"),
    ]
    _legend(fig, axes, styles)
    return fig


PLOTS = {"quality_vs_m": plot_quality_vs_m, "throughput_vs_m": plot_throughput_vs_m, "R_tradeoff": plot_R_tradeoff}


def figures(df: pd.DataFrame) -> tuple[dict[str, Figure], list[str]]:
    """Every plot the sweep supports, and a note for each one skipped."""
    figs, notes = {}, []
    for name, plot in PLOTS.items():
        try:
            figs[name] = plot(df)
        except NoAxis as why:
            notes.append(f"{name}.png skipped: {why}.")
    return figs, notes


# ------------------------------------------------------------------------------------------------------------ output


@contextmanager
def _atomic(path: Path):
    """Yield a temporary path beside `path`; renamed onto it only once the caller's write succeeded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_text(path: Path, text: str) -> None:
    with _atomic(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_report(
    df: pd.DataFrame, out: str | os.PathLike, paper: bool = False, title: str = "Report"
) -> tuple[str, list[Path]]:
    """Write tables.md, tables.tex, summary.csv and the PNG plots into `out`; return the Markdown and the files."""
    out = Path(out)
    tables = build_tables(df, paper)
    figs, notes = figures(df)
    files = []
    for name, fig in figs.items():
        path = out / f"{name}.png"
        with _atomic(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        files.append(path)
    markdown = to_markdown(tables, notes, [p.name for p in files], title)
    for name, text in (("tables.md", markdown), ("tables.tex", to_latex(tables))):
        _write_text(out / name, text)
        files.append(out / name)
    with _atomic(out / "summary.csv") as tmp:
        df.to_csv(tmp, index=False)
    files.append(out / "summary.csv")
    tests = paired_tests(df)
    if len(tests):
        with _atomic(out / "significance.csv") as tmp:
            tests.to_csv(tmp, index=False)
        files.append(out / "significance.csv")
    return markdown, files


def log_wandb(files: list[Path], mode: str, out: Path, sweep: Path) -> None:
    """Log the report's files as one wandb artifact (offline: files under `out/wandb`, `wandb sync` later)."""
    from adore.tracking import wandb_run

    name = re.sub(r"[^\w.-]", "_", f"report-{sweep.resolve().name}")
    with wandb_run({"mode": mode}, str(out), name, {"sweep": str(sweep)}, job_type="report") as run:
        if run is None:
            return
        import wandb

        artifact = wandb.Artifact(name, type="report")
        for f in files:
            artifact.add_file(str(f))
        run.log_artifact(artifact)
        run.log({f"report/{f.stem}": wandb.Image(str(f)) for f in files if f.suffix == ".png"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adore.report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a run or sweep directory; every results.json below it is read")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <sweep_dir>/report)")
    parser.add_argument("--paper", action="store_true", help=f"show the paper's numbers ({PAPER_BACKBONE}) beside ours")
    parser.add_argument("--wandb", choices=("offline", "online", "disabled"), default="disabled")
    args = parser.parse_args(argv)
    df = collect(args.sweep_dir)
    if df.empty:
        print(f"no readable results.json under {args.sweep_dir}", file=sys.stderr)
        return 1
    out = args.out or args.sweep_dir / "report"
    markdown, files = write_report(df, out, args.paper, title=f"Report: {args.sweep_dir}")
    print(markdown)
    print(f"wrote {len(files)} files to {out}", file=sys.stderr)
    if args.wandb != "disabled":
        log_wandb(files, args.wandb, out, args.sweep_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
