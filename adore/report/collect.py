"""results.json files -> one flat DataFrame, and what makes two runs the same row (their identity).

A run's identity is its run settings (task, data, model, adapter, num_examples, max_new_tokens, task=ruler's arrival
regime, and batch size for throughput) and every field of its method (the results.json `method` section). Runs that
differ in any of them are never averaged into one row. task=ruler runs of one identity that cover other tasks or
lengths are one row, scored over all their examples (`pool_ruler`). Display names, row order and which runs are
baselines come from the files too (`run.label`, `run.training_free`), never from a list of known methods.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import pandas as pd

from adore.io import read_json

# run fields that also name a method setting (the method section's m, R, sinks land here, not under method/)
BUDGET = ("m", "R", "K", "sinks")
SETTINGS = ("adapter", "model", "num_examples", "max_new_tokens", "arrival")  # arrival: task=ruler's regime
FLAGS = ("label", "tag", "training_free", "chat", "has_answer")
RUN_FIELDS = (
    "task",
    "method",
    *FLAGS,
    "data",
    "model",
    "adapter",
    *BUDGET,
    "num_examples",
    "max_new_tokens",
    "arrival",
    "batch_size",
)
NUMERIC_FIELDS = (*BUDGET, "num_examples", "max_new_tokens", "batch_size")
METHOD_PREFIX = "method/"  # every other field of the method section: method/recent_ratio, method/controller, ...
# method settings a run label spells already: ADORE names its controller's recipe and a rebuild policy other than
# the paper's ("ADORE [probe_l20] + recall")
NAMED_BY_LABEL = ("method/controller", "method/rebuild")
METRIC_PREFIXES = ("eval/", "fidelity/", "perf/")
SHORT = {"num_examples": "n", "max_new_tokens": "new", "batch_size": "bs"}


def collect(*roots: str | os.PathLike) -> pd.DataFrame:
    """One flat row per results.json below the roots (several: a sweep run in parts, e.g. a length at a time): run
    fields, `method/<field>` for each method setting that is not a run field, every numeric eval/, fidelity/, perf/
    value, `reference` (full attention: training-free without a budget) and `path`.

    A `<name>_ci` [low, high] pair becomes the columns `<name>_ci_low` and `<name>_ci_high`. Unreadable or
    partial files are skipped with a warning.
    """
    rows = []
    for root in map(Path, roots):
        if not root.is_dir():
            warnings.warn(f"{root} is not a directory: no results", stacklevel=2)
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
    for col in ("training_free", "chat", "has_answer"):
        df[col] = df[col].astype(bool)
    df["label"] = df["label"].fillna("?").astype(str)
    df["reference"] = df["training_free"] & df["m"].isna()
    df = pool_ruler(df)
    front = [*RUN_FIELDS, *method_columns(df), "reference"]
    metrics = sorted(c for c in df.columns if c.startswith(METRIC_PREFIXES))
    rest = [c for c in df.columns if c not in front and c not in metrics and c != "path"]
    return df[[*front, *rest, *metrics, "path"]] if len(df) else df[front]


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _scalar(v):
    """A value fit for a DataFrame cell and a groupby key: nested values as sorted JSON text."""
    return v if v is None or isinstance(v, str | int | float | bool) else json.dumps(v, sort_keys=True, default=str)


def _flatten(result: dict, run_dir: Path) -> dict:
    if not isinstance(result, dict) or not isinstance(result.get("run"), dict):
        raise ValueError("no 'run' section (partial file?)")
    row = {k: _scalar(v) for k, v in result["run"].items()}
    config = result.get("config") if isinstance(result.get("config"), dict) else {}
    if row.get("K") is None and _is_number(config.get("K")):  # experiment=ablation_K: the controller's K is top-level
        row["K"] = config["K"]
    method = result.get("method") if isinstance(result.get("method"), dict) else None
    if method is None or any(k not in row for k in FLAGS if k != "tag"):
        method = _legacy(row, method)
    # m, R, sinks are the method's: a setting it does not have is no value (run.R is 0 for methods without rebuild)
    row.update({k: method.get(k) for k in ("m", "R", "sinks")})
    row["K"] = method.get("K") if method.get("K") is not None else row.get("K")  # ADORE: its controller's K
    row.update({METHOD_PREFIX + k: _scalar(v) for k, v in method.items() if k not in (*BUDGET, "name")})
    for section, values in result.items():
        if section in ("run", "config", "versions", "method") or not isinstance(values, dict):
            continue
        for key, v in values.items():
            if _is_number(v):
                row[key] = float(v)
            elif key.endswith("_ci") and isinstance(v, list | tuple) and len(v) == 2 and all(map(_is_number, v)):
                row[f"{key}_low"], row[f"{key}_high"] = float(v[0]), float(v[1])
    for k, v in (result.get("versions") or {}).items():
        row[f"versions/{k}"] = str(v)
    if row.get("task") == "ruler" and row.get("examples_per_setting") is not None:
        # prompts per task and length, not in all: a run over other tasks or lengths is the same setting (pool_ruler)
        row["num_examples"] = row["examples_per_setting"]
    row["finished_at"] = result.get("finished_at")
    row["path"] = str(run_dir)
    return row


# ------------------------------------------------------------------------------------------- task=ruler in parts
RULER_METRIC = "eval/ruler_"


def pool_ruler(df: pd.DataFrame) -> pd.DataFrame:
    """task=ruler runs of one identity and haystack -> one row scored over the union of their examples.

    A long-context sweep is run in parts (a length at a time, a task added later): pooled, each method is one row
    of the tables, one heatmap panel over every length, and one side of paired tests over every example. Accuracies
    and intervals are recomputed from the parts' predictions (`adore.ruler.accuracy_metrics`; an example in two
    parts counts once, from the later), never averaged over parts; other metrics are the parts' mean. `runs` holds
    the parts' folders (`run_dirs`). A group with a part whose predictions.jsonl cannot be read stays as it is."""
    if "task" not in df or not (df["task"] == "ruler").any():
        return df
    ruler = df[df["task"] == "ruler"]
    keys = ["task", "data", "label", "method", "reference", "training_free", *identity(ruler)]
    pooled, merged = [], set()
    for _, g in ruler.groupby(keys, dropna=False, sort=False):
        if len(g) < 2:
            continue
        row = _pooled(g.sort_values("finished_at", na_position="first", key=lambda s: s.astype(str)))
        if row is not None:
            pooled.append(row)
            merged |= set(g.index)
    if not pooled:
        return df
    return pd.concat([df.drop(index=sorted(merged)), pd.DataFrame(pooled)], ignore_index=True).copy()


def _pooled(parts: pd.DataFrame) -> dict | None:
    """One row for `parts` (oldest first), or None (with a warning) when a part's predictions cannot be read."""
    from adore.eval.stats import Bootstrap
    from adore.ruler import VARIANTS, accuracy_metrics

    try:
        examples = predictions(tuple(parts["path"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        warnings.warn(f"task=ruler runs of one setting left apart: {err}", stacklevel=3)
        return None
    order = {v: i for i, v in enumerate(VARIANTS)}  # a run's own order: variant, length, index
    rows = sorted(examples.values(), key=lambda r: (order.get(r["variant"], len(order)), r["length"], r["index"]))
    row = {k: v for k, v in parts.iloc[-1].items() if not k.startswith(RULER_METRIC)}
    row |= {c: parts[c].mean() for c in row if c.startswith(METRIC_PREFIXES)}
    for key, value in accuracy_metrics(rows, Bootstrap().mean_ci).items():
        if key.endswith("_ci"):
            row[f"{key}_low"], row[f"{key}_high"] = value
        else:
            row[key] = value
    row["prompt_tokens_mean"] = sum(r["prompt_tokens"] for r in rows) / len(rows)
    row["runs"] = tuple(parts["path"])
    return row


def predictions(dirs: tuple[str, ...]) -> dict[str, dict]:
    """id -> predictions.jsonl row over the runs in `dirs` (the later run wins an id in two); a file that cannot be
    read raises, its path in the message."""
    from adore.io import read_jsonl

    examples = {}
    for path in dirs:
        try:
            examples |= {str(r["id"]): r for r in read_jsonl(Path(path) / "predictions.jsonl") if "id" in r}
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}/predictions.jsonl: {err}") from err
    return examples


def run_dirs(row) -> tuple[str, ...]:
    """The folders of a row's runs: the parts of a pooled task=ruler row, else its one run."""
    runs = row.get("runs")
    return runs if isinstance(runs, tuple) else (row["path"],)


# --- legacy results.json (written before runs carried `method`, run.label, training_free, chat, has_answer) ---------
# These sets stand in for the fields such files lack; they are used for nothing else.
LEGACY_TRAINING_FREE = frozenset({"full", "window", "streaming", "h2o", "random"})
LEGACY_CHAT = frozenset({"chat", "math", "gsm8k", "samsum"})
LEGACY_ANSWER = frozenset({"math", "gsm8k"})


def _legacy(row: dict, method: dict | None) -> dict:
    """Fill a legacy run's missing fields in `row`; return its method section (identity: m, R, K, sinks)."""
    name = str(row.get("method") or "?")
    if name == "full":  # full attention has no budget: an m or R recorded by a shared config would only split its row
        row.update(m=None, R=None, sinks=None)
    row.setdefault("label", name.replace("_", " ").title())
    row.setdefault("training_free", name in LEGACY_TRAINING_FREE)
    row.setdefault("chat", row.get("data") in LEGACY_CHAT)
    row.setdefault("has_answer", row.get("data") in LEGACY_ANSWER)
    return method if method is not None else {"name": name, **{k: row.get(k) for k in BUDGET}}


# ------------------------------------------------------------------------------------------------------ identity


def method_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith(METHOD_PREFIX)]


def identity(df: pd.DataFrame, throughput: bool = False) -> tuple[str, ...]:
    """The columns that tell two runs of one method and dataset apart, in the order labels show them."""
    return (*BUDGET, *method_columns(df), *SETTINGS, *(("batch_size",) if throughput else ()))


def generate_runs(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["task"].isna() | (df["task"] == "generate")] if "task" in df else df


def task_runs(df: pd.DataFrame, task: str) -> pd.DataFrame:
    return df[df["task"] == task] if "task" in df else df.iloc[:0]


def metric_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith(METRIC_PREFIXES) and pd.api.types.is_numeric_dtype(df[c])]


def in_row_order(v: pd.DataFrame, keys=()) -> pd.DataFrame:
    """Full attention first, then the training-free methods, then the others; each by label, then m and `keys`."""
    v = v.assign(
        _rank=2 - v["reference"].astype(int) - v["training_free"].astype(int), _label=v["label"].str.casefold()
    )
    v = v.sort_values(["_rank", "_label", *keys], na_position="first", kind="stable", key=_sort_key)
    return v.drop(columns=["_rank", "_label"]).reset_index(drop=True)


def _sort_key(s: pd.Series) -> pd.Series:
    return s if pd.api.types.is_numeric_dtype(s) else s.astype(str)


def variants(df: pd.DataFrame, keys: tuple[str, ...], shown: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Mean of every metric per (method, `keys`, dataset), in row order, with its row label in `row`.

    `shown`: the keys a row label may name (default `keys`), e.g. all but m where m is a column.
    """
    d = df.assign(data=df["data"].astype(object).where(df["data"].notna(), "?"))
    groups = ["reference", "training_free", "label", "method", "task", *keys, "data"]
    v = d.groupby(groups, dropna=False, sort=False)[metric_columns(d)].mean().reset_index()
    v = in_row_order(v, keys)
    v["row"] = row_labels(v, keys if shown is None else shown)
    return v


def fmt_value(v) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _varies(v: pd.DataFrame, key: str, dropna: bool = False) -> bool:
    """Whether `key` takes two values among the rows of one dataset."""
    return bool(len(v)) and bool(v.groupby("data")[key].nunique(dropna=dropna).gt(1).any())


def _renames(g: pd.DataFrame, key: str, before: list[str]) -> bool:
    """A text setting that only renames a key shown before it: one-to-one with it and spelling its value on every
    row (the controller file `c_k64@ab` where K=64 is shown). A setting that merely follows a shown key in one sweep
    (rebuild=recall on the R=64 rows only) is a choice of its own, so the label keeps it."""

    def determines(a: str, b: str) -> bool:
        return bool((g.groupby(a, dropna=False)[b].nunique(dropna=False) <= 1).all())

    def spells(j: str) -> bool:
        return all(_spells(text, value) for text, value in zip(g[key], g[j]))

    return not pd.api.types.is_numeric_dtype(g[key]) and any(
        determines(j, key) and determines(key, j) and spells(j) for j in before
    )


def _spells(text, value) -> bool:
    """Whether `text` holds `value` whole (64 in "c_k64@ab", not in "c_k640"); a missing value spells only a missing one."""
    if pd.isna(text) or pd.isna(value):
        return pd.isna(text) and pd.isna(value)
    return re.search(rf"(?<![\d.]){re.escape(fmt_value(value))}(?![\d.])", str(text)) is not None


def shown_keys(v: pd.DataFrame, keys) -> dict[str, list[str]]:
    """label -> the keys its rows name. A run field (m, R, K, sinks, adapter, model, n, new, bs) is named on every
    row wherever it varies among one dataset's rows, so rows of different methods compare at a glance (a missing m,
    R, K or sinks is "not this method's knob", not a value); a method setting (method/...) where it varies among
    the rows of that label, or among the rows of its method unless the label itself names it (`NAMED_BY_LABEL`):
    a recipe alone under its label still says which of its method's settings it departs in."""
    common = [k for k in keys if not k.startswith(METHOD_PREFIX) and _varies(v, k, dropna=k in BUDGET)]
    out = {}
    for label, g in v.groupby("label", sort=False):
        kin = v[v["method"].isin(g["method"])]
        ks = []
        for k in keys:
            by_method = k.startswith(METHOD_PREFIX) and k not in NAMED_BY_LABEL and _varies(kin, k)
            if (k in common or by_method or _varies(g, k)) and not _renames(g, k, ks):
                ks.append(k)
        out[label] = ks
    return out


def short(key: str) -> str:
    return SHORT.get(key, key.removeprefix(METHOD_PREFIX))


def row_labels(v: pd.DataFrame, keys) -> pd.Series:
    """'H2O (m=64, recent_ratio=0.25)': run.label and the identity keys that tell its rows apart (`shown_keys`)."""
    shown = shown_keys(v, keys)

    def label(r) -> str:
        parts = ", ".join(f"{short(k)}={fmt_value(r[k])}" for k in shown[r["label"]] if pd.notna(r[k]))
        base = r["label"]
        if not parts:
            return base
        return f"{base[:-1]}, {parts})" if base.endswith(")") else f"{base} ({parts})"

    return v.apply(label, axis=1) if len(v) else pd.Series([], dtype=object)


def shorten(text: str, width: int) -> str:
    """`text` in at most `width` characters, its middle cut ("ADORE (m=64, con…k64@1a2b3c4d)"): a row label's name
    and its last settings are what tell it apart."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return f"{text[:head]}…{text[len(text) - (width - 1 - head) :]}"


def fixed(v: pd.DataFrame, keys) -> str:
    """'m=128, model=packaged:smollm2, n=50 (math) / 20 (samsum)': the run fields no row label names, for a caption."""
    named = {k for ks in shown_keys(v, keys).values() for k in ks}
    parts = []
    for k in keys:
        if k in named or k.startswith(METHOD_PREFIX) or not v[k].notna().any():
            continue
        per_data = v.dropna(subset=[k]).groupby("data", sort=False)[k].first()
        if per_data.nunique() == 1:
            parts.append(f"{short(k)}={fmt_value(per_data.iloc[0])}")
        else:
            parts.append(f"{short(k)}=" + " / ".join(f"{fmt_value(x)} ({d})" for d, x in per_data.items()))
    return ", ".join(parts)


def datasets(df: pd.DataFrame) -> list[str]:
    """The datasets of the runs, by name: the column groups of every table."""
    return sorted(set(df["data"].dropna().astype(str))) if "data" in df else []


def models(df: pd.DataFrame) -> str:
    found = sorted(set(df["model"].dropna().astype(str))) if "model" in df else []
    return ", ".join(found) or "unknown"
