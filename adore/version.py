"""The package's version, read where it is declared: the installed distribution's metadata, or pyproject.toml in
a checkout that runs without being installed (the tests and the entry scripts do). One source, no constant."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path


def package_version() -> str:
    try:
        return importlib.metadata.version("adore")
    except importlib.metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        return tomllib.loads(pyproject.read_text())["project"]["version"]
