"""The floor: a bare forward over a cache of fixed size, the best any engine can do at that size."""

from __future__ import annotations

import torch

from adore.bench.turns import Decoder
from adore.engine.attention import PLAIN_CAUSAL, register
from adore.engine.cache import SlotCache


@torch.no_grad()
def start_floor(model, batch: int, cached: int, new_tokens: int) -> Decoder:
    """A bare forward, one token per row, over a cache holding `cached` tokens (random keys and values): no
    release, no bookkeeping, only the model and an argmax, through the engine's attention kernel. Each step
    overwrites the same slot, so the cache holds the same number of tokens at every step. Returned not yet run,
    like `start_method`."""
    config, device = model.config, model.device
    cache = SlotCache.for_model(config, batch, cached + 1, model.dtype, device)
    cache.fill_random()
    cache.write_slots = torch.full((batch, 1), cached, device=device)
    model.set_attn_implementation(register())
    pos = torch.full((batch, 1), cached, device=device)

    def steps():
        token = torch.randint(100, config.vocab_size, (batch, 1), device=device)
        kwargs = dict(attention_mask=PLAIN_CAUSAL, cache=cache, use_cache=True, logits_to_keep=1)  # attend to all
        going = torch.ones(batch, dtype=torch.bool, device=device)
        for step in range(new_tokens + 2):  # two untimed warm-up steps first
            token = model(input_ids=token, position_ids=pos, **kwargs).logits[:, -1].argmax(-1, keepdim=True)
            if step >= 1:
                yield token[:, 0], going

    row = {
        "method": f"floor_{cached}",
        "batch": batch,
        "prefill_s": None,
        "kv_bytes_decode": cache.nbytes,
        "kv_bytes_peak": cache.nbytes,
        "rebuilt_tokens": 0,
        "rebuilt_per_step": 0.0,
        "rebuilt_kept": None,
    }
    return Decoder(row, steps(), batch, new_tokens, device)
