"""Package discovery only; everything else is in pyproject.toml.

`packages.find` in pyproject.toml can only name folders under the project root, and the Hydra config tree
`conf/` must ship as `adore/conf` (adore/registry.py reads it there in an installed package), so the list is
built here: every `adore*` package, plus `conf/` and its groups mapped to `adore.conf` by `package-dir`.
"""

from setuptools import find_namespace_packages, find_packages, setup

conf = ["adore.conf", *(f"adore.conf.{group}" for group in find_namespace_packages(where="conf"))]
setup(packages=find_packages(include=["adore", "adore.*"]) + conf)
