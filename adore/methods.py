"""Release policies. Each is a score over history tokens; the session keeps the m highest (ADORE.md §3).

Adding a method = a dataclass with `score(session, cols)`; optional hooks update its state. One loop
(`adore.session.Session.feed`) serves all of them. `m=None` means no budget (full attention).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from adore.controller import Controller, ControllerConfig

KEEP = 1e9  # a score bonus that no learned or accumulated score reaches: "always keep"


@dataclass
class Method:
    m: int | None = None
    R: ClassVar[int] = 0  # tokens rebuilt per step (ADORE only)
    name: ClassVar[str] = "method"
    needs_attention: ClassVar[str | None] = None  # "sum" / "last": the session records attention weights

    def __post_init__(self):
        if self.m is not None and (not isinstance(self.m, int) or self.m < 1):
            raise ValueError(f"method.m={self.m!r} must be a positive integer (the KV budget), or null for no budget")

    def reset(self, session) -> None:
        """Allocate per-batch state at the start of a session."""

    def grow_history(self, session, extra: int) -> None:
        """The session's history grew by `extra` columns; grow per-token state alike."""

    def before_forward(self, session, cols: torch.Tensor, valid: torch.Tensor) -> None:
        """New tokens (history columns `cols`, (B, n)) are about to be fed."""

    def observe(self, session, cols: torch.Tensor, valid: torch.Tensor, attention: torch.Tensor | None) -> None:
        """After the forward, before release; `attention` is (B, C) per-slot mass when `needs_attention`."""

    def score(self, session, cols: torch.Tensor) -> torch.Tensor:
        """(B, k) scores of the history tokens `cols` (B, k) for the current query; higher = keep."""
        raise NotImplementedError

    @property
    def tag(self) -> str:
        """Short name with hyper-parameters, used for run directories."""
        return self.name if self.m is None else f"{self.name}_m{self.m}"


def _positions(session, cols):
    return session.hist_pos.gather(1, cols)


@dataclass
class Full(Method):
    """No budget: every token stays (the reference all others are compared with)."""

    name: ClassVar[str] = "full"

    def __post_init__(self):
        if self.m is not None:
            raise ValueError(f"method=full keeps every token; got method.m={self.m}: use method=window for a budget")

    def score(self, session, cols):
        return _positions(session, cols).float()


@dataclass
class Window(Method):
    """The m most recent tokens."""

    m: int = 128
    name: ClassVar[str] = "window"

    def score(self, session, cols):
        return _positions(session, cols).float()


@dataclass
class Streaming(Method):
    """StreamingLLM: the first `sinks` tokens (attention sinks) plus the most recent."""

    m: int = 128
    sinks: int = 4
    name: ClassVar[str] = "streaming"

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.sinks < self.m:
            raise ValueError(f"method.sinks={self.sinks} must be in [0, m={self.m}): sinks plus at least one recent token")

    def score(self, session, cols):
        pos = _positions(session, cols)
        return pos.float() + KEEP * (pos < self.sinks)

    @property
    def tag(self):
        return f"{self.name}_m{self.m}_s{self.sinks}"


@dataclass
class H2O(Method):
    """Heavy hitters (largest attention mass accumulated over all queries so far) plus recent tokens.

    One decision for all layers and heads (uniform scheduling, like ADORE), so the mass is summed over both.
    """

    m: int = 128
    recent_ratio: float = 0.5  # share of m reserved for the most recent tokens
    name: ClassVar[str] = "h2o"
    needs_attention: ClassVar[str] = "sum"

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"method.recent_ratio={self.recent_ratio} must be in [0, 1]")

    def reset(self, session):
        self.mass = torch.zeros(session.hist_ids.shape, dtype=torch.float32, device=session.device)

    def grow_history(self, session, extra):
        self.mass = torch.cat([self.mass, self.mass.new_zeros(self.mass.shape[0], extra)], 1)

    def observe(self, session, cols, valid, attention):
        held = session.slot_valid
        self.mass.scatter_add_(1, session.slot_col.clamp(min=0), attention.float() * held)

    def score(self, session, cols):
        recent = max(1, int(round(self.m * self.recent_ratio)))
        is_recent = _positions(session, cols) > session.query_pos - recent
        return self.mass.gather(1, cols) + KEEP * is_recent

    @property
    def tag(self):
        return f"{self.name}_m{self.m}_r{self.recent_ratio:g}"


@dataclass
class Random(Method):
    """Random release (the newest token is always kept): a floor every policy should beat.

    Each token gets a fixed pseudo-random priority from (seed, position, id), so a row's choices do not
    depend on the other rows of its batch.
    """

    m: int = 128
    seed: int = 0
    name: ClassVar[str] = "random"

    def score(self, session, cols):
        pos = _positions(session, cols)
        ids = session.hist_ids.gather(1, cols)
        priority = ((pos * 1103515245 + ids * 12345 + self.seed * 2654435761 + 1013904223) % 2**31).float() / 2**31
        return priority + KEEP * (pos == session.query_pos)


@dataclass
class Adore(Method):
    """ADORE: the GRU controller's scores decide release, and the top-R released tokens are rebuilt.

    `controller` is a checkpoint from `train.py stage=controller`; None builds a fresh random controller
    (seeded) so the engine runs before any training. R=0 is the no-rebuild ablation.
    """

    m: int = 128
    R: int = 4
    controller: str | None = None
    seed: int = 0
    config: dict = field(default_factory=dict)  # ControllerConfig fields for a fresh controller
    name: ClassVar[str] = "adore"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.R, int) or self.R < 0:
            raise ValueError(f"method.R={self.R!r} must be a non-negative integer (tokens rebuilt per step)")
        if self.controller is not None:
            from pathlib import Path

            project_path = Path(__file__).resolve().parents[1] / self.controller
            if not Path(self.controller).is_file() and project_path.is_file():
                self.controller = str(project_path)
            if not Path(self.controller).is_file():
                raise ValueError(
                    f"method.controller={self.controller!r} does not exist: pass controller.pt from a "
                    "`python train.py stage=controller` run, or null for an untrained controller"
                )
        self.net: Controller | None = None
        self.K = Controller.meta(self.controller).get("K") if self.controller is not None else None  # labels' top-K

    def reset(self, session):
        if self.net is None:
            if self.controller is not None:
                self.net = Controller.load(self.controller)
            else:
                with torch.random.fork_rng():
                    torch.manual_seed(self.seed)
                    self.net = Controller(ControllerConfig(d_model=session.model.config.hidden_size, **self.config))
        self.net = self.net.to(session.device).eval()
        self.z = torch.zeros(*session.hist_ids.shape, self.net.config.width, device=session.device)  # (B, T, width)
        self.h = None  # (B, width) GRU state after the last fed token

    def grow_history(self, session, extra):
        self.z = torch.cat([self.z, self.z.new_zeros(self.z.shape[0], extra, self.z.shape[2])], 1)

    def observe(self, session, cols, valid, attention):
        """z_i = GRU(x_i, z_{i-1}) for the new tokens, once, when they enter."""
        embeds = session.model.get_input_embeddings()(session.hist_ids.gather(1, cols)).float()
        z, self.h = self.net.encode(embeds, valid, self.h)
        self.z[:, cols[0]] = z

    def score(self, session, cols):
        z = self.z.gather(1, cols[..., None].expand(-1, -1, self.z.shape[2]))
        return self.net.logits(z, _positions(session, cols), session.query_pos)

    @property
    def tag(self):
        return f"{self.name}_m{self.m}_R{self.R}" + ("" if self.controller else "_untrained")


class _RecordLast(Full):
    needs_attention: ClassVar[str] = "last"

    def observe(self, session, cols, valid, attention):
        self.attention = attention


@dataclass
class Oracle(Adore):
    """ADORE's loop scored by the true full-attention weights of the current query (the controller's target).

    A shadow full-attention session over the same tokens gives, at every step, the attention of the newest
    query on every past token, summed over heads and layers: its top-m is the ideal top-K cache.
    """

    name: ClassVar[str] = "oracle"

    def reset(self, session):
        from adore.session import Session

        self.shadow = Session(session.model, _RecordLast(), session.batch_size, session.hist_ids.shape[1])
        self.weights = torch.zeros(session.hist_ids.shape, dtype=torch.float32, device=session.device)

    def grow_history(self, session, extra):
        self.weights = torch.cat([self.weights, self.weights.new_zeros(self.weights.shape[0], extra)], 1)

    def before_forward(self, session, cols, valid):
        self.shadow.feed(session.hist_ids.gather(1, cols), valid)
        held = self.shadow.slot_valid
        self.weights.zero_().scatter_add_(1, self.shadow.slot_col.clamp(min=0), self.shadow.method.attention.float() * held)

    def observe(self, session, cols, valid, attention):
        pass

    def score(self, session, cols):
        return self.weights.gather(1, cols)

    @property
    def tag(self):
        return f"{self.name}_m{self.m}_R{self.R}"
