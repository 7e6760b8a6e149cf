"""The evaluation job behind `eval.py`: one (task, model, data, method) run → results.json + predictions.jsonl.

The task (conf/task/, chosen by `_target_`) does the work; this module validates the config before any
model loads, skips finished runs, writes results atomically and logs them. Runs are resumable: a run
directory that already holds results.json for the same settings is skipped, so a re-launched sweep only
does what is missing; different settings in the same directory are an error (nothing written is lost)
unless `eval.overwrite=true`.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import resource
import socket
from contextlib import contextmanager
from pathlib import Path

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

import adore
from adore.config import build
from adore.io import read_json, write_json, write_jsonl
from adore.metrics import PACKAGED_BERTSCORE, bertscore_model_path
from adore.models import load
from adore.tasks import Context
from adore.tracking import wandb_run

NOT_SETTINGS = ("eval.overwrite", "eval.progress", "eval.cuda_graphs", "logger", "budget")  # may change between a run and its resume
# (`budget` reaches a run only through method.m, which stays in the settings)


def method_tag(node) -> str:
    """Run-directory name of a method config, e.g. adore_m128_R4 (OmegaConf resolver)."""
    return build(node).tag


def model_tag(node) -> str:
    name = Path(str(node.name_or_path).replace("packaged:", "")).name
    return name + ("-ft" if node.get("adapter") else "")


def task_suffix(node) -> str:
    """"" for task generation, "-<task>[<task's own suffix>]" otherwise: other tasks on the same data get their own folder."""
    task = get_class(node._target_)
    if task.name == "generate":
        return ""
    return f"-{task.name}" + (task.dir_suffix(node) if hasattr(task, "dir_suffix") else "")


OmegaConf.register_new_resolver("method_tag", method_tag, replace=True)
OmegaConf.register_new_resolver("task_suffix", task_suffix, replace=True)
OmegaConf.register_new_resolver("model_tag", model_tag, replace=True)


def settings(cfg: DictConfig) -> dict:
    """The resolved config without the keys that may differ between a run and its resume."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in NOT_SETTINGS:
        head, _, tail = key.partition(".")
        if tail:
            plain.get(head, {}).pop(tail, None)
        else:
            plain.pop(head, None)
    return plain


def validate(cfg: DictConfig):
    """Build every cheap object first so a bad value fails before any model is loaded."""
    if not isinstance(cfg.budget, int) or cfg.budget < 1:
        raise ValueError(f"budget={cfg.budget!r} must be a positive integer (the KV budget m)")
    if not isinstance(cfg.get("task"), DictConfig) or "_target_" not in cfg.task:
        raise ValueError(f"task={cfg.get('task')!r} is not a task config: use task=generate, perplexity, stream or long")
    if cfg.eval.bertscore_model == PACKAGED_BERTSCORE:
        bertscore_model_path(cfg.eval.bertscore_model)
    return build(cfg.model), build(cfg.data), build(cfg.method), build(cfg.task)


def run(cfg: DictConfig, run_dir: str) -> dict:
    model_spec, data_spec, method, task = validate(cfg)
    run_dir = Path(run_dir)
    results_path = run_dir / "results.json"
    if results_path.exists():
        previous = read_json(results_path)
        if previous.get("settings") == settings(cfg):
            print(f"[skip] {run_dir} already holds results for these settings")
            return previous
        if not cfg.eval.overwrite:
            raise FileExistsError(
                f"{results_path} holds a run with other settings; pass eval.overwrite=true to replace it, "
                "or choose another directory with out_root=... or hydra.run.dir=..."
            )

    items = task.load(data_spec)
    with claim(run_dir) as mine:
        if not mine:
            print(f"[busy] {run_dir} is being run by another process (parallel sweep jobs); left to it")
            return {"metrics": {}, "busy": True}
        return _run(cfg, run_dir, model_spec, data_spec, method, task, items)


@contextmanager
def claim(run_dir: Path):
    """Yield True when this process may run in `run_dir`: parallel sweep jobs (joblib, SLURM) that map to
    one directory (e.g. full attention in a budget sweep) then run it once. A lock left by a dead process
    on this host is taken over."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / ".lock"
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            host, _, pid = lock.read_text().partition(" ")
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            yield False
            return
        with os.fdopen(fd, "w") as f:
            f.write(me)
        try:
            yield True
        finally:
            lock.unlink(missing_ok=True)
        return
    yield False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _run(cfg, run_dir, model_spec, data_spec, method, task, items) -> dict:
    torch.manual_seed(cfg.seed)
    model, tokenizer = load(model_spec)
    ctx = Context(model, tokenizer, model_spec, data_spec, run_dir, cfg.eval.progress, cfg.eval.cuda_graphs)
    start = dt.datetime.now()
    out = task.run(ctx, method, items)
    perf = out.perf | {
        "perf/wall_s": (dt.datetime.now() - start).total_seconds(),
        "perf/peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    result = {
        "run": {
            "task": task.name,
            "method": method.name,
            "label": method.label,
            "tag": method.tag,
            "training_free": method.training_free,
            "data": data_spec.name,
            "chat": any(r.get("messages") for r in items),  # conversations (else plain documents)
            "has_answer": any(r.get("answer") is not None for r in items),  # a gold answer: accuracy is scored
            "model": model_spec.name_or_path,
            "adapter": model_spec.adapter,
            "m": method.m,
            "R": method.R if method.m is not None else 0,
            "K": getattr(method, "K", None) or cfg.get("K"),  # ADORE: the K its controller was trained with
            **out.run,
        },
        "method": method.identity(),  # every setting of the method: the report never merges runs that differ
        "metrics": out.metrics,
        "perf": perf,
        "settings": settings(cfg),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "versions": {
            "adore": adore.__version__,
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "python": platform.python_version(),
            "device": str(model.device),
        },
        "finished_at": dt.datetime.now().isoformat(timespec="seconds"),
    }
    write_jsonl(run_dir / "predictions.jsonl", out.rows)
    write_json(run_dir / "results.json", result)  # last: its presence marks the run as finished
    scalars = {k: v for k, v in (out.metrics | perf).items() if isinstance(v, int | float)}
    with wandb_run(OmegaConf.to_container(cfg.logger), str(run_dir), run_dir.name, result["config"], "eval") as wb:
        if wb is not None:
            wb.log(scalars)
    shown = {k: v for k, v in scalars.items() if k.startswith(("eval/", "fidelity/kl", "fidelity/top1"))}
    line = "  ".join(f"{k.split('/')[1]}={v:.3g}" for k, v in (shown | {"perf/decode_tok_per_s": perf["perf/decode_tok_per_s"]}).items())
    print(f"[{task.name} {data_spec.name} {method.tag}] {line}  -> {run_dir}")
    return result
