"""Files: atomic writes (a crash mid-write never leaves a half-written results.json behind), and paths named
from the project root."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path`; it is renamed onto `path` once the block succeeds, removed otherwise.

    The one atomic writer: text, JSON, torch checkpoints, report files and figures (`fig.savefig(tmp)`) go through it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only: give it the mode any file the user writes has
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def _atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str | os.PathLike, obj) -> None:
    _atomic_write_text(Path(path), json.dumps(obj, indent=2, default=str) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    _atomic_write_text(Path(path), "".join(json.dumps(r, default=str) + "\n" for r in rows))


def read_json(path: str | os.PathLike):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def save_torch(path: str | os.PathLike, obj) -> None:
    """torch.save, atomically (a stored reference is either whole or absent)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def project_file(path: str) -> str:
    """`path` when it names a file; else the same relative path under the project root when a file is there, so
    that the shipped `checkpoints/...` resolve from wherever a command runs. Otherwise `path` unchanged (the
    caller's own check then names it)."""
    if Path(path).is_file() or Path(path).is_absolute():
        return str(path)
    in_project = PROJECT_ROOT / path
    return str(in_project) if in_project.is_file() else str(path)
