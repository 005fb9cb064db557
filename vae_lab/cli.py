"""The command line: Hydra composes the config, `run_task` picks the task and runs it.

`python run.py ...` and the `vae-lab ...` console script are this same `main`.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from vae_lab.errors import VaeLabError
from vae_lab.runtime import log_file
from vae_lab.validate import validate

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"
USER_ERROR_EXIT = 2


def _train(cfg, run_dir):
    from vae_lab.train import train

    return train(cfg, run_dir)


def _evaluate(cfg, run_dir):
    from vae_lab.evaluate import evaluate

    return evaluate(cfg, run_dir)


TASKS = {"train": _train, "evaluate": _evaluate}


def run_task(cfg: DictConfig, run_dir: Path):
    """Check the config, then run the task it names with `run_dir` as the run directory."""
    validate(cfg, TASKS)
    with log_file(run_dir / "run.log"):
        return TASKS[cfg.task](cfg, run_dir)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig):
    hydra_cfg = HydraConfig.get()
    try:
        return run_task(cfg, Path(hydra_cfg.runtime.output_dir))
    except VaeLabError as error:
        log.error("%s", error)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise  # the sweep records this job as failed and goes on with the others
        sys.exit(getattr(error, "exit_code", USER_ERROR_EXIT))
