"""The wheel: every `adore*` package and the whole Hydra config tree ship in it, and the entry points run on it.

The wheel is built from a copy of the files git knows (tracked, or untracked and not ignored): what a clone with
the current work builds, without writing `build/` or `*.egg-info` into the shared checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

PROJECT = Path(__file__).resolve().parents[1]


def source_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=PROJECT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"not a git checkout: {out.stderr.strip()}")
    return [f for f in out.stdout.splitlines() if (PROJECT / f).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for f in source_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT / f, src / f)
    dist = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    (found,) = dist.glob("adore-*.whl")
    return found


def test_wheel_holds_every_package_and_the_config_tree(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = sorted(p.parent.relative_to(PROJECT).as_posix() for p in (PROJECT / "adore").rglob("__init__.py"))
    assert {"adore", "adore/engine", "adore/eval", "adore/eval/tasks", "adore/lit"} <= set(packages)
    missing = [p for p in packages if f"{p}/__init__.py" not in names]
    assert not missing, f"packages missing from the wheel: {missing}"
    modules = sorted(p.relative_to(PROJECT).as_posix() for p in (PROJECT / "adore").rglob("*.py"))
    assert not [m for m in modules if m not in names]
    configs = sorted("adore/" + p.relative_to(PROJECT).as_posix() for p in (PROJECT / "conf").rglob("*.yaml"))
    assert "adore/conf/eval.yaml" in configs and any(c.startswith("adore/conf/method/") for c in configs)
    assert not [c for c in configs if c not in names], "config files missing from the wheel"


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> Path:
    """The wheel installed into a bare folder (no dependencies: the venv has them)."""
    folder = tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(folder), str(wheel)]
    subprocess.run(pip, check=True, capture_output=True, text=True)
    return folder


def run_installed(site: Path, args: list[str], cwd: Path) -> str:
    """`python -P <args>` with only the installed folder on PYTHONPATH, so `import adore` finds only the wheel.

    `-P` (Python 3.11) keeps the script's folder (or, with `-c`, the working directory) off `sys.path`; the
    venv still provides torch and the other dependencies.
    """
    env = os.environ | {"PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-P", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"python -P {' '.join(args)}: {out.stderr[-3000:]}"
    return out.stdout


def test_installed_wheel_imports_and_finds_its_config_tree(site, tmp_path):
    check = (
        "import adore, adore.eval.tasks, adore.lit; from adore.registry import conf_dir, method_names; "
        "print(adore.__file__); print(conf_dir()); print(method_names())"
    )
    module, conf, methods = run_installed(site, ["-c", check], cwd=tmp_path).splitlines()[-3:]
    assert Path(module).is_relative_to(site), "adore was imported from the checkout, not the wheel"
    assert Path(conf) == site / "adore" / "conf"
    assert "'window'" in methods and "'full'" in methods


@pytest.mark.slow
def test_entry_points_run_on_the_installed_wheel(site):
    """The checkout's `eval.py` / `train.py` with `adore` from the wheel: Hydra's `config_path` is relative to
    the script, so the config comes from the checkout's `conf/`, every module from the wheel; `--cfg job`
    composes and prints the config without running anything (importing torch, Lightning etc. takes ~15 s)."""
    assert "_target_: adore.methods" in run_installed(site, ["eval.py", "--cfg", "job", "method=window"], PROJECT)
    assert "stage:" in run_installed(site, ["train.py", "--cfg", "job", "stage=controller"], PROJECT)


def test_requirements_pins_satisfy_the_declared_dependencies():
    """requirements.txt pins the tested environment; pyproject.toml declares loose bounds for users. Same names."""
    project = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    lines = (PROJECT / "requirements.txt").read_text().splitlines()
    pins = {r.name: r for r in (Requirement(line.split("#")[0]) for line in lines if line.split("#")[0].strip())}
    bounds = {r.name: r for r in declared}
    assert sorted(pins) == sorted(bounds), "requirements.txt and pyproject.toml name different packages"
    for name, pin in pins.items():
        (spec,) = pin.specifier
        assert bounds[name].specifier.contains(spec.version), f"{name}{spec} is outside pyproject's {bounds[name]}"


def test_the_layer_contracts_hold():
    """pyproject.toml's import contracts (engine and methods below everything, no Lightning outside the
    stages, no Hydra or wandb in the core) hold for the tree as it is: `lint-imports` exits 0."""
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.skip("import-linter is not installed (pip install -r requirements.txt)")
    done = subprocess.run([lint, "--no-cache"], cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
