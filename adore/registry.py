"""Methods by name: every `conf/method/<name>.yaml` is a method, built exactly as `eval.py method=<name>` builds it.

Tests, the benchmark, the Python API and the presets all find methods here, so adding a method is adding its
class and its YAML: no list to keep in sync.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def conf_dir() -> Path:
    """The config tree: `conf/` of a source checkout, else the copy a wheel installs as `adore/conf`."""
    source = Path(__file__).resolve().parents[1] / "conf"
    if (source / "eval.yaml").is_file():
        return source
    installed = Path(str(importlib.resources.files("adore") / "conf"))
    if (installed / "eval.yaml").is_file():
        return installed
    raise FileNotFoundError(f"no config tree at {source} or {installed}: reinstall adore (pip install .)")


def config_names(group: str) -> list[str]:
    """Every config of a group, sorted: the stems of conf/<group>/*.yaml."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def method_names() -> list[str]:
    """Every method config, sorted: the stems of conf/method/*.yaml."""
    return config_names("method")


def method_config(name: str, budget: int = 128, **overrides) -> DictConfig:
    """The resolved `method` node of `eval.py method=<name> budget=<budget>`, with `overrides` merged over it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if name not in method_names():
        raise ValueError(f"method={name!r} is not a method config: choose one of {method_names()} (conf/method/)")
    args = [f"method={name}", f"budget={budget}", "logger=none"]
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app or a test's compose context
        cfg = compose("eval", overrides=args)
    else:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = compose("eval", overrides=args)
    node = OmegaConf.create(OmegaConf.to_container(cfg.method, resolve=True))
    return OmegaConf.merge(node, overrides) if overrides else node


def build_method(name: str, budget: int = 128, **overrides):
    """The method object of conf/method/<name>.yaml, e.g. `build_method("h2o", 64, recent_ratio=0.25)`."""
    from adore.config import build

    return build(method_config(name, budget, **overrides))
