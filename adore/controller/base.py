"""What every controller is (ADORE.md §2): its config, the scoring interface, checkpoints and shared helpers."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from adore.checks import check_integer
from adore.io import project_file


@dataclass
class ControllerConfig:
    d_model: int  # the LLM's embedding width (input of the projection)
    width: int = 64  # GRU state and position-embedding width
    mlp_hidden: int = 64
    num_buckets: int = 32
    max_distance: int = 4096  # distances beyond this share the last bucket
    # the longest distance (or, absolute, position) training saw; beyond it the bucket of this one: the buckets
    # past it were never trained and hold their random init. None: every bucket (checkpoints written before)
    trained_distance: int | None = None
    position: str = "relative"  # relative: p encodes t - i; absolute: p encodes i
    input_layer: int = 0  # x_i: 0 = the LLM's input embedding (paper); k = its residual stream after k layers
    query: bool = False  # add a query-dependent bilinear term (False: the paper's query-independent score)
    heads: int = 0  # > 0: an attention probe of that many heads instead of the GRU + MLP (adore/controller/probe.py)
    head_dim: int = 32  # the probe's query/key width per head

    def __post_init__(self):
        check_integer("controller d_model", self.d_model, fix=" (the backbone's embedding width)")
        check_integer("controller width", self.width)
        check_integer("controller mlp_hidden", self.mlp_hidden)
        check_integer("controller num_buckets", self.num_buckets, 4)
        check_integer("controller max_distance", self.max_distance, self.num_buckets // 2 + 1)  # log buckets above
        check_integer("controller trained_distance", self.trained_distance, 0, optional=True)
        if self.position not in ("relative", "absolute"):
            raise ValueError(f"controller position={self.position!r}: use 'relative' or 'absolute'")
        check_integer("controller input_layer", self.input_layer, 0, fix=" (0: input embeddings)")
        check_integer("controller heads", self.heads, 0, fix=" (0: the GRU controller)")
        check_integer("controller head_dim", self.head_dim)
        if self.heads and self.query:
            raise ValueError("controller heads > 0 (an attention probe) is query-dependent already: set query=false")


def bucketize(distance: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Log-spaced buckets (as T5's relative positions): exact below num_buckets/2, logarithmic above."""
    distance = distance.clamp(min=0)
    exact = num_buckets // 2
    log_bucket = (
        exact
        + (
            torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (num_buckets - exact)
        ).long()
    )
    return torch.where(distance < exact, distance, log_bucket.clamp(max=num_buckets - 1))


def head_dots(keys: torch.Tensor, query: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, k, heads) <q_h, k_{i,h}> per head, for keys (B, k, width) and one query per row (B, width), the width split
    into `heads` equal parts. Keys laid out token-minor (`token_minor`: a (B, width, T) tensor seen as (B, T, width),
    sliced to k <= T) are one bmm of each head's query against its (head_dim, k) keys: a read at memory bandwidth,
    3x faster on a CPU than the row-major paths below at 4k tokens. Row-major keys are read in place (einsum would
    first copy them into a head-major layout): on a GPU (or with gradients) one bmm against a block-diagonal query
    matrix; on a CPU a product and a sum over slices of about 2^20 floats, which stay in cache (docs/recall.md)."""
    B, k, width = keys.shape
    q = query.unflatten(-1, (heads, -1))  # (B, heads, head_dim)
    if k > 1 and keys.stride(1) == 1:  # token-minor: (B, width, k) with rows of k contiguous tokens
        by_head = keys.transpose(1, 2).reshape(B * heads, width // heads, k)  # a view: no copy
        return torch.bmm(q.reshape(B * heads, 1, -1), by_head).view(B, heads, k).transpose(1, 2).contiguous()
    if keys.is_cuda or keys.requires_grad or query.requires_grad:  # out= slices cannot carry gradients
        eye = torch.eye(heads, dtype=keys.dtype, device=keys.device)
        return torch.bmm(keys, (q[..., None] * eye[None, :, None, :]).reshape(B, width, heads))
    out = keys.new_empty(B, k, heads)
    per_head, q = keys.unflatten(-1, (heads, -1)), q[:, None]
    step = max(1, (1 << 20) // max(1, B * width))
    for start in range(0, k, step):
        torch.sum(per_head[:, start : start + step] * q, -1, out=out[:, start : start + step])
    return out


def token_minor(batch: int, length: int, width: int, device=None) -> torch.Tensor:
    """Zeros (batch, length, width) laid out (batch, width, length): each of the `width` features of every token
    contiguous, so that `head_dots` reads a history of keys at memory bandwidth. Writing a token's column is a
    strided write of `width` floats; gathering columns of it is slower than of a row-major tensor."""
    return torch.zeros(batch, width, length, device=device).transpose(1, 2)


def token_logsumexp(scores: torch.Tensor) -> torch.Tensor:
    """(B, 1, heads) log sum over the tokens of `scores` (B, T, heads), bit-identical to `scores.logsumexp(1,
    keepdim=True)` (the same max, the same exp-sum). The max is taken over contiguous blocks of 64 floats: a max over
    a strided middle dimension runs 15-20x slower on a CPU (docs/recall.md)."""
    B, T, heads = scores.shape
    group = max(1, 64 // heads)  # tokens a block holds
    whole = T - T % group
    top = None
    if whole:
        top = scores[:, :whole].reshape(B, whole // group, group * heads).amax(1).view(B, group, heads)
        top = top.amax(1, keepdim=True)
    if whole < T:
        rest = scores[:, whole:].amax(1, keepdim=True)
        top = rest if top is None else torch.maximum(top, rest)
    top = top.masked_fill(top.abs() == float("inf"), 0)  # as torch.logsumexp: all -inf stays -inf, no nan
    return (scores - top).exp_().sum(1, keepdim=True).log_().add_(top)


def newest_valid(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) whether each row of `valid` (B, T) has a valid column, and the index of its last one (0 if none); no
    host sync."""
    if valid.shape[1] == 1:  # a decode step's one column: five operations fewer, every step
        return valid[:, 0], torch.zeros(valid.shape[0], dtype=torch.long, device=valid.device)
    index = (valid.long() * torch.arange(1, valid.shape[1] + 1, device=valid.device)).argmax(1)
    return valid.any(1), index


class Controller(nn.Module):
    """Scores how likely each past token is among the current query's top-K keys.

    `Controller(config)` builds the kind the config names, as `pathlib.Path()` builds a `PosixPath`: the paper's
    GRU scorer (`heads` = 0, `GRUScorer`) or the attention probe (`heads` > 0, `AttentionProbe`). Either stores a
    state z_i per token when the token enters (`encode`), and scores tokens for a query (`logits`); what a query is
    differs by kind (`sequence_queries`). Pure PyTorch: no Lightning, no transformers.
    """

    config: ControllerConfig

    def __new__(cls, *args, **kwargs):
        if cls is Controller:  # the kind its config names (a copy or unpickling names its class itself)
            from adore.controller.gru import GRUScorer
            from adore.controller.probe import AttentionProbe

            config = args[0] if args else kwargs["config"]
            cls = AttentionProbe if config.heads else GRUScorer
        return super().__new__(cls)

    def __init__(self, config: ControllerConfig):
        super().__init__()
        self.config = config

    @property
    def state_width(self) -> int:
        """Width of the per-token state z_i the engine stores for every history token."""
        raise NotImplementedError

    def encode(
        self, embeds: torch.Tensor, valid: torch.Tensor, h: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """z_i of newly entered tokens, once each, and the state carried to the next call.

        embeds: (B, T, d_model) x_i (input embeddings or residual stream); valid: (B, T) bool, False for padding
        (skipped); h: the carried state of the previous call, None at the start. Returns z: (B, T, state_width)
        (zeros at invalid columns) and the new carried state.
        """
        raise NotImplementedError

    def sequence_queries(self, x: torch.Tensor, embeds: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The query of every position t of whole sequences, as `logits` reads it (training scores all of them at
        once). x: (B, T, d_model) what `encode` read; embeds: (B, T, d_model) input embeddings; z: `encode`'s."""
        raise NotImplementedError

    def logits(
        self,
        z: torch.Tensor,
        token_pos: torch.Tensor,
        query_pos: torch.Tensor,
        query: torch.Tensor | None = None,
        key_valid: torch.Tensor | None = None,
        columns: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(..., k) scores of the tokens of z (..., k, state_width) at token_pos (..., k) for the query at position
        query_pos (..., 1) or broadcastable, whose state is `query`. Higher: more likely in the query's top-K."""
        raise NotImplementedError

    def buckets(self, distance: torch.Tensor) -> torch.Tensor:
        """The learned bucket of each (integer) distance, capped at the longest one training saw: looked up in a
        table of every distance up to that cap (`bucketize` of each), one lookup where the formula takes a dozen
        operations, each over every history token of every row, every decode step."""
        table = self._bucket_table(distance.device)
        return table[distance.clamp(0, table.shape[0] - 1)]

    def _bucket_table(self, device) -> torch.Tensor:
        """bucketize(min(d, trained_distance)) for d = 0 .. the first distance past which every bucket is the same:
        the trained cap, or max_distance (the last bucket from there on). Rebuilt when the config or device moves."""
        c = self.config
        last = c.max_distance if c.trained_distance is None else min(c.trained_distance, c.max_distance)
        key = (last, c.num_buckets, c.max_distance, device)
        if getattr(self, "_table_key", None) != key:
            self._table = bucketize(torch.arange(last + 1, device=device), c.num_buckets, c.max_distance)
            self._table_key = key
        return self._table

    @property
    def distance_embedding(self) -> nn.Embedding:
        """The learned table indexed by `buckets` (a bias or an embedding per distance bucket)."""
        raise NotImplementedError

    @torch.no_grad()
    def extend_trained_distance(self, distance: int) -> None:
        """Record that training now reaches `distance`. The buckets past the old trained distance never trained:
        they start as the capped bucket they stood in for, so a controller trained further scores as before until
        training moves them. A fresh controller (no trained distance yet) just records it."""
        c = self.config
        if c.trained_distance is not None and distance > c.trained_distance:
            capped = int(bucketize(torch.tensor(c.trained_distance), c.num_buckets, c.max_distance))
            table = self.distance_embedding.weight
            table[capped + 1 :] = table[capped]
        c.trained_distance = distance if c.trained_distance is None else max(c.trained_distance, distance)

    def save(self, path, meta: dict | None = None) -> None:
        """`meta`: how it was trained (e.g. the labels' K), read back by `Controller.meta`."""
        torch.save({"config": asdict(self.config), "state_dict": self.state_dict(), "meta": meta or {}}, path)

    @staticmethod
    def meta(path) -> dict:
        return _read(path).get("meta", {})

    @staticmethod
    def config_of(path) -> ControllerConfig:
        return ControllerConfig(**_read(path)["config"])

    @classmethod
    def load(cls, path, map_location="cpu") -> Controller:
        """The controller of a checkpoint (`save`), of the kind its config names, in eval mode."""
        blob = _read(path, map_location)
        controller = Controller(ControllerConfig(**blob["config"]))
        if not isinstance(controller, cls):
            raise ValueError(f"{path} holds a controller of kind {type(controller).__name__}, not {cls.__name__}")
        try:
            controller.load_state_dict(blob["state_dict"])
        except RuntimeError as err:
            raise ValueError(
                f"{path}: its weights do not fit its own config ({str(err).splitlines()[0]}); retrain it"
            ) from None
        return controller.eval()


def continuable(path: str, fields: dict, key: str) -> str:
    """`path` (project-relative allowed) when it holds a controller whose config equals `fields` (ControllerConfig
    fields, `trained_distance` aside): one to train further as the recipe `fields` come from, so that the recipe's
    name still says what was trained. A ValueError naming the option `key` otherwise."""
    path = project_file(path)
    if not Path(path).is_file():
        raise ValueError(f"{key}={path!r} does not exist: pass a controller.pt (or null: a fresh controller)")
    saved = asdict(Controller.config_of(path))
    for name, value in fields.items():
        if name != "trained_distance" and saved.get(name) != value:
            raise ValueError(
                f"{key}={path} holds a controller with {name}={saved.get(name)!r}, but the recipe asks for "
                f"{value!r}: pass the recipe it was trained with (recipe={Controller.meta(path).get('recipe')})"
            )
    return path


def _read(path, map_location="cpu") -> dict:
    """A controller checkpoint's contents, or a ValueError naming the file (weights only: nothing is executed)."""
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a corrupt or truncated file; torch's message advises unsafe loading: not repeated
        raise ValueError(
            f"{path} is not a readable controller checkpoint ({type(err).__name__}): rebuild it with "
            "`python train.py stage=controller` or restore the file"
        ) from None
    if not isinstance(blob, dict) or not {"config", "state_dict"} <= set(blob):
        raise ValueError(
            f"{path} is not a controller checkpoint (no config / state_dict): pass controller.pt of a controller run"
        )
    return blob
