"""Fixtures: a tiny random Llama (2 layers, GQA) saved to disk with the packaged model's tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread a worker (and its subprocesses): workers share the cores
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from adore.models import ModelSpec, load_tokenizer  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]


def tiny_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,  # the packaged SmolLM2's context window (eval checks prompts against it)
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="session")
def packaged_tokenizer():
    return load_tokenizer(ModelSpec())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, packaged_tokenizer) -> str:
    """A random 2-layer Llama with the packaged tokenizer, saved like any local model folder."""
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = tiny_config(len(packaged_tokenizer))
    config.bos_token_id = packaged_tokenizer.bos_token_id
    config.eos_token_id = packaged_tokenizer.eos_token_id
    config.pad_token_id = packaged_tokenizer.pad_token_id
    model = LlamaForCausalLM(config)
    # larger random weights give peaked, position-sensitive attention: release policies then matter
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    model.save_pretrained(folder)
    packaged_tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    from adore.models import load

    return load(ModelSpec(name_or_path=tiny_model_dir))


@pytest.fixture(scope="session")
def packaged():
    """The packaged SmolLM2-135M (the real backbone) and its tokenizer."""
    from adore.models import load

    return load(ModelSpec())


# ---- the real configs, composed once per call and shrunk (tests run the configs users run) ----------------
CONF = str(PROJECT / "conf")


def compose(config: str, *overrides: str, hydra: bool = False):
    """conf/<config>.yaml as `python <config>.py <overrides>` composes it (`hydra`: with the hydra node)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(CONF, version_base="1.3"):
        return hydra_compose(config, overrides=list(overrides), return_hydra_config=hydra)


def compose_eval(*overrides: str):
    """conf/eval.yaml as `python eval.py <overrides>` composes it, without a logger or progress bars."""
    return compose("eval", "logger=none", "eval.progress=false", *overrides)


def tiny_overrides(tiny_model_dir: str, *more: str) -> list[str]:
    """The tiny model and a few short examples; stored full-attention outputs go beside the model (per session)."""
    return [f"model.name_or_path={tiny_model_dir}", f"out_root={Path(tiny_model_dir).parent / 'outputs'}",
            "eval.num_examples=3", "eval.batch_size=2", "eval.max_new_tokens=6", "eval.bertscore_model=null", *more]  # fmt: skip


def method_names() -> list[str]:
    """Every method config (conf/method/*.yaml): parametrized suites run them all, so adding a method adds no line."""
    from adore.registry import method_names as names

    return names()


def make_method(name: str, m: int, model=None, **overrides):
    """The method of conf/method/<name>.yaml at budget m; skips the test when it cannot run on `model` (e.g. a
    trained controller whose width fits another backbone), or, given a model, when its config refuses a test's small
    budget (`adore_late` recalls m tokens a step in pages of 16: m a multiple of 16; test_eval builds every config)."""
    from adore.registry import build_method

    try:
        method = build_method(name, m, **overrides)
    except ValueError as why:
        if model is None or overrides:
            raise
        pytest.skip(f"method={name} does not run at m={m}: {why}")
    if model is not None:
        try:
            method.start(1, 4, model.device, model)
        except ValueError as why:
            pytest.skip(f"method={name} does not run on this model: {why}")
    return method
