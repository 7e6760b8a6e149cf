"""Tables and plots shaped like the paper's, from a sweep's results.json files (`python -m adore.report <dir>`).

collect.py reads the files and says which runs are one row; tables.py (generation) and task_tables.py (the other
tasks) build the tables from grid.py's cells, significance.py the paired tests, plots.py the figures; render.py writes
them as Markdown, LaTeX and terminal text; cli.py writes the files.
"""

from adore.report.cli import log_wandb, main, write_report
from adore.report.collect import collect
from adore.report.grid import Table
from adore.report.plots import NoAxis, figures, plot_quality_vs_m, plot_R_tradeoff, plot_throughput_vs_m
from adore.report.render import to_latex, to_markdown, to_terminal
from adore.report.significance import comparisons, paired_tests, pooled_tests, significance_table
from adore.report.tables import (
    PAPER,
    PAPER_BACKBONE,
    PAPER_LABEL,
    build_tables,
    fidelity_table,
    overview_values,
    quality_table,
    quality_values,
    throughput_table,
    throughput_values,
)
from adore.report.task_tables import long_table, perplexity_table, perplexity_values, stream_table

__all__ = [
    "PAPER",
    "PAPER_BACKBONE",
    "PAPER_LABEL",
    "NoAxis",
    "Table",
    "build_tables",
    "collect",
    "comparisons",
    "fidelity_table",
    "figures",
    "log_wandb",
    "long_table",
    "main",
    "overview_values",
    "paired_tests",
    "perplexity_table",
    "perplexity_values",
    "plot_R_tradeoff",
    "plot_quality_vs_m",
    "plot_throughput_vs_m",
    "pooled_tests",
    "quality_table",
    "quality_values",
    "significance_table",
    "stream_table",
    "throughput_table",
    "throughput_values",
    "to_latex",
    "to_markdown",
    "to_terminal",
    "write_report",
]
