"""Tables and plots shaped like the paper's, from a sweep's results.json files (see ../shared/ADORE.md, "What the paper reports").

    python -m adore.report <sweep_dir> [<sweep_dir> ...] [--out DIR] [--paper] [--against TEXT] [--wandb ...]

The report reads only results.json files (and task=ruler's predictions, to score a sweep run in parts together),
so it can be rebuilt at any time without rerunning anything. Writes `<out>/tables.md`, `<out>/tables.tex`,
`<out>/summary.csv`, `<out>/significance.csv` and PNG plots (default out: the first `<sweep_dir>/report`), and prints
a compact table per dataset.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap
from pathlib import Path

import pandas as pd

from adore.io import _atomic_write_text, atomic_path
from adore.report import significance
from adore.report.collect import collect
from adore.report.plots import figures
from adore.report.render import WIDTH, to_latex, to_markdown, to_terminal
from adore.report.tables import PAPER_BACKBONE, build_tables, overview_values


def write_report(
    df: pd.DataFrame, out: str | os.PathLike, paper: bool = False, title: str = "Report", against: str | None = None
) -> tuple[str, list[Path]]:
    """Write tables.md, tables.tex, summary.csv, significance.csv and significance_pooled.csv (when runs have
    predictions.jsonl; the pooled tests where a comparison holds in two settings or more) and the PNG
    plots into `out`, each atomically; return the Markdown and the files. `against`: see `paired_tests`."""
    out = Path(out)
    # once: the significance tables and their CSVs share them
    found = significance.comparisons(df, against)
    tests, pooled = significance.paired_tests(df, against=against, found=found), significance.pooled_tests(found)
    tables = build_tables(df, paper, tests=tests, pooled=pooled)
    figs, notes = figures(df)
    files = []
    for name, fig in figs.items():
        with atomic_path(out / f"{name}.png") as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        files.append(out / f"{name}.png")
    markdown = to_markdown(tables, notes, [p.name for p in files], title)
    for name, text in (("tables.md", markdown), ("tables.tex", to_latex(tables))):
        _atomic_write_text(out / name, text)
        files.append(out / name)
    for name, frame in (("summary.csv", df), ("significance.csv", tests), ("significance_pooled.csv", pooled)):
        if name == "summary.csv" or len(frame):
            with atomic_path(out / name) as tmp:
                frame.to_csv(tmp, index=False)
            files.append(out / name)
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
    parser.add_argument(
        "sweep_dir", type=Path, nargs="+", help="run or sweep directories; every results.json below them is read"
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <first sweep_dir>/report)")
    parser.add_argument("--paper", action="store_true", help=f"show the paper's numbers ({PAPER_BACKBONE}) beside ours")
    parser.add_argument(
        "--against",
        default=None,
        metavar="TEXT",
        help="also test every bounded run in pairs against the run whose row label holds TEXT (same data and m), "
        "e.g. a controller's tag: controller_smollm2_probe_k64",
    )
    parser.add_argument("--wandb", choices=("offline", "online", "disabled"), default="disabled")
    args = parser.parse_args(argv)
    sweeps = args.sweep_dir
    df = collect(*sweeps)
    named = ", ".join(map(str, sweeps))
    if df.empty:
        print(f"no readable results.json under {named}", file=sys.stderr)
        return 1
    out = args.out or sweeps[0] / "report"
    try:
        markdown, files = write_report(df, out, args.paper, title=f"Report: {named}", against=args.against)
    except ValueError as err:
        if args.against is None or "--against" not in str(err):
            raise
        print(err, file=sys.stderr)
        return 2
    print(to_terminal(overview_values(df), "Generation, per dataset (every column and table: tables.md)"))
    titles = [line.removeprefix("## ") for line in markdown.splitlines() if line.startswith("## ")]
    titles = [t for t in titles if t != "Plots"]
    print(textwrap.fill("Tables in tables.md: " + ", ".join(titles) + ".", WIDTH))
    print(f"Wrote {len(files)} files to {out}{os.sep}")
    print(textwrap.fill(", ".join(f.name for f in files), WIDTH, initial_indent="  ", subsequent_indent="  "))
    if args.wandb != "disabled":
        log_wandb(files, args.wandb, out, sweeps[0])
    return 0
