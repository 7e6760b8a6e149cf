"""Evaluate a release method on a dataset: `python eval.py method=adore method.m=128 data=samsum`.

Sweeps: `python eval.py -m method=window,adore method.m=64,128`. See README.md.
"""

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from adore.eval import job


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    try:
        prepared = job.prepare(cfg, HydraConfig.get().runtime.output_dir)
    except job.USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.exit(f"error: {err}")
    result = job.execute(prepared) if isinstance(prepared, job.Job) else prepared
    return result["metrics"].get("eval/rougeL")  # what a Hydra sweeper would optimise


if __name__ == "__main__":
    main()
