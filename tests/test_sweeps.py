"""Sweeps: a 2 x 2 `python eval.py -m` of the tiny model end to end, its report, resume (also under the joblib
launcher); every experiment preset (conf/experiment/) composes and validates at both sizes."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob

from adore import report
from adore.eval import job as evaluate
from adore.io import read_json
from adore.registry import method_names

PROJECT = Path(__file__).resolve().parents[1]
CONF = str(PROJECT / "conf")
PRESETS = sorted(p.stem for p in (PROJECT / "conf/experiment").glob("*.yaml"))
SIZED = sorted(
    p.removesuffix("_smoke") for p in PRESETS if p.endswith("_smoke")
)  # presets with a paper and a smoke size


def multirun(tiny_model_dir: str, out: Path, *more: str) -> subprocess.CompletedProcess:
    """The 2 x 2 sweep (window, StreamingLLM) x (m = 8, 12) on 2 SAMSum examples, as a user launches it."""
    cmd = [sys.executable, "eval.py", "-m", "method=window,streaming", "budget=8,12", "data=samsum",
           f"model.name_or_path={tiny_model_dir}", f"out_root={out}", f"hydra.sweep.dir={out}/sweep", "logger=none",
           "eval.progress=false", "eval.bertscore_model=null", "eval.num_examples=2", "eval.batch_size=2",
           "eval.max_new_tokens=4", *more]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def swept(tiny_model_dir, tmp_path_factory) -> tuple[Path, dict[Path, bytes]]:
    out = tmp_path_factory.mktemp("sweeps")
    multirun(tiny_model_dir, out)
    results = {p: p.read_bytes() for p in (out / "sweep").rglob("results.json")}
    return out, results


def test_sweep_writes_one_run_directory_per_setting(swept):
    out, results = swept
    tags = sorted(p.parent.name for p in results)
    assert tags == ["streaming_m12_s4", "streaming_m8_s4", "window_m12", "window_m8"]
    runs = [read_json(p)["run"] for p in results]
    assert sorted((r["method"], r["m"]) for r in runs) == [
        ("streaming", 8),
        ("streaming", 12),
        ("window", 8),
        ("window", 12),
    ]
    assert all((p.parent / "predictions.jsonl").exists() for p in results)


def test_report_on_the_sweep(swept, capsys):
    out, _ = swept
    assert report.main([str(out / "sweep")]) == 0
    markdown = (out / "sweep/report/tables.md").read_text()
    for label in ("Window (m=8)", "Window (m=12)", "StreamingLLM (m=8)", "StreamingLLM (m=12)"):
        assert f"| {label}" in markdown
    assert "## Fidelity to full attention" in markdown
    assert (out / "sweep/report/quality_vs_m.png").exists() and (out / "sweep/report/throughput_vs_m.png").exists()


def test_rerun_skips_every_finished_run_also_under_joblib(swept, tiny_model_dir):
    """Resume: the same sweep again, here through the joblib launcher (2 workers), only prints [skip]."""
    out, results = swept
    done = multirun(tiny_model_dir, out, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert (done.stdout + done.stderr).count("[skip]") == 4
    assert {p: p.read_bytes() for p in (out / "sweep").rglob("results.json")} == results


# -------------------------------------------------------------------------------------------------- presets


def preset_cfg(*overrides):
    return compose("eval", *overrides, hydra=True)


def sweep_lists(cfg) -> list[list[str]]:
    """The preset's swept values as override lists, one list per key (Hydra's basic sweeper takes their product);
    a `glob(...)` over a config group expands to the group's configs, as Hydra does."""
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()])
    lists = []
    for o in parsed:
        if isinstance(o.value(), Glob):
            values = o.value().filter(sorted(p.stem for p in (PROJECT / "conf" / o.get_key_element()).glob("*.yaml")))
        else:
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
        lists.append([f"{o.get_key_element()}={v}" for v in values])
    return lists


def every_value_once(lists: list[list[str]]) -> list[list[str]]:
    """Jobs that together use every swept value (the others at their first value): cheaper than the product."""
    first = [values[0] for values in lists]
    return [first[:i] + [v] + first[i + 1 :] for i, values in enumerate(lists) for v in values[1:]] + [first]


def test_every_preset_has_a_paper_and_a_smoke_size():
    assert {"quality", "throughput", "ablation_m", "ablation_R", "ablation_K"} <= set(SIZED)
    for name in SIZED:
        assert name in PRESETS, f"conf/experiment/{name}_smoke.yaml has no paper-size {name}.yaml"


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_and_every_job_validates(name, monkeypatch):
    """Each job of the sweep composes and passes eval's start-up checks (no model is loaded)."""
    monkeypatch.setattr(evaluate, "load", lambda *a: pytest.fail("model loaded"))
    cfg = preset_cfg(f"experiment={name}")
    base = name.removesuffix("_smoke")
    assert cfg.hydra.sweep.dir == f"outputs/{base}" + ("-smoke" if name.endswith("_smoke") else "")
    lists = sweep_lists(cfg)
    assert len(list(itertools.product(*lists))) >= 2
    for job in every_value_once(lists):
        job_cfg = preset_cfg(f"experiment={name}", *job)
        if base == "ablation_K":  # its controllers come from the train.py sweeps (docs/experiments.md)
            with pytest.raises(ValueError, match=rf"{cfg.hydra.sweep.dir}/train/controller_K{job_cfg.K}/controller.pt"):
                evaluate.validate(job_cfg)
        else:
            evaluate.validate(job_cfg)


def test_smoke_presets_are_small():
    for name in SIZED:
        cfg = preset_cfg(f"experiment={name}_smoke")
        jobs = len(list(itertools.product(*sweep_lists(cfg))))
        assert cfg.eval.num_examples <= 4 and cfg.eval.max_new_tokens <= 32 and jobs <= 3 * len(method_names()), name
