"""The tables of the tasks other than generation: perplexity, stream and long generation, RULER, and any other task
(its every eval/ metric). tables.py builds the generation tables and puts these after them."""

from __future__ import annotations

import math
import re

import pandas as pd

from adore.report.collect import datasets, fmt_value, identity, metric_columns, task_runs, variants
from adore.report.grid import (
    DECODE,
    MISSING,
    RATIO,
    Table,
    grid,
    metric_table,
    present,
    reference_values,
    with_ci,
)
from adore.ruler import VARIANTS

STREAM = {
    "eval/bleu": ("BLEU", 2),
    "eval/rougeL": ("ROUGE-L", 2),
    "eval/bertscore_f": ("BERT-F", 2),
    DECODE: ("tok/s", 1),
}
LONG = {"eval/repeated_ngram_fraction": ("rep. n-gram", 3), DECODE: ("tok/s", 1)}
RULER_ALL = "eval/ruler_accuracy"  # task=ruler: share of reference strings found, over every example
RULER_KEPT = "eval/ruler_needle_kept"  # task=ruler: share of the needles' answer tokens cached when the answer starts
RULER_KEY_KEPT = "eval/ruler_key_kept"  # ... and of the asked needles' keys (what tells them from distractors)
KNOWN = ("generate", "perplexity", "stream", "long", "ruler")  # the tasks with tables of their own

PPL_NOTE = (
    "Teacher-forced perplexity under each method's cache, one token per step (task=perplexity), "
    "mean ± half-width of its bootstrap interval, and in brackets its ratio to full attention's perplexity on the "
    "same data and model. Full attention has no budget: its perplexity stands in every m column."
)
RULER_NOTE = (
    "RULER's synthetic tasks (task=ruler): the share of each example's reference strings found in the "
    "output, mean ± half-width of its bootstrap interval, per target length (prompt + answer budget, in "
    "tokens) or per task; all: every example. The data column is the haystack (noise: RULER's noise "
    "passage; wikitext2: WikiText-2 prose); arrival: how the prompt reached the cache (oneshot, chunked, "
    f"turns). {MISSING} where missing."
)


RULER_KEPT_NOTE = (
    "The share of the tokens an answer copies (the asked-for values in their needles; vt: the variables' names) that "
    "are in the cache when the answer starts, after the prompt's last release (task=ruler, per task, mean ± "
    "half-width): what a method kept, to tell a needle released from one kept but not read. Recall and rebuild "
    f"can still bring a released token back while the answer is decoded. {MISSING} where not measured (cwe, fwe)."
)
RULER_KEY_KEPT_NOTE = (
    'The same share for the keys of the needles asked for (niah: the words after "for", which tell the asked '
    "needle from its distractors): a value kept without its key cannot be told from a distractor's. "
    f"{MISSING} where not measured (vt, cwe, fwe)."
)


def stream_table(df: pd.DataFrame) -> pd.DataFrame:
    """Stream generation (task=stream): methods x (dataset, BLEU | ROUGE-L | BERT-F | decode tok/s)."""
    return metric_table(task_runs(df, "stream"), STREAM)


def long_table(df: pd.DataFrame) -> pd.DataFrame:
    """Long generation (task=long): methods x (dataset, repeated n-gram fraction | decode tok/s)."""
    return metric_table(task_runs(df, "long"), LONG)


def _ruler_metrics(runs: pd.DataFrame, by: str) -> dict[str, tuple[str, int]]:
    """task=ruler's accuracy columns per length (`by="length"`, ascending) or per task (`by="variant"`), then "all";
    `by="kept"` / `"key_kept"`: the share of the needles' answer tokens / asked keys cached when the answer starts,
    per task, then "all"."""
    if by in ("kept", "key_kept"):
        kept = RULER_KEPT if by == "kept" else RULER_KEY_KEPT
        return {f"{kept}_{v}": (v, 2) for v in VARIANTS} | {kept: ("all", 2)}
    if by == "length":
        lengths = sorted(int(m.group(1)) for c in runs.columns if (m := re.fullmatch(r"eval/ruler_(\d+)", c)))
        columns = {f"eval/ruler_{n}": (str(n), 2) for n in lengths}
    else:
        columns = {f"eval/ruler_{v}": (v, 2) for v in VARIANTS}
    return columns | {RULER_ALL: ("all", 2)}


def ruler_table(df: pd.DataFrame, by: str = "length") -> pd.DataFrame:
    """RULER (task=ruler): methods (and arrival regimes) x (haystack, length | task | all), accuracy ± half-width."""
    runs = task_runs(df, "ruler")
    return metric_table(runs, _ruler_metrics(runs, by)) if len(runs) else pd.DataFrame()


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
    cells = with_ci(ppl, half)
    for col in ppl.columns:
        cells[col] = [c if pd.isna(q) else f"{c} ({q:.2f}×)" for c, q in zip(cells[col], ratio[col])]
    return cells


def other_task_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Methods x (dataset, metric) for any other task: every eval/ metric it has."""
    v = variants(runs, identity(runs))
    metrics = [c for c in metric_columns(v) if c.startswith("eval/") and not c.endswith(("_ci_low", "_ci_high"))]
    columns = present(v, {c: c.removeprefix("eval/") for c in metrics})
    return with_ci(*grid(v, columns))


def task_tables(df: pd.DataFrame) -> list[Table]:
    """The formatted tables of every task but generation, in report order; a task without runs gives none."""
    found = [
        Table("perplexity", "Language modelling (perplexity)",
              PPL_NOTE + " Long documents (e.g. WikiText-2), each one stream.", perplexity_table(df, chat=False)),
        Table("nlm", "Natural language modelling", PPL_NOTE + " Conversations: perplexity of the reference answers "
              "given their prompts, the paper's natural-language-modelling task (CNN/DailyMail, SAMSum).",
              perplexity_table(df, chat=True)),
        Table("stream", "Stream generation", (
            "Each multi-turn dialogue as one stream with a bounded cache (task=stream): every reply scored against the "
            f"dataset's reply (BLEU, ROUGE-L, BERT-F in %, mean ± half-width), and decode tokens/s; {MISSING} where missing."
        ), stream_table(df)),
        Table("long", "Long generation", (
            "Generations several times longer than the cache (task=long): share of repeated n-grams (degeneration, "
            f"lower is better; mean ± half-width) and decode tokens/s; {MISSING} where missing."
        ), long_table(df)),
        *(Table(f"ruler_{by}", f"Long context (RULER), {title}", RULER_NOTE, ruler_table(df, by))
          for by, title in (("length", "by length"), ("variant", "by task"))),
        Table("ruler_kept", "Long context (RULER), what the release kept", RULER_KEPT_NOTE, ruler_table(df, "kept")),
        Table("ruler_key_kept", "Long context (RULER), the asked keys the release kept", RULER_KEY_KEPT_NOTE,
              ruler_table(df, "key_kept")),
    ]  # fmt: skip
    tables = [t for t in found if t.frame.shape[0] and t.frame.shape[1]]
    others = df[df["task"].notna() & ~df["task"].isin(KNOWN)] if "task" in df else df.iloc[:0]
    for task in sorted(set(others["task"].astype(str))):
        frame = other_task_table(others[others["task"] == task])
        if frame.shape[1]:
            tables.append(Table(f"task_{task}", f"Task: {task}", f"Every eval/ metric of the `{task}` runs.", frame))
    return tables
