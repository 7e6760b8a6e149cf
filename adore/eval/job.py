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
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.experimental.callback import Callback
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from adore.checks import check_integer, is_integer
from adore.config import build
from adore.engine.cache import kv_bytes_per_slot
from adore.engine.session import capacity_for
from adore.eval import runlock
from adore.eval.metrics import PACKAGED_BERTSCORE, bertscore_model_path
from adore.eval.tasks import Context
from adore.io import read_json, write_json, write_jsonl
from adore.models import DTYPES, device_name, load, load_config
from adore.registry import config_names
from adore.tracking import wandb_run
from adore.version import package_version

NOT_SETTINGS = (
    "eval.overwrite",
    "eval.progress",
    "eval.cuda_graphs",
    "eval.lock_timeout_s",
    "logger",
    "budget",
)  # may change between a run and its resume
# (`budget` reaches a run only through method.m, which stays in the settings)


SHOWN = 6  # task metrics in a run's one-line summary; per-cell ones (RULER depths, positions) stay in results.json


def method_tag(node) -> str:
    """Run-directory name of a method config, e.g. adore_m128_R4 (OmegaConf resolver). A bad value gives a
    placeholder here, so that `validate` reports it in one line instead of Hydra failing to name the folder."""
    try:
        return build(node).tag
    except (ValueError, FileNotFoundError):
        return "invalid-method"


def model_tag(node) -> str:
    name = Path(str(node.name_or_path).replace("packaged:", "")).name
    return name + ("-ft" if node.get("adapter") else "")


def task_suffix(node) -> str:
    """ "" for task generation, "-<task>[<task's own suffix>]" otherwise: other tasks on the same data get their own folder."""
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


def without_targets(node):
    """Settings compared without their `_target_` class paths: a class that moves to another module (as the
    packages did) runs the same settings, and its run folder still resumes."""
    if isinstance(node, dict):
        return {k: without_targets(v) for k, v in node.items() if k != "_target_"}
    return [without_targets(v) for v in node] if isinstance(node, list) else node


def validate(cfg: DictConfig):
    """Build every cheap object first so a bad value fails before any model is loaded."""
    check_integer("budget", cfg.budget, fix=" (the KV budget m)")
    if not isinstance(cfg.get("task"), DictConfig) or "_target_" not in cfg.task:
        raise ValueError(f"task={cfg.get('task')!r} is not a task config: use task=" + ", ".join(config_names("task")))
    if cfg.eval.bertscore_model == PACKAGED_BERTSCORE:
        bertscore_model_path(cfg.eval.bertscore_model)
    model_spec, data_spec, method, task = build(cfg.model), build(cfg.data), build(cfg.method), build(cfg.task)
    try:
        model_config = load_config(model_spec)
    except OSError as err:
        raise ValueError(f"model.name_or_path={model_spec.name_or_path!r}: its config cannot be read ({err})") from None
    method.check(model_config)  # e.g. a controller trained on another backbone
    check_context_window(model_config, task)
    check_memory(model_spec, model_config, method, task)
    return model_spec, data_spec, method, task


def check_context_window(config, task) -> None:
    """A sequence longer than the model's context window (`max_position_embeddings`) would be read at positions it
    was never trained on: refused now, naming the key to lower. A task with its own lengths checks them
    (`task.check_window`); the others, eval.max_prompt_tokens and the tokens generated after it."""
    window = getattr(config, "max_position_embeddings", None)
    if not is_integer(window):  # a config without one: nothing to check against
        return
    if hasattr(task, "check_window"):
        task.check_window(window)
        return
    prompt, new = getattr(task, "max_prompt_tokens", None), getattr(task, "max_new_tokens", None) or 0
    if prompt and prompt + new > window:
        raise ValueError(
            f"eval.max_prompt_tokens={prompt} and eval.max_new_tokens={new} pass the model's context window of "
            f"{window} tokens (max_position_embeddings): set eval.max_prompt_tokens={max(window - new, 1)} or less"
        )


def check_memory(model_spec, config, method, task) -> None:
    """A batch whose KV cache cannot fit the device fails now, not after the model loads. Counts the cache of the
    longest possible sequence (max_prompt_tokens + max_new_tokens) at the method's clamped capacity; weights aside."""
    length = (getattr(task, "max_prompt_tokens", None) or 0) + (getattr(task, "max_new_tokens", None) or 0)
    if not length:
        return
    batch = getattr(task, "batch_size", 1)
    slots = capacity_for(method, length)
    need = kv_bytes_per_slot(config, DTYPES[model_spec.dtype]) * batch * slots
    host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cuda = model_spec.device.startswith("cuda")
    have = torch.cuda.mem_get_info(torch.device(model_spec.device))[0] if cuda else host
    store = (
        0
        if method.m is None
        else method.rebuild_policy().store_bytes_for(config, DTYPES[model_spec.dtype]) * batch * length
    )
    if need + (0 if cuda else store) > have:  # on the CPU the cache and the store share one RAM
        raise ValueError(
            f"eval.batch_size={batch} needs {need / 2**30:.1f} GiB of KV cache ({batch} rows x {slots} slots)"
            + (f" and {store / 2**30:.1f} GiB of recall store" if store and not cuda else "")
            + f", more than the {have / 2**30:.1f} GiB free on {model_spec.device}: lower eval.batch_size or "
            "eval.max_prompt_tokens"
        )
    if store > host:
        raise ValueError(
            f"method.rebuild=recall stores {store / 2**30:.1f} GiB of KV ({batch} rows x {length} tokens), more than "
            f"the {host / 2**30:.1f} GiB of host memory free: lower eval.batch_size or set method.store_dtype=int8 or int4"
        )


USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError)  # a bad value or path: one line, no traceback


@dataclass
class Job:
    cfg: DictConfig
    run_dir: Path
    model_spec: object
    data_spec: object
    method: object
    task: object
    items: list


def prepare(cfg: DictConfig, run_dir: str) -> Job | dict:
    """Everything that can fail on the user's input, before any model loads: the finished result when the run
    is already done, else the job to run. Raises one of USER_ERRORS naming the value and the fix."""
    model_spec, data_spec, method, task = validate(cfg)
    run_dir = Path(run_dir)
    check_writable(run_dir)
    items = task.load(data_spec)
    previous = finished(cfg, run_dir)
    return previous if previous is not None else Job(cfg, run_dir, model_spec, data_spec, method, task, items)


def execute(job: Job) -> dict:
    with runlock.hold(job.run_dir, job.cfg.eval.lock_timeout_s, force=job.cfg.eval.overwrite) as waited:
        previous = finished(job.cfg, job.run_dir) if waited else None  # the holder we waited for may have finished it
        if previous is not None:
            return previous
        return _run(job.cfg, job.run_dir, job.model_spec, job.data_spec, job.method, job.task, job.items)


def run(cfg: DictConfig, run_dir: str) -> dict:
    job = prepare(cfg, run_dir)
    return execute(job) if isinstance(job, Job) else job


def check_writable(run_dir: Path) -> None:
    """An output folder that cannot be created or written fails now, not after the model has loaded. Nothing is
    left behind: a probe folder is made and removed in the deepest folder that exists."""
    import tempfile

    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "a file is in the way", str(existing))
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".adore-probe-"))
    except OSError as err:
        raise ValueError(
            f"cannot write run directory {run_dir} ({err.strerror}): choose another out_root=..."
        ) from None


def finished(cfg: DictConfig, run_dir: Path) -> dict | None:
    """The results already in `run_dir` for these settings (the run is skipped), else None.

    Other settings are an error unless eval.overwrite=true; an unreadable results.json is reported with its
    path and replaced only under eval.overwrite=true."""
    results_path = run_dir / "results.json"
    if not results_path.exists():
        return None
    try:
        previous = read_json(results_path)
    except ValueError as err:
        if cfg.eval.overwrite:
            return None
        raise ValueError(
            f"{results_path} is damaged ({err}): delete it, or pass eval.overwrite=true to run again over it"
        ) from None
    if without_targets(previous.get("settings")) == without_targets(settings(cfg)):
        print(f"[skip] {run_dir} already holds results for these settings")
        return previous
    if not cfg.eval.overwrite:
        raise FileExistsError(
            f"{results_path} holds a run with other settings; pass eval.overwrite=true to replace it, "
            "or choose another directory with out_root=... or hydra.run.dir=..."
        )
    return None


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
            "R": method.identity().get("R"),  # None for methods that rebuild nothing
            "K": getattr(method, "K", None) or cfg.get("K"),  # ADORE: the K its controller was trained with
            "excluded": getattr(items, "excluded", {}),  # records left out of scoring, by reason (ids)
            **out.run,
        },
        "method": method.identity(),  # every setting of the method: the report never merges runs that differ
        "metrics": out.metrics,
        "perf": perf,
        "settings": settings(cfg),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "versions": {
            "adore": package_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "python": platform.python_version(),
            "device": str(model.device),
            "device_name": device_name(model.device),  # throughput and x floor depend on the machine
        },
        "finished_at": dt.datetime.now().isoformat(timespec="seconds"),
    }
    if out.run.get("truncated_prompts"):
        print(f"[data] {out.run['truncated_prompts']} prompts were longer than max_prompt_tokens: their middle was cut "
              "(prompt_cut_tokens in predictions.jsonl)")  # fmt: skip
    write_jsonl(run_dir / "predictions.jsonl", out.rows)
    write_json(run_dir / "results.json", result)  # last: its presence marks the run as finished
    scalars = {k: v for k, v in (out.metrics | perf).items() if isinstance(v, int | float)}
    with wandb_run(OmegaConf.to_container(cfg.logger), str(run_dir), run_dir.name, result["config"], "eval") as wb:
        if wb is not None:
            wb.log(scalars)
    task_metrics = [(k, v) for k, v in scalars.items() if k.startswith("eval/")]  # a task's headline ones first
    more = f"  (+{len(task_metrics) - SHOWN} more in results.json)" if len(task_metrics) > SHOWN else ""
    fidelity = [(k, v) for k, v in scalars.items() if k in ("fidelity/kl", "fidelity/top1")]
    shown = [*task_metrics[:SHOWN], *fidelity, ("perf/decode_tok_per_s", perf["perf/decode_tok_per_s"])]
    line = "  ".join(f"{k.split('/')[1]}={v:.3g}" for k, v in shown) + more
    print(f"[{task.name} {data_spec.name} {method.tag}] {line}  -> {run_dir}")
    return result


class StartupChecks(Callback):
    """Hydra callback (conf/eval.yaml): the output folder is checked before Hydra writes into it, and before a
    multirun's first job starts every job is composed and validated, so that a sweep never dies half-way on a
    typo. A problem is one line per bad value, and nothing is started."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _writable_or_exit(Path(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _writable_or_exit(Path(config.hydra.sweep.dir))
        from hydra import compose
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.override_parser.overrides_parser import OverridesParser

        params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        overrides = parser.parse_overrides([*params, *config.hydra.overrides.task])
        jobs = BasicSweeper.split_arguments(overrides, None)[0]
        problems: dict[str, list[str]] = {}
        for job in jobs:
            try:
                validate(compose(config.hydra.job.config_name, overrides=list(job)))
            except USER_ERRORS as err:
                problems.setdefault(str(err), []).append(" ".join(job))
        if problems:
            lines = [f"error: {why}\n  in {len(js)} of {len(jobs)} jobs, e.g. {js[0]}" for why, js in problems.items()]
            sys.exit("\n".join(["no job was started: the sweep has invalid settings", *lines]))


def _writable_or_exit(folder: Path) -> None:
    try:
        check_writable(folder)
    except ValueError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.exit(f"error: {err}")
