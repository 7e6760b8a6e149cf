"""The ADORE controller (ADORE.md §2): scores how likely each past token is among the current query's top-K keys.

Two kinds behind one interface (`Controller`: `encode` a token's state once, when it enters; `logits` of tokens
for a query): the paper's GRU scorer (`gru.py`) and the attention probe (`probe.py`). `Controller(config)` and
`Controller.load(path)` build the kind the config names. Pure PyTorch: no Lightning, no transformers.
"""

from adore.controller.base import (
    Controller,
    ControllerConfig,
    bucketize,
    continuable,
    newest_valid,
    token_logsumexp,
    token_minor,
)
from adore.controller.gru import GRUScorer
from adore.controller.probe import AttentionProbe

__all__ = [
    "AttentionProbe",
    "Controller",
    "ControllerConfig",
    "GRUScorer",
    "bucketize",
    "continuable",
    "newest_valid",
    "token_logsumexp",
    "token_minor",
]
