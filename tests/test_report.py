"""The report on a synthetic sweep: tables shaped like the paper's, ratios to full attention, plots, CLI, notebook."""

from __future__ import annotations

import json
import math
import os
import shutil
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


# What adore/eval/job.py records about each method: its display name and whether it is training-free.
LABELS = {"full": "Full attention", "window": "Window", "streaming": "StreamingLLM", "h2o": "H2O", "random": "Random",
          "adore": "ADORE", "oracle": "Oracle"}  # fmt: skip
TRAINING_FREE = {"full", "window", "streaming", "h2o", "random"}
CHAT = {"chat", "math", "samsum"}


def method_section(method, m=None, R=None, sinks=None, **fields) -> dict:
    """The results.json `method` section: every field of the method's dataclass."""
    defaults = {
        "streaming": {"sinks": sinks},
        "h2o": {"recent_ratio": 0.5},
        "random": {"seed": 0},
        "adore": {"R": R, "controller": "controller_smollm2_samsum_k64@1a2b3c4d", "seed": 0, "config": {}},
        "oracle": {"R": R, "controller": "controller_smollm2_samsum_k64@1a2b3c4d", "seed": 0, "config": {}},
    }
    return {"name": method, "m": m, **defaults.get(method, {}), **fields}


def new_format(res: dict, label=None, **fields) -> dict:
    """`res` with the method section and the run fields of today's results.json (`fields`: method settings)."""
    run = res["run"]
    method = method_section(run["method"], run["m"], run["R"], run["sinks"], **fields)
    run["R"] = run["R"] or 0  # evaluate.py records Method.R: 0 for the methods that rebuild nothing
    run |= {"label": label or LABELS[run["method"]], "tag": run["method"], "training_free": run["method"] in TRAINING_FREE,
            "chat": run["data"] in CHAT, "has_answer": run["data"] == "math"}  # fmt: skip
    return res | {"method": method}


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
    return new_format({"run": run, "metrics": metrics, "perf": perf, "config": {"method": {"name": method}},
                       "versions": {"adore": "0.1.0"}, "finished_at": "2026-11-24T14:00:00"})  # fmt: skip


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


# full attention, then the training-free methods, then the others; each by label, then m
EXPECTED_ROWS = [
    "Full attention",
    "H2O (m=64)", "H2O (m=128)",
    "Random (m=128)",
    "StreamingLLM (m=64)", "StreamingLLM (m=128)",
    "Window (m=64)", "Window (m=128)",
    "ADORE (m=64, R=0)", "ADORE (m=64, R=4)",
    "ADORE (m=128, R=0)", "ADORE (m=128, R=1)", "ADORE (m=128, R=2)", "ADORE (m=128, R=4)", "ADORE (m=128, R=8)",
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
    assert table.loc["ADORE (m=64, R=0, bs=4)", col] == "3.218×"  # R = 0 is ADORE with one setting changed
    assert table.loc["Full attention (bs=4)", col] == "—"
    assert col not in report.throughput_table(df).columns
    tables = {t.name: t for t in report.build_tables(df, paper=True)}
    assert "Llama-2-7B" in tables["throughput"].caption and "packaged:smollm2" in tables["throughput"].caption
    assert "Llama-2-7B" not in tables["quality"].caption  # the paper's quality numbers are not in PAPER yet
    assert set(tables) == {"quality", "throughput", "fidelity", "nlm"}  # no predictions.jsonl: no paired tests
    assert tables["nlm"].frame.loc["Full attention", ("samsum", "PPL")] == "12.50 (1.00×)"
    assert tables["fidelity"].frame.loc["ADORE (m=128, R=4)", ("samsum", "KL")] == "0.050"


def test_paper_quality_numbers_sit_beside_ours(df, monkeypatch):
    monkeypatch.setitem(report.PAPER, "quality", {("ADORE", "samsum", "ROUGE-L"): 12.3})
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
    assert (
        "ADORE (m=128, R=4, bs=4)" in done.stdout and "paper (Llama-2-7B)" in (tmp_path / "out/tables.md").read_text()
    )
    assert str(tmp_path / "out") in done.stdout and "tables.md" in done.stdout
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


# ------------------------------------------------------------------ paired tests, fidelity and the other tasks

IDS = [f"samsum-{i}" for i in range(20)]


def rows(rougeL, bertscore, kl=None, drop=None, phase=0) -> list[dict]:
    """predictions.jsonl rows, written in reverse id order (the report aligns by id, not by position)."""
    out = []
    for i, id_ in enumerate(IDS):
        if id_ == drop:
            continue
        noise = ((i + phase) * 7 % 5) - 2  # mean 0 over 20 examples, a different order per method
        row = {
            "id": id_,
            "output": "x",
            "reference": "y",
            "rougeL": rougeL + noise,
            "bertscore_f": bertscore + (-1) ** (i + phase),
        }
        if kl is not None:
            row |= {"fidelity_kl": kl + 0.01 * (i % 3), "fidelity_top1": 1 - kl}
        out.append(row)
    return out[::-1]


def run_result(task, method, data, m=None, R=None, metrics=None, perf=None, K=None) -> dict:
    run = {"task": task, "method": method, "data": data, "model": "packaged:smollm2", "adapter": None, "m": m, "R": R,
           "K": None, "sinks": None, "num_examples": 20, "max_new_tokens": 64, "batch_size": 4}  # fmt: skip
    return {"run": run, "metrics": metrics or {}, "perf": perf or {}, "config": {"K": K} if K else {}}


def make_rich_sweep(root: Path) -> Path:
    """Generation runs with predictions.jsonl, and perplexity, stream and long runs."""
    from adore.io import write_jsonl

    generate = {  # name: (method, m, R, rougeL, bertscore_f, kl, dropped id)
        "full": ("full", None, None, 30, 60, None, None),
        "window": ("window", 64, None, 20, 55, 0.5, None),
        "h2o": ("h2o", 64, None, 24, 58, 0.3, None),
        "adore": ("adore", 64, 4, 28, 58, 0.1, "samsum-3"),
        "random": ("random", 64, None, 26, 50, 0.2, None),  # no predictions.jsonl: never a baseline
    }
    for phase, (name, (method, m, R, rl, bs, kl, drop)) in enumerate(generate.items()):
        metrics = {"eval/rougeL": rl, "eval/rougeL_ci": [rl - 1, rl + 1], "eval/bertscore_f": bs}
        if kl is not None:
            metrics |= {"fidelity/kl": kl, "fidelity/kl_ci": [kl - 0.01, kl + 0.01], "fidelity/top1": 1 - kl,
                        "fidelity/identical": 0.25, "fidelity/first_divergence": 7.5, "fidelity/rougeL_vs_full": 60.0}  # fmt: skip
        write_json(
            root / "gen" / name / "results.json", new_format(run_result("generate", method, "samsum", m, R, metrics))
        )
        if name != "random":
            write_jsonl(root / "gen" / name / "predictions.jsonl", rows(rl, bs, kl, drop, phase))
    ppl = {  # (data, method, m, R): ppl
        ("wikitext2", "full", None, None): 20.0,
        ("wikitext2", "window", 64, None): 30.0,
        ("wikitext2", "window", 128, None): 25.0,
        ("wikitext2", "adore", 64, 4): 22.0,
        ("samsum", "full", None, None): 10.0,
        ("samsum", "window", 64, None): 12.0,
    }
    for i, ((data, method, m, R), value) in enumerate(ppl.items()):
        metrics = {
            "eval/ppl": value,
            "eval/nll": math.log(value),
            "eval/ppl_ci": [value - 0.5, value + 0.5],
            "eval/tokens": 512,
        }
        write_json(
            root / "ppl" / str(i) / "results.json", new_format(run_result("perplexity", method, data, m, R, metrics))
        )
    for method, m, bleu, tok_s in (("full", None, 10.0, 40.0), ("window", 64, 6.0, 90.0)):
        metrics = {
            "eval/bleu": bleu,
            "eval/bleu_ci": [bleu - 2, bleu + 2],
            "eval/rougeL": 3 * bleu,
            "eval/bertscore_f": 50 + bleu,
        }
        write_json(root / "stream" / method / "results.json",
                   new_format(run_result("stream", method, "chat", m, None, metrics, {"perf/decode_tok_per_s": tok_s})))  # fmt: skip
    for method, R, rep in (("window", None, 0.3), ("adore", 4, 0.1)):
        metrics = {"eval/repeated_ngram_fraction": rep, "eval/repeated_ngram_fraction_ci": [rep - 0.05, rep + 0.05]}
        write_json(root / "long" / method / "results.json",
                   new_format(run_result("long", method, "chat", 64, R, metrics, {"perf/decode_tok_per_s": 50.0})))  # fmt: skip
    return root


@pytest.fixture(scope="module")
def rich(tmp_path_factory) -> pd.DataFrame:
    return report.collect(make_rich_sweep(tmp_path_factory.mktemp("rich")))


def test_paired_tests_against_full_and_the_best_baseline(rich):
    tests = report.paired_tests(rich).set_index(["method", "vs", "metric"])
    # m and R are shared by every run, so not in the labels; H2O has the best ROUGE-L of the baselines
    adore, best = "ADORE", "best baseline: H2O"
    t = tests.loc[(adore, "full", "ROUGE-L")]
    assert t["diff"] == pytest.approx(-2 - 1 / 19) and t["significant"] and t["n"] == 19  # aligned by id, one missing
    t = tests.loc[(adore, best, "ROUGE-L")]
    assert t["diff"] == pytest.approx(4 - 2 / 19) and t["significant"] and t["low"] <= 4 <= t["high"]
    assert not tests.loc[(adore, best, "BERT-F")]["significant"]  # same mean, per-example noise of opposite sign
    assert tests.loc[(adore, best, "KL")]["diff"] == pytest.approx(-0.2)
    assert (adore, "full", "KL") not in tests.index  # full attention is the fidelity reference, not a competitor
    assert ("Window", "full", "ROUGE-L") in tests.index
    best_tested = {m for m, vs, _ in tests.index if vs.startswith("best")}
    assert best_tested == {adore}  # baselines are not tested against the best baseline
    assert "Random" not in tests.index.get_level_values("method")  # no predictions.jsonl: never tested


def test_a_rebuilding_method_is_tested_against_its_own_run_without_rebuild(tmp_path):
    """Whether rebuilding pays: ADORE R = 4 against ADORE R = 0 with the same controller, on every metric."""
    from adore.io import write_jsonl

    for name, (method, R, rl, kl, controller) in {
        "window": ("window", None, 20, 0.5, None),
        "r4": ("adore", 4, 28, 0.1, "a@1"),
        "r0": ("adore", 0, 25, 0.3, "a@1"),
        "r0_other": ("adore", 0, 10, 0.9, "b@2"),  # another controller: never the R = 0 of "r4"
    }.items():
        res = run_result("generate", method, "samsum", 64, R, {"eval/rougeL": rl, "fidelity/kl": kl})
        write_json(
            tmp_path / name / "results.json", new_format(res, **({"controller": controller} if controller else {}))
        )
        write_jsonl(tmp_path / name / "predictions.jsonl", rows(rl, 50, kl))
    recall = run_result("generate", "adore", "samsum", 64, 64, {"eval/rougeL": 30, "fidelity/kl": 0.05})
    recall = new_format(recall, controller="a@1", rebuild="recall", page_size=16)  # settings only R > 0 records
    write_json(tmp_path / "r64_pages" / "results.json", recall)
    write_jsonl(tmp_path / "r64_pages" / "predictions.jsonl", rows(30, 50, 0.05))
    tests = report.paired_tests(report.collect(tmp_path))
    vs_r0 = tests[tests["vs"] == "R = 0"]
    pages = vs_r0[vs_r0["method"].str.contains("recall")].set_index("metric")
    assert pages.loc["ROUGE-L", "diff"] == pytest.approx(5)  # recall in pages, against the same controller's R = 0
    vs_r0 = vs_r0[~vs_r0["method"].str.contains("recall")].set_index("metric")
    assert len(vs_r0["method"].unique()) == 1 and vs_r0.loc["ROUGE-L", "diff"] == pytest.approx(3)
    assert vs_r0.loc["KL", "diff"] == pytest.approx(-0.2) and vs_r0.loc["KL", "significant"]
    assert set(vs_r0.index) == {"ROUGE-L", "BERT-F", "KL", "top-1"}


def test_against_tests_every_bounded_run_against_one_named_row(tmp_path, capsys):
    """Two controllers of one method, paired on every metric (`--against <tag>`); a tag in no row is refused."""
    from adore.io import write_jsonl

    for name, (method, m, rl, kl, controller) in {
        "window": ("window", 64, 20, 0.5, None),
        "shipped": ("adore", 64, 25, 0.3, "shipped@1"),
        "new": ("adore", 64, 28, 0.1, "new@2"),
        "new_m128": ("adore", 128, 30, 0.05, "new@2"),  # no shipped run at m = 128: no pair
    }.items():
        res = run_result("generate", method, "samsum", m, 4 if controller else None, {"eval/rougeL": rl})
        write_json(
            tmp_path / name / "results.json", new_format(res, **({"controller": controller} if controller else {}))
        )
        write_jsonl(tmp_path / name / "predictions.jsonl", rows(rl, 50, kl))
    df = report.collect(tmp_path)
    assert not report.paired_tests(df)["vs"].str.contains("shipped").any()  # only when asked
    tests = report.paired_tests(df, against="shipped")
    vs = tests[tests["vs"].str.contains("shipped")].set_index(["method", "metric"])
    tested = set(vs.index.get_level_values(0))
    assert len(tested) == 2 and any(label.startswith("Window") for label in tested)  # baselines too
    assert not any("shipped" in label or "128" in label for label in tested)  # not itself; m = 128 has no partner
    new = next(label for label in tested if "new" in label)
    assert vs.loc[(new, "ROUGE-L"), "diff"] == pytest.approx(3)
    assert vs.loc[(new, "KL"), "diff"] == pytest.approx(-0.2) and vs.loc[(new, "KL"), "significant"]
    with pytest.raises(ValueError, match="'nosuch'.*labels are"):
        report.paired_tests(df, against="nosuch")
    assert report.main([str(tmp_path), "--against", "nosuch", "--out", str(tmp_path / "out")]) == 2
    assert "nosuch" in capsys.readouterr().err and not (tmp_path / "out").exists()  # refused before writing


def test_against_pairs_with_every_row_that_holds_the_text(tmp_path):
    """One controller at R = 4 and R = 0: a baseline is tested against each, never against only the first found."""
    from adore.io import write_jsonl

    for name, (method, R, rl, controller) in {
        "window": ("window", None, 20, None),
        "r4": ("adore", 4, 28, "shipped@1"),
        "r0": ("adore", 0, 24, "shipped@1"),
        "other": ("adore", 4, 26, "other@2"),  # a second controller: the tags enter the labels
    }.items():
        res = run_result("generate", method, "samsum", 64, R, {"eval/rougeL": rl})
        write_json(
            tmp_path / name / "results.json", new_format(res, **({"controller": controller} if controller else {}))
        )
        write_jsonl(tmp_path / name / "predictions.jsonl", rows(rl, 50, 0.5))
    tests = report.paired_tests(report.collect(tmp_path), against="shipped")
    window = tests[tests["method"].str.startswith("Window") & tests["vs"].str.contains("shipped")]
    diffs = window[window["metric"] == "ROUGE-L"].set_index("vs")["diff"]
    assert len(diffs) == 2 and sorted(diffs.round(6)) == [-8, -4]  # against R = 4 and against R = 0, each labelled


def test_stream_replies_are_tested_in_pairs_by_dialogue(tmp_path):
    """task=stream: one score per reply, every reply of a dialogue resampled together, never paired with a
    generate run of the same data."""
    from adore.io import write_jsonl

    for name, (task, method, m, shift) in {
        "full": ("stream", "full", None, 0.0), "window": ("stream", "window", 64, 0.0),
        "adore": ("stream", "adore", 64, 2.0), "adore_generate": ("generate", "adore", 64, 9.0),
    }.items():  # fmt: skip
        res = run_result(task, method, "chat", m, 4 if method == "adore" else None, {"eval/rougeL": 20 + shift})
        write_json(tmp_path / name / "results.json", new_format(res))
        replies = [{"id": f"chat-{d}-turn{t}", "dialogue": f"chat-{d}", "turn": t, "reference": "r",
                    "rougeL": 20 + shift + (d % 3) - 1} for d in range(10) for t in range(1 + d % 3)]  # fmt: skip
        write_jsonl(tmp_path / name / "predictions.jsonl", replies)
    tests = report.paired_tests(report.collect(tmp_path))
    stream = tests[tests["data"] == "chat (stream)"].set_index(["method", "vs"])
    t = stream.loc[("ADORE", "best baseline: Window")]
    assert t["diff"] == pytest.approx(2.0) and t["significant"] and t["n"] == 10  # dialogues, not replies
    assert not (tests["data"] == "chat").any()  # the generate run has no stream partner of its task


def test_significance_table_marks_significance(rich, tmp_path):
    table = report.significance_table(report.paired_tests(rich))
    row = table[(table.index == "ADORE") & (table["vs"] == "best baseline: H2O")].iloc[0]
    assert row["ROUGE-L"].startswith("+3.89 [") and row["ROUGE-L"].endswith("✓")
    assert row["BERT-F"].endswith("✗")
    full_row = table[(table.index == "ADORE") & (table["vs"] == "full")].iloc[0]
    assert full_row["KL"] == "—"
    markdown, files = report.write_report(rich, tmp_path)
    assert "## Paired bootstrap tests" in markdown and "✓" in markdown
    assert r"$\checkmark$" in (tmp_path / "tables.tex").read_text()
    assert len(pd.read_csv(tmp_path / "significance.csv")) == len(report.paired_tests(rich))


def test_fidelity_table(rich):
    table = report.fidelity_table(rich)
    assert "Full attention" not in table.index  # the reference itself
    assert table.loc["ADORE", ("samsum", "KL")] == "0.100 ± 0.010"
    assert table.loc["Window", ("samsum", "1st div.")] == "7.5"
    assert ("samsum", "BERT-F vs full") not in table.columns  # no run reports it


def test_perplexity_tables_ratio_to_full_attention(rich):
    ppl, ratio = report.perplexity_values(rich)
    assert ppl.loc["Window", ("wikitext2", "m=64")] == 30 and ratio.loc["Window", ("wikitext2", "m=64")] == 1.5
    assert ppl.loc["Full attention", ("wikitext2", "m=128")] == 20  # no budget: the reference of every column
    lm = report.perplexity_table(rich, chat=False)
    assert lm.loc["ADORE", ("wikitext2", "m=64")] == "22.00 ± 0.50 (1.10×)"
    assert lm.loc["ADORE", ("wikitext2", "m=128")] == "—"
    assert "samsum" not in lm.columns.get_level_values(0)
    nlm = report.perplexity_table(rich, chat=True)
    assert nlm.loc["Window", ("samsum", "m=64")] == "12.00 ± 0.50 (1.20×)"
    tables = {t.name: t for t in report.build_tables(rich)}
    assert {"perplexity", "nlm", "stream", "long", "significance", "fidelity"} <= set(tables)


def test_stream_and_long_tables(rich):
    stream = report.stream_table(rich)
    assert stream.loc["Window", ("chat", "BLEU")] == "6.00 ± 2.00"
    assert stream.loc["Window", ("chat", "tok/s")] == "90.0"
    assert stream.loc["Full attention", ("chat", "ROUGE-L")] == "30.00"
    long = report.long_table(rich)
    assert long.loc["ADORE", ("chat", "rep. n-gram")] == "0.100 ± 0.050"
    assert long.loc["Window", ("chat", "tok/s")] == "50.0"


def test_K_comes_from_the_config_when_the_run_has_none(tmp_path):
    """A legacy results.json (no method section): identity from m, R, K, sinks; label from the method's name."""
    for K in (8, 16):
        res = run_result("generate", "adore", "samsum", 32, 4, {"eval/rougeL": K}, K=K)
        write_json(tmp_path / f"K{K}" / "results.json", res)
    df = report.collect(tmp_path)
    assert sorted(df["K"]) == [8, 16]
    assert report.quality_values(df).index.tolist() == ["Adore (K=8)", "Adore (K=16)"]


def test_missing_tasks_give_no_table_and_no_crash(sweep, rich):
    only_generate = rich[rich["task"] == "generate"]
    assert report.perplexity_table(only_generate).empty and report.stream_table(only_generate).shape[1] == 0
    assert report.significance_table(report.paired_tests(rich.iloc[:0])).empty


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


# ----------------------------------------------------------------- identity: every method setting, labels from the runs


def write_run(root: Path, name: str, method: str, m=None, R=None, rougeL=20.0, label=None, data="samsum", **fields):
    res = run_result("generate", method, data, m, R, {"eval/rougeL": rougeL}, {"perf/decode_tok_per_s": 50.0})
    write_json(root / name / "results.json", new_format(res, label, **fields))


def test_runs_that_differ_in_any_method_setting_are_separate_rows(tmp_path):
    write_run(tmp_path, "full", "full")
    write_run(tmp_path, "h2o_r0.25", "h2o", 64, rougeL=21.0, recent_ratio=0.25)
    write_run(tmp_path, "h2o_r0.75", "h2o", 64, rougeL=23.0, recent_ratio=0.75)
    write_run(tmp_path, "window_m64", "window", 64)
    write_run(tmp_path, "window_m128", "window", 128)
    values = report.quality_values(report.collect(tmp_path))
    # recent_ratio varies among the H2O rows only, so only they name it; m varies in the table, so every row does
    assert values.index.tolist() == [
        "Full attention", "H2O (m=64, recent_ratio=0.25)", "H2O (m=64, recent_ratio=0.75)", "Window (m=64)", "Window (m=128)"
    ]  # fmt: skip
    assert values.loc["H2O (m=64, recent_ratio=0.25)", ("samsum", "ROUGE-L")] == 21.0  # never averaged with 0.75


def test_untrained_adore_and_controllers_in_labels(tmp_path):
    write_run(tmp_path, "untrained", "adore", 64, 4, label="ADORE (untrained)", controller="untrained")
    for K in (8, 16):  # the controller file only renames K: the label names K alone
        res = run_result("generate", "adore", "samsum", 64, 4, {"eval/rougeL": K})
        write_json(
            tmp_path / f"K{K}/results.json", new_format(res | {"run": res["run"] | {"K": K}}, controller=f"c_k{K}@ab")
        )
    write_run(tmp_path, "R0", "adore", 64, 0, label="ADORE (untrained)", controller="untrained")
    rows = report.quality_values(report.collect(tmp_path)).index.tolist()
    # R, a run field, varies in the table, so every row that has one names it
    assert rows == ["ADORE (R=4, K=8)", "ADORE (R=4, K=16)", "ADORE (untrained, R=0)", "ADORE (untrained, R=4)"]


def test_a_rebuild_policy_that_follows_R_stays_in_the_label(tmp_path):
    """page_size implies rebuild=recall; the label says both even where recall runs are exactly the large-R ones."""
    write_run(tmp_path / "a", "R4", "adore", 256, 4)  # the paper's rule: results.json records no rebuild
    write_run(tmp_path / "a", "R64_recall", "adore", 256, 64, rebuild="recall")
    write_run(tmp_path / "a", "R64_recall_page16", "adore", 256, 64, rebuild="recall", page_size=16)
    assert report.quality_values(report.collect(tmp_path / "a")).index.tolist() == [
        "ADORE (R=4)", "ADORE (R=64, rebuild=recall)", "ADORE (R=64, rebuild=recall, page_size=16)"
    ]  # fmt: skip
    write_run(tmp_path / "b", "R16_keep", "adore", 256, 16, rebuild="keep")
    write_run(tmp_path / "b", "R64_recall_page16", "adore", 256, 64, rebuild="recall", page_size=16)
    assert report.quality_values(report.collect(tmp_path / "b")).index.tolist() == [
        "ADORE (R=16, rebuild=keep)", "ADORE (R=64, rebuild=recall, page_size=16)"
    ]  # fmt: skip


def test_a_recipe_alone_under_its_label_names_the_settings_its_method_varies(tmp_path):
    """The late-question recipe is the only row of its label: its pages and tail_alone are still named, the
    controller and rebuild its label spells are not."""
    shipped = "ADORE [probe_l20] + recall"
    write_run(tmp_path, "shipped", "adore", 256, 4, label=shipped, controller="c_l20@ab", rebuild="recall")
    write_run(tmp_path, "late", "adore", 256, 256, label="ADORE [probe_l20_long] + recall", controller="c_long@cd",
              rebuild="recall", page_size=16, tail_alone=48)  # fmt: skip
    write_run(tmp_path, "streaming", "streaming", 256)
    assert report.quality_values(report.collect(tmp_path)).index.tolist() == [
        "StreamingLLM", f"{shipped} (R=4)", "ADORE [probe_l20_long] + recall (R=256, page_size=16, tail_alone=48)"
    ]  # fmt: skip


def test_a_legacy_results_file_still_makes_a_row(tmp_path):
    """Before runs carried `method`, run.label and the flags: label from the name, identity from m, R, K, sinks."""
    for method, m, R in (("full", 256, None), ("window", 64, None), ("adore", 64, 4)):  # full's m: a shared config's
        res = run_result("generate", method, "math", m, R, {"eval/rougeL": 20.0, "eval/accuracy": 0.5})
        write_json(tmp_path / method / "results.json", res)
    df = report.collect(tmp_path)
    assert df.set_index("method")["training_free"].to_dict() == {"adore": False, "full": True, "window": True}
    assert report.quality_values(df).index.tolist() == ["Full", "Window", "Adore"]
    assert ("math", "Acc") in report.quality_values(df).columns


def test_terminal_output_fits_120_columns(sweep, tmp_path, capsys):
    long = "controller_" + "x" * 90
    for i, controller in enumerate((f"{long}@1a2b3c4d", f"{long}@5e6f7a8b")):
        res = run_result("generate", "adore", "math", 64, 4, {"eval/rougeL": 20.0 + i, "eval/bertscore_f": 60.0,
                         "eval/accuracy": 0.5, "fidelity/kl": 0.1, "fidelity/top1": 0.9}, {"perf/decode_tok_per_s": 50.0})  # fmt: skip
        write_json(tmp_path / "runs" / str(i) / "results.json", new_format(res, controller=controller))
    shutil.copytree(sweep, tmp_path / "runs/sweep")
    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(map(len, lines)) <= 120
    # long labels are cut in the middle, so the settings at both ends still tell the rows apart
    shortened = [line.split("  ")[0] for line in lines if "xxxx@" in line]
    assert shortened == [
        "ADORE (m=64, R=4, contr…xxxxxxxx@1a2b3c4d, bs=4)",
        "ADORE (m=64, R=4, contr…xxxxxxxx@5e6f7a8b, bs=4)",
    ]
    assert any(line.startswith("Oracle (m=128, R=4, bs=4) ") for line in lines)
    assert str(tmp_path / "out") in "\n".join(lines)
    assert "controller_" + "x" * 90 in (tmp_path / "out/tables.md").read_text()  # full labels stay in the files


def test_paired_tests_run_once_per_report(rich, tmp_path, monkeypatch):
    calls = []
    paired_tests = report.significance.paired_tests
    monkeypatch.setattr(report.significance, "paired_tests", lambda df, **kw: calls.append(1) or paired_tests(df, **kw))
    markdown, files = report.write_report(rich, tmp_path)
    assert len(calls) == 1
    assert "## Paired bootstrap tests" in markdown and (tmp_path / "significance.csv") in files


def test_perplexity_by_position_is_plotted_per_m_with_full_attention_in_each_panel(tmp_path):
    """task=perplexity with position_bin writes eval/ppl_pos<start>: one panel per m, a line per method, full
    attention (no budget) in every panel; a sweep without such cells draws nothing and says nothing."""
    from adore.report.plots import plot_perplexity_by_position

    cells = lambda base: {f"eval/ppl_pos{b}": base + b / 1024 for b in (0, 1024, 2048)}  # noqa: E731
    for name, method, m in (
        ("full", "full", None),
        ("w64", "window", 64),
        ("w128", "window", 128),
        ("s64", "streaming", 64),
    ):
        res = run_result("perplexity", method, "wikitext2", m, metrics={"eval/ppl": 20.0} | cells(20 if m else 15))
        write_json(tmp_path / name / "results.json", new_format(res))
    fig = plot_perplexity_by_position(report.collect(tmp_path))
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["wikitext2, m = 64", "wikitext2, m = 128"]
    assert [len(ax.get_lines()) for ax in axes] == [3, 2]  # full + window + streaming; full + window
    assert list(axes[0].get_lines()[0].get_xdata()) == [0, 1024, 2048]
    (tmp_path / "none").mkdir()
    plain = run_result("perplexity", "window", "wikitext2", 64, metrics={"eval/ppl": 20.0})
    write_json(tmp_path / "none" / "results.json", new_format(plain))
    assert plot_perplexity_by_position(report.collect(tmp_path / "none")) is None


def ruler_rows(length: int, scores: dict[str, list[float]]) -> list[dict]:
    """Scored task=ruler examples at one length: needle tasks at depths 0 % and 100 %, fwe without a depth."""
    return [
        {"id": f"{v}-{length}-{i}", "variant": v, "length": length, "index": i,
         "depth": None if v == "fwe" else float(i % 2), "prompt_tokens": length - 8, "references": ["1"],
         "output": "", "score": s}
        for v, values in scores.items() for i, s in enumerate(values)
    ]  # fmt: skip


def write_ruler_run(root: Path, method: str, m, rows: list[dict], finished_at: str, arrival="oneshot") -> None:
    """A task=ruler run as eval.py writes it: results.json (metrics by the task's own scorer) and predictions."""
    from adore.eval.stats import Bootstrap
    from adore.io import write_jsonl
    from adore.ruler import accuracy_metrics

    run = {"task": "ruler", "method": method, "label": LABELS[method], "tag": method,
           "training_free": method in TRAINING_FREE, "data": "noise", "chat": False, "has_answer": False,
           "model": "packaged:smollm2", "adapter": None, "m": m, "R": None, "K": None, "num_examples": len(rows),
           "arrival": arrival, "haystack": "noise", "examples_per_setting": 2, "max_new_tokens": 8,
           "batch_size": 2, "prompt_tokens_mean": sum(r["prompt_tokens"] for r in rows) / len(rows)}  # fmt: skip
    metrics = accuracy_metrics(rows, Bootstrap().mean_ci)
    write_json(root / "results.json", {"run": run, "method": {"name": method, "m": m}, "metrics": metrics,
                                       "perf": {"perf/decode_tok_per_s": 10.0}, "finished_at": finished_at})  # fmt: skip
    write_jsonl(root / "predictions.jsonl", rows)


def test_a_ruler_sweep_run_in_parts_is_one_row_scored_over_every_example(tmp_path):
    """Window at 1k over three tasks, then at 2k over two (another folder), then one 2k example rescored: one row,
    its accuracies and intervals those of a single run over every example (the rescored one counted once, as the
    later run has it), one heatmap panel with both lengths, and paired tests over every example."""
    from adore.eval.stats import Bootstrap
    from adore.report.plots import plot_ruler_heatmap
    from adore.ruler import VARIANTS, accuracy_metrics

    short = ruler_rows(1024, {"niah_single": [1.0, 0.0], "niah_multivalue": [0.5, 0.25], "fwe": [1.0, 1.0]})
    long = ruler_rows(2048, {"niah_single": [0.0, 0.0], "niah_multivalue": [0.75, 0.5]})
    fixed = [dict(long[0], score=1.0)]
    write_ruler_run(tmp_path / "a/window_1k", "window", 64, short, "2026-12-01T10:00:00")
    write_ruler_run(tmp_path / "b/window_2k", "window", 64, long, "2026-12-02T10:00:00")
    write_ruler_run(tmp_path / "b/window_2k_again", "window", 64, fixed, "2026-12-03T10:00:00")
    everything = short + long
    full = [dict(r, score=1.0) for r in everything]
    write_ruler_run(tmp_path / "a/full", "full", None, full, "2026-12-01T09:00:00")
    df = report.collect(tmp_path / "a", tmp_path / "b")
    window = df[df["method"] == "window"]
    assert len(window) == 1 and window.iloc[0]["num_examples"] == 2  # prompts per task and length
    assert len(window.iloc[0]["runs"]) == 3
    one_run = sorted(short + fixed + long[1:], key=lambda r: (VARIANTS.index(r["variant"]), r["length"], r["index"]))
    expected = accuracy_metrics(one_run, Bootstrap().mean_ci)  # one run over both lengths: the same bootstrap draws
    for key, value in expected.items():
        if key.endswith("_ci"):
            assert [window.iloc[0][f"{key}_low"], window.iloc[0][f"{key}_high"]] == pytest.approx(value)
        else:
            assert window.iloc[0][key] == pytest.approx(value), key
    assert window.iloc[0]["eval/ruler_accuracy"] == pytest.approx(6.0 / 10)
    assert len(df[df["method"] == "full"]) == 1 and pd.isna(df.loc[df["method"] == "full", "runs"]).all()
    fig = plot_ruler_heatmap(df)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert len(panels) == 2 and all(len(ax.get_xticks()) == 2 for ax in panels)  # full attention, window: 1k and 2k
    tests = report.paired_tests(df).set_index("metric")
    assert tests.loc["RULER", "n"] == 10 and tests.loc["RULER", "diff"] == pytest.approx(6.0 / 10 - 1)
    # and task by task: niah_single 1, 0 at 1k and 1 (rescored), 0 at 2k; fwe only at 1k, both right
    assert tests.loc["RULER niah_single", "n"] == 4 and tests.loc["RULER niah_single", "diff"] == pytest.approx(-0.5)
    assert tests.loc["RULER fwe", "n"] == 2 and tests.loc["RULER fwe", "diff"] == 0
    assert list(tests.index) == ["RULER", "RULER niah_single", "RULER niah_multivalue", "RULER fwe"]
    assert report.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out/tables.md").read_text().count("| Window") == 3  # paired tests, by length, by task


def test_ruler_tasks_are_tested_against_the_baseline_best_on_each(tmp_path):
    runs = {
        "adore": {"niah_single": [1.0, 1.0], "fwe": [0.0, 1.0]},
        "streaming": {"niah_single": [1.0, 0.0], "fwe": [0.0, 0.0]},
        "h2o": {"niah_single": [0.0, 0.0], "fwe": [1.0, 1.0]},
    }
    for method, scores in runs.items():
        write_ruler_run(tmp_path / method, method, 64, ruler_rows(1024, scores), "2026-12-01T10:00:00")
    tests = report.paired_tests(report.collect(tmp_path))
    best = tests[tests["vs"].str.startswith("best baseline")].set_index("metric")
    assert best.loc["RULER niah_single", "vs"] == "best baseline: StreamingLLM"
    assert best.loc["RULER niah_single", "diff"] == pytest.approx(0.5)
    assert best.loc["RULER fwe", "vs"] == "best baseline: H2O" and best.loc["RULER fwe", "diff"] == -0.5
    assert best.loc["RULER", "vs"] == "best baseline: H2O" and best.loc["RULER", "diff"] == 0.25
    columns = report.significance_table(tests).columns.tolist()
    assert columns == ["data", "vs", "RULER", "RULER niah_single", "RULER fwe"]  # the tasks in RULER's order


def test_a_chunked_ruler_run_is_tested_against_one_shot_full_attention(tmp_path):
    """Full attention releases nothing: chunks leave it one forward's cache. Turns change the prompt: no stand-in."""
    rows = ruler_rows(1024, {"niah_single": [1.0, 0.0]})
    write_ruler_run(tmp_path / "full", "full", None, [dict(r, score=1.0) for r in rows], "2026-12-01T10:00:00")
    for arrival in ("chunked", "turns"):
        write_ruler_run(tmp_path / arrival, "window", 64, rows, "2026-12-01T10:00:00", arrival=arrival)
    tests = report.paired_tests(report.collect(tmp_path))
    assert set(tests["vs"]) == {"full (arrival=oneshot)"} and set(tests["method"]) == {"Window (arrival=chunked)"}
    assert tests.set_index("metric").loc["RULER", "diff"] == -0.5


def test_pooled_tests_join_one_comparison_over_its_settings_and_count_a_shared_prompt_once():
    """The same run label against the best baseline at two cache sizes pools into one test of every pair, the
    prompts both settings hold resampled as one unit; a comparison held in one setting alone is not pooled."""
    from adore.report.significance import Comparison, pooled_table, pooled_tests

    def comparison(row, vs, a, b, units, family="ADORE"):
        return Comparison("noise (ruler)", row, family, "ruler", vs, "score", a, b, units)

    found = [
        comparison("ADORE m=128", "best baseline: H2O m=128", [0.0, 1.0, 0.0], [1.0, 1.0, 1.0], ["p1", "p2", "p3"]),
        comparison("ADORE m=512", "best baseline: SnapKV m=512", [1.0, 0.0], [1.0, 1.0], ["p1", "p2"]),
        comparison("ADORE m=512", "full", [1.0, 0.0], [1.0, 1.0], ["p1", "p2"]),  # one setting only
        comparison("TOVA m=512", "full", [1.0], [0.0], ["p1"], family="TOVA"),
    ]
    pooled = pooled_tests(found)
    assert len(pooled) == 1
    (row,) = pooled.to_dict("records")
    assert (row["family"], row["vs"], row["metric"], row["settings"]) == ("ADORE", "best baseline", "RULER", 2)
    assert row["diff"] == pytest.approx((1 - 3 + 1 - 2) / 5) and row["n"] == 3  # five pairs, three prompts
    table = pooled_table(pooled)
    assert table.loc["ADORE", "RULER"].endswith("(2)") and table.loc["ADORE", "vs"] == "best baseline"
