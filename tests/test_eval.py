"""eval.py composed from the real Hydra config, shrunk to the tiny model; one run with the packaged model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT, make_method, method_names, tiny_overrides
from conftest import compose_eval as eval_cfg

from adore.eval import job as evaluate
from adore.io import read_json, read_jsonl


@pytest.mark.parametrize("method", method_names())
def test_every_method_runs_through_eval(tmp_path, tiny, tiny_model_dir, method):
    built = make_method(method, 16, tiny[0])  # skips a method that cannot run on the tiny model
    cfg = eval_cfg(*tiny_overrides(tiny_model_dir, f"method={method}", "budget=16", "data=samsum"))
    result = evaluate.run(cfg, str(tmp_path))
    assert {"eval/bleu", "eval/rouge1", "eval/rouge2", "eval/rougeL"} <= set(result["metrics"])
    assert result["perf"]["perf/decode_tok_per_s"] > 0
    assert "CPU" in result["versions"]["device_name"]  # the machine its throughput was measured on
    run = result["run"]
    assert run["method"] == built.name and run["m"] == built.m and run["tag"] == built.tag
    assert run["label"] == built.label and run["training_free"] == built.training_free
    assert run["chat"] is True and run["has_answer"] is False  # SAMSum: conversations, no gold answer
    assert result["method"] == built.identity()  # every setting, so no two settings share a report row
    rows = read_jsonl(tmp_path / "predictions.jsonl")
    assert len(rows) == 3
    assert read_json(tmp_path / "results.json")["run"] == result["run"]
    repeated = [r["repeated_ngram_fraction"] for r in rows]  # degeneration of each output, and its mean
    assert all(0 <= v <= 1 for v in repeated)
    assert result["metrics"]["eval/repeated_ngram_fraction"] == pytest.approx(sum(repeated) / 3)


def test_rerun_skips_and_other_settings_do_not_overwrite(tmp_path, tiny_model_dir, capsys):
    cfg = eval_cfg(*tiny_overrides(tiny_model_dir, "method=window", "budget=8"))
    first = evaluate.run(cfg, str(tmp_path))
    again = evaluate.run(
        eval_cfg(*tiny_overrides(tiny_model_dir, "method=window", "budget=8", "eval.progress=true")), str(tmp_path)
    )
    assert "[skip]" in capsys.readouterr().out and again["finished_at"] == first["finished_at"]
    with pytest.raises(FileExistsError, match="eval.overwrite=true"):
        evaluate.run(eval_cfg(*tiny_overrides(tiny_model_dir, "method=window", "budget=9")), str(tmp_path))
    evaluate.run(
        eval_cfg(*tiny_overrides(tiny_model_dir, "method=window", "budget=9", "eval.overwrite=true")), str(tmp_path)
    )
    assert read_json(tmp_path / "results.json")["run"]["m"] == 9


def test_math_reports_accuracy(tmp_path, tiny_model_dir):
    result = evaluate.run(eval_cfg(*tiny_overrides(tiny_model_dir, "data=math")), str(tmp_path))
    assert "eval/accuracy" in result["metrics"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("method=window", None),
        ("budget=0", "budget=0"),
        ("method=window method.m=0", "method.m=0"),
        ("eval.batch_size=0", "eval.batch_size=0"),
        ("eval.num_examples=-1", "eval.num_examples=-1"),
        ("model.device=cuda", "model.device='cuda'"),
        ("model.dtype=float8", "model.dtype='float8'"),
        ("method=adore method.controller=/nope.pt", "method.controller"),
        ("sampling.temperature=0", "sampling.temperature=0"),
        ("eval.batch_size=100000000", "eval.batch_size=100000000 needs .* GiB of KV cache"),
        (
            "eval.max_prompt_tokens=8192",
            "eval.max_prompt_tokens=8192 .* context window of 8192 .* set eval.max_prompt_tokens=8128",
        ),
        ("task=ruler data=noise task.lengths=[16384]", "task.lengths=.16384.: .* context window of 8192"),
    ],
)
def test_bad_values_fail_before_any_model_loads(override, message, monkeypatch):
    if message is None:  # the valid config passes validation
        evaluate.validate(eval_cfg(*override.split()))
        return
    monkeypatch.setattr(evaluate, "load", lambda *a: pytest.fail("model loaded before validation"))
    with pytest.raises(ValueError, match=message.replace("(", "\\(")):
        evaluate.run(eval_cfg(*override.split()), "/tmp/never")


def test_unknown_task_names_the_choices():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="generate"):
        eval_cfg("task=translate")


def test_run_directory_names_carry_the_hyper_parameters():
    cfg = eval_cfg("method=adore", "method.m=64", "method.R=8", "data=chat")
    assert evaluate.method_tag(cfg.method) == "adore_m64_R8_untrained_seed0_rebuild_every8"  # the default policy
    assert evaluate.method_tag(eval_cfg("method=streaming", "budget=32").method) == "streaming_m32_s4"
    assert (
        evaluate.method_tag(eval_cfg("method=h2o", "budget=32", "method.recent_ratio=0.25").method) == "h2o_m32_r0.25"
    )
    assert evaluate.method_tag(eval_cfg("method=random", "budget=32", "method.seed=3").method) == "random_m32_seed3"
    trained = evaluate.method_tag(eval_cfg("method=adore_trained", "budget=32").method)
    assert trained.startswith("adore_m32_R16_controller_smollm2_probe_l20_k64-")  # every step: no `every` suffix
    # the shipped recipe recalls and releases by attention; runs of the paper's rules keep their names
    assert trained.endswith("_rebuildrecall_releaseattention")
    assert len(trained.removesuffix("_rebuildrecall_releaseattention").rsplit("-", 1)[1]) == 8  # the hash prefix
    before = evaluate.method_tag(
        eval_cfg("method=adore_trained", "budget=32", "method.R=4", "method.release=controller").method
    )
    assert before == trained.replace("_R16_", "_R4_").removesuffix("_releaseattention")  # its old runs' folders


def test_adore_late_is_the_late_question_recipe_by_name():
    """`method=adore_late` is `adore_trained` with the recipe's overrides: the same run, folder and row."""
    recipe = {
        "controller": "checkpoints/controller_smollm2_probe_l20_long_k64.pt",
        "R": 256,
        "page_size": 16,
        "tail_alone": 48,
        "release": "attention",
    }
    assert make_method("adore_late", 256).tag == make_method("adore_trained", 256, **recipe).tag
    assert make_method("adore_late", 512).R == 512  # R follows the budget


def test_every_method_setting_names_its_run_directory():
    """Two settings of any method never share a run directory: changing any field of any method changes its tag."""
    import dataclasses

    for name in method_names():
        method = make_method(name, 32)
        for f in dataclasses.fields(method):
            value = getattr(method, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if f.name not in method.identity():
                continue  # not a setting of this configuration (a trained controller has no seed)
            for changed in (value + 1, value + 2, value // 2) if isinstance(value, int) else (value / 2,):
                try:
                    other = dataclasses.replace(method, **{f.name: changed})
                except ValueError:
                    continue  # not a valid value of this knob (e.g. an even pooling width): try the next
                assert other.tag != method.tag, (name, f.name)
                break
            else:
                pytest.fail(f"no valid change of {name}.{f.name} found")


@pytest.mark.slow
def test_packaged_model_end_to_end_on_samsum(tmp_path):
    """The real SmolLM2 backbone, 2 SAMSum examples, through `python eval.py` as a user runs it."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    cmd = [
        sys.executable,
        "eval.py",
        "data=samsum",
        "eval.num_examples=2",
        "eval.max_new_tokens=24",
        "logger=none",
        "eval.progress=false",
        f"hydra.run.dir={tmp_path}",
        f"out_root={tmp_path}",
    ]
    subprocess.run(cmd, cwd=PROJECT, env=env, check=True, timeout=600)
    result = read_json(tmp_path / "results.json")
    for key in ("eval/bleu", "eval/rouge1", "eval/rouge2", "eval/rougeL", "eval/bertscore_f"):
        assert key in result["metrics"]
    assert result["metrics"]["eval/bertscore_f"] > 0 and result["perf"]["perf/decode_tok_per_s"] > 0
    outputs = [r["output"] for r in read_jsonl(tmp_path / "predictions.jsonl")]
    assert all(len(o) > 0 for o in outputs)


def test_a_lock_left_by_a_killed_job_on_another_host_is_taken_over(tmp_path, tiny_model_dir, capsys):
    import os

    (tmp_path / ".lock").write_text("node07 4242")  # a killed cluster job: another host, no heartbeat since
    os.utime(tmp_path / ".lock", (0, 0))
    cfg = eval_cfg(*tiny_overrides(tiny_model_dir, "method=window", "budget=8"))
    assert "eval/rougeL" in evaluate.run(cfg, str(tmp_path))["metrics"]
    assert "[lock] taking over" in capsys.readouterr().out and not (tmp_path / ".lock").exists()


def test_a_live_lock_is_waited_for_then_taken_over_when_its_heartbeat_stops(tmp_path, tiny_model_dir, capsys):
    import socket

    (tmp_path / ".lock").write_text(f"{socket.gethostname()} 1")  # pid 1 is alive, but nothing touches the lock
    cfg = eval_cfg(*tiny_overrides(tiny_model_dir, "method=window", "budget=8", "eval.lock_timeout_s=1"))
    assert "eval/rougeL" in evaluate.run(cfg, str(tmp_path))["metrics"]
    out = capsys.readouterr().out
    assert "[wait]" in out and "no heartbeat" in out and not (tmp_path / ".lock").exists()


def test_overwrite_takes_a_live_lock_at_once(tmp_path, tiny_model_dir, capsys):
    import socket

    (tmp_path / ".lock").write_text(f"{socket.gethostname()} 1")
    cfg = eval_cfg(*tiny_overrides(tiny_model_dir, "method=window", "budget=8", "eval.overwrite=true"))
    assert "eval/rougeL" in evaluate.run(cfg, str(tmp_path))["metrics"]
    assert "eval.overwrite=true" in capsys.readouterr().out


def test_a_damaged_results_file_is_named_and_overwrite_replaces_it(tmp_path, tiny_model_dir):
    (tmp_path / "results.json").write_text('{"run": {"task": "gen')
    cfg = eval_cfg(*tiny_overrides(tiny_model_dir, "method=window", "budget=8"))
    with pytest.raises(ValueError, match=rf"{tmp_path / 'results.json'} is damaged.*eval.overwrite=true"):
        evaluate.run(cfg, str(tmp_path))
    cfg = eval_cfg(*tiny_overrides(tiny_model_dir, "method=window", "budget=8", "eval.overwrite=true"))
    assert "eval/rougeL" in evaluate.run(cfg, str(tmp_path))["metrics"]


def run_eval_py(*args: str, cwd=PROJECT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | {"WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "eval.py", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_every_job_of_a_sweep_is_validated_before_the_first_starts(tmp_path):
    """window at m=4 is fine, StreamingLLM's 4 sinks need m > 4: nothing runs, one line names the problem."""
    done = run_eval_py("-m", "method=window,streaming", "budget=4", f"hydra.sweep.dir={tmp_path}/sweep", "logger=none")
    assert done.returncode != 0
    assert "no job was started" in done.stderr and "method.sinks=4 must be in [0, m=4)" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "sweep").exists()


def test_a_bad_value_is_one_line_without_a_traceback(tmp_path):
    done = run_eval_py("budget=0", f"hydra.run.dir={tmp_path}/run", "logger=none")
    assert (
        done.returncode != 0 and done.stderr.strip() == "error: budget=0 must be a positive integer (the KV budget m)"
    )


@pytest.mark.parametrize("content, why", [(b"not a checkpoint", "not a readable controller checkpoint"),
                                          (None, "not a readable controller checkpoint")])  # fmt: skip
def test_a_broken_controller_is_named_without_unsafe_advice(tmp_path, content, why):
    path = tmp_path / "controller.pt"
    if content is None:  # a truncated real checkpoint
        content = (PROJECT / "checkpoints/controller_smollm2_samsum_k64.pt").read_bytes()[:5000]
    path.write_bytes(content)
    with pytest.raises(ValueError, match=why) as err:
        evaluate.validate(eval_cfg("method=adore", f"method.controller={path}"))
    assert str(path) in str(err.value) and "weights_only" not in str(err.value)


def test_a_controller_of_another_backbone_is_refused_before_the_model_loads(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(evaluate, "load", lambda *a: pytest.fail("model loaded before validation"))
    paper = "method.controller=checkpoints/controller_smollm2_samsum_k64.pt"
    with pytest.raises(ValueError, match="reads embeddings of width 576, but this model's are 32 wide"):
        evaluate.run(eval_cfg(*tiny_overrides(tiny_model_dir, "method=adore", paper)), "/tmp/never")
    with pytest.raises(ValueError, match="reads the residual stream after layer 20, but this model has 2 layers"):
        evaluate.run(eval_cfg(*tiny_overrides(tiny_model_dir, "method=adore_trained")), "/tmp/never")


def test_result_files_get_the_users_umask(tmp_path):
    import stat

    from adore.io import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "results.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == 0o644


def test_a_long_prompt_keeps_its_head_and_end_and_the_cut_is_recorded(tmp_path, tiny, tiny_model_dir):
    from adore.data import DataSpec, load_records
    from adore.engine.text import encode_prompts

    record = load_records(DataSpec("samsum"), 1)[0]
    (full,), _ = encode_prompts(tiny[1], [record], None)
    (cut_ids,), (cut,) = encode_prompts(tiny[1], [record], 40)
    assert len(cut_ids) == 40 and cut == len(full) - 40
    assert cut_ids[:10] == full[:10] and cut_ids[-30:] == full[-30:]  # chat header + instruction, and the end
    result = evaluate.run(eval_cfg(*tiny_overrides(tiny_model_dir, "eval.max_prompt_tokens=40")), str(tmp_path))
    assert result["run"]["truncated_prompts"] == 3
    assert all(r["prompt_cut_tokens"] > 0 for r in read_jsonl(tmp_path / "predictions.jsonl"))


def test_empty_references_and_prompts_are_excluded_and_named(tmp_path, tiny_model_dir):
    import json

    rows = json.loads(
        (Path(os.environ.get("ADORE_DATA_DIR", PROJECT.parent / "shared/data")) / "samsum/test.json").read_text()
    )[:4]
    rows[1]["summary"] = "  "
    rows[2]["dialogue"], rows[2]["instruction"] = "", ""
    (tmp_path / "data/samsum").mkdir(parents=True)
    (tmp_path / "data/samsum/test.json").write_text(json.dumps(rows))
    cfg = eval_cfg(*tiny_overrides(tiny_model_dir, f"data.root={tmp_path / 'data'}", "eval.num_examples=4"))
    result = evaluate.run(cfg, str(tmp_path / "run"))
    assert result["run"]["excluded"] == {"empty_reference": ["samsum-eval-1"], "empty_prompt": ["samsum-eval-2"]}
    assert result["run"]["num_examples"] == 2


def test_an_unwritable_output_folder_fails_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "load", lambda *a: pytest.fail("model loaded before validation"))
    (tmp_path / "file").write_text("")  # a file where a folder should be: no user, root included, can write into it
    with pytest.raises(ValueError, match="cannot write run directory .*choose another out_root"):
        evaluate.run(eval_cfg("method=window"), str(tmp_path / "file" / "run"))
