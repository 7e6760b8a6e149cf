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
`dtype`: "model" keeps the forward's dtype (recall is then exact), "bfloat16" halves fp32 stores, "int8" stores
a symmetric 8-bit code per value and a float16 scale per (token, layer, head) (absmax / 127).
"""

from __future__ import annotations

import torch

from adore.engine.columns import at_columns

STORE_DTYPES = ("model", "bfloat16", "int8")


def store_bytes_per_token(config, model_dtype: torch.dtype, kind: str) -> int:
    """Bytes one stored token takes: keys and values of every layer and KV head (int8: + a float16 scale each)."""
    from adore.engine.cache import head_dim_of

    layers, heads, dim = config.num_hidden_layers, config.num_key_value_heads, head_dim_of(config)
    if kind == "int8":
        return 2 * layers * heads * (dim + 2)
    itemsize = 2 if kind == "bfloat16" else torch.empty(0, dtype=model_dtype).element_size()
    return 2 * layers * heads * dim * itemsize


class KVStore:
    def __init__(self, cache, length: int, dtype: str = "model"):
        if dtype not in STORE_DTYPES:
            raise ValueError(f"method.store_dtype={dtype!r}: choose one of {list(STORE_DTYPES)}")
        self.kind = dtype
        layers, batch, heads, _, dim = cache.keys.shape
        self.shape = (batch, layers, heads, dim)
        self.model_dtype = cache.keys.dtype
        self.device = cache.keys.device
        self.pinned = self.device.type == "cuda"
        self.dtype = {"model": self.model_dtype, "bfloat16": torch.bfloat16, "int8": torch.int8}[dtype]
        self.keys, self.values = self._empty(length), self._empty(length)
        self.key_scale = self._empty(length, scale=True) if dtype == "int8" else None
        self.value_scale = self._empty(length, scale=True) if dtype == "int8" else None

    def _empty(self, length: int, scale: bool = False) -> torch.Tensor:
        B, L, H, D = self.shape
        shape = (B, length, L, H) if scale else (B, length, L, H, D)
        dtype = torch.float16 if scale else self.dtype
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
        tensors = [self.keys, self.values] + ([self.key_scale, self.value_scale] if self.key_scale is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def grow(self, length: int) -> None:
        """Room for `length` history columns (the session's history grew)."""
        if length <= self.length:
            return
        for name in ("keys", "values", "key_scale", "value_scale"):
            old = getattr(self, name)
            if old is None:
                continue
            new = self._empty(length, scale=name.endswith("scale"))
            new[:, : old.shape[1]] = old
            setattr(self, name, new)

    def write(self, cache, start: int, slots: torch.Tensor) -> None:
        """Store the tokens of history columns start .. start + n - 1 of every row, cached in `slots` (B, n)."""
        end = start + slots.shape[1]
        for name, cached in (("key", cache.keys), ("value", cache.values)):
            code, scale = self._encode(cached[:, cache.rows, :, slots])  # (B, n, layers, kv_heads, head_dim)
            getattr(self, name + "s")[:, start:end] = code
            if scale is not None:
                getattr(self, name + "_scale")[:, start:end] = scale

    def read_into(self, cache, cols: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Copy the stored tokens of history columns `cols` (B, r) into cache `slots` (B, r). Slots of picks not
        made are free ones (the session claimed them unlinked): what lands there is never attended. With `rows`
        (N,), `cols` and `slots` are (N,) too: the N tokens (rows[i], cols[i]) only, into their rows' slots."""
        if not cols.numel():
            return
        for name, cached in (("key", cache.keys), ("value", cache.values)):
            code = at_columns(getattr(self, name + "s"), cols, rows)  # (B, r | N, layers, kv_heads, head_dim)
            scale = getattr(self, name + "_scale")
            # written through a (B, slots, layers, heads, dim) view: its two indexed dimensions lead, adjacent, so the
            # write takes the strided fast path (3x faster on a CPU than indexing dimensions 1 and 3 in place)
            slot_major = cached.permute(1, 3, 0, 2, 4)
            decoded = self._decode(code, None if scale is None else at_columns(scale, cols, rows))
            slot_major[cache.rows if rows is None else rows, slots] = decoded

    def _encode(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.kind != "int8":
            return tensor.to(self.dtype), None
        scale = tensor.abs().amax(-1).float().clamp(min=1e-8) / 127  # (B, n, layers, heads)
        code = (tensor.float() / scale[..., None]).round().clamp(-127, 127).to(torch.int8)
        return code, scale.to(torch.float16)

    def _decode(self, code: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        if scale is None:
            return code.to(self.model_dtype)
        return (code.float() * scale.float()[..., None]).to(self.model_dtype)


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
