"""ADORE, the release method (ADORE.md §2-3): a controller scores every history token, the session keeps the m
best, and the R best released tokens are rebuilt.

The method holds three objects, each a concept with variants: the controller (`adore.controller`: the GRU scorer
or the attention probe), its `Scoring` (how a session keeps the controller's per-token state and scores with it)
and its release rule (`adore.methods.releases`: by the controller's scores, by this step's attention, or by the
attention accumulated so far).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from adore.checks import check_integer, check_share
from adore.controller import AttentionProbe, Controller, ControllerConfig
from adore.io import project_file
from adore.methods.base import State, file_identity
from adore.methods.guarantees import protect, recent_tokens
from adore.methods.rebuilds import Rebuilds
from adore.methods.releases import RELEASES
from adore.methods.scoring import SHORTLIST, GRUScoring, PagedProbeScoring, ProbeScoring


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
    # controller: release by its scores | attention: by this step's attention (TOVA) | mass: by the attention
    # accumulated over every step (H2O; with recent_ratio)
    release: str = "controller"
    # the probe scores picks and the release's normaliser from page summaries: true with page_size (page picks);
    # N with token picks (pages of N summarised, the pick shortlisted from them)
    page_summary: bool | int = False
    page_shortlist: int = SHORTLIST  # with page_summary: candidate pages rescored exactly per page (token) picked
    sinks: int | None = None  # the first `sinks` positions are never released
    recent_ratio: float | None = None  # the newest round(recent_ratio * m) tokens are never released
    name: ClassVar[str] = "adore"
    training_free: ClassVar[bool] = False
    needs: ClassVar[frozenset[str]] = frozenset({"embeddings"})
    short: ClassVar[dict] = Rebuilds.short | {
        "controller": "",
        "recent_ratio": "recent",
        "page_summary": "summary",
        "page_shortlist": "shortlist",
    }

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
        if self.release == "mass" and self.recent_ratio is None:
            raise ValueError(
                "method.release=mass releases the newest tokens first (they have had no time to gather attention): "
                "pass method.recent_ratio=0.5 (H2O's recent share) or another share of m to keep them"
            )
        self.release_rule = RELEASES[self.release]()
        self.net: Controller | None = None  # loaded on first use
        meta = Controller.meta(self.controller) if self.controller is not None else {}
        self.K = meta.get("K")  # the labels' top-K
        self.recipe = meta.get("recipe")  # the training recipe's name (conf/recipe), shown in labels
        net_config = Controller.config_of(self.controller) if self.controller else ControllerConfig(1, **self.config)
        self.width = net_config.d_model if self.controller else None  # the embedding width it reads (checked)
        self.input_layer = net_config.input_layer
        self.needs = frozenset({"hidden" if self.input_layer else "embeddings"}) | self.release_rule.needs
        self._check_page_summary(net_config)

    def _check_page_summary(self, net_config) -> None:
        """`page_summary`: off, true (pages of page_size, for page picks) or an integer (pages of that many tokens,
        for token picks), and only for a probe controller that recalls."""
        check_integer(
            "method.page_shortlist",
            self.page_shortlist,
            fix=f": the pages rescored per page (or token) picked, {SHORTLIST} by default",
        )
        value = self.page_summary
        if value is False:
            return
        if value is True and not self.page_size:
            raise ValueError(
                "method.page_summary=true summarises pages of method.page_size, which is null (token picks): pass "
                "method.page_summary=16 to summarise pages of 16 and shortlist the token picks from them"
            )
        if value is not True:
            check_integer("method.page_summary", value, fix=", or true with method.page_size")
            if self.page_size:
                raise ValueError(
                    f"method.page_summary={value} sets the summaries' page, but method.page_size={self.page_size} "
                    "picks pages, which are the summaries' pages: pass method.page_summary=true"
                )
        if not (net_config.heads and self.rebuild == "recall"):
            raise ValueError(
                f"method.page_summary={value} scores picks from summaries of the attention probe's keys: it needs a "
                "probe controller (e.g. method=adore_trained) and method.rebuild=recall"
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
        summary = {}
        if self.page_summary is not False:  # the shortlist named only off its default: older runs keep their names
            summary = {"page_summary": self.page_summary} | (
                {} if self.page_shortlist == SHORTLIST else {"page_shortlist": self.page_shortlist}
            )
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
            summary_page = self.page_size if self.page_summary is True else self.page_summary
            self.scoring = PagedProbeScoring(self.net, summary_page, self.R, self.page_shortlist)
        else:
            self.scoring = ProbeScoring(self.net)
        state = State(tokens={"z": self.scoring.new_keys(batch_size, length, device)})
        state.h = None  # the state `encode` carries (the GRU's; the probe's x of the newest token)
        self.release_rule.start(state, batch_size, length, device)
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

    def pick_scores(self, state, tokens, released, R):
        return self._protect(self.scoring.pick_scores(state, tokens, released, R), tokens)

    def _protect(self, scores, tokens):
        return protect(scores, tokens, sinks=self.sinks or 0, recent=self.recent)
