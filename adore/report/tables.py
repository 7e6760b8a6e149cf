"""The report's tables, shaped like the paper's: methods (rows, see collect.py) x (dataset, metric) columns.

Here the generation tables (quality, throughput, fidelity, release diagnostic) and `build_tables`, which adds the
paired tests (significance.py) and the other tasks' tables (task_tables.py); grid.py makes the cells."""

from __future__ import annotations

import math

import pandas as pd

from adore.report import significance
from adore.report.collect import datasets, fixed, generate_runs, identity, models, variants
from adore.report.grid import (
    DECODE,
    MISSING,
    RATIO,
    Table,
    fmt,
    grid,
    metric_table,
    present,
    reference_values,
    with_ci,
)
from adore.report.task_tables import task_tables

QUALITY = {
    "eval/bleu": "BLEU",
    "eval/rouge1": "ROUGE-1",
    "eval/rouge2": "ROUGE-2",
    "eval/rougeL": "ROUGE-L",
    "eval/bertscore_f": "BERT-F",
    "eval/accuracy": "Acc",
    "eval/repeated_ngram_fraction": "rep. n-gram",  # lower is better: the share of an output's token n-grams repeated
}
ACCURACY = "eval/accuracy"
REPEATED = "eval/repeated_ngram_fraction"  # runs before it was recorded have none: no column then
# Distance to full attention (adore/eval/fidelity.py); digits shown per metric.
FIDELITY = {
    "fidelity/kl": ("KL", 3),
    "fidelity/top1": ("top-1", 2),
    "fidelity/identical": ("identical", 2),
    "fidelity/first_divergence": ("1st div.", 1),
    "fidelity/rougeL_vs_full": ("ROUGE-L vs full", 2),
    "fidelity/bertscore_f_vs_full": ("BERT-F vs full", 2),
}
# The release diagnostic (adore/engine/diagnostic.py, eval.diagnose=true): what the kept cache holds of full attention,
# overall and per age bucket (diagnostic.BUCKETS -> its label here).
AGES = {"sink": "sink", "age0_15": "age<16", "age16_63": "16-63", "age64_255": "64-255", "age256_": "256+"}
RELEASE = {
    "fidelity/release_recall": ("recall@m", 3),
    "fidelity/release_mass": ("kept mass", 3),
    "fidelity/release_pick_recall": ("page pick recall", 3),
} | {
    f"fidelity/release_{kind}_{bucket}": (f"{label} {kind}", 3)
    for bucket, label in AGES.items()
    for kind in ("kept", "mass")
}
FIDELITY_CAPTION = (
    "Distance of each bounded method to full attention on the same prompts (adore/eval/fidelity.py): KL(full || "
    "method) in nats and top-1 agreement of the next-token distributions with full attention's output "
    "teacher-forced; identical: share of outputs equal to full attention's; 1st div.: tokens generated "
    "before the first difference; ROUGE-L / BERT-F vs full: the two outputs scored against each other (%). "
    f"mean ± half-width of the bootstrap interval; {MISSING} where a run or metric is missing."
)
RELEASE_CAPTION = (
    "After every teacher-forced step, for the newest query's full attention (a shadow pass, summed over "
    "heads and layers; eval.diagnose=true): recall@m, the share of its top-m tokens the kept cache holds; "
    "kept mass, the share of its attention the kept tokens hold; then per token age (query position minus "
    "token position; the first 4 positions apart as sinks) the mass full attention puts there and the mass "
    "the cache kept there (kept columns sum to kept mass). Steps whose history is within m are not counted. "
    f"mean ± half-width of the bootstrap interval; {MISSING} where missing."
)
# The few numbers the terminal shows per dataset: column -> (label, digits, suffix).
OVERVIEW = {
    "eval/rougeL": ("ROUGE-L", 2, ""),
    "eval/bertscore_f": ("BERT-F", 2, ""),
    ACCURACY: ("Acc", 2, ""),
    "fidelity/kl": ("KL", 3, ""),
    "fidelity/top1": ("top-1", 2, ""),
    DECODE: ("tok/s", 1, ""),
    RATIO: ("× full", 2, "×"),
}
# A full-attention run is the throughput reference of the runs that share these (and, if one exists, the adapter).
REFERENCE = ("data", "model", "num_examples", "max_new_tokens", "batch_size")

# Numbers the paper reports, shown by --paper next to ours (docs/report.md says how to add more; never guess one).
PAPER_BACKBONE = "Llama-2-7B"
PAPER_LABEL = f"paper ({PAPER_BACKBONE})"
PAPER = {
    # run label -> decode throughput / full attention. Abstract: "221.8% higher throughput" (best case; its
    # dataset, m and R are not those of our runs).
    "throughput_ratio": {"ADORE": 3.218},
    # (run label, dataset, metric label in QUALITY) -> value, e.g. ("ADORE", "samsum", "ROUGE-L"): ...
    "quality": {},
}


def _labels(v: pd.DataFrame) -> pd.Series:
    """Row label -> run label (the method's display name), for the paper's numbers."""
    return v.drop_duplicates("row").set_index("row")["label"]


# ----------------------------------------------------------------------------------------- generation: quality, speed


def _quality(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    """Numeric quality table, the half-widths of the metrics that carry a `_ci`, and each row's run label."""
    runs = generate_runs(df)
    v = variants(runs, identity(runs))
    answer = set(runs.loc[runs["has_answer"], "data"])
    columns = []
    for data in datasets(v):
        has = v[v["data"] == data]
        for col, name in QUALITY.items():
            present = col in has and has[col].notna().any()
            if col not in (ACCURACY, REPEATED) or present or (col == ACCURACY and data in answer):
                columns.append((data, name, col))
    values, half = grid(v, columns)
    return values, half, _labels(v)


def quality_values(df: pd.DataFrame) -> pd.DataFrame:
    """Methods x (dataset, metric) means; NaN where a run or metric is missing."""
    return _quality(df)[0]


def quality_table(df: pd.DataFrame, paper: bool = False) -> pd.DataFrame:
    """The formatted quality table: "—" where missing, "mean ± half-width" where the metric has a `_ci`."""
    values, half, label = _quality(df)
    out = with_ci(values, half)
    if paper and PAPER["quality"]:
        for data, name in list(values.columns)[::-1]:
            cells = [PAPER["quality"].get((label[row], data, name)) for row in out.index]
            if any(c is not None for c in cells):
                out.insert(
                    out.columns.get_loc((data, name)) + 1, (data, f"{name} {PAPER_LABEL}"), [fmt(c) for c in cells]
                )
    return out


def _speed(df: pd.DataFrame) -> pd.DataFrame:
    """Generation variants with batch size, their decode tok/s and its ratio to full attention (`RATIO`)."""
    runs = generate_runs(df)
    v = variants(runs, identity(runs, throughput=True))
    if DECODE not in v:
        v[DECODE] = math.nan
    v[RATIO] = v[DECODE] / reference_values(v, DECODE, REFERENCE) if len(v) else []
    return v


def throughput_values(df: pd.DataFrame) -> pd.DataFrame:
    """Methods x (dataset, 'tok/s' | '× full'): decode throughput and its ratio to full attention in the same sweep."""
    v = _speed(df)
    return grid(v, [(d, name, col) for d in datasets(v) for name, col in (("tok/s", DECODE), ("× full", RATIO))])[0]


def throughput_table(df: pd.DataFrame, paper: bool = False) -> pd.DataFrame:
    values = throughput_values(df)
    out = values.copy().astype(object)
    for col in values.columns:
        out[col] = [fmt(x, 1) if col[1] == "tok/s" else fmt(x, 2, "×") for x in values[col]]
    if paper:
        label = _labels(_speed(df))
        cells = [PAPER["throughput_ratio"].get(label[row]) for row in out.index]
        if any(c is not None for c in cells):
            out[(PAPER_LABEL, "× full")] = [fmt(c, 3, "×") for c in cells]
    return out


def overview_values(df: pd.DataFrame) -> pd.DataFrame:
    """Methods x (dataset, metric) of the few numbers the terminal shows (`OVERVIEW`), one row per generation
    variant with its batch size; only the metrics some run of a dataset reports."""
    v = _speed(df)
    return grid(v, present(v, {col: name for col, (name, _, _) in OVERVIEW.items()}))[0]


# ------------------------------------------------------------------------------------- fidelity, release diagnostic


def bounded_table(df: pd.DataFrame, metrics: dict[str, tuple[str, int]]) -> pd.DataFrame:
    """Formatted methods x (dataset, metric) table of `metrics` over the bounded generation runs: full attention,
    the reference these metrics measure against, has no row."""
    runs = generate_runs(df)
    return metric_table(runs[~runs["reference"]], metrics)


def fidelity_table(df: pd.DataFrame) -> pd.DataFrame:
    """Bounded methods x (dataset, KL | top-1 | identical | 1st div. | ROUGE-L vs full ...): distance to full attention."""
    return bounded_table(df, FIDELITY)


# ---------------------------------------------------------------------------------------------------------- all


def build_tables(
    df: pd.DataFrame, paper: bool = False, tests: pd.DataFrame | bool = True, pooled: pd.DataFrame | None = None
) -> list[Table]:
    """Every table of the report, formatted; empty when the sweep has no runs. `tests`: the paired bootstrap tests
    (`significance.paired_tests(df)`, which reads each run's predictions.jsonl), True to compute them (and the
    pooled ones), False for none; `pooled`: the tests pooled over settings (`significance.pooled_tests`)."""
    tables = []
    runs = generate_runs(df)
    paper_note = (
        f" Columns '{PAPER_LABEL}' hold numbers reported by the paper, whose backbone was {PAPER_BACKBONE}; "
        f"ours used {models(runs)}. The paper's settings (cache size, R, data, hardware) differ from ours: "
        "compare trends, not cells."
    )
    if len(runs):
        caption = (
            "Quality of the generated text (BLEU, ROUGE and BERTScore-F in %; Acc: exact-match accuracy as "
            f"reported), mean over duplicate runs; {MISSING} where a run or metric is missing." + _shared(runs)
        )
        frame = quality_table(df, paper)
        has_paper = any(PAPER_LABEL in c[1] for c in frame.columns)
        tables.append(Table("quality", "Quality", caption + (paper_note if has_paper else ""), frame))
    if len(runs) and DECODE in runs and runs[DECODE].notna().any():
        caption = (
            "Decode throughput (generated tokens per second, prefill excluded) and its ratio to full attention "
            "measured in the same sweep on the same data, model and generation settings (batch size, "
            f"max_new_tokens, num_examples); {MISSING} where the sweep has no such full-attention run."
            + _shared(runs, throughput=True)
        )
        frame = throughput_table(df, paper)
        if PAPER_LABEL in frame.columns.get_level_values(0):
            caption += (
                paper_note + " The paper's figure is its headline: 221.8 % higher throughput than full attention."
            )
        tables.append(Table("throughput", "Throughput", caption, frame))
    for name, title, metrics, caption in (
        ("fidelity", "Fidelity to full attention", FIDELITY, FIDELITY_CAPTION),
        ("release", "Release diagnostic", RELEASE, RELEASE_CAPTION),
    ):
        if len(runs) and any(c in runs and runs[c].notna().any() for c in metrics):
            tables.append(Table(name, title, caption, bounded_table(df, metrics)))
    if tests is True:
        found = significance.comparisons(df)
        tests, pooled = significance.paired_tests(df, found=found), significance.pooled_tests(found)
    if tests is not False:
        frame = significance.significance_table(tests)
        if len(frame):
            tables.append(Table("significance", "Paired bootstrap tests", significance.CAPTION, frame))
    if pooled is not None and len(pooled):
        frame = significance.pooled_table(pooled)
        tables.append(Table("pooled", "Paired tests pooled over settings", significance.POOLED_CAPTION, frame))
    return tables + task_tables(df)


def _shared(runs: pd.DataFrame, throughput: bool = False) -> str:
    keys = identity(runs, throughput)
    shared = fixed(variants(runs, keys), keys)
    return f" Shared by every row (where it applies): {shared}." if shared else ""
