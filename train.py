"""Training stages: `python train.py stage=finetune|labels|controller` (docs/training.md).

Compose the config, check it, instantiate datamodule, module, logger and trainer, run, export, write
`metrics.json`. Everything else lives in `adore/` (pure parts) and `adore/lit/` (Lightning wrappers).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from adore.io import write_json
from adore.lit.setup import check_config, checkpoint_dir, make_logger

log = logging.getLogger(__name__)


def _prefixed(metrics: dict, prefix: str = "") -> dict:
    return {prefix + k: float(v) for k, v in metrics.items()}


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Run one stage; returns (metrics, objects). Metrics from a validation before training carry `before/`."""
    check_config(cfg)  # before any model is loaded
    L.seed_everything(cfg.train.seed, workers=True)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)

    datamodule = instantiate(cfg.stage.datamodule, _convert_="all")
    module = instantiate(cfg.stage.module, _convert_="all")
    config = OmegaConf.to_container(cfg, resolve=True)
    logger = make_logger(cfg.logger, run_dir, f"{cfg.stage.name}-{run_dir.name}", config)
    trainer = instantiate(cfg.trainer, logger=logger, default_root_dir=str(run_dir))

    metrics = {}
    started = time.perf_counter()
    if cfg.stage.fit:
        if cfg.stage.validate_before and not cfg.train.resume:
            metrics.update(_prefixed(trainer.validate(module, datamodule=datamodule)[0], "before/"))
        trainer.fit(module, datamodule=datamodule, ckpt_path="last" if cfg.train.resume else None)
        if cfg.stage.validate_after:
            metrics.update(_prefixed(trainer.validate(module, datamodule=datamodule)[0]))
        metrics["trainer/global_step"] = trainer.global_step
    else:
        trainer.predict(module, datamodule=datamodule, return_predictions=False)
    metrics["train/wall_s"] = time.perf_counter() - started  # this process's share (a resumed run: since resume)
    if trainer.is_global_zero:
        metrics.update(module.export(run_dir))
        write_json(run_dir / "metrics.json", metrics)
    log.info("run dir: %s; checkpoints: %s; metrics: %s", run_dir, checkpoint_dir(cfg), metrics)
    return metrics, {"module": module, "datamodule": datamodule, "trainer": trainer}


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig):
    train(cfg)


if __name__ == "__main__":
    main()
