"""A fixed-capacity KV cache of slots (ADORE.md §3.4, "matrix slicing").

Keys and values of all layers live in two preallocated tensors (layers, B, kv_heads, capacity, head_dim).
Which token sits in which slot is the session's business: before each forward it names the slots the new
tokens go to, with one index for all layers, and `update` writes them in place. Released slots are simply
overwritten later; nothing is ever concatenated.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


def kv_bytes_per_slot(config, dtype: torch.dtype) -> int:
    """Bytes one cached token takes: keys and values of every layer and KV head."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim_of(config) * itemsize


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class SlotCache(Cache):
    @classmethod
    def for_model(cls, config, batch_size: int, capacity: int, dtype, device) -> SlotCache:
        """A cache of `capacity` slots per row shaped for a model of `config`."""
        layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
        return cls(layers, batch_size, kv_heads, head_dim_of(config), capacity, dtype, device)

    def __init__(self, num_layers: int, batch_size: int, kv_heads: int, head_dim: int, capacity: int, dtype, device):
        super().__init__(layers=[])
        shape = (num_layers, batch_size, kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.rows = torch.arange(batch_size, device=device)[:, None]  # (B, 1)
        self.write_slots: torch.Tensor | None = None  # (B, q) slots of the tokens of the next forward

    def __len__(self) -> int:
        return self.keys.shape[0]

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Write the new (B, kv_heads, q, D) states into this step's slots; return the whole layer."""
        # advanced indices around a slice put the indexed dims first: (B, q, kv_heads, D)
        self.keys[layer_idx][self.rows, :, self.write_slots] = key_states.transpose(1, 2)
        self.values[layer_idx][self.rows, :, self.write_slots] = value_states.transpose(1, 2)
        return self.keys[layer_idx], self.values[layer_idx]

    def select(self, slots: torch.Tensor) -> None:
        """Keep the slots `slots` (B, new_capacity) in that order, all layers at once; -1 leaves a slot empty."""
        index = slots.clamp(min=0)[None, :, None, :, None].expand(
            self.keys.shape[0], -1, self.keys.shape[2], -1, self.keys.shape[4]
        )
        self.keys = self.keys.gather(3, index)
        self.values = self.values.gather(3, index)

    @torch.no_grad()
    def take_prefix(self, source: SlotCache, taken: int) -> None:
        """Hold copies of `source`'s first `taken` slots (every layer), in at least this cache's capacity: a
        session adopting another's prompt forward starts from its KV (Session.adopt)."""
        capacity = max(self.capacity, taken)
        for name in ("keys", "values"):
            tensor = getattr(source, name)
            copy = tensor.new_zeros(*tensor.shape[:3], capacity, tensor.shape[4])
            copy[..., :taken, :] = tensor[..., :taken, :]
            setattr(self, name, copy)

    @torch.no_grad()
    def fill_random(self) -> None:
        """Random keys and values in every slot: decode cost depends on shapes, not values (benchmarks)."""
        self.keys.normal_()
        self.values.normal_()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.capacity

    def get_max_length(self) -> int:
        return self.capacity

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.capacity, 0
