"""Every stage on one backbone, in order and resumable: `python pipeline.py [setting=base|finetuned]`.

finetune (setting=finetuned) -> labels -> controller (one per recipe) -> evaluation of every method. See
conf/pipeline.yaml and docs/training.md.
"""

import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from adore.lit.pipeline import Pipeline


@hydra.main(version_base="1.3", config_path="conf", config_name="pipeline")
def main(cfg: DictConfig) -> None:
    try:
        pipeline = Pipeline(**OmegaConf.to_container(cfg, resolve=True))
    except ValueError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.exit(f"error: {err}")
    pipeline.run()


if __name__ == "__main__":
    main()
