"""The evaluation job behind `eval.py`: one (model, data, method) run → results.json + predictions.jsonl.

Runs are resumable: a run directory that already holds results.json for the same settings is skipped, so
a re-launched sweep only does what is missing; different settings in the same directory are an error
(nothing written is lost) unless `eval.overwrite=true`.
"""

from __future__ import annotations

import datetime as dt
import platform
import resource
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

import adore
from adore.data import load_records
from adore.generate import generate
from adore.io import read_json, write_json, write_jsonl
from adore.metrics import PACKAGED_BERTSCORE, bertscore_model_path, quality
from adore.models import load
from adore.tracking import wandb_run

RUN_FIELDS = ("m", "R", "K", "sinks")
NOT_SETTINGS = ("eval.overwrite", "eval.progress", "eval.cuda_graphs", "logger", "budget")  # may change between a run and its resume
# (`budget` reaches a run only through method.m, which stays in the settings)


def method_tag(node) -> str:
    """Run-directory name of a method config, e.g. adore_m128_R4 (OmegaConf resolver)."""
    return build(node).tag


def model_tag(node) -> str:
    name = Path(str(node.name_or_path).replace("packaged:", "")).name
    return name + ("-ft" if node.get("adapter") else "")


OmegaConf.register_new_resolver("method_tag", method_tag, replace=True)
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
    ev = cfg.eval
    if not isinstance(cfg.budget, int) or cfg.budget < 1:
        raise ValueError(f"budget={cfg.budget!r} must be a positive integer (the KV budget m)")
    for key in ("batch_size", "max_new_tokens"):
        if not isinstance(ev[key], int) or ev[key] < 1:
            raise ValueError(f"eval.{key}={ev[key]!r} must be a positive integer")
    if ev.num_examples is not None and (not isinstance(ev.num_examples, int) or ev.num_examples < 1):
        raise ValueError(f"eval.num_examples={ev.num_examples!r} must be a positive integer or null (all)")
    if ev.max_prompt_tokens is not None and ev.max_prompt_tokens < 1:
        raise ValueError(f"eval.max_prompt_tokens={ev.max_prompt_tokens!r} must be positive or null")
    if ev.prefill_chunk is not None and ev.prefill_chunk < 1:
        raise ValueError(f"eval.prefill_chunk={ev.prefill_chunk!r} must be positive or null (whole prompt)")
    if cfg.task != "generate":
        raise ValueError(f"task={cfg.task!r} is not known: use task=generate")
    if ev.bertscore_model == PACKAGED_BERTSCORE:
        bertscore_model_path(ev.bertscore_model)
    return build(cfg.model), build(cfg.data), build(cfg.method), build(cfg.sampling)


def build(node):
    """`instantiate`, but a bad value surfaces as its own ValueError rather than Hydra's wrapper."""
    try:
        return instantiate(node)
    except InstantiationException as err:
        if isinstance(err.__cause__, (ValueError, FileNotFoundError)):
            raise err.__cause__ from None
        raise


def encode_prompts(tokenizer, records, max_prompt_tokens):
    """Chat-template token ids per record, left-truncated to the last `max_prompt_tokens`."""
    prompts = []
    for r in records:
        ids = tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        prompts.append(ids[-max_prompt_tokens:] if max_prompt_tokens else ids)
    return prompts


def left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in batch)
    ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in batch])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch])
    return ids, mask


def eos_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen = model.generation_config.eos_token_id
    ids.update(gen if isinstance(gen, list) else [gen])
    return sorted(i for i in ids if i is not None)


def run(cfg: DictConfig, run_dir: str) -> dict:
    model_spec, data_spec, method, sampling = validate(cfg)
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

    records = load_records(data_spec, cfg.eval.num_examples)
    if not records:
        raise ValueError(f"data={data_spec.name} split={data_spec.split} has no records")
    torch.manual_seed(cfg.seed)
    model, tokenizer = load(model_spec)
    prompts = encode_prompts(tokenizer, records, cfg.eval.max_prompt_tokens)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    outputs: dict[int, str] = {}
    stats = []
    eos = eos_ids(model, tokenizer)
    batches = [order[i : i + cfg.eval.batch_size] for i in range(0, len(order), cfg.eval.batch_size)]
    start = dt.datetime.now()
    for batch in tqdm(batches, desc=f"{data_spec.name} {method.tag}", disable=not cfg.eval.progress):
        ids, mask = left_pad([prompts[i] for i in batch], tokenizer.pad_token_id)
        gen = generate(model, method, ids, mask, cfg.eval.max_new_tokens, eos, tokenizer.pad_token_id, sampling,
                       cfg.eval.prefill_chunk, cuda_graphs=cfg.eval.cuda_graphs)
        stats.append(gen.stats)
        for row, i in enumerate(batch):
            outputs[i] = tokenizer.decode(gen.tokens[row, : gen.lengths[row]], skip_special_tokens=True).strip()
    wall_s = (dt.datetime.now() - start).total_seconds()

    texts = [outputs[i] for i in range(len(records))]
    summary, per_example = quality(
        data_spec.name, texts, [r["reference"] for r in records], [r["answer"] for r in records], cfg.eval.bertscore_model
    )
    total = lambda key: sum(s[key] for s in stats)  # noqa: E731
    perf = {
        "perf/prefill_s": total("prefill_s"),
        "perf/decode_s": total("decode_s"),
        "perf/wall_s": wall_s,
        "perf/prompt_tokens": total("prompt_tokens"),
        "perf/generated_tokens": total("generated_tokens"),
        "perf/decode_tok_per_s": total("decode_tokens") / max(total("decode_s"), 1e-9),
        "perf/prefill_tok_per_s": total("prompt_tokens") / max(total("prefill_s"), 1e-9),
        "perf/rebuilt_tokens": total("rebuilt_tokens"),
        "perf/peak_kv_bytes": max(s["peak_kv_bytes"] for s in stats),
        "perf/peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    result = {
        "run": {
            "task": cfg.task,
            "method": method.name,
            "data": data_spec.name,
            "model": model_spec.name_or_path,
            "adapter": model_spec.adapter,
            **{k: method_cfg.get(k) for k in RUN_FIELDS},
            "num_examples": len(records),
            "max_new_tokens": cfg.eval.max_new_tokens,
            "batch_size": cfg.eval.batch_size,
        },
        "metrics": {f"eval/{k}": v for k, v in summary.items()},
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
    rows = [
        {"id": r["id"], "messages": r["messages"], "reference": r["reference"], "answer": r["answer"], "output": texts[i]}
        | {k: v[i] for k, v in per_example.items()}
        for i, r in enumerate(records)
    ]
    write_jsonl(run_dir / "predictions.jsonl", rows)
    write_json(results_path, result)  # last: its presence marks the run as finished
    with wandb_run(OmegaConf.to_container(cfg.logger), str(run_dir), run_dir.name, result["config"], "eval") as wb:
        if wb is not None:
            wb.log(result["metrics"] | perf)
    line = "  ".join(f"{k.split('/')[1]}={v:.2f}" for k, v in (result["metrics"] | {"perf/decode_tok_per_s": perf["perf/decode_tok_per_s"]}).items())
    print(f"[{data_spec.name} {method.tag}] {line}  -> {run_dir}")
    return result
