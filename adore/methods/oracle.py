from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from adore.methods.base import Method


@dataclass
class Oracle(Method):
    """ADORE's loop (release + rebuild of the top-R) scored by the true full-attention weights of the current query.

    The session runs a shadow full-attention pass over the same tokens ("full_attention"): at every step its
    newest query's attention on every past token, summed over heads and layers, is what the controller learns
    to predict, so its top-m is the ideal cache.
    """

    m: int = 128
    R: int = 4
    rebuild: str = "top"
    rebuild_every: int = 1
    rebuild_forward: int | None = None
    name: ClassVar[str] = "oracle"
    label: ClassVar[str] = "Oracle"
    training_free: ClassVar[bool] = False  # it reads full attention: an upper bound, not a baseline
    needs: ClassVar[frozenset[str]] = frozenset({"full_attention"})

    def __post_init__(self):
        super().__post_init__()
        check_R(self.R, self.m)
        check_rebuild(self.rebuild, self.rebuild_every, self.rebuild_forward)

    def identity(self) -> dict:
        return {"name": self.name, "m": self.m, "R": self.R} | rebuild_identity(self)

    def score(self, state, tokens):
        return tokens.full_attention


def check_R(R, m: int) -> None:
    if isinstance(R, bool) or not isinstance(R, int) or R < 0:
        raise ValueError(f"method.R={R!r} must be a non-negative integer (tokens rebuilt per step)")
    if R > m:
        raise ValueError(
            f"method.R={R} exceeds method.m={m}: a step keeps only m tokens, so at most m rebuilt ones can stay; use R <= m"
        )


REBUILD_POLICIES = ("top", "survivors", "keep")  # adore.session.Session._pick_rebuild says what each does
PAPER_REBUILD = {"rebuild": "top", "rebuild_every": 1, "rebuild_forward": None}


def check_rebuild(policy, every, forward=None) -> None:
    if policy not in REBUILD_POLICIES:
        raise ValueError(f"method.rebuild={policy!r}: choose one of {list(REBUILD_POLICIES)}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"method.rebuild_every={every!r} must be a positive integer (rebuild on every k-th step)")
    if forward is not None:
        if isinstance(forward, bool) or not isinstance(forward, int) or forward < 1:
            raise ValueError(f"method.rebuild_forward={forward!r} must be a positive integer or null (all picks)")
        if policy != "keep":
            raise ValueError(
                f"method.rebuild_forward={forward} caps the picks `keep` forwards (the others wait, held or "
                f"released); with method.rebuild={policy!r} it would only be a smaller R: set method.rebuild=keep"
            )


def rebuild_identity(method) -> dict:
    """The rebuild policy's settings where they differ from the paper's rule (top-R every step), and none when
    R = 0: runs written before the policies existed used that rule, so their identity stays as it was."""
    if not method.R:  # nothing is rebuilt: the policy changes nothing
        return {}
    return {key: getattr(method, key) for key, paper in PAPER_REBUILD.items() if getattr(method, key) != paper}
