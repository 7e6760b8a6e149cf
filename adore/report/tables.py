"""The report's tables, shaped like the paper's: methods (rows, see collect.py) x (dataset, metric) columns."""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import pandas as pd

from adore.report import significance
from adore.report.collect import (
    datasets,
    fixed,
    fmt_value,
    generate_runs,
    identity,
    metric_columns,
    models,
    task_runs,
    variants,
)
from adore.ruler import VARIANTS

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
DECODE = "perf/decode_tok_per_s"
RATIO = "ratio"  # decode tok/s over full attention's, a column of the throughput variants
# Distance to full attention (adore/eval/fidelity.py); digits shown per metric.
FIDELITY = {
    "fidelity/kl": ("KL", 3),
    "fidelity/top1": ("top-1", 2),
    "fidelity/identical": ("identical", 2),
    "fidelity/first_divergence": ("1st div.", 1),
    "fidelity/rougeL_vs_full": ("ROUGE-L vs full", 2),
    "fidelity/bertscore_f_vs_full": ("BERT-F vs full", 2),
}
# The release diagnostic (adore/engine/diagnostic.py, eval.diagnose=true): what the kept cache holds of full attention.
RELEASE = {
    "fidelity/release_recall": ("recall@m", 3),
    "fidelity/release_mass": ("kept mass", 3),
    "fidelity/release_kept_sink": ("sink kept", 3),
    "fidelity/release_mass_sink": ("sink mass", 3),
    "fidelity/release_kept_age0_15": ("age<16 kept", 3),
    "fidelity/release_mass_age0_15": ("age<16 mass", 3),
    "fidelity/release_kept_age16_63": ("16-63 kept", 3),
    "fidelity/release_mass_age16_63": ("16-63 mass", 3),
    "fidelity/release_kept_age64_255": ("64-255 kept", 3),
    "fidelity/release_mass_age64_255": ("64-255 mass", 3),
    "fidelity/release_kept_age256_": ("256+ kept", 3),
    "fidelity/release_mass_age256_": ("256+ mass", 3),
}
STREAM = {
    "eval/bleu": ("BLEU", 2),
    "eval/rougeL": ("ROUGE-L", 2),
    "eval/bertscore_f": ("BERT-F", 2),
    DECODE: ("tok/s", 1),
}
LONG = {"eval/repeated_ngram_fraction": ("rep. n-gram", 3), DECODE: ("tok/s", 1)}
RULER_ALL = "eval/ruler_accuracy"  # task=ruler: share of reference strings found, over every example
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
MISSING = "—"

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


class Table(NamedTuple):
    name: str
    title: str
    caption: str
    frame: pd.DataFrame  # formatted strings; index: row labels; columns: (dataset, metric)


def fmt(x, digits: int = 2, suffix: str = "") -> str:
    return MISSING if x is None or pd.isna(x) else f"{x:.{digits}f}{suffix}"


def _grid(v: pd.DataFrame, columns: list[tuple[str, str, str]]) -> tuple[pd.DataFrame, pd.DataFrame]:
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


def _present(v: pd.DataFrame, metrics) -> list[tuple[str, str, str]]:
    """(dataset, label, column) for every metric some run of that dataset reports."""
    return [
        (data, name, col)
        for data in datasets(v)
        for col, name in metrics.items()
        if col in v and v.loc[v["data"] == data, col].notna().any()
    ]


def _with_ci(values: pd.DataFrame, half: pd.DataFrame, digits: dict | int = 2) -> pd.DataFrame:
    """Formatted cells: "mean ± half-width" where there is an interval, "—" where there is no value."""
    out = values.astype(object).copy()
    for j, col in enumerate(values.columns):
        d = digits if isinstance(digits, int) else digits.get(col[1], 2)
        out[col] = [
            fmt(x, d) if pd.isna(h) or pd.isna(x) else f"{fmt(x, d)} ± {h:.{d}f}"
            for x, h in zip(values.iloc[:, j], half.iloc[:, j])
        ]
    return out


def _labels(v: pd.DataFrame) -> pd.Series:
    """Row label -> run label (the method's display name), for the paper's numbers."""
    return v.drop_duplicates("row").set_index("row")["label"]


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
    values, half = _grid(v, columns)
    return values, half, _labels(v)


def quality_values(df: pd.DataFrame) -> pd.DataFrame:
    """Methods x (dataset, metric) means; NaN where a run or metric is missing."""
    return _quality(df)[0]


def quality_table(df: pd.DataFrame, paper: bool = False) -> pd.DataFrame:
    """The formatted quality table: "—" where missing, "mean ± half-width" where the metric has a `_ci`."""
    values, half, label = _quality(df)
    out = _with_ci(values, half)
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
    return _grid(v, [(d, name, col) for d in datasets(v) for name, col in (("tok/s", DECODE), ("× full", RATIO))])[0]


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
    return _grid(v, _present(v, {col: name for col, (name, _, _) in OVERVIEW.items()}))[0]


# ------------------------------------------------------------------------------------------- fidelity, other tasks


def _metric_table(runs: pd.DataFrame, metrics: dict[str, tuple[str, int]]) -> pd.DataFrame:
    """Formatted methods x (dataset, metric) table of `metrics` = {column: (label, digits)}; empty if none is present."""
    v = variants(runs, identity(runs))
    columns = _present(v, {col: name for col, (name, _) in metrics.items()})
    values, half = _grid(v, columns)
    return _with_ci(values, half, {name: digits for name, digits in metrics.values()})


def fidelity_table(df: pd.DataFrame) -> pd.DataFrame:
    """Bounded methods x (dataset, KL | top-1 | identical | 1st div. | ROUGE-L vs full ...): distance to full attention."""
    runs = generate_runs(df)
    return _metric_table(runs[~runs["reference"]], FIDELITY)


def release_table(df: pd.DataFrame) -> pd.DataFrame:
    """Bounded methods x (dataset, recall@m | kept mass | per age bucket): where release loses attention mass."""
    runs = generate_runs(df)
    return _metric_table(runs[~runs["reference"]], RELEASE)


def stream_table(df: pd.DataFrame) -> pd.DataFrame:
    """Stream generation (task=stream): methods x (dataset, BLEU | ROUGE-L | BERT-F | decode tok/s)."""
    return _metric_table(task_runs(df, "stream"), STREAM)


def long_table(df: pd.DataFrame) -> pd.DataFrame:
    """Long generation (task=long): methods x (dataset, repeated n-gram fraction | decode tok/s)."""
    return _metric_table(task_runs(df, "long"), LONG)


def _ruler_metrics(runs: pd.DataFrame, by: str) -> dict[str, tuple[str, int]]:
    """task=ruler's accuracy columns per length (`by="length"`, ascending) or per task (`by="variant"`), then "all"."""
    if by == "length":
        lengths = sorted(int(m.group(1)) for c in runs.columns if (m := re.fullmatch(r"eval/ruler_(\d+)", c)))
        columns = {f"eval/ruler_{n}": (str(n), 2) for n in lengths}
    else:
        columns = {f"eval/ruler_{v}": (v, 2) for v in VARIANTS}
    return columns | {RULER_ALL: ("all", 2)}


def ruler_table(df: pd.DataFrame, by: str = "length") -> pd.DataFrame:
    """RULER (task=ruler): methods (and arrival regimes) x (haystack, length | task | all), accuracy ± half-width."""
    runs = task_runs(df, "ruler")
    return _metric_table(runs, _ruler_metrics(runs, by)) if len(runs) else pd.DataFrame()


def _perplexity(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """PPL, its CI half-width and its ratio to full attention: methods x (dataset, "m=<m>")."""
    keys = identity(runs)
    v = variants(runs, keys, shown=tuple(k for k in keys if k != "m"))
    for col in ("eval/ppl", "eval/ppl_ci_low", "eval/ppl_ci_high"):
        if col not in v:
            v[col] = math.nan
    v[RATIO] = v["eval/ppl"] / reference_values(v, "eval/ppl", ("data", "model")) if len(v) else []
    columns = []
    for data in datasets(v):
        ms = sorted(v.loc[(v["data"] == data) & v["m"].notna(), "m"].unique())
        columns += [(data, f"m={fmt_value(m)}", m) for m in ms] or [(data, "PPL", math.nan)]
    mi = pd.MultiIndex.from_tuples([(d, n) for d, n, _ in columns], names=["data", "metric"])
    index = pd.Index(list(dict.fromkeys(v["row"])), name="Method")
    ppl, half, ratio = (pd.DataFrame(math.nan, index=index, columns=mi) for _ in range(3))
    for _, r in v.iterrows():
        for data, name, m in columns:
            # full attention has no budget: its perplexity stands in every column, as the reference of that column
            if data == r["data"] and (pd.isna(r["m"]) or r["m"] == m):
                ppl.loc[r["row"], (data, name)] = r["eval/ppl"]
                half.loc[r["row"], (data, name)] = (r["eval/ppl_ci_high"] - r["eval/ppl_ci_low"]) / 2
                ratio.loc[r["row"], (data, name)] = r[RATIO]
    return ppl, half, ratio


def perplexity_values(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Perplexity runs: PPL and its ratio to full attention (same data and model), methods x (dataset, m=<m>)."""
    ppl, _, ratio = _perplexity(task_runs(df, "perplexity"))
    return ppl, ratio


def perplexity_table(df: pd.DataFrame, chat: bool | None = None) -> pd.DataFrame:
    """Formatted "PPL ± half-width (ratio× full)"; chat=True keeps the runs on conversations (`run.chat`), False
    the others, None all."""
    runs = task_runs(df, "perplexity")
    if chat is not None:
        runs = runs[runs["chat"] == chat]
    ppl, half, ratio = _perplexity(runs)
    cells = _with_ci(ppl, half)
    for col in ppl.columns:
        cells[col] = [c if pd.isna(q) else f"{c} ({q:.2f}×)" for c, q in zip(cells[col], ratio[col])]
    return cells


def other_task_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Methods x (dataset, metric) for any other task: every eval/ metric it has."""
    v = variants(runs, identity(runs))
    metrics = [c for c in metric_columns(v) if c.startswith("eval/") and not c.endswith(("_ci_low", "_ci_high"))]
    columns = _present(v, {c: c.removeprefix("eval/") for c in metrics})
    return _with_ci(*_grid(v, columns))


# ---------------------------------------------------------------------------------------------------------- all


def build_tables(df: pd.DataFrame, paper: bool = False, tests: pd.DataFrame | bool = True) -> list[Table]:
    """Every table of the report, formatted; empty when the sweep has no runs. `tests`: the paired bootstrap tests
    (`significance.paired_tests(df)`, which reads each run's predictions.jsonl), True to compute them, False for none."""
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
    if len(runs) and any(c in runs and runs[c].notna().any() for c in FIDELITY):
        tables.append(Table("fidelity", "Fidelity to full attention", (
            "Distance of each bounded method to full attention on the same prompts (adore/eval/fidelity.py): KL(full || "
            "method) in nats and top-1 agreement of the next-token distributions with full attention's output "
            "teacher-forced; identical: share of outputs equal to full attention's; 1st div.: tokens generated "
            "before the first difference; ROUGE-L / BERT-F vs full: the two outputs scored against each other (%). "
            f"mean ± half-width of the bootstrap interval; {MISSING} where a run or metric is missing."
        ), fidelity_table(df)))  # fmt: skip
    if len(runs) and any(c in runs and runs[c].notna().any() for c in RELEASE):
        tables.append(Table("release", "Release diagnostic", (
            "After every teacher-forced step, for the newest query's full attention (a shadow pass, summed over "
            "heads and layers; eval.diagnose=true): recall@m, the share of its top-m tokens the kept cache holds; "
            "kept mass, the share of its attention the kept tokens hold; then per token age (query position minus "
            "token position; the first 4 positions apart as sinks) the mass full attention puts there and the mass "
            "the cache kept there (kept columns sum to kept mass). Steps whose history is within m are not counted. "
            f"mean ± half-width of the bootstrap interval; {MISSING} where missing."
        ), release_table(df)))  # fmt: skip
    if tests is not False:
        frame = significance.significance_table(significance.paired_tests(df) if tests is True else tests)
        if len(frame):
            tables.append(Table("significance", "Paired bootstrap tests", significance.CAPTION, frame))
    ppl_note = (
        "Teacher-forced perplexity under each method's cache, one token per step (task=perplexity), "
        "mean ± half-width of its bootstrap interval, and in brackets its ratio to full attention's perplexity on the "
        "same data and model. Full attention has no budget: its perplexity stands in every m column."
    )
    for chat, name, title, what in (
        (False, "perplexity", "Language modelling (perplexity)", " Long documents (e.g. WikiText-2), each one stream."),
        (True, "nlm", "Natural language modelling", " Conversations: perplexity of the reference answers given their "
         "prompts, the paper's natural-language-modelling task (CNN/DailyMail, SAMSum)."),
    ):  # fmt: skip
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
    ):  # fmt: skip
        if frame.shape[0] and frame.shape[1]:
            tables.append(Table(task, title, caption, frame))
    for by, title in (("length", "by length"), ("variant", "by task")):
        frame = ruler_table(df, by)
        if frame.shape[0] and frame.shape[1]:
            tables.append(Table(f"ruler_{by}", f"Long context (RULER), {title}", (
                "RULER's synthetic tasks (task=ruler): the share of each example's reference strings found in the "
                "output, mean ± half-width of its bootstrap interval, per target length (prompt + answer budget, in "
                "tokens) or per task; all: every example. The data column is the haystack (noise: RULER's noise "
                "passage; wikitext2: WikiText-2 prose); arrival: how the prompt reached the cache (oneshot, chunked, "
                f"turns). {MISSING} where missing."
            ), frame))  # fmt: skip
    known = ("generate", "perplexity", "stream", "long", "ruler")
    others = df[df["task"].notna() & ~df["task"].isin(known)] if "task" in df else df.iloc[:0]
    for task in sorted(set(others["task"].astype(str))):
        frame = other_task_table(others[others["task"] == task])
        if frame.shape[1]:
            tables.append(Table(f"task_{task}", f"Task: {task}", f"Every eval/ metric of the `{task}` runs.", frame))
    return tables


def _shared(runs: pd.DataFrame, throughput: bool = False) -> str:
    keys = identity(runs, throughput)
    shared = fixed(variants(runs, keys), keys)
    return f" Shared by every row (where it applies): {shared}." if shared else ""
