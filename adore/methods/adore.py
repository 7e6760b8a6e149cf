from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from adore.controller import Controller, ControllerConfig, newest_valid
from adore.engine.pages import PageSummary
from adore.methods.base import KEEP, State, file_identity
from adore.methods.rebuilds import Rebuilds

RELEASES = ("controller", "attention")  # what `Adore.release` may be

PROJECT = Path(__file__).resolve().parents[2]
REFINE = 4  # page_summary: candidate pages rescored exactly per page picked
inf = float("inf")


@dataclass
class Adore(Rebuilds):
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

    controller: str | None = None
    seed: int = 0
    config: dict = field(default_factory=dict)  # ControllerConfig fields for a fresh controller
    rebuild_every: int = 8  # rebuild on every k-th step only (1: the paper's rule; 8: same KL, faster)
    release: str = "controller"  # controller: release by its scores | attention: by this step's attention (TOVA)
    page_summary: bool = False  # the probe with page_size: pick pages and normalise the release from page summaries
    sinks: int | None = None  # the first `sinks` positions are never released
    recent_ratio: float | None = None  # the newest round(recent_ratio * m) tokens are never released
    name: ClassVar[str] = "adore"
    training_free: ClassVar[bool] = False
    needs: ClassVar[frozenset[str]] = frozenset({"embeddings"})
    short: ClassVar[dict] = Rebuilds.short | {"controller": "", "recent_ratio": "recent", "page_summary": "summary"}

    def __post_init__(self):
        super().__post_init__()
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
        if self.page_summary and not (self.page_size and self.heads):
            raise ValueError(
                "method.page_summary=true scores pages from summaries of the attention probe's keys: it needs a probe "
                "controller (e.g. method=adore_trained) and method.rebuild=recall method.page_size=16"
            )
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
        release |= {"page_summary": True} if self.page_summary else {}
        return self.rebuild_identity() | release | guarantees

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
            if self.paged:  # page picks and the release's normaliser read page summaries, not every key
                state.pages = PageSummary(batch_size, self.net.state_width, self.page_size, device)
        return state

    @property
    def paged(self) -> bool:
        """The probe scoring from page summaries (recall in pages): O(pages) per step, not O(history)."""
        return self.probe and self.page_size is not None and self.page_summary

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
            if self.paged:
                state.pages.add(entered.cols[0], z, entered.positions, entered.valid, state.tokens["z"].shape[1])
            # a feed of several tokens (a prompt): the query's x_{t-1} is the second newest of them
            before = entered.valid.clone()
            before.scatter_(1, newest_valid(entered.valid)[1][:, None], False)
            two, second = newest_valid(before)
            self._set_query(state, two, x.gather(1, second[:, None, None].expand(-1, 1, x.shape[-1]))[:, 0])
        state.h = h
        if self.release == "attention":
            state.tokens["attention"] = entered.last_attention  # (B, T): only the newest query counts (TOVA)

    def assume(self, state, cols, positions, length):
        super().assume(state, cols, positions, length)
        if self.paged:  # the assumed keys enter their pages' summaries
            z = state.tokens["z"][:, cols]
            state.pages.add(cols, z, positions, torch.ones_like(positions, dtype=torch.bool), length)

    def score(self, state, tokens):
        """Release scores: the controller's, or with `release=attention` this step's recorded attention."""
        if self.release == "attention":
            return self._guaranteed(state.tokens["attention"].gather(1, tokens.cols), tokens)
        return self.rebuild_score(state, tokens)

    def rebuild_score(self, state, tokens):
        """The controller's scores (it alone knows released tokens: they have no attention in the cache)."""
        z = state.tokens["z"]
        if self.paged:  # the asked tokens only, normalised over the cache and the page summaries
            z = z.gather(1, tokens.cols[..., None].expand(-1, -1, z.shape[2]))
            scores = self.net.paged_logits(
                z, tokens.positions, tokens.query_pos, state.query, self._log_norm(state, tokens)
            )
        elif self.probe:  # normalised over every history token, scored for the asked ones
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

    def page_scores(self, state, tokens, page_size, open_pages):
        """The probe in pages (`page_summary`): each open page's bound from its summary (adore.engine.pages), then the
        REFINE x (R / page_size) best bounds rescored exactly from their members' keys (the bound alone ranks
        loosely): O(pages + REFINE x R) keys read a step, whatever the history. Else the default."""
        if not self.paged:
            return super().page_scores(state, tokens, page_size, open_pages)
        seen, pages = tokens.cols.shape[1], open_pages.shape[1]
        log_norm = self._log_norm(state, tokens)
        bound = self.net.page_logits(state.pages, pages, tokens.query_pos, state.query, log_norm)
        bound = bound.masked_fill(~open_pages, -inf)
        candidates = bound.topk(min(REFINE * max(self.R // page_size, 1), pages), dim=1).indices  # (B, c)
        cols = (candidates[..., None] * page_size + torch.arange(page_size, device=bound.device)).flatten(1)
        inside = cols < seen
        cols = cols.clamp(max=seen - 1)
        z = state.tokens["z"].gather(1, cols[..., None].expand(-1, -1, state.tokens["z"].shape[2]))  # (B, c * P, width)
        positions = state.tokens["pos"].gather(1, cols)
        exact = self.net.paged_logits(z, positions, tokens.query_pos, state.query, log_norm)
        exact = exact.masked_fill(~(inside & state.tokens["filled"].gather(1, cols)), -inf)
        best = exact.view(exact.shape[0], -1, page_size).amax(2)  # (B, c)
        return torch.full_like(bound, -inf).scatter(1, candidates, best).masked_fill(~open_pages, -inf)

    def _log_norm(self, state, tokens):
        """The probe's per-head log normaliser for this query: exact over the cache, estimated over the released."""
        cols = tokens.cached  # (B, C), -1: empty slot
        z = state.tokens["z"]
        cached_z = z.gather(1, cols.clamp(min=0)[..., None].expand(-1, -1, z.shape[2]))
        cached_pos = state.tokens["pos"].gather(1, cols.clamp(min=0))
        return self.net.log_normaliser(state.pages, tokens.query_pos, state.query, cached_z, cached_pos, cols)

    def _guaranteed(self, scores, tokens):
        if self.sinks:
            scores = scores + KEEP * (tokens.positions < self.sinks)
        if self.recent:
            scores = scores + KEEP * (tokens.query_pos - tokens.positions < self.recent)
        return scores
