from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from adore.controller import Controller, ControllerConfig, newest_valid
from adore.methods.base import KEEP, Method, State, file_identity
from adore.methods.oracle import check_R, check_rebuild, rebuild_identity

RELEASES = ("controller", "attention")  # what `Adore.release` may be

PROJECT = Path(__file__).resolve().parents[2]


@dataclass
class Adore(Method):
    """ADORE: the GRU controller's scores decide release, and the top-R released tokens are rebuilt (ADORE.md §2-3).

    `controller` is a checkpoint from `train.py stage=controller`; None builds a fresh random controller
    (seeded) so the engine runs before any training: it is labelled "untrained" everywhere. R=0 is the
    no-rebuild ablation. `sinks` / `recent_ratio` (null = off) always keep the first positions and the most
    recent round(recent_ratio * m) tokens, as StreamingLLM and H2O do (a share of m, as H2O's, so that one value
    serves a sweep over m); the controller ranks the rest (issue 12's guarantee lever).
    `release="attention"` keeps the controller for the rebuild pick only (released tokens have nothing else to
    be scored by) and releases by the newest query's attention in this step's forward, rebuilt tokens included
    (TOVA's rule), so that a wrong pick is dropped again instead of displacing a token the query reads.
    """

    m: int = 128
    R: int = 4
    controller: str | None = None
    seed: int = 0
    config: dict = field(default_factory=dict)  # ControllerConfig fields for a fresh controller
    rebuild: str = "top"  # rebuild policy: "top" (the paper's top-R), "survivors" or "keep" (Session._pick_rebuild)
    rebuild_every: int = 8  # rebuild on every k-th step only (1: the paper's rule; 8: same KL, faster; issue 13)
    rebuild_forward: int | None = None  # keep: forward at most this many picks per step (the rest wait); None: all
    release: str = "controller"  # controller: release by its scores | attention: by this step's attention (TOVA)
    sinks: int | None = None  # the first `sinks` positions are never released
    recent_ratio: float | None = None  # the newest round(recent_ratio * m) tokens are never released
    name: ClassVar[str] = "adore"
    training_free: ClassVar[bool] = False
    needs: ClassVar[frozenset[str]] = frozenset({"embeddings"})
    short: ClassVar[dict] = {"controller": "", "recent_ratio": "recent"}

    def __post_init__(self):
        super().__post_init__()
        check_R(self.R, self.m)
        check_rebuild(self.rebuild, self.rebuild_every, self.rebuild_forward)
        if self.controller is not None:
            in_project = PROJECT / self.controller
            if not Path(self.controller).is_file() and in_project.is_file():
                self.controller = str(in_project)
            if not Path(self.controller).is_file():
                raise ValueError(
                    f"method.controller={self.controller!r} does not exist: pass controller.pt from a "
                    "`python train.py stage=controller` run, or null for an untrained controller"
                )
        sinks = self.sinks
        if sinks is not None and (isinstance(sinks, bool) or not isinstance(sinks, int) or not 0 < sinks < self.m):
            raise ValueError(f"method.sinks={sinks!r} must be an integer in 1..m-1={self.m - 1}, or null (off)")
        ratio = self.recent_ratio
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1):
            raise ValueError(f"method.recent_ratio={ratio!r} must be a share of m in (0, 1), e.g. 0.75, or null (off)")
        if ratio is not None and self.recent < 1:
            raise ValueError(
                f"method.recent_ratio={ratio} keeps no token of m={self.m}: raise it to >= {1 / self.m:.3g}"
            )
        if (sinks or 0) + self.recent >= self.m:
            raise ValueError(
                f"method.sinks + round(method.recent_ratio * m) = {(sinks or 0) + self.recent} leave the controller "
                f"nothing of m={self.m}: lower them"
            )
        self.net: Controller | None = None  # loaded on first use
        meta = Controller.meta(self.controller) if self.controller is not None else {}
        self.K = meta.get("K")  # the labels' top-K
        self.recipe = meta.get("recipe")  # the training recipe's name (conf/recipe), shown in labels
        net_config = Controller.config_of(self.controller) if self.controller else ControllerConfig(1, **self.config)
        self.width = net_config.d_model if self.controller else None  # the embedding width it reads (checked)
        self.input_layer, self.query, self.heads = net_config.input_layer, net_config.query, net_config.heads
        self.needs = frozenset({"hidden" if self.input_layer else "embeddings"})
        if self.release not in RELEASES:
            raise ValueError(f"method.release={self.release!r}: choose one of {list(RELEASES)}")
        if self.release == "attention":  # the forward records the newest query's attention over the cache
            self.needs |= {"last_attention"}

    @property
    def label(self) -> str:
        if self.controller is None:
            return "ADORE (untrained)"
        return f"ADORE [{self.recipe}]" if self.recipe else "ADORE"

    def identity(self) -> dict:
        if self.controller is None:  # a random controller: its seed and shape are what it is
            return {
                "name": self.name,
                "m": self.m,
                "R": self.R,
                "controller": "untrained",
                "seed": self.seed,
                "config": self.config,
            } | self._guarantees()
        return {
            "name": self.name,
            "m": self.m,
            "R": self.R,
            "controller": file_identity(self.controller),
        } | self._guarantees()

    @property
    def recent(self) -> int:
        """Newest tokens never released: round(recent_ratio * m), 0 when off."""
        return 0 if self.recent_ratio is None else int(round(self.recent_ratio * self.m))

    def _guarantees(self) -> dict:
        guarantees = {key: getattr(self, key) for key in ("sinks", "recent_ratio") if getattr(self, key) is not None}
        release = {"release": self.release} if self.release != "controller" else {}  # older runs: by the controller
        return rebuild_identity(self) | release | guarantees

    def check(self, model_config):
        if self.input_layer > model_config.num_hidden_layers:
            raise ValueError(
                f"method.controller={self.controller!r} reads the residual stream after layer {self.input_layer}, but "
                f"this model has {model_config.num_hidden_layers} layers: train a controller on this backbone"
            )
        width = self.width or model_config.hidden_size
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
            tokens={"z": torch.zeros(batch_size, length, self.net.state_width, device=device)}
        )  # (B, T, state width)
        state.h = None  # (B, width) GRU state after the last fed token (the probe: x of the newest token)
        if self.probe:
            state.tokens["pos"] = torch.zeros(batch_size, length, dtype=torch.long, device=device)
            state.tokens["filled"] = torch.zeros(batch_size, length, dtype=torch.bool, device=device)
            state.embed = model.get_input_embeddings()
            state.query = None  # (B, heads * head_dim): the probe's query of the newest token
        return state

    @property
    def probe(self) -> bool:
        return bool(self.heads)

    def arrive(self, state, arriving):
        """The probe's query of the newest arriving token t: x_{t-1} (known) and token t's input embedding."""
        if not self.probe:
            return
        has, newest = newest_valid(arriving.valid)
        state.embedded = state.embed(arriving.ids.gather(1, newest[:, None]))[:, 0].float()  # (B, d_model)
        previous = torch.zeros_like(state.embedded) if state.h is None else state.h
        self._set_query(state, has, previous)

    def _set_query(self, state, rows: torch.Tensor, previous: torch.Tensor) -> None:
        query = self.net.queries(previous, state.embedded)
        state.query = query if state.query is None else torch.where(rows[:, None], query, state.query)

    def update(self, state, entered):
        """z_i = GRU(x_i, z_{i-1}) for the new tokens, once, when they enter (h: z of each row's newest token).
        The probe: k_i per token, and h = x of the newest token (the next query reads it)."""
        x = (entered.hidden if self.input_layer else entered.embeddings).float()
        z, h = self.net.encode(x, entered.valid, state.h)
        state.tokens["z"][:, entered.cols[0]] = z
        if self.probe:
            state.tokens["pos"][:, entered.cols[0]] = entered.positions
            state.tokens["filled"][:, entered.cols[0]] = entered.valid
            # a feed of several tokens (a prompt): the query's x_{t-1} is the second newest of them
            before = entered.valid.clone()
            before.scatter_(1, newest_valid(entered.valid)[1][:, None], False)
            two, second = newest_valid(before)
            self._set_query(state, two, x.gather(1, second[:, None, None].expand(-1, 1, x.shape[-1]))[:, 0])
        state.h = h
        if self.release == "attention":
            state.tokens["attention"] = entered.last_attention  # (B, T): only the newest query counts (TOVA)

    def score(self, state, tokens):
        """Release scores: the controller's, or with `release=attention` this step's recorded attention."""
        if self.release == "attention":
            return self._guaranteed(state.tokens["attention"].gather(1, tokens.cols), tokens)
        return self.rebuild_score(state, tokens)

    def rebuild_score(self, state, tokens):
        """The controller's scores (it alone knows released tokens: they have no attention in the cache)."""
        z = state.tokens["z"]
        if self.probe:  # normalised over every history token, scored for the asked ones
            scores = self.net.logits(
                z,
                state.tokens["pos"],
                tokens.query_pos,
                state.query[:, None],
                key_valid=state.tokens["filled"],
                columns=tokens.cols,
            )  # (B, k)
        else:
            z = z.gather(1, tokens.cols[..., None].expand(-1, -1, z.shape[2]))
            query_z = state.h[:, None] if self.query else None  # (B, 1, width): the newest token is the query
            scores = self.net.logits(z, tokens.positions, tokens.query_pos, query_z)
        return self._guaranteed(scores, tokens)

    def _guaranteed(self, scores, tokens):
        if self.sinks:
            scores = scores + KEEP * (tokens.positions < self.sinks)
        if self.recent:
            scores = scores + KEEP * (tokens.query_pos - tokens.positions < self.recent)
        return scores
