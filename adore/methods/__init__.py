"""Release methods: one file per method, each a dataclass with a `score` (adore/methods/base.py).

A method is found by its config, conf/method/<name>.yaml (`_target_` names its class): see adore/registry.py.
"""

from adore.methods.adore import Adore
from adore.methods.base import KEEP, Entered, Method, State, Tokens
from adore.methods.full import Full
from adore.methods.h2o import H2O
from adore.methods.oracle import Oracle
from adore.methods.random import Random
from adore.methods.streaming import Streaming
from adore.methods.window import Window

__all__ = [
    "KEEP",
    "Adore",
    "Entered",
    "Full",
    "H2O",
    "Method",
    "Oracle",
    "Random",
    "State",
    "Streaming",
    "Tokens",
    "Window",
]
