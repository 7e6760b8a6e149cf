"""What `train.py` needs besides instantiation: config checks at start, the logger, the labels location.

`check_config` runs before any model is loaded, so a bad value fails in a second with the value and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from adore.checks import check_integer
from adore.config import build
from adore.controller import continuable

STAGES = ("finetune", "labels", "controller")

# conf/trainer/ddp.yaml: a device count and precision that work where the run is, GPUs or CPU processes
OmegaConf.register_new_resolver("ddp_devices", lambda: torch.cuda.device_count() or 2, replace=True)
OmegaConf.register_new_resolver(
    "if_cuda", lambda on_gpu, on_cpu: on_gpu if torch.cuda.is_available() else on_cpu, replace=True
)
LATEST = "latest"  # stage.datamodule.labels: the newest outputs/train/labels/*/labels/labels.pt
LABELS_GLOB = "outputs/train/labels/*/labels/labels.pt"
CUDA_PRECISIONS = ("16-mixed", "16", 16, "16-true", "transformer-engine")


def _fail(message: str):
    raise ValueError(message)


def latest_labels(root: str | Path = ".") -> Path | None:
    found = sorted(Path(root).glob(LABELS_GLOB), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def resolve_labels(path: str | None) -> Path:
    """The labels file the controller stage reads; a run folder is accepted for its labels/labels.pt."""
    fix = "run `python train.py stage=labels` first, or pass stage.datamodule.labels=<labels run>/labels/labels.pt"
    if path in (None, LATEST):
        found = latest_labels()
        if found is None:
            _fail(f"stage.datamodule.labels={path!r}: no labels file matches {LABELS_GLOB} under {Path.cwd()}: {fix}")
        return found
    candidate = Path(path)
    if candidate.is_dir():
        candidate = candidate / "labels" / "labels.pt" if (candidate / "labels").is_dir() else candidate / "labels.pt"
    if not candidate.is_file():
        _fail(f"stage.datamodule.labels={path!r}: {candidate} does not exist: {fix}")
    return candidate


def checkpoint_dir(cfg: DictConfig) -> Path:
    return Path(cfg.run_dir) / "checkpoints"


def check_config(cfg: DictConfig) -> None:
    """Fail fast on values that would fail late. Resolves `stage.datamodule.labels` in place."""
    stage = cfg.stage.name
    if stage not in STAGES:
        _fail(f"stage.name={stage!r} is not a training stage: use stage=finetune, stage=labels or stage=controller")
    check_integer("K", cfg.K, fix=": top-K keeps K keys per query; pass e.g. K=64")
    build(cfg.model)  # ModelSpec checks device, quantize (CUDA only) and adapter without loading anything
    build(cfg.data)
    loader = cfg.stage.datamodule
    for key, least, optional in (("batch_size", 1, False), ("num_train", 1, True), ("num_val", 0, False)):
        check_integer(f"stage.datamodule.{key}", loader.get(key, least), least, optional=optional)
    cuda = torch.cuda.is_available()
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if not cuda and accelerator in ("gpu", "cuda"):
        _fail(
            f"trainer.accelerator={accelerator!r} but CUDA is not available here: use trainer.accelerator=auto or cpu"
        )
    precision = cfg.trainer.get("precision", "32-true")
    if not cuda and precision in CUDA_PRECISIONS:
        _fail(f"trainer.precision={precision!r} needs CUDA: on CPU use trainer.precision=32-true (or bf16-mixed)")
    mode = cfg.logger.get("mode", "disabled")
    if mode not in ("offline", "online", "disabled"):
        _fail(f"logger.mode={mode!r}: use offline, online or disabled")
    module = cfg.stage.module
    if stage == "finetune":
        check_integer("stage.module.lora.r", module.lora.r, fix=": the LoRA rank, e.g. 16")
        check_integer("stage.datamodule.max_length", loader.max_length, 2, fix=": a prompt token and a target")
    if stage == "labels":
        check_integer("stage.module.h2o_k", module.h2o_k, optional=True, fix=": the H2O ranking's length (null = 2*K)")
    if stage != "controller" and "recipe" in cfg.stage.module:
        _fail(f"recipe={cfg.stage.module.recipe} is a controller recipe (conf/recipe): use it with stage=controller")
    if stage == "controller":
        given = cfg.stage.datamodule.labels
        many = OmegaConf.is_list(given) or isinstance(given, list | tuple)
        labels = [str(resolve_labels(p)) for p in given] if many else str(resolve_labels(given))
        with open_dict(cfg):
            cfg.stage.datamodule.labels = labels
        check_integer(
            "stage.module.budget", module.budget, optional=True, fix=": the evaluated budget (null = the labels' K)"
        )
        if module.get("init_from"):  # before the backbone loads
            continuable(module.init_from, OmegaConf.to_container(module.controller), "stage.module.init_from")
    if not cfg.train.resume and any(checkpoint_dir(cfg).glob("*.ckpt")):
        _fail(
            f"{checkpoint_dir(cfg)} holds checkpoints of an earlier run: pass train.resume=true to continue it, or "
            "start a new one in another folder (run_dir=<new folder>, or remove that one)"
        )
    if cfg.train.resume and not (checkpoint_dir(cfg) / "last.ckpt").exists():
        _fail(
            f"train.resume=true but {checkpoint_dir(cfg) / 'last.ckpt'} does not exist: pass the folder of the run to "
            "continue, hydra.run.dir=<run_dir> (or run_dir=<run_dir>), or drop train.resume"
        )


def make_logger(logger_cfg: DictConfig, run_dir: str | Path, name: str, config: dict):
    """Lightning's WandbLogger from conf/logger (offline: files under the run dir); a CSVLogger when disabled,
    whose metrics.csv keeps the history of the run it resumes."""
    from lightning.pytorch.loggers import WandbLogger

    mode = logger_cfg.get("mode", "disabled")
    if mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
        return _history_csv_logger(run_dir)
    return WandbLogger(
        project=logger_cfg.get("project", "adore"),
        entity=logger_cfg.get("entity"),
        tags=list(logger_cfg.get("tags") or []),
        mode=mode,
        save_dir=str(run_dir),
        name=name,
        job_type="train",
        config=config,
    )


def _history_csv_logger(run_dir):
    """A CSVLogger that appends to an earlier run's metrics.csv (Lightning's own deletes it on a resume): rows
    of steps before the first one logged now are kept, later ones (logged after the checkpoint) replaced."""
    import csv

    from lightning.fabric.loggers.logger import rank_zero_experiment
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class Writer(ExperimentWriter):
        def __init__(self, log_dir: str) -> None:
            path = Path(log_dir) / self.NAME_METRICS_FILE
            self.earlier = list(csv.DictReader(path.open(newline=""))) if path.is_file() else []
            super().__init__(log_dir)  # removes the file

        def save(self) -> None:
            if self.earlier and self.metrics:
                first = min(int(m["step"]) for m in self.metrics)
                self.metrics = [r for r in self.earlier if int(float(r["step"])) < first] + self.metrics
                self.earlier = []
            super().save()

    class HistoryCSVLogger(CSVLogger):
        @property
        @rank_zero_experiment
        def experiment(self) -> Writer:
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = Writer(log_dir=self.log_dir)
            return self._experiment

    return HistoryCSVLogger(save_dir=run_dir, name="csv", version="")
