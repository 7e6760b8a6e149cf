"""ADORE: adaptive token release for a fixed-size KV cache (see ../shared/ADORE.md).

`from adore import Pipeline` is the Python API (adore/api.py, docs/api.md). It is imported on first use, so
`import adore` stays cheap (no torch) for the entry points and tools that only need a submodule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adore.version import package_version

__version__ = package_version()
__all__ = ["Pipeline", "__version__"]

if TYPE_CHECKING:
    from adore.api import Pipeline


def __getattr__(name: str):
    if name == "Pipeline":
        from adore.api import Pipeline

        return Pipeline
    raise AttributeError(f"module 'adore' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "Pipeline"])
