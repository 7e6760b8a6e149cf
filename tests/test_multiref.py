"""Several references per prompt (rows of one dialogue, one per reference): generated once, scored against all
references, resampled as one unit; single-reference data scores as before."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import PROJECT, tiny_overrides
from conftest import compose_eval as eval_cfg

from adore.eval import job as evaluate
from adore.eval.metrics import bleu, exact_match, quality, reference_streams, rouge
from adore.eval.stats import Bootstrap, corpus_bleu_ci
from adore.eval.tasks import group_by_prompt
from adore.io import read_jsonl, write_json, write_jsonl


def samsum_rows(n: int) -> list[dict]:
    path = Path(os.environ.get("ADORE_DATA_DIR", PROJECT.parent / "shared/data")) / "samsum/test.json"
    return json.loads(path.read_text())[:n]


def test_repeated_prompts_are_generated_once_and_scored_against_all_references(tmp_path, tiny_model_dir):
    import sacrebleu
    from rouge_score import rouge_scorer

    a, b = samsum_rows(2)
    rows = []
    for k in range(3):  # interleaved: a, b, a, b, a, b (grouping does not need neighbours)
        rows += [a | {"summary": f"{a['summary']} (version {k})"}, b | {"summary": f"take {k}: {b['summary']}"}]
    rows.append(a | {"summary": " "})  # an empty reference leaves its group
    (tmp_path / "data/samsum").mkdir(parents=True)
    (tmp_path / "data/samsum/test.json").write_text(json.dumps(rows))
    cfg = eval_cfg(*tiny_overrides(tiny_model_dir, f"data.root={tmp_path / 'data'}", "eval.num_examples=5"))
    result = evaluate.run(cfg, str(tmp_path / "run"))

    preds = read_jsonl(tmp_path / "run/predictions.jsonl")
    assert len(preds) == 2 and [p["id"] for p in preds] == ["samsum-eval-0", "samsum-eval-1"]
    assert preds[0]["ids"] == ["samsum-eval-0", "samsum-eval-2", "samsum-eval-4"]
    assert preds[0]["references"] == [rows[i]["summary"] for i in (0, 2, 4)]
    assert preds[1]["references"] == [rows[i]["summary"] for i in (1, 3, 5)]
    assert all(p["reference"] == p["references"][0] for p in preds)  # what older readers use
    run = result["run"]
    assert run["num_examples"] == 2 and run["grouped_rows"] == 4 and run["num_references"] == 6
    assert run["excluded"] == {"empty_reference": ["samsum-eval-6"]}

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for p in preds:
        for key in ("rouge1", "rouge2", "rougeL"):
            best = max(100 * scorer.score(ref, p["output"])[key].fmeasure for ref in p["references"])
            assert p[key] == best
    assert result["metrics"]["eval/rougeL"] == pytest.approx(np.mean([p["rougeL"] for p in preds]))
    outputs, refs = [p["output"] for p in preds], [p["references"] for p in preds]
    streams = [list(s) for s in zip(*refs)]  # three references each: three full streams
    assert result["metrics"]["eval/bleu"] == pytest.approx(sacrebleu.corpus_bleu(outputs, streams).score)


def test_multi_reference_metrics():
    import sacrebleu

    outputs = ["the cat sat on the mat", "a dog barked"]
    refs = [["a cat was on a mat", "the cat sat on the mat"], ["the dog barked loudly"]]  # uneven counts
    assert reference_streams(refs) == [
        ["a cat was on a mat", "the dog barked loudly"],
        ["the cat sat on the mat", None],
    ]
    assert bleu(outputs, refs) == pytest.approx(
        sacrebleu.corpus_bleu(outputs, [[r[0] for r in refs], [refs[0][1], None]]).score
    )
    bleu_metric = sacrebleu.BLEU(effective_order=True)  # one sentence: sacrebleu's multi-reference sentence BLEU
    assert sacrebleu.corpus_bleu(outputs[:1], [[r] for r in refs[0]]).score == pytest.approx(100.0)
    assert bleu(outputs[:1], refs[:1]) == pytest.approx(bleu_metric.sentence_score(outputs[0], refs[0]).score)
    assert rouge(outputs, refs)["rougeL"][0] == pytest.approx(100.0)  # the best reference counts
    assert rouge(outputs, refs)["rougeL"][1] == rouge(outputs[1:], ["the dog barked loudly"])["rougeL"][0]
    low, high = corpus_bleu_ci(outputs, refs, Bootstrap(resamples=50))
    assert low <= high
    _, per = quality(outputs, refs, [None, None], "packaged:all-MiniLM-L6-v2")
    _, alone = quality(outputs[:1], [refs[0][1]], [None], "packaged:all-MiniLM-L6-v2")
    assert per["bertscore_f"][0] == pytest.approx(alone["bertscore_f"][0], abs=1e-4)  # max over references
    assert exact_match(["The answer is 7", "8", "9"], [["6", "7"], "8", None]) == [1.0, 1.0, 0.0]


def test_grouping_merges_same_prompts_only():
    msgs = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    records = [
        {"id": "0", "messages": msgs("p"), "reference": "r0", "answer": "1"},
        {"id": "1", "messages": msgs("q"), "reference": "r1", "answer": None},
        {"id": "2", "messages": msgs("p"), "reference": "r2", "answer": "2"},
        {"id": "3", "messages": [], "reference": "doc", "answer": None},
        {"id": "4", "messages": [], "reference": "doc", "answer": None},  # documents are never merged
    ]
    grouped = group_by_prompt(records)
    assert [g["ids"] for g in grouped] == [["0", "2"], ["1"], ["3"], ["4"]]
    assert grouped[0]["references"] == ["r0", "r2"] and grouped[0]["answers"] == ["1", "2"]
    assert grouped[0]["reference"] == "r0" and grouped[0]["answer"] == "1"
    assert "answers" not in grouped[1] and grouped[1]["references"] == ["r1"]


def test_bootstrap_resamples_groups_as_one_unit():
    rng = np.random.default_rng(0)
    values = rng.normal(50, 10, 30)
    boot = Bootstrap(resamples=2000)
    grouped = boot.mean_ci(values)
    rows, groups = np.repeat(values, 3), np.repeat(np.arange(30), 3).tolist()  # one row per reference, same score
    assert boot.mean_ci(rows, groups) == pytest.approx(grouped)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(boot.mean_ci(rows)) < 0.7 * width(grouped)  # rows as examples: about sqrt(3) too narrow
    other = values - 2 + rng.normal(0, 3, 30)
    t_grouped, t_rows = boot.paired(values, other), boot.paired(rows, np.repeat(other, 3), groups)
    assert t_rows["ci"] == pytest.approx(t_grouped["ci"]) and t_rows["n"] == t_grouped["n"] == 30
    assert t_rows["diff"] == pytest.approx(t_grouped["diff"])


def _sweep(root: Path, copies: int) -> Path:
    """Legacy results.json and predictions.jsonl of full attention and window: 12 prompts, `copies` rows each
    (ids in prompt order, so both sweeps draw the prompts in the same order)."""
    rng = np.random.default_rng(1)
    base = rng.normal(30, 8, 12)
    for method, m, shift in (("full", None, 0.0), ("window", 64, -3.0)):
        run = {"task": "generate", "method": method, "data": "samsum", "model": "tiny", "adapter": None, "m": m,
               "R": None, "K": None, "sinks": None, "num_examples": 12 * copies, "max_new_tokens": 8}  # fmt: skip
        write_json(root / method / "results.json", {"run": run, "metrics": {"eval/rougeL": 30 + shift}})
        rows = [
            {"id": f"samsum-eval-{i * copies + k:03d}", "messages": [{"role": "user", "content": f"dialogue {i}"}],
             "reference": f"summary {k}", "output": "x", "rougeL": float(base[i] + shift * (1 + 0.1 * (i % 4)))}
            for i in range(12) for k in range(copies)
        ]  # fmt: skip
        write_jsonl(root / method / "predictions.jsonl", rows)
    return root


def test_report_resamples_rows_of_one_prompt_together(tmp_path):
    from adore import report

    tests = {
        copies: report.paired_tests(report.collect(_sweep(tmp_path / str(copies), copies))).set_index("metric")
        for copies in (1, 3)
    }
    one, three = tests[1].loc["ROUGE-L"], tests[3].loc["ROUGE-L"]
    assert three["n"] == one["n"] == 12  # prompts, not rows
    assert (three["low"], three["high"]) == pytest.approx((one["low"], one["high"]))
    assert three["diff"] == pytest.approx(one["diff"])


def test_single_reference_scores_are_unchanged():
    """One reference as a text or as a one-element list: the same numbers, bit for bit (what runs gave before)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    outputs = ["the cat sat on a mat", "x y", "a dog barked at the mailman"]
    refs = ["the cat sat on the mat", "a b c d", "the dog barked"]
    listed = [[r] for r in refs]
    assert bleu(outputs, listed) == bleu(outputs, refs) == sacrebleu.corpus_bleu(outputs, [refs]).score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    assert rouge(outputs, listed)["rougeL"] == [
        100 * scorer.score(r, o)["rougeL"].fmeasure for o, r in zip(outputs, refs)
    ]
    model = "packaged:all-MiniLM-L6-v2"
    assert quality(outputs, listed, [None] * 3, model) == quality(outputs, refs, [None] * 3, model)
    boot = Bootstrap(resamples=200)
    assert corpus_bleu_ci(outputs, listed, boot) == corpus_bleu_ci(outputs, refs, boot)
    values = [1.0, 4.0, float("nan"), 2.5]
    assert boot.mean_ci(values, ["a", "b", "c", "d"]) == boot.mean_ci(values)
    assert boot.paired([1, 2, 3], [0, 2, 1], ["a", "b", "c"]) == boot.paired([1, 2, 3], [0, 2, 1])
    assert exact_match(["The answer is 1,024", "7"], ["1024", "8"]) == [1.0, 0.0]
