"""One process per run directory: parallel sweep jobs that map to one directory (full attention in a budget sweep,
say) run it once, and a lock left behind by a killed job never strands the run.

The lock file names its holder (host, pid) and a heartbeat thread touches it while the run lasts. A lock is
stale, and taken over with a message, when its process is gone (same host) or its heartbeat stopped for
`stale_after_s` (any host: a killed cluster job). A live lock is waited for; the caller then finds the
holder's results. `force` (eval.overwrite=true) takes any lock at once.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

HEARTBEAT_S = 10.0


@contextmanager
def hold(run_dir: Path, stale_after_s: float = 120.0, force: bool = False, poll_s: float = 1.0):
    """Hold `run_dir/.lock` for the duration of the block, waiting for a live holder and taking over a stale one."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / ".lock"
    waited = False
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            why = "eval.overwrite=true" if force else stale(lock, stale_after_s)
            if why:
                print(f"[lock] taking over {lock} ({_holder(lock)}): {why}")
                lock.unlink(missing_ok=True)
                continue
            if not waited:
                print(
                    f"[wait] {run_dir} is being run by {_holder(lock)}; waiting for it (its lock is taken over "
                    f"if its heartbeat stops for {stale_after_s:g} s)"
                )
                waited = True
            time.sleep(poll_s)
    with os.fdopen(fd, "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}")
    done = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lock, done), daemon=True)
    beat.start()
    try:
        yield waited
    finally:
        done.set()
        beat.join()
        lock.unlink(missing_ok=True)


def stale(lock: Path, stale_after_s: float) -> str | None:
    """Why `lock` is stale, or None while its holder looks alive."""
    try:
        host, _, pid = lock.read_text().partition(" ")
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return "released meanwhile"
    if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
        return f"process {pid} is gone"
    if age > stale_after_s:
        return f"no heartbeat for {age:.0f} s (> eval.lock_timeout_s={stale_after_s:g})"
    return None


def _holder(lock: Path) -> str:
    try:
        host, _, pid = lock.read_text().partition(" ")
    except FileNotFoundError:
        return "nobody"
    return f"process {pid} on {host}"


def _heartbeat(lock: Path, done: threading.Event) -> None:
    while not done.wait(HEARTBEAT_S):
        try:
            os.utime(lock)
        except FileNotFoundError:
            return


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
