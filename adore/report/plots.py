"""The report's plots: quality and throughput against the cache size m, the rebuild trade-off against R, and
RULER's accuracy by needle depth x length (task=ruler).

Figures are built with matplotlib's object API (no pyplot), so drawing them changes no global state.
"""

from __future__ import annotations

import math
import re
import textwrap

import pandas as pd
from matplotlib import rcParams
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from adore.report.collect import (
    datasets,
    fmt_value,
    generate_runs,
    identity,
    in_row_order,
    row_labels,
    shorten,
    task_runs,
    variants,
)
from adore.report.grid import DECODE
from adore.report.tables import QUALITY

# a marker and line style per variant of one method, so that a dozen lines in few colours stay readable
LEGEND_WIDTH = 40  # characters of a legend entry; longer labels are cut in the middle
STYLES = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("P", "--"), ("X", "-."), ("*", ":")]


class NoAxis(Exception):
    """A plot needs an axis (m, R) that the sweep does not vary."""


def palette(df: pd.DataFrame) -> dict[str, str]:
    """Run label -> colour: full attention black, every other method the next colour of matplotlib's cycle, in row
    order, so one sweep's plots agree and the same sweep always gets the same colours."""
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    labels = in_row_order(df.drop_duplicates("label"))
    out, i = {}, 0
    for label, reference in zip(labels["label"], labels["reference"]):
        out[label] = "black" if reference else colors[i % len(colors)]
        i += not reference
    return out


def _styles(v: pd.DataFrame, colors: dict[str, str]) -> dict:
    """Line -> colour of its method, and a marker and line style per variant of that method."""
    out, count = {}, {}
    for label, line in dict.fromkeys(zip(v["label"], v["line"])):
        marker, ls = STYLES[count.get(label, 0) % len(STYLES)]
        count[label] = count.get(label, 0) + 1
        out[line] = {"color": colors[label], "marker": marker, "ls": ls}
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
    labels = [shorten(label, LEGEND_WIDTH) for label in handles]
    fig.legend(list(handles.values()), labels, loc="outside right upper", fontsize="small")


def _lines(runs: pd.DataFrame, axis: str, throughput: bool) -> pd.DataFrame:
    """Variants of the runs, with `line`: the row label without `axis`, the x axis of the plot."""
    keys = identity(runs, throughput)
    v = variants(runs, keys)
    v["line"] = row_labels(v, [k for k in keys if k != axis])
    return v


def _plot_vs_m(df: pd.DataFrame, metric: str, throughput: bool, ylabel: str) -> Figure:
    runs = generate_runs(df)
    if metric not in runs or not runs[metric].notna().any():
        raise NoAxis(f"no run has {metric}")
    runs = runs[runs[metric].notna()]
    if runs.loc[~runs["reference"], "m"].nunique() < 2:
        raise NoAxis("the sweep has a single cache size m")
    v = _lines(runs, "m", throughput)
    styles = _styles(v, palette(df))
    fig, axes = _new_figure(len(datasets(v)))
    for ax, data in zip(axes, datasets(v)):
        for line, g in v[v["data"] == data].groupby("line", sort=False):
            if g["m"].isna().all():  # full attention: no budget, a reference line
                ax.axhline(g[metric].mean(), ls="--", color=styles[line]["color"], label=line)
            else:
                g = g.dropna(subset=["m"]).sort_values("m")
                ax.plot(g["m"], g[metric], label=line, **styles[line])
        ms = sorted(v["m"].dropna().unique())
        ax.set_xscale("log", base=2)
        ax.set_xticks(ms, [fmt_value(float(m)) for m in ms])
        ax.minorticks_off()
        ax.set(title=data, xlabel="cache size m", ylabel=ylabel)
        ax.grid(alpha=0.3)
    _legend(fig, axes)
    return fig


def plot_quality_vs_m(df: pd.DataFrame, metric: str = "eval/rougeL") -> Figure:
    """ROUGE-L (or `metric`) against the cache size m, one line per method, one panel per dataset."""
    return _plot_vs_m(df, metric, False, QUALITY.get(metric, metric))


def plot_throughput_vs_m(df: pd.DataFrame) -> Figure:
    """Decode tok/s against the cache size m, one line per method, one panel per dataset."""
    return _plot_vs_m(df, DECODE, True, "decode tok/s")


def plot_R_tradeoff(df: pd.DataFrame, metric: str = "eval/rougeL") -> Figure:
    """The rebuild trade-off of the methods that rebuild tokens (ADORE, the oracle): ROUGE-L (solid, left axis) and
    decode tok/s (dashed, right axis) against R, one colour per variant."""
    runs = generate_runs(df).dropna(subset=["R"])
    if not len(runs) or runs.groupby("label")["R"].nunique().max() < 2:
        raise NoAxis("no method has two values of R")
    v = _lines(runs, "R", throughput=True)
    for col in (metric, DECODE):
        if col not in v:
            v[col] = math.nan
    cycle = rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {line: cycle[i % len(cycle)] for i, line in enumerate(dict.fromkeys(v["line"]))}
    fig, axes = _new_figure(len(datasets(v)))
    for ax, data in zip(axes, datasets(v)):
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


DEPTH_CELL = re.compile(r"eval/ruler_depth(\d+)_(\d+)")  # task=ruler: needle tasks' accuracy at (depth %, length)
HEATMAP_COLUMNS = 4  # panels per row of the heatmap figure


def plot_ruler_heatmap(df: pd.DataFrame) -> Figure | None:
    """RULER (task=ruler): accuracy of the needle tasks by depth of the needle (rows, 0 % = start of the context)
    x target length (columns), one panel per method and arrival regime (and haystack), the long-context papers'
    figure; a sweep run in parts (a length at a time) fills one panel per method (`collect.pool_ruler`). Cells
    hold the accuracy; empty where no example was at that depth and length. None (no plot, no note) for a sweep
    without task=ruler runs."""
    runs = task_runs(df, "ruler")
    if not len(runs):
        return None
    cells = {c: (int(m.group(1)), int(m.group(2))) for c in runs.columns if (m := DEPTH_CELL.fullmatch(c))}
    if not cells:
        raise NoAxis("no task=ruler run has needle depths")
    v = variants(runs, identity(runs))
    v = v[v[list(cells)].notna().any(axis=1)]  # runs of non-needle tasks only (fwe, cwe) have no cell to draw
    depths = sorted({d for d, _ in cells.values()})
    lengths = sorted({n for _, n in cells.values()})
    panels = [(r["data"], r["row"], r) for _, r in v.iterrows()]
    cols = min(HEATMAP_COLUMNS, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(
        figsize=(2.2 + 1.0 * max(2, len(lengths)) * cols, 0.6 + (0.35 * len(depths) + 0.9) * rows),
        layout="constrained",
    )
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    image = None
    for ax, (data, row, r) in zip(axes, panels):
        grid = [[r.get(f"eval/ruler_depth{d}_{n}", math.nan) for n in lengths] for d in depths]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, line in enumerate(grid):
            for j, x in enumerate(line):
                if x == x:
                    ax.text(j, i, f"{x:.2f}", ha="center", va="center", fontsize="x-small")
        ax.set_xticks(range(len(lengths)), [fmt_value(float(n)) for n in lengths], fontsize="small")
        ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths], fontsize="small")
        # wrapped to the panel's width: one line of a long row label ran into the next panel's title
        width = 9 * max(2, len(lengths))  # a panel is at least two lengths wide: a label fits in three lines
        ax.set_title(textwrap.fill(shorten(f"{row} · {data}", 4 * width), width), fontsize="x-small")
        ax.set(xlabel="length (tokens)", ylabel="needle depth")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.colorbar(image, ax=list(axes[: len(panels)]), label="accuracy", shrink=0.8)
    return fig


PPL_AT = re.compile(r"eval/ppl_pos(\d+)")  # task=perplexity with position_bin: perplexity of the bin starting there


def plot_perplexity_by_position(df: pd.DataFrame) -> Figure | None:
    """Perplexity by position in the stream (task=perplexity with `task.position_bin`), one line per method, one
    panel per dataset and cache size m (full attention, with no budget, in every panel): where a method falls
    behind as the context grows past what it keeps. None for a sweep without such runs."""
    runs = task_runs(df, "perplexity")
    cells = {c: int(m.group(1)) for c in runs.columns if (m := PPL_AT.fullmatch(c))}
    if not len(runs) or not cells:
        return None
    runs = runs[runs[list(cells)].notna().any(axis=1)]
    v = _lines(runs, "m", False)
    styles = _styles(v, palette(df))
    bins = sorted(cells.values())
    panels = [(d, m) for d in datasets(v) for m in sorted(v.loc[v["data"] == d, "m"].dropna().unique())] or [
        (d, None) for d in datasets(v)
    ]
    fig, axes = _new_figure(len(panels))
    for ax, (data, m) in zip(axes, panels):
        here = v[(v["data"] == data) & (v["m"].isna() | (v["m"] == m))]
        for line, g in here.groupby("line", sort=False):
            r = g.iloc[0]
            ax.plot(bins, [r.get(f"eval/ppl_pos{b}", math.nan) for b in bins], label=line, **styles[line])
        ax.set(title=f"{data}, m = {fmt_value(float(m))}" if m is not None else data)
        ax.set(xlabel="position in the stream (bin start, tokens)", ylabel="perplexity")
        ax.grid(alpha=0.3)
    _legend(fig, axes)
    return fig


PLOTS = {
    "quality_vs_m": plot_quality_vs_m,
    "throughput_vs_m": plot_throughput_vs_m,
    "R_tradeoff": plot_R_tradeoff,
    "ruler_heatmap": plot_ruler_heatmap,
    "perplexity_by_position": plot_perplexity_by_position,
}


def figures(df: pd.DataFrame) -> tuple[dict[str, Figure], list[str]]:
    """Every plot the sweep supports, and a note for each one skipped (none for a plot of another task's runs)."""
    figs, notes = {}, []
    for name, plot in PLOTS.items():
        try:
            fig = plot(df)
            if fig is not None:
                figs[name] = fig
        except NoAxis as why:
            notes.append(f"{name}.png skipped: {why}.")
    return figs, notes
