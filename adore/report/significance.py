"""Paired bootstrap tests on the per-example scores of two runs (predictions.jsonl, aligned by example id).

Rows with the same prompt are one unit of resampling: runs written before repeated prompts were grouped
(`adore.eval.tasks.group_by_prompt`) hold one row per reference of a prompt, and resampling those rows one by one
would give intervals too narrow by about sqrt(references per prompt).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass

import pandas as pd

from adore.report.collect import identity, in_row_order, predictions, row_labels, run_dirs
from adore.ruler import VARIANTS

# Per-example scores tested in pairs: key -> (label, tested against full attention).
TESTS = {
    "rougeL": ("ROUGE-L", True),
    "bertscore_f": ("BERT-F", True),
    "accuracy": ("Acc", True),
    "score": ("RULER", True),  # task=ruler: share of an example's reference strings found in the output
    "fidelity_kl": ("KL", False),
    "fidelity_top1": ("top-1", False),
    # the output scored against full attention's own: where the backbone itself fails the task (a base model that
    # continues the dialogue instead of summarising it), ROUGE-L against the reference rewards forgetting
    "fidelity_rougeL_vs_full": ("ROUGE-L vs full", False),
}
# Two runs are compared only when they share these (and a baseline the cache size m).
PAIRED = ("data", "task", "model", "adapter", "max_new_tokens", "arrival")
# task=ruler: full attention releases nothing, so a prompt fed in chunks leaves it the cache one forward gives; a
# chunked run without a chunked full-attention run is tested against the one-shot one
FULL_STANDS_IN = {"chunked": "oneshot"}
# identity keys a method records only when it rebuilds (adore.methods.rebuilds.Rebuilds.rebuild_identity): its R = 0
# run has none of them, and is still the same run without rebuild
REBUILD_SETTINGS = (
    "rebuild",
    "rebuild_every",
    "rebuild_forward",
    "page_size",
    "store_dtype",
    "page_score",
    "tail_alone",
)
RULER_TASK = "@"  # "score@niah_single": the score of one task=ruler task's examples, tested on its own
TASKS = ("generate", "stream", "ruler")  # tasks with per-example scores (stream: one per reply, resampled by dialogue)
COLUMNS = ["data", "method", "family", "vs", "metric", "diff", "low", "high", "significant", "n"]
POOLED_COLUMNS = ["family", "task", "vs", "metric", "diff", "low", "high", "significant", "n", "settings"]
CAPTION = (
    "Difference of the per-example mean (this method - the other), its 95 % paired bootstrap interval over the "
    "examples both runs scored (aligned by id; rows of one prompt resampled together, n counts prompts), and ✓ "
    "when the interval excludes 0. vs full: full attention on the "
    "same data, model and generation length (quality only: full attention is the fidelity reference; a chunked "
    "RULER run without a chunked full-attention run: the one-shot one, which is the same cache). vs best "
    "baseline: for each metric, the training-free run (window, StreamingLLM, H2O, ...) best on that metric at the "
    "same cache size m (one row per such run, with the metrics it is best on). vs R = 0: the same method and "
    "settings without rebuild (does rebuild pay?). vs a row label: the run named by `--against` at the same m. "
    "RULER: every example of a task=ruler run; RULER <task>: that task's examples alone, each task against the "
    "baseline best on it. KL: lower is better. — : not tested."
)

POOLED_CAPTION = (
    "The paired tests above, pooled over every setting that holds the same comparison (the same run label and task "
    "against full attention, the best baseline of each setting, R = 0 or the `--against` row, at other cache sizes, "
    "lengths or datasets): the difference of the per-example means over all pairs, its 95 % paired bootstrap "
    "interval (pairs of one prompt resampled together, across settings too), ✓ when it excludes 0, and in brackets "
    "the number of settings pooled. A small difference that no setting shows on its own can be one over all."
)


def _scores(row, cache: dict) -> dict[str, dict]:
    """id -> predictions.jsonl row of a report row's runs (a pooled task=ruler row's parts together; the later part
    wins an id in two); {} when a file is missing or unreadable."""
    dirs = run_dirs(row)
    if dirs not in cache:
        try:
            cache[dirs] = predictions(dirs)
        except (OSError, ValueError) as err:
            if not isinstance(err, FileNotFoundError):
                warnings.warn(f"skipping {err}", stacklevel=3)
            cache[dirs] = {}
    return cache[dirs]


def _tests(rows: dict[str, dict] | None) -> dict[str, tuple[str, bool]]:
    """TESTS, and for task=ruler predictions one more per task they hold ("RULER niah_single"; rows=None: every
    task, in their order): long-context methods are judged task by task, each against the baseline best on it."""
    held = VARIANTS if rows is None else {r.get("variant") for r in rows.values() if "score" in r}
    return TESTS | {f"score{RULER_TASK}{v}": (f"RULER {v}", True) for v in VARIANTS if v in held}


def _per_example(rows: dict[str, dict], key: str) -> dict[str, float]:
    key, _, variant = key.partition(RULER_TASK)
    return {
        i: float(r[key])
        for i, r in rows.items()
        if isinstance(r.get(key), int | float) and not isinstance(r[key], bool) and variant in ("", r.get("variant"))
    }


def _aligned(a: dict[str, float], b: dict[str, float], only: set[str]) -> tuple[list[str], list[float], list[float]]:
    ids = sorted(set(a) & set(b) & only)
    return ids, [a[i] for i in ids], [b[i] for i in ids]


def _unit(row: dict) -> str:
    """What a row is resampled with: every reply of the same dialogue (task=stream), every row of the same prompt
    (its messages, or `prompt` in older files)."""
    if row.get("dialogue") is not None:
        return f"dialogue:{row['dialogue']}"
    prompt = row.get("messages") or row.get("prompt")
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False) if prompt else f"id:{row['id']}"


def _references(row: dict) -> list:
    return row.get("references") or [row.get("reference")]


def _comparable(mine: dict[str, dict], theirs: dict[str, dict], where: str) -> set[str]:
    """Ids scored against the same references in both runs. A run written before repeated prompts were grouped
    scored each row against one reference, one written after against all of the prompt's: not comparable."""
    ids = set(mine) & set(theirs)
    same = {i for i in ids if _references(mine[i]) == _references(theirs[i])}
    if len(same) < len(ids):
        warnings.warn(
            f"{where}: {len(ids) - len(same)} examples were scored against other references in the two runs "
            "(one of them written before repeated prompts were grouped): they are left out of the paired tests",
            stacklevel=3,
        )
    return same


@dataclass
class Comparison:
    """The per-example scores of one metric in two runs, aligned: `a` this run's (row label `row`, run label
    `family`), `b` the other's (`vs`), `units` each pair's resampling unit (its prompt or dialogue)."""

    data: str
    row: str
    family: str
    task: str
    vs: str
    key: str
    a: list[float]
    b: list[float]
    units: list[str]


def paired_tests(
    df: pd.DataFrame, bootstrap=None, against: str | None = None, found: list[Comparison] | None = None
) -> pd.DataFrame:
    """Paired bootstrap tests on per-example scores (predictions.jsonl, aligned by id), one row per test.

    Every bounded method against full attention (quality metrics; full attention is the fidelity reference) and
    every method that is not training-free against the best baseline on each metric (the training-free run with the
    best mean of that metric) at the same dataset, task, model, adapter, max_new_tokens and cache size m (task=generate,
    and task=stream by reply with each dialogue's replies resampled together). Columns: data, method (row
    label), family (run label), vs, metric, diff (method - other), low, high, significant, n (prompts compared: rows
    with the same prompt, as in runs written before repeated prompts were grouped, are resampled as one unit).
    A method that rebuilds (R > 0) is also tested on every metric against its own run with R = 0, all else equal.
    `against`: text in one row label (e.g. a shipped controller's tag); every other bounded run is also tested on
    every metric against that row's run of the same dataset, task, model, adapter, max_new_tokens and m (two
    controllers, two recipes, a lever on and off); against each of them where several rows at that m hold it (one
    controller at R = 4 and R = 0). No row label holding it: ValueError naming the labels. `found`: the
    comparisons (`comparisons(df, against)`), when the caller has them.
    """
    from adore.eval.stats import Bootstrap

    bootstrap = bootstrap or Bootstrap()
    found = comparisons(df, against) if found is None else found
    out = []
    for c in found:
        t = bootstrap.paired(c.a, c.b, c.units)
        out.append([c.data, c.row, c.family, c.vs, _label(c.key), t["diff"], *t["ci"], t["significant"], t["n"]])
    return pd.DataFrame(out, columns=COLUMNS)


def _label(key: str) -> str:
    return _tests(None)[key][0]


def comparisons(df: pd.DataFrame, against: str | None = None) -> list[Comparison]:
    """Every pair of runs `paired_tests` tests, with their aligned per-example scores, one per metric."""
    df = df.assign(task=df["task"].fillna("generate") if "task" in df else "generate")  # older runs: generate
    df = df if "arrival" in df else df.assign(arrival=None)  # frames from before task=ruler's regimes
    runs = df[df["task"].isin(TASKS)]
    if runs.empty or "path" not in runs:
        return []
    keys = identity(runs)
    runs = runs.assign(row=row_labels(runs, keys).values)
    runs = in_row_order(runs.drop_duplicates(["row", "data", "task"]), keys)
    cache: dict = {}
    if against is not None:
        labels = sorted(set(runs.loc[~runs["reference"], "row"]))
        if not any(against in label for label in labels):
            raise ValueError(
                f"--against {against!r} is in no row label of a run with per-example scores; the labels are: "
                + "; ".join(labels)
            )

    def same(r, cols) -> pd.Series:
        mask = pd.Series(True, index=runs.index)
        for c in cols:
            mask &= runs[c].isna() if pd.isna(r[c]) else runs[c] == r[c]
        return mask

    def mean_of(row, key) -> float:
        """The run's mean of `key`, signed so that higher is better (-inf when it has none)."""
        values = [v for v in _per_example(_scores(row, cache), key).values() if v == v]
        lower_is_better = key == "fidelity_kl"
        return (-1 if lower_is_better else 1) * sum(values) / len(values) if values else -math.inf

    out = []
    for _, r in runs[~runs["reference"]].iterrows():
        mine = _scores(r, cache)
        if not mine:
            continue
        tests = _tests(mine)
        others = []
        full, vs = runs[same(r, PAIRED) & runs["reference"]], "full"
        if not len(full) and r["arrival"] in FULL_STANDS_IN:
            unpaired, vs = [k for k in PAIRED if k != "arrival"], f"full (arrival={FULL_STANDS_IN[r['arrival']]})"
            full = runs[same(r, unpaired) & runs["reference"] & (runs["arrival"] == FULL_STANDS_IN[r["arrival"]])]
        if len(full):
            others.append((vs, full.iloc[0], [k for k, (_, vs_full) in tests.items() if vs_full]))
        baselines = runs[same(r, (*PAIRED, "m")) & runs["training_free"] & ~runs["reference"]]
        if not r["training_free"] and len(baselines):  # per metric, the baseline best on that metric
            bests: dict = {}
            for key in tests:
                best = max((b for _, b in baselines.iterrows()), key=lambda b, key=key: mean_of(b, key))
                if mean_of(best, key) > -math.inf:
                    bests.setdefault(best["row"], (best, []))[1].append(key)
            for row, (best, keys_) in bests.items():
                others.append((f"best baseline: {row}", best, keys_))
        if "R" in runs and pd.notna(r["R"]) and r["R"] > 0:  # does rebuild pay? the same run at R = 0
            settings = [k for k in keys if k != "R" and k.split("/")[-1] not in REBUILD_SETTINGS]  # R = 0 has none
            candidates = same(r, ("method", *PAIRED, *settings)) & (runs["R"] == 0)
            no_rebuild = runs[candidates]
            if len(no_rebuild):
                others.append(("R = 0", no_rebuild.iloc[0], list(tests)))
        if against is not None and against not in r["row"]:  # the anchor row's run at this dataset and m
            anchors = runs[
                same(r, (*PAIRED, "m")) & ~runs["reference"] & runs["row"].str.contains(against, regex=False)
            ]
            for _, anchor in anchors.iterrows():  # one test per anchor row: R = 0 and R = 4 of one controller both
                others.append((anchor["row"], anchor, list(tests)))
        for vs, other, tested in others:
            theirs = _scores(other, cache)
            common = _comparable(mine, theirs, f"{r['path']} vs {other['path']}")
            for key in tested:
                ids, a, b = _aligned(_per_example(mine, key), _per_example(theirs, key), common)
                if a:
                    data = r["data"] if r["task"] == "generate" else f"{r['data']} ({r['task']})"
                    units = [_unit(mine[i]) for i in ids]
                    out.append(Comparison(data, r["row"], r["label"], r["task"], vs, key, a, b, units))
    return out


def _kind(vs: str) -> str:
    """What a comparison is against, whatever the setting: full attention, the best baseline (each setting's
    own), the same run at R = 0, or a named row."""
    for kind in ("full", "best baseline", "R = 0"):
        if vs.startswith(kind):
            return kind
    return "against"


def pooled_tests(found: list[Comparison], bootstrap=None) -> pd.DataFrame:
    """One paired test per (run label, task, kind of comparison, metric) over every setting that has it (cache
    sizes, lengths, datasets), where there are at least two: a small difference that no setting shows significantly
    on its own can be one over all of them. Pairs of one prompt are resampled together across settings too (the
    same prompt at m = 128 and m = 512 is one unit), so the interval is not narrowed by counting it twice."""
    from adore.eval.stats import Bootstrap

    bootstrap = bootstrap or Bootstrap()
    groups: dict[tuple, list[Comparison]] = {}
    for c in found:
        groups.setdefault((c.family, c.task, _kind(c.vs), c.key), []).append(c)
    out = []
    for (family, task, kind, key), held in groups.items():
        settings = {(c.data, c.row, c.vs) for c in held}
        if len(settings) < 2:
            continue
        a, b, units = ([x for c in held for x in getattr(c, name)] for name in ("a", "b", "units"))
        t = bootstrap.paired(a, b, units)
        out.append([family, task, kind, _label(key), t["diff"], *t["ci"], t["significant"], t["n"], len(settings)])
    return pd.DataFrame(out, columns=POOLED_COLUMNS)


def pooled_table(tests: pd.DataFrame) -> pd.DataFrame:
    """One row per (run label, task, comparison); cells "diff [low, high] ✓|✗ (settings pooled)" per metric."""
    if tests.empty:
        return pd.DataFrame()
    metrics = _metrics(tests)
    rows: dict = {}
    for _, t in tests.iterrows():
        rows.setdefault((t["family"], t["task"], t["vs"]), {})[t["metric"]] = f"{_cell(t)} ({t['settings']})"
    return pd.DataFrame(
        [[task, vs, *(cells.get(m, "—") for m in metrics)] for (_, task, vs), cells in rows.items()],
        index=pd.Index([k[0] for k in rows], name="Method"),
        columns=["task", "vs", *metrics],
    )


def significance_table(tests: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, dataset, comparison); cells "diff [low, high] ✓|✗" per metric ("—": not tested)."""
    if tests.empty:
        return pd.DataFrame()
    metrics = _metrics(tests)
    rows = {}
    for _, t in tests.iterrows():
        rows.setdefault((t["method"], t["data"], t["vs"]), {})[t["metric"]] = _cell(t)
    return pd.DataFrame(
        [[data, vs, *(cells.get(m, "—") for m in metrics)] for (_, data, vs), cells in rows.items()],
        index=pd.Index([k[0] for k in rows], name="Method"),
        columns=["data", "vs", *metrics],
    )


def _cell(test) -> str:
    """ "diff [low, high] ✓|✗" of one test (KL to three decimals)."""
    d = 3 if test["metric"] == "KL" else 2
    return f"{test['diff']:+.{d}f} [{test['low']:.{d}f}, {test['high']:.{d}f}] {'✓' if test['significant'] else '✗'}"


def _metrics(tests: pd.DataFrame) -> list[str]:
    """The metrics tested, in the order of TESTS (then RULER's tasks)."""
    found = set(tests["metric"])
    return [name for name, _ in _tests(None).values() if name in found]
