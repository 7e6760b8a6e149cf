"""ADORE, the release method (ADORE.md §2-3): a controller scores every history token, the session keeps the m
best, and the R best released tokens are rebuilt.

The method holds three objects, each a concept with variants: the controller (`adore.controller`: the GRU scorer
or the attention probe), its `Scoring` (how a session keeps the controller's per-token state and scores with it)
and its `release` rule (by the controller's scores, or by this step's attention).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from adore.checks import check_integer, check_share
from adore.controller import AttentionProbe, Controller, ControllerConfig, newest_valid
from adore.engine.pages import PageSummary, by_page
from adore.io import project_file
from adore.methods.base import State, file_identity
from adore.methods.guarantees import protect, recent_tokens
from adore.methods.rebuilds import Rebuilds

REFINE = 4  # page_summary: candidate pages rescored exactly per page picked
inf = float("inf")


class Scoring:
    """A controller in a session: `start` adds the state it keeps, `arrive` / `update` follow the fed tokens
    (Method's hooks of the same names), `score` gives the (B, k) raw scores of a `Tokens` view. Every kind keeps
    z_i per history column (`tokens["z"]`) and the state `encode` carries (`state.h`)."""

    def __init__(self, net: Controller):
        self.net = net

    def start(self, state: State, model) -> None:
        pass

    def arrive(self, state: State, arriving) -> None:
        pass

    def update(self, state: State, entered, x: torch.Tensor) -> torch.Tensor:
        """Encode the tokens just fed (x: (B, n, d_model)), once; returns their z (B, n, state_width)."""
        z, state.h = self.net.encode(x, entered.valid, state.h)
        state.tokens["z"][:, entered.cols[0]] = z
        return z

    def assume(self, state: State, cols: torch.Tensor, positions: torch.Tensor, length: int) -> None:
        pass

    def score(self, state: State, tokens) -> torch.Tensor:
        raise NotImplementedError

    def page_scores(self, state, tokens, page_size: int, released: torch.Tensor, reduce, exact):
        """(B, pages) page scores for a page pick; `exact` is the method's default (Method.page_scores)."""
        return exact(state, tokens, page_size, released, reduce)


class GRUScoring(Scoring):
    """The GRU scorer: each asked token's z_i, scored for the newest token, whose state h is the query."""

    def score(self, state, tokens):
        z = state.tokens["z"]
        z = z.gather(1, tokens.cols[..., None].expand(-1, -1, z.shape[2]))
        query_z = state.h[:, None] if self.net.config.query else None  # (B, 1, width): the newest token's state
        return self.net.logits(z, tokens.positions, tokens.query_pos, query_z)


class ProbeScoring(Scoring):
    """The attention probe: keys with their positions and flags per history column, and the query of the token
    being fed, made before its forward (from x_{t-1} and its input embedding), so the rebuild pick is for it.
    Scores are normalised over every history token. A decode step asks twice with one query (the rebuild pick
    before the forward, the release after it), so the query's per-head scores over the history are kept
    (`state.head_scores`, masked where it may not read, with their log normaliser `state.log_norm`) and the token
    fed joins both: the history's keys are read, and normalised over, once a step, not twice."""

    def start(self, state, model):
        B, T = state.tokens["z"].shape[:2]
        device = state.tokens["z"].device
        state.tokens["pos"] = torch.zeros(B, T, dtype=torch.long, device=device)
        state.tokens["filled"] = torch.zeros(B, T, dtype=torch.bool, device=device)
        state.embed = model.get_input_embeddings()
        state.query = None  # (B, heads * head_dim): the query of the newest token
        state.head_scores = None  # (B, T, heads): the query's per-head scores of every history column, or None
        state.allowed = state.log_norm = None  # with head_scores: the columns it may read, its (B, 1, heads) normaliser

    def arrive(self, state, arriving):
        """The query of the newest arriving token t: x_{t-1} (known) and token t's input embedding."""
        has, newest = newest_valid(arriving.valid)
        state.embedded = state.embed(arriving.ids.gather(1, newest[:, None]))[:, 0].float()  # (B, d_model)
        previous = torch.zeros_like(state.embedded) if state.h is None else state.h
        self._set_query(state, has, previous)
        state.head_scores = None

    def update(self, state, entered, x):
        z = super().update(state, entered, x)
        cols = entered.cols[0]
        state.tokens["pos"][:, cols] = entered.positions
        state.tokens["filled"][:, cols] = entered.valid
        if entered.valid.shape[1] == 1:  # a decode step: the query stays; the fed token's own scores join its row
            if state.head_scores is not None:  # its column held a masked score, which added nothing to log_norm
                own = self.net.head_scores(z, entered.positions, entered.query_pos, state.query)  # (B, 1, heads)
                allowed = self.net.allowed(entered.positions, entered.query_pos, entered.valid)
                own.masked_fill_(~allowed[..., None], -1e9)
                state.head_scores[:, cols], state.allowed[:, cols] = own, allowed
                state.log_norm = torch.logaddexp(state.log_norm, own)
            return z
        # a feed of several tokens (a prompt): the query's x_{t-1} is the second newest of them
        before = entered.valid.clone()
        before.scatter_(1, newest_valid(entered.valid)[1][:, None], False)
        two, second = newest_valid(before)
        self._set_query(state, two, x.gather(1, second[:, None, None].expand(-1, 1, x.shape[-1]))[:, 0])
        state.head_scores = None
        return z

    def assume(self, state, cols, positions, length):
        state.head_scores = None

    def _set_query(self, state, rows: torch.Tensor, previous: torch.Tensor) -> None:
        query = self.net.queries(previous, state.embedded)
        state.query = query if state.query is None else torch.where(rows[:, None], query, state.query)

    def score(self, state, tokens):
        if state.head_scores is None:  # the history's keys, read and normalised once per query
            s = self.net.head_scores(state.tokens["z"], state.tokens["pos"], tokens.query_pos, state.query)
            state.allowed = self.net.allowed(state.tokens["pos"], tokens.query_pos, state.tokens["filled"])
            s.masked_fill_(~state.allowed[..., None], -1e9)
            state.head_scores, state.log_norm = s, s.logsumexp(1, keepdim=True)  # (B, T, heads), (B, 1, heads)
        cols = tokens.cols
        if 2 * cols.shape[1] > state.head_scores.shape[1]:  # most of the history (the rebuild pick): all, then pick
            mixed = self.net.mixed_normalised(state.head_scores - state.log_norm).gather(1, cols)
        else:  # a few columns (the release asks the cache's)
            heads = cols[..., None].expand(-1, -1, state.head_scores.shape[2])
            mixed = self.net.mixed_normalised(state.head_scores.gather(1, heads) - state.log_norm)
        return mixed.masked_fill(~state.allowed.gather(1, cols), float("-inf"))  # (B, k)


class PagedProbeScoring(ProbeScoring):
    """The probe with page summaries (`page_summary`, recall in pages): the asked tokens are normalised over the
    cache and the page summaries, and pages are picked by their bounds: O(pages) per step, not O(history)."""

    def __init__(self, net: AttentionProbe, page_size: int, R: int):
        super().__init__(net)
        self.page_size, self.R = page_size, R

    def start(self, state, model):
        super().start(state, model)
        B, _, width = state.tokens["z"].shape
        state.pages = PageSummary(B, width, self.page_size, state.tokens["z"].device)

    def update(self, state, entered, x):
        z = super().update(state, entered, x)
        state.pages.add(entered.cols[0], z, entered.positions, entered.valid, state.tokens["z"].shape[1])
        return z

    def assume(self, state, cols, positions, length):
        """The assumed keys enter their pages' summaries."""
        super().assume(state, cols, positions, length)
        z = state.tokens["z"][:, cols]
        state.pages.add(cols, z, positions, torch.ones_like(positions, dtype=torch.bool), length)

    def score(self, state, tokens):
        z = state.tokens["z"]
        z = z.gather(1, tokens.cols[..., None].expand(-1, -1, z.shape[2]))
        return self.net.paged_logits(z, tokens.positions, tokens.query_pos, state.query, self._log_norm(state, tokens))

    def page_scores(self, state, tokens, page_size, released, reduce, exact):
        """Each open page's bound from its summary (adore.engine.pages), then the REFINE x (R / page_size) best
        bounds rescored exactly from their members' keys (the bound alone ranks loosely) and reduced as
        Method.page_scores reduces them: O(pages + REFINE x R) keys read a step, whatever the history."""
        seen = tokens.cols.shape[1]
        open_pages = by_page(released, page_size, False).any(2)  # (B, pages)
        pages = open_pages.shape[1]
        log_norm = self._log_norm(state, tokens)
        bound = self.net.page_logits(state.pages, pages, tokens.query_pos, state.query, log_norm)
        bound = bound.masked_fill(~open_pages, -inf)
        candidates = bound.topk(min(REFINE * max(self.R // page_size, 1), pages), dim=1).indices  # (B, c)
        cols = (candidates[..., None] * page_size + torch.arange(page_size, device=bound.device)).flatten(1)
        inside = cols < seen
        cols = cols.clamp(max=seen - 1)
        z = state.tokens["z"].gather(1, cols[..., None].expand(-1, -1, state.tokens["z"].shape[2]))  # (B, c * P, width)
        positions = state.tokens["pos"].gather(1, cols)
        exact_scores = self.net.paged_logits(z, positions, tokens.query_pos, state.query, log_norm)
        exact_scores = exact_scores.masked_fill(~(inside & state.tokens["filled"].gather(1, cols)), -inf)
        shape = (exact_scores.shape[0], -1, page_size)
        rescored = reduce(exact_scores.view(shape), (inside & released.gather(1, cols)).view(shape))  # (B, c)
        return torch.full_like(bound, -inf).scatter(1, candidates, rescored).masked_fill(~open_pages, -inf)

    def _log_norm(self, state, tokens):
        """The per-head log normaliser for this query: exact over the cache, estimated over the released."""
        cols = tokens.cached  # (B, C), -1: empty slot
        z = state.tokens["z"]
        cached_z = z.gather(1, cols.clamp(min=0)[..., None].expand(-1, -1, z.shape[2]))
        cached_pos = state.tokens["pos"].gather(1, cols.clamp(min=0))
        return self.net.log_normaliser(state.pages, tokens.query_pos, state.query, cached_z, cached_pos, cols)


class ByController:
    """Release by the controller's scores (the paper)."""

    needs: frozenset[str] = frozenset()
    identity: dict = {}  # runs written before the release rules existed released this way: their names stay

    def update(self, state, entered) -> None:
        pass

    def score(self, state, tokens, scoring: Scoring) -> torch.Tensor:
        return scoring.score(state, tokens)


class ByAttention:
    """Release by the newest query's attention over the cache in this step's forward, rebuilt tokens included
    (TOVA's rule), so that a wrong rebuild pick is dropped again instead of displacing a token the query reads.
    The controller still picks the rebuilds: released tokens have nothing else to be scored by."""

    needs = frozenset({"last_attention"})
    identity = {"release": "attention"}

    def update(self, state, entered) -> None:
        state.tokens["attention"] = entered.last_attention  # (B, T): only the newest query counts

    def score(self, state, tokens, scoring: Scoring) -> torch.Tensor:
        return state.tokens["attention"].gather(1, tokens.cols)


RELEASES = {"controller": ByController, "attention": ByAttention}  # what `Adore.release` may be


@dataclass
class Adore(Rebuilds):
    """ADORE: the controller's scores decide release, and the top-R released tokens are rebuilt (ADORE.md §2-3).

    `controller` is a checkpoint from `train.py stage=controller`; None builds a fresh random controller
    (seeded) so the engine runs before any training: it is labelled "untrained" everywhere. R=0 is the
    no-rebuild ablation. `sinks` / `recent_ratio` (null = off) always keep the first positions and the most
    recent round(recent_ratio * m) tokens, as StreamingLLM and H2O do (adore.methods.guarantees; a share of m,
    as H2O's, so that one value serves a sweep over m); the controller ranks the rest. `release` chooses what
    releases (`RELEASES`); rebuilds are always the controller's picks.
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
            self.controller = project_file(self.controller)
            if not Path(self.controller).is_file():
                raise ValueError(
                    f"method.controller={self.controller!r} does not exist: pass controller.pt from a "
                    "`python train.py stage=controller` run, or null for an untrained controller"
                )
        check_integer("method.sinks", self.sinks, optional=True, fix=" (off): the first positions never released")
        check_share("method.recent_ratio", self.recent_ratio, optional=True, fix=" (off): a share of m, e.g. 0.75")
        if self.recent_ratio is not None and self.recent < 1:
            raise ValueError(
                f"method.recent_ratio={self.recent_ratio} keeps no token of m={self.m}: raise it to >= {1 / self.m:.3g}"
            )
        if (self.sinks or 0) + self.recent >= self.m:
            raise ValueError(
                f"method.sinks={self.sinks} and method.recent_ratio={self.recent_ratio} keep "
                f"{(self.sinks or 0) + self.recent} tokens, leaving the controller nothing of m={self.m}: lower them"
            )
        if self.release not in RELEASES:
            raise ValueError(f"method.release={self.release!r}: choose one of {list(RELEASES)}")
        self.release_rule = RELEASES[self.release]()
        self.net: Controller | None = None  # loaded on first use
        meta = Controller.meta(self.controller) if self.controller is not None else {}
        self.K = meta.get("K")  # the labels' top-K
        self.recipe = meta.get("recipe")  # the training recipe's name (conf/recipe), shown in labels
        net_config = Controller.config_of(self.controller) if self.controller else ControllerConfig(1, **self.config)
        self.width = net_config.d_model if self.controller else None  # the embedding width it reads (checked)
        self.input_layer = net_config.input_layer
        self.needs = frozenset({"hidden" if self.input_layer else "embeddings"}) | self.release_rule.needs
        if self.page_summary and not (self.page_size and net_config.heads):
            raise ValueError(
                "method.page_summary=true scores pages from summaries of the attention probe's keys: it needs a probe "
                "controller (e.g. method=adore_trained) and method.rebuild=recall method.page_size=16"
            )

    @property
    def name_label(self) -> str:
        if self.controller is None:
            return "ADORE (untrained)"
        return f"ADORE [{self.recipe}]" if self.recipe else "ADORE"

    def identity(self) -> dict:
        if self.controller is None:  # a random controller: its seed and shape are what it is
            net = {"controller": "untrained", "seed": self.seed, "config": self.config}
        else:
            net = {"controller": file_identity(self.controller)}
        return {"name": self.name, "m": self.m, "R": self.R} | net | self._guarantees()

    @property
    def recent(self) -> int:
        """Newest tokens never released: round(recent_ratio * m), 0 when off."""
        return recent_tokens(self.m, self.recent_ratio)

    def _guarantees(self) -> dict:
        guarantees = {key: getattr(self, key) for key in ("sinks", "recent_ratio") if getattr(self, key) is not None}
        summary = {"page_summary": True} if self.page_summary else {}
        return self.rebuild_identity() | self.release_rule.identity | summary | guarantees

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
        if not isinstance(self.net, AttentionProbe):
            self.scoring = GRUScoring(self.net)
        elif self.page_summary:
            self.scoring = PagedProbeScoring(self.net, self.page_size, self.R)
        else:
            self.scoring = ProbeScoring(self.net)
        state = State(tokens={"z": torch.zeros(batch_size, length, self.net.state_width, device=device)})
        state.h = None  # the state `encode` carries (the GRU's; the probe's x of the newest token)
        self.scoring.start(state, model)
        return state

    def arrive(self, state, arriving):
        self.scoring.arrive(state, arriving)

    def update(self, state, entered):
        """z_i of the new tokens, once, when they enter (and what the release rule records)."""
        x = (entered.hidden if self.input_layer else entered.embeddings).float()
        self.scoring.update(state, entered, x)
        self.release_rule.update(state, entered)

    def assume(self, state, cols, positions, length):
        super().assume(state, cols, positions, length)
        self.scoring.assume(state, cols, positions, length)

    def score(self, state, tokens):
        """Release scores: the release rule's, sinks and recent tokens kept."""
        return self._protect(self.release_rule.score(state, tokens, self.scoring), tokens)

    def rebuild_score(self, state, tokens):
        """The controller's scores (it alone knows released tokens: they have no attention in the cache)."""
        return self._protect(self.scoring.score(state, tokens), tokens)

    def page_scores(self, state, tokens, page_size, released, reduce):
        return self.scoring.page_scores(state, tokens, page_size, released, reduce, super().page_scores)

    def _protect(self, scores, tokens):
        return protect(scores, tokens, sinks=self.sinks or 0, recent=self.recent)
