from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from adore.controller import Controller, ControllerConfig
from adore.methods.base import Method, State, file_identity
from adore.methods.oracle import check_R

PROJECT = Path(__file__).resolve().parents[2]


@dataclass
class Adore(Method):
    """ADORE: the GRU controller's scores decide release, and the top-R released tokens are rebuilt (ADORE.md §2-3).

    `controller` is a checkpoint from `train.py stage=controller`; None builds a fresh random controller
    (seeded) so the engine runs before any training: it is labelled "untrained" everywhere. R=0 is the
    no-rebuild ablation.
    """

    m: int = 128
    R: int = 4
    controller: str | None = None
    seed: int = 0
    config: dict = field(default_factory=dict)  # ControllerConfig fields for a fresh controller
    name: ClassVar[str] = "adore"
    training_free: ClassVar[bool] = False
    needs: ClassVar[frozenset[str]] = frozenset({"embeddings"})
    short: ClassVar[dict] = {"controller": ""}

    def __post_init__(self):
        super().__post_init__()
        check_R(self.R, self.m)
        if self.controller is not None:
            in_project = PROJECT / self.controller
            if not Path(self.controller).is_file() and in_project.is_file():
                self.controller = str(in_project)
            if not Path(self.controller).is_file():
                raise ValueError(
                    f"method.controller={self.controller!r} does not exist: pass controller.pt from a "
                    "`python train.py stage=controller` run, or null for an untrained controller"
                )
        self.net: Controller | None = None  # loaded on first use
        self.K = Controller.meta(self.controller).get("K") if self.controller is not None else None  # labels' top-K

    @property
    def label(self) -> str:
        return "ADORE" if self.controller else "ADORE (untrained)"

    def identity(self) -> dict:
        if self.controller is None:  # a random controller: its seed and shape are what it is
            return {
                "name": self.name,
                "m": self.m,
                "R": self.R,
                "controller": "untrained",
                "seed": self.seed,
                "config": self.config,
            }
        return {"name": self.name, "m": self.m, "R": self.R, "controller": file_identity(self.controller)}

    def check(self, model_config):
        width = Controller.config_of(self.controller).d_model if self.controller else model_config.hidden_size
        if width != model_config.hidden_size:
            raise ValueError(
                f"method.controller={self.controller!r} reads embeddings of width {width}, but this model's are "
                f"{model_config.hidden_size} wide: train a controller on this backbone (docs/training.md) or pass "
                "method.controller=null"
            )

    def start(self, batch_size, length, device, model):
        self.check(model.config)
        if self.net is None:
            if self.controller is not None:
                self.net = Controller.load(self.controller)
            else:
                with torch.random.fork_rng():
                    torch.manual_seed(self.seed)
                    self.net = Controller(ControllerConfig(d_model=model.config.hidden_size, **self.config))
        self.net = self.net.to(device).eval()
        state = State(
            tokens={"z": torch.zeros(batch_size, length, self.net.config.width, device=device)}
        )  # (B, T, width)
        state.h = None  # (B, width) GRU state after the last fed token
        return state

    def update(self, state, entered):
        """z_i = GRU(x_i, z_{i-1}) for the new tokens, once, when they enter."""
        z, state.h = self.net.encode(entered.embeddings.float(), entered.valid, state.h)
        state.tokens["z"][:, entered.cols[0]] = z

    def score(self, state, tokens):
        z = state.tokens["z"]
        z = z.gather(1, tokens.cols[..., None].expand(-1, -1, z.shape[2]))
        return self.net.logits(z, tokens.positions, tokens.query_pos)
