"""The report on a synthetic sweep: tables shaped like the paper's, ratios to full attention, plots, CLI, notebook."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from adore import report
from adore.io import write_json

PROJECT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"

# method -> (ROUGE-L, decode tok/s) at m = 128; m = 64 loses 3 ROUGE-L points and gains 10 tok/s
BASE = {
    "full": (30, 40),
    "window": (20, 100),
    "streaming": (22, 96),
    "h2o": (24, 50),
    "random": (18, 90),
    "oracle": (29, 100),
}


def adore_base(R: int) -> tuple[float, float]:
    return 26 + 0.5 * R, 120 - 5 * R


def result(method, data, m=None, R=None, sinks=None, batch_size=4, task="generate", bertscore=True) -> dict:
    rougeL, tok_s = adore_base(R) if method == "adore" else BASE[method]
    if m == 64:
        rougeL, tok_s = rougeL - 3, tok_s + 10
    metrics = {"eval/bleu": rougeL / 5, "eval/rouge1": rougeL + 5, "eval/rouge2": rougeL / 3, "eval/rougeL": rougeL}
    if bertscore:
        metrics["eval/bertscore_f"] = 50 + rougeL
    if data == "math":
        metrics["eval/accuracy"] = rougeL / 100
    run = {"task": task, "method": method, "data": data, "model": "packaged:smollm2", "adapter": None, "m": m, "R": R, "K": None,
           "sinks": sinks, "num_examples": 20, "max_new_tokens": 64, "batch_size": batch_size}  # fmt: skip
    perf = {
        "perf/decode_tok_per_s": tok_s,
        "perf/prefill_tok_per_s": 900.0,
        "perf/generated_tokens": 1280,
        "perf/peak_kv_bytes": 1000 * (m or 256),
    }
    return {"run": run, "metrics": metrics, "perf": perf, "config": {"method": {"name": method}}, "versions": {"adore": "0.1.0"},
            "finished_at": "2026-11-24T14:00:00"}  # fmt: skip


def specs(data: str) -> list[dict]:
    out = [dict(method="full")] if data == "samsum" else []
    for m in (64, 128):
        out += [dict(method="window", m=m), dict(method="streaming", m=m, sinks=4), dict(method="h2o", m=m)]
        out += [dict(method="adore", m=m, R=0), dict(method="adore", m=m, R=4)]
    out += [dict(method="random", m=128), dict(method="oracle", m=128, R=4)]
    return out + [dict(method="adore", m=128, R=R) for R in (1, 2, 8)]


def make_sweep(root: Path) -> Path:
    """Methods x m x R x {samsum, math}; math has no full-attention run; plus the odd files a real sweep holds."""
    for data in ("samsum", "math"):
        for i, spec in enumerate(specs(data)):
            res = result(
                data=data, **spec, bertscore=not (data == "samsum" and spec == dict(method="adore", m=64, R=4))
            )
            if data == "samsum" and spec == dict(method="adore", m=128, R=4):
                res["metrics"]["eval/rougeL_ci"] = [27.0, 29.0]
                res["metrics"]["fidelity/kl"] = 0.05
            write_json(root / data / f"{i}_{spec['method']}_m{spec.get('m')}_R{spec.get('R')}" / "results.json", res)
    # deeper, Hydra-multirun style: a batch-size-1 run without a batch-size-1 full reference, and a perplexity run
    write_json(
        root / "multirun/2026-11-24/14-00-00/0/results.json", result("adore", "samsum", m=128, R=4, batch_size=1)
    )
    ppl = result("full", "samsum", task="perplexity")
    ppl["metrics"] = {"eval/ppl": 12.5}
    write_json(root / "multirun/2026-11-24/14-00-00/1/results.json", ppl)
    (root / "broken").mkdir()
    (root / "broken/results.json").write_text('{"run": {"method": "adore", "da')  # killed mid-write by hand
    write_json(root / "partial/results.json", {"metrics": {"eval/rougeL": 1.0}})
    return root


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    return make_sweep(tmp_path_factory.mktemp("sweep"))


@pytest.fixture(scope="module")
def df(sweep) -> pd.DataFrame:
    with pytest.warns(UserWarning, match="skipping"):
        return report.collect(sweep)


def test_collect_skips_corrupt_and_partial_files(sweep):
    with pytest.warns(UserWarning) as caught:
        df = report.collect(sweep)
    skipped = sorted(str(w.message).split(":")[0] for w in caught)
    assert skipped == [f"skipping {sweep / 'broken/results.json'}", f"skipping {sweep / 'partial/results.json'}"]
    assert len(df) == 16 + 15 + 2
    assert not df["path"].str.contains("broken|partial").any()
    # unknown metrics and confidence intervals are carried through as columns
    row = df[df["fidelity/kl"].notna()].iloc[0]
    assert (row["eval/rougeL_ci_low"], row["eval/rougeL_ci_high"]) == (27.0, 29.0)
    assert df.loc[df["task"] == "perplexity", "eval/ppl"].tolist() == [12.5]
    assert df["m"].dtype.kind == "f" and df["versions/adore"].eq("0.1.0").all()


def test_collect_on_an_empty_or_missing_directory(tmp_path):
    assert report.collect(tmp_path).empty
    with pytest.warns(UserWarning, match="not a directory"):
        df = report.collect(tmp_path / "nope")
    assert df.empty and report.build_tables(df) == []
    assert report.main([str(tmp_path)]) == 1


EXPECTED_ROWS = [
    "Full attention",
    "Window (m=64)", "Window (m=128)",
    "StreamingLLM (m=64)", "StreamingLLM (m=128)",
    "H2O (m=64)", "H2O (m=128)",
    "Random (m=128)",
    "ADORE w/o rebuild (m=64, R=0)", "ADORE w/o rebuild (m=128, R=0)",
    "ADORE (m=64, R=4)", "ADORE (m=128, R=1)", "ADORE (m=128, R=2)", "ADORE (m=128, R=4)", "ADORE (m=128, R=8)",
    "Oracle (m=128, R=4)",
]  # fmt: skip


def test_quality_table_rows_and_columns(df):
    values = report.quality_values(df)
    assert values.index.tolist() == EXPECTED_ROWS
    metrics = ["BLEU", "ROUGE-1", "ROUGE-2", "ROUGE-L", "BERT-F"]
    assert values.columns.tolist() == [("math", m) for m in [*metrics, "Acc"]] + [("samsum", m) for m in metrics]
    assert values.loc["ADORE (m=128, R=8)", ("samsum", "ROUGE-L")] == 30.0
    assert values.loc["H2O (m=64)", ("math", "Acc")] == pytest.approx(0.21)


def test_missing_cells_are_dashes(df):
    table = report.quality_table(df)
    assert table.loc["ADORE (m=64, R=4)", ("samsum", "BERT-F")] == "—"
    assert table.loc["ADORE (m=64, R=4)", ("samsum", "ROUGE-L")] == "25.00"
    assert table.loc["Full attention", ("math", "ROUGE-L")] == "—"  # no full-attention run on math
    assert table.loc["ADORE (m=128, R=4)", ("samsum", "ROUGE-L")] == "28.00 ± 1.00"  # from eval/rougeL_ci
    assert not table.isna().any().any()


def test_throughput_ratios_to_full_attention_of_the_same_sweep(df):
    values = report.throughput_values(df)
    table = report.throughput_table(df)
    # batch size varies (a bs=1 run), so it is part of every label
    adore, adore_bs1, full = "ADORE (m=128, R=4, bs=4)", "ADORE (m=128, R=4, bs=1)", "Full attention (bs=4)"
    assert values.loc[adore, ("samsum", "tok/s")] == 100
    assert values.loc[adore, ("samsum", "× full")] == pytest.approx(100 / 40)
    assert values.loc["Window (m=64, bs=4)", ("samsum", "× full")] == pytest.approx(110 / 40)
    assert values.loc[full, ("samsum", "× full")] == 1.0
    assert table.loc[adore, ("samsum", "× full")] == "2.50×"
    assert table.loc[adore, ("math", "tok/s")] == "100.0"
    assert table.loc[adore, ("math", "× full")] == "—"  # no full attention on math
    assert table.loc[adore_bs1, ("samsum", "× full")] == "—"  # no full attention at batch size 1
    assert math.isnan(values.loc[adore_bs1, ("samsum", "× full")])


def test_paper_numbers_only_where_the_paper_gives_one(df):
    table = report.throughput_table(df, paper=True)
    col = (report.PAPER_LABEL, "× full")
    assert table.loc["ADORE (m=128, R=4, bs=4)", col] == "3.218×"
    assert table.loc["ADORE w/o rebuild (m=64, R=0, bs=4)", col] == "—"
    assert table.loc["Full attention (bs=4)", col] == "—"
    assert col not in report.throughput_table(df).columns
    tables = {t.name: t for t in report.build_tables(df, paper=True)}
    assert "Llama-2-7B" in tables["throughput"].caption and "packaged:smollm2" in tables["throughput"].caption
    assert "Llama-2-7B" not in tables["quality"].caption  # the paper's quality numbers are not in PAPER yet
    assert set(tables) == {"quality", "throughput", "task_perplexity"}
    assert tables["task_perplexity"].frame.loc["Full attention", ("samsum", "ppl")] == "12.50"


def test_paper_quality_numbers_sit_beside_ours(df, monkeypatch):
    monkeypatch.setitem(report.PAPER, "quality", {("adore", "samsum", "ROUGE-L"): 12.3})
    table = report.quality_table(df, paper=True)
    col = ("samsum", f"ROUGE-L {report.PAPER_LABEL}")
    assert table.columns.get_loc(col) == table.columns.get_loc(("samsum", "ROUGE-L")) + 1
    assert table.loc["ADORE (m=128, R=4)", col] == "12.30" and table.loc["Oracle (m=128, R=4)", col] == "—"
    assert "Llama-2-7B" in report.build_tables(df, paper=True)[0].caption


def test_write_report_files(df, tmp_path):
    markdown, files = report.write_report(df, tmp_path, paper=True)
    names = sorted(f.name for f in files)
    assert names == sorted(
        ["R_tradeoff.png", "quality_vs_m.png", "throughput_vs_m.png", "tables.md", "tables.tex", "summary.csv"]
    )
    for f in files:
        if f.suffix == ".png":
            assert f.read_bytes()[:8] == PNG and f.stat().st_size > 5000
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # no temporary file left behind
    assert (tmp_path / "tables.md").read_text() == markdown
    assert "| ADORE (m=128, R=4)" in markdown and "28.00 ± 1.00" in markdown
    tex = (tmp_path / "tables.tex").read_text()
    assert r"\begin{tabular}" in tex and r"\multicolumn" in tex and r"$\pm$" in tex and "×" not in tex
    assert len(pd.read_csv(tmp_path / "summary.csv")) == len(df)


def test_plots_are_skipped_without_their_axis(df):
    one_m = df[(df["m"].isna() | (df["m"] == 128)) & ((df["method"] != "adore") | (df["R"] == 4))]
    figs, notes = report.figures(one_m)
    assert figs == {}
    assert [n.split(".png")[0] for n in notes] == ["quality_vs_m", "throughput_vs_m", "R_tradeoff"]
    figs, notes = report.figures(df[df["method"] == "adore"])
    assert sorted(figs) == ["R_tradeoff", "quality_vs_m", "throughput_vs_m"] and notes == []


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "adore.report", *map(str, args)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli(sweep, tmp_path):
    done = run_cli(sweep, "--out", tmp_path / "out", "--paper")
    assert done.returncode == 0, done.stderr
    assert "| ADORE (m=128, R=4, bs=4)" in done.stdout and "paper (Llama-2-7B)" in done.stdout
    assert "skipping" in done.stderr  # the corrupt file is reported, not fatal
    assert (tmp_path / "out/quality_vs_m.png").read_bytes()[:8] == PNG
    assert run_cli(tmp_path / "empty").returncode == 1


def test_cli_default_out_and_wandb_offline(sweep, tmp_path):
    single = tmp_path / "sweep"
    single.mkdir()
    for sub in ("samsum/0_full_mNone_RNone", "samsum/10_adore_m128_R4"):
        (single / sub).mkdir(parents=True)
        (single / sub / "results.json").write_text((sweep / sub / "results.json").read_text())
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"} | {"WANDB_SILENT": "true"}
    done = run_cli(single, "--wandb", "offline", env=env)
    assert done.returncode == 0, done.stderr
    out = single / "report"
    assert "2.50×" in (out / "tables.md").read_text()
    assert "skipped" in (out / "tables.md").read_text()  # a single m and R: no plot
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_notebook_executes(sweep, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("ADORE_SWEEP_DIR", str(sweep))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(PROJECT / "notebooks/analysis.ipynb", as_version=4)
    # kernel "python3" runs this interpreter: jupyter_client swaps the kernelspec's "python" for sys.executable
    client = nbclient.NotebookClient(
        nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(PROJECT / "notebooks")}}
    )
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3
    assert any("ADORE (m=128, R=4)" in json.dumps(o.get("data", {})) for o in outputs)
