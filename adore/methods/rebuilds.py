"""The settings of a method that rebuilds released tokens (ADORE and the oracle): R and the rebuild policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from adore.checks import check_integer
from adore.engine.kvstore import STORE_DTYPES
from adore.engine.rebuild import PAGE_SCORES, POLICIES, Keep, Recall
from adore.methods.base import Method

ALIASES = {"top": "recompute"}  # the paper's rule kept its first name in older configs and commands
# the paper's rule: what runs written before the policies existed used, so it leaves their identity as it was
PAPER_REBUILD = {
    "rebuild": "recompute",
    "rebuild_every": 1,
    "rebuild_forward": None,
    "page_size": None,
    "tail_alone": 1,
}
RECALL_DEFAULTS = {"store_dtype": "model", "page_score": "max"}


@dataclass
class Rebuilds(Method):
    """R released tokens come back per step, by `rebuild` (adore.engine.rebuild): recompute (the paper), survivors,
    keep or recall. `rebuild_every` = k rebuilds on every k-th feed only; `rebuild_forward` caps `keep`'s forward;
    `page_size` makes `recall` pick whole pages, scored by `page_score` (adore.engine.rebuild.PAGE_SCORES);
    `store_dtype` is `recall`'s store (adore.engine.kvstore); `tail_alone` = n feeds the last n tokens of a prompt
    arriving over released history one at a time, each picking by its own query (`Rebuild.fed_alone`)."""

    m: int = 128
    R: int = 4
    rebuild: str = "recompute"
    rebuild_every: int = 1
    rebuild_forward: int | None = None
    page_size: int | None = None
    store_dtype: str = "model"
    page_score: str = "max"
    tail_alone: int = 1
    training_free: ClassVar[bool] = False
    name_label: ClassVar[str] = "Method"  # the name tables show, before the rebuild policy (`label`)
    short: ClassVar[dict] = {
        "page_size": "page",
        "store_dtype": "store",
        "page_score": "pagescore",
        "tail_alone": "tail",
    }

    def __post_init__(self):
        super().__post_init__()
        self.rebuild = ALIASES.get(self.rebuild, self.rebuild)
        R = self.R
        check_integer("method.R", R, 0, fix=": tokens rebuilt per step, e.g. method.R=4")
        if R > self.m:
            raise ValueError(
                f"method.R={R} exceeds method.m={self.m}: a step keeps only m tokens, so at most m rebuilt ones can "
                "stay; use R <= m"
            )
        if self.rebuild not in POLICIES:
            raise ValueError(f"method.rebuild={self.rebuild!r}: choose one of {list(POLICIES)}")
        check_integer("method.rebuild_every", self.rebuild_every, fix=": rebuild on every k-th step, e.g. 1")
        check_integer(
            "method.rebuild_forward", self.rebuild_forward, optional=True, fix=": picks forwarded per step, e.g. 2"
        )
        if self.rebuild_forward is not None and self.rebuild != "keep":
            raise ValueError(
                f"method.rebuild_forward={self.rebuild_forward} caps the picks `keep` forwards (the others wait, held "
                f"or released); with method.rebuild={self.rebuild!r} it would only be a smaller R: set "
                "method.rebuild=keep"
            )
        check_integer("method.page_size", self.page_size, optional=True, fix=": tokens per recalled page, e.g. 16")
        if self.page_size is not None and self.rebuild != "recall":
            raise ValueError(
                f"method.page_size={self.page_size} picks pages to copy back from the store: set method.rebuild=recall"
            )
        if self.page_size is not None and R and self.page_size > self.m:  # R = 0 recalls nothing: no page
            raise ValueError(
                f"method.page_size={self.page_size} exceeds method.m={self.m}: a recalled page must fit the cache; "
                f"use a page of at most {self.m} tokens or a larger budget"
            )
        if self.page_size is not None and R % self.page_size:
            raise ValueError(
                f"method.R={R} is not a whole number of pages of method.page_size={self.page_size}: use R = "
                f"{max(self.page_size, R - R % self.page_size)}"
            )
        check_integer(
            "method.tail_alone", self.tail_alone, 0, fix=": a prompt's last tokens fed one at a time, e.g. 1 or 48"
        )
        if self.page_score not in PAGE_SCORES:
            raise ValueError(f"method.page_score={self.page_score!r}: choose one of {list(PAGE_SCORES)}")
        if self.page_score != "max" and self.page_size is None:
            raise ValueError(
                f"method.page_score={self.page_score} scores pages: set method.page_size (and method.rebuild=recall)"
            )
        if self.store_dtype not in STORE_DTYPES:
            raise ValueError(f"method.store_dtype={self.store_dtype!r}: choose one of {list(STORE_DTYPES)}")

    @property
    def label(self) -> str:
        """The method's name, and its rebuild policy where it departs from the paper's rule ("ADORE [probe_l20] +
        recall"): a table of recall runs alone must not read like the paper's rule, which every table names plain."""
        policy = self.rebuild if self.R and self.rebuild != PAPER_REBUILD["rebuild"] else None
        return f"{self.name_label} + {policy}" if policy else self.name_label

    def rebuild_identity(self) -> dict:
        """The rebuild settings where they differ from the paper's rule (recompute every step), none when R = 0:
        runs written before the policies existed used that rule, so their identity stays as it was."""
        if not self.R:  # nothing is rebuilt: the policy changes nothing
            return {}
        settings = {key: getattr(self, key) for key, paper in PAPER_REBUILD.items() if getattr(self, key) != paper}
        if self.rebuild == "recall":
            settings |= {k: getattr(self, k) for k, v in RECALL_DEFAULTS.items() if getattr(self, k) != v}
        return settings

    def rebuild_policy(self):
        if self.rebuild == "keep":
            return Keep(self.R, self.rebuild_every, self.rebuild_forward, tail=self.tail_alone)
        if self.rebuild == "recall":
            return Recall(
                self.R, self.rebuild_every, self.page_size, self.store_dtype, self.page_score, tail=self.tail_alone
            )
        return POLICIES[self.rebuild](self.R, self.rebuild_every, tail=self.tail_alone)
