"""Building objects from Hydra config nodes, shared by `eval.py`, `train.py` and the registry."""

from __future__ import annotations

from hydra.errors import InstantiationException
from hydra.utils import instantiate


def build(node):
    """`instantiate`, but a bad value surfaces as its own ValueError rather than Hydra's wrapper."""
    try:
        return instantiate(node)
    except InstantiationException as err:
        if isinstance(err.__cause__, (ValueError, FileNotFoundError)):
            raise err.__cause__ from None
        raise
