"""The model and prompts a benchmark runs."""

from __future__ import annotations

import torch

from adore.data import data_root


def build_model(name: str, dtype: torch.dtype, device: str):
    """(model, tokenizer): a model `adore.models.load` knows, or `llama2-7b-random`, a Llama-2-7B-shaped model with
    random weights and no tokenizer (speed does not depend on the values) for GPU runs."""
    if name == "llama2-7b-random":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
            max_position_embeddings=8192,
        )
        with torch.device(device):
            model = LlamaForCausalLM(config).to(dtype)
        return model.eval(), None
    from adore.models import ModelSpec, load

    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    model, tokenizer = load(ModelSpec(name_or_path=name, dtype=dtype_name, device=device))
    return model, tokenizer


def prompts(tokenizer, vocab_size: int, batch: int, length: int) -> torch.Tensor:
    """(batch, length) ids: real text (WikiText-2 slices) when the tokenizer and the offline copy are there, else
    random ids."""
    path = data_root() / "wikitext-2/wiki.test.raw"
    if tokenizer is not None and path.exists():
        ids = tokenizer(path.read_text(encoding="utf-8")[: batch * length * 8], add_special_tokens=False)["input_ids"]
        if len(ids) >= batch * length:
            return torch.tensor(ids[: batch * length]).view(batch, length)
    return torch.randint(100, vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
