"""Experiment tracking: wandb, offline by default (files under the run directory, `wandb sync` later)."""

from __future__ import annotations

import os
from contextlib import contextmanager


@contextmanager
def wandb_run(logger_cfg: dict | None, run_dir: str, name: str, config: dict, job_type: str):
    """Yield a wandb run (or None when `logger.mode=disabled`); always finished on exit."""
    mode = (logger_cfg or {}).get("mode", "disabled")
    if mode not in ("offline", "online", "disabled"):
        raise ValueError(f"logger.mode={mode!r}: use offline, online or disabled")
    if mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
        yield None
        return
    import wandb

    run = wandb.init(
        project=logger_cfg.get("project", "adore"),
        entity=logger_cfg.get("entity"),
        tags=list(logger_cfg.get("tags") or []),
        mode=mode,
        dir=run_dir,
        name=name,
        config=config,
        job_type=job_type,
        reinit="finish_previous",
    )
    try:
        yield run
    finally:
        run.finish()
