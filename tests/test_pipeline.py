"""`python pipeline.py` on the tiny model: every stage finds its input, and a killed run resumes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import PROJECT


def _list(*items: str) -> str:
    """A Hydra list override whose items are overrides themselves (quoted: they hold '=')."""
    return "[" + ",".join(f"'{item}'" for item in items) + "]"


def _pipeline(out, tiny_model_dir, *more):
    command = [
        sys.executable, "pipeline.py", "setting=finetuned", f"out={out}", "K=8", "train_data=samsum",
        "backbone_overrides=" + _list(f"model.name_or_path={tiny_model_dir}"),
        "finetune=" + _list("logger=none", "trainer.max_steps=2", "stage.datamodule.num_train=8", "stage.datamodule.num_val=2",
                            "stage.datamodule.max_length=256", "stage.datamodule.batch_size=2", "stage.module.lora.r=4", "train.threads=1"),
        "labels.data=[samsum,math]",
        "labels.overrides=" + _list("logger=none", "stage.datamodule.num_train=8", "stage.datamodule.max_length=256", "stage.module.h2o_k=16"),
        "labels.per_data={math:" + _list("stage.datamodule.max_length=128") + "}",  # one dataset's own overrides
        "controller.recipes=[paper,query]",
        "controller.overrides=" + _list("logger=none", "trainer.max_steps=2", "stage.datamodule.num_val=2", "stage.datamodule.batch_size=2"),
        "evaluation.data=[samsum]", "evaluation.budgets=[8]", "evaluation.baselines=[full,window]", "evaluation.R=[2]",
        "evaluation.overrides=" + _list("logger=none", "eval.num_examples=2", "eval.batch_size=2", "eval.max_new_tokens=4",
                                        "eval.bertscore_model=null", "eval.progress=false", "eval.diagnose=true"),
        *more,
    ]  # fmt: skip
    return subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_pipeline_runs_every_stage_and_resumes(tmp_path, tiny_model_dir):
    out = tmp_path / "pipe"
    first = _pipeline(out, tiny_model_dir)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert (out / "finetune" / "adapter").is_dir()
    for data in ("samsum", "math"):
        assert (out / f"labels_{data}" / "labels" / "labels.pt").is_file()
        labels_cfg = (out / f"labels_{data}" / "config.yaml").read_text()
        assert str(out / "finetune" / "adapter") in labels_cfg  # labels of the fine-tuned backbone
        assert f"max_length: {128 if data == 'math' else 256}" in labels_cfg
    for recipe in ("paper", "query"):
        meta_cfg = (out / f"controller_{recipe}" / "config.yaml").read_text()
        assert "labels_samsum" in meta_cfg and "labels_math" in meta_cfg  # both labels runs pooled
    results = [json.loads(p.read_text()) for p in (out / "eval").rglob("results.json")]
    tags = sorted(r["run"]["tag"] for r in results)
    assert len(results) == 6, tags  # full, window, and per recipe one ADORE per rebuild policy
    assert all(r["run"]["adapter"] == str(out / "finetune" / "adapter") for r in results)  # baselines too
    labels = {r["run"]["label"] for r in results if r["run"]["method"] == "adore"}
    assert labels == {"ADORE [paper]", "ADORE [query]", "ADORE [paper] + recall", "ADORE [query] + recall"}, labels

    # a run killed during the query controller: its output is gone, its checkpoint is there
    (out / "controller_query" / "controller.pt").unlink()
    second = _pipeline(out, tiny_model_dir)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "finetune: done" in second.stdout and "labels samsum: done" in second.stdout
    assert "controller query: resuming from" in second.stdout
    assert (out / "controller_query" / "controller.pt").is_file()
    assert "[skip]" in second.stdout  # finished evaluations are not run again


def test_overrides_of_a_dataset_not_labelled_fail_before_anything_runs(tmp_path):
    done = subprocess.run([sys.executable, "pipeline.py", f"out={tmp_path}", "labels.data=[samsum]",
                           "labels.per_data={chat:['stage.datamodule.max_length=1024']}"],
                          cwd=PROJECT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0 and "labels.per_data names ['chat']" in done.stderr
    assert not any(p.is_dir() for p in tmp_path.iterdir())


def test_unknown_rebuild_policy_fails_before_anything_runs(tmp_path):
    done = subprocess.run([sys.executable, "pipeline.py", f"out={tmp_path}", "evaluation.rebuild=[recall,copy]"],
                          cwd=PROJECT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0 and "evaluation.rebuild has 'copy'" in done.stderr
    assert not any(p.is_dir() for p in tmp_path.iterdir())


def test_unknown_recipe_fails_before_anything_runs(tmp_path):
    done = subprocess.run([sys.executable, "pipeline.py", f"out={tmp_path}", "controller.recipes=[nope]"],
                          cwd=PROJECT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0 and "controller.recipes has 'nope'" in done.stderr
    assert not any(p.is_dir() for p in tmp_path.iterdir())  # no stage started
