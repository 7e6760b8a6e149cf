"""The store of released KV that `recall` copies back from (ADORE.md, "Beyond the paper").

Every token's keys and values, all layers, are written here once, as its forward computed them (write-through:
a release then costs no copy, and a token released twice is stored once). Attention never reads the store: a
recalled token is copied into a free cache slot first. On CUDA it lives in pinned host memory, so device memory
stays at the cache's m + R + 1 slots; the device addresses it directly (unified addressing: a pinned page has one
address on both sides), so a copy either way is an ordinary indexing kernel reading or writing across the bus:
no staging, no host sync, and a CUDA graph can replay it. On the CPU it is a separate tensor of the same RAM,
which a report counts apart from the cache.

Layout (B, T, layers, kv_heads, head_dim): one token's KV of every layer is contiguous, so a page of tokens is one
block to copy, and the cache's advanced index `keys[:, rows, :, slots]` yields the same (B, r, layers, heads, dim).
`dtype` names the codec a vector of head_dim values is kept in (`CODECS`): "model" keeps the forward's dtype
(recall is then exact), "bfloat16" halves fp32 stores, "int8" a symmetric 8-bit code per value and a float16 scale
per (token, layer, head), "int4" two 4-bit codes a byte and a float16 minimum and step per (token, layer, head):
a store a seventh of fp32's at head_dim 64, so that under a memory budget the device cache, not the store, bounds
the batch (docs/recall.md).
"""

from __future__ import annotations

import torch

from adore.engine.columns import as_wide, at_columns


class Cast:
    """The vector as it is, in `dtype` (None: the model's): no parameters."""

    params = 0

    def __init__(self, dtype: torch.dtype | None = None):
        self.dtype = dtype

    def code_dtype(self, model_dtype):
        return self.dtype or model_dtype

    def code_width(self, dim: int) -> int:
        return dim

    def encode(self, tensor):
        return tensor.to(self.code_dtype(tensor.dtype)), None

    def decode(self, code, params, model_dtype):
        return code.to(model_dtype)


class Absmax8:
    """A symmetric 8-bit code per value, one float16 scale a vector (absmax / 127): absolute error at most half a
    step, plus the scale's rounding."""

    params = 1

    def code_dtype(self, model_dtype):
        return torch.int8

    def code_width(self, dim: int) -> int:
        return dim

    def encode(self, tensor):
        scale = tensor.abs().amax(-1).float().clamp(min=1e-8) / 127  # (..., ) per vector
        code = (tensor.float() / scale[..., None]).round().clamp(-127, 127).to(torch.int8)
        return code, scale.to(torch.float16)[..., None]

    def decode(self, code, params, model_dtype):
        return code.float().mul_(params.float()).to(model_dtype)  # in place: one temporary fewer, 2x faster


class MinMax4:
    """An asymmetric 4-bit code per value, two packed a byte, and a float16 minimum and step a vector ((max - min)
    / 15), as KIVI and Atom quantise KV per token group: absolute error at most half a step, plus the float16
    rounding of the minimum and the step (the codes are taken from the rounded ones). head_dim must be even."""

    params = 2

    def code_dtype(self, model_dtype):
        return torch.uint8

    def code_width(self, dim: int) -> int:
        if dim % 2:
            raise ValueError(f"method.store_dtype='int4' packs two values a byte: head_dim={dim} must be even")
        return dim // 2

    def encode(self, tensor):
        x = tensor.float()
        low = x.amin(-1).to(torch.float16)
        step = ((x.amax(-1) - low.float()) / 15).to(torch.float16).clamp_(min=2**-24)  # a constant vector: step > 0
        code = ((x - low.float()[..., None]) / step.float()[..., None]).round_().clamp_(0, 15).to(torch.uint8)
        return code[..., 0::2] | (code[..., 1::2] << 4), torch.stack([low, step], -1)  # (..., dim / 2), (..., 2)

    def decode(self, code, params, model_dtype):
        # each half written through a stride-2 view: 6x faster on a CPU than stacking the halves (docs/recall.md)
        values = code.new_empty(*code.shape[:-1], 2 * code.shape[-1], dtype=torch.float32)  # (..., dim)
        values[..., 0::2], values[..., 1::2] = code & 15, code >> 4
        params = params.float()
        return values.mul_(params[..., 1:2]).add_(params[..., 0:1]).to(model_dtype)


CODECS = {"model": Cast(), "bfloat16": Cast(torch.bfloat16), "int8": Absmax8(), "int4": MinMax4()}
STORE_DTYPES = tuple(CODECS)


def store_bytes_per_token(config, model_dtype: torch.dtype, kind: str) -> int:
    """Bytes one stored token takes: keys and values of every layer and KV head, codes and float16 parameters."""
    from adore.engine.cache import head_dim_of

    layers, heads, dim = config.num_hidden_layers, config.num_key_value_heads, head_dim_of(config)
    codec = CODECS[kind]
    itemsize = torch.empty(0, dtype=codec.code_dtype(model_dtype)).element_size()
    return 2 * layers * heads * (codec.code_width(dim) * itemsize + 2 * codec.params)


class KVStore:
    def __init__(self, cache, length: int, dtype: str = "model"):
        if dtype not in CODECS:
            raise ValueError(f"method.store_dtype={dtype!r}: choose one of {list(STORE_DTYPES)}")
        self.kind, self.codec = dtype, CODECS[dtype]
        layers, batch, heads, _, dim = cache.keys.shape
        self.shape = (batch, layers, heads, dim)
        self.model_dtype = cache.keys.dtype
        self.device = cache.keys.device
        self.pinned = self.device.type == "cuda"
        self.width = self.codec.code_width(dim)
        self.keys, self.values = self._empty(length), self._empty(length)
        self.key_params = self._empty(length, params=True) if self.codec.params else None
        self.value_params = self._empty(length, params=True) if self.codec.params else None

    def _empty(self, length: int, params: bool = False) -> torch.Tensor:
        B, L, H, _ = self.shape
        shape = (B, length, L, H, self.codec.params if params else self.width)
        dtype = torch.float16 if params else self.codec.code_dtype(self.model_dtype)
        host = torch.zeros(shape, dtype=dtype, pin_memory=self.pinned)
        return device_view(host, self.device) if self.pinned else host

    @property
    def length(self) -> int:
        return self.keys.shape[1]

    @property
    def exact(self) -> bool:
        """Whether a copy back gives the KV exactly as the forward computed it (the model's dtype)."""
        return self.kind == "model"

    @property
    def nbytes(self) -> int:
        tensors = [self.keys, self.values] + ([self.key_params, self.value_params] if self.codec.params else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def grow(self, length: int) -> None:
        """Room for `length` history columns (the session's history grew)."""
        if length <= self.length:
            return
        for name in ("keys", "values", "key_params", "value_params"):
            old = getattr(self, name)
            if old is None:
                continue
            new = self._empty(length, params=name.endswith("params"))
            new[:, : old.shape[1]] = old
            setattr(self, name, new)

    def write(self, cache, start: int, slots: torch.Tensor) -> None:
        """Store the tokens of history columns start .. start + n - 1 of every row, cached in `slots` (B, n)."""
        end = start + slots.shape[1]
        for name, cached in (("key", cache.keys), ("value", cache.values)):
            states = as_wide(cached)[:, cache.rows, :, slots].view(cached.dtype)  # (B, n, layers, kv_heads, head_dim)
            code, params = self.codec.encode(states)
            getattr(self, name + "s")[:, start:end] = code
            if params is not None:
                getattr(self, name + "_params")[:, start:end] = params

    def read_into(self, cache, cols: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Copy the stored tokens of history columns `cols` (B, r) into cache `slots` (B, r). Slots of picks not
        made are free ones (the session claimed them unlinked): what lands there is never attended. With `rows`
        (N,), `cols` and `slots` are (N,) too: the N tokens (rows[i], cols[i]) only, into their rows' slots."""
        if not cols.numel():
            return
        for name, cached in (("key", cache.keys), ("value", cache.values)):
            code = at_columns(getattr(self, name + "s"), cols, rows)  # (B, r | N, layers, kv_heads, width)
            params = getattr(self, name + "_params")
            # written through a (B, slots, layers, heads, dim) view: its two indexed dimensions lead, adjacent, so the
            # write takes the strided fast path (3x faster on a CPU than indexing dimensions 1 and 3 in place)
            slot_major = as_wide(cached).permute(1, 3, 0, 2, 4)
            decoded = self.codec.decode(
                code, None if params is None else at_columns(params, cols, rows), self.model_dtype
            )
            slot_major[cache.rows if rows is None else rows, slots] = as_wide(decoded)


def device_view(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CUDA tensor over the pinned host tensor `host` (no copy): kernels read and write host memory through it.
    Built with the CUDA array interface over the raw bytes (it has no bfloat16); the view keeps `host` alive."""

    class Bytes:
        keep = host
        __cuda_array_interface__ = {  # noqa: RUF012
            "shape": (host.numel() * host.element_size(),),
            "typestr": "|u1",
            "data": (host.data_ptr(), False),
            "version": 3,
        }

    with torch.cuda.device(device):
        raw = torch.as_tensor(Bytes(), device=device)
    return raw.view(host.dtype).view(host.shape)
