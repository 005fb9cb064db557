"""The command line: Hydra composes the config, `run_task` picks the task and runs it.

`python run.py ...` and the `vae-lab ...` console script are this same `main`.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import sys
import time
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
# Hydra plugins behind the optional extras: the override that needs one -> (module, extra).
PLUGINS = {
    "hydra/launcher=joblib": ("hydra_plugins.hydra_joblib_launcher", "sweep"),
    "hydra/sweeper=optuna": ("hydra_plugins.hydra_optuna_sweeper", "sweep"),
    "experiment=optuna_search": ("hydra_plugins.hydra_optuna_sweeper", "sweep"),
    "hydra/launcher=submitit_local": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "hydra/launcher=submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "hydra/launcher=slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "hydra/launcher=ray": ("hydra_plugins.hydra_ray_launcher", "ray"),
}


def _train(cfg, run_dir):
    from vae_lab.train import train

    return train(cfg, run_dir)


def _evaluate(cfg, run_dir):
    from vae_lab.evaluate import evaluate

    return evaluate(cfg, run_dir)


def _summarize(cfg, run_dir):
    from vae_lab.sweep import summarize

    return summarize(cfg, run_dir)


TASKS = {"train": _train, "evaluate": _evaluate, "summarize": _summarize}


def run_task(cfg: DictConfig, run_dir: Path):
    """Check the config, then run the task it names with `run_dir` as the run directory."""
    validate(cfg, TASKS)
    with log_file(run_dir / "run.log"):
        return TASKS[cfg.task](cfg, run_dir)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def hydra_main(cfg: DictConfig):
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return _sweep_job(cfg, run_dir)
    try:
        return run_task(cfg, run_dir)
    except VaeLabError as error:
        log.error("%s", error)
        sys.exit(getattr(error, "exit_code", USER_ERROR_EXIT))


def _sweep_job(cfg: DictConfig, run_dir: Path) -> float:
    """One job of a sweep: a failure is logged and recorded in job.json, and the sweep goes on.

    Returning (NaN) instead of raising keeps every launcher and sweeper running the
    other jobs; the summary callback reports the failure and sets the exit status.
    """
    started = time.perf_counter()
    status = {"status": "completed", "error": ""}
    value = math.nan
    try:
        value = run_task(cfg, run_dir)
    except VaeLabError as error:
        log.error("%s", error)
        status = {"status": "failed", "error": str(error)}
    except Exception as error:  # a bug: keep its traceback in run.log, and the sweep going
        log.exception("job failed")
        status = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
    finally:
        status["seconds"] = round(time.perf_counter() - started, 3)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "job.json").write_text(json.dumps(status, indent=2) + "\n")
    return value


def _missing_plugin(arguments: list[str]) -> str | None:
    """The install command for a plugin that an override asks for and this install lacks."""
    for argument in arguments:
        key = argument.lstrip("+~")
        if key.startswith("hydra/launcher=") or key.startswith("hydra/sweeper=") or key.startswith("experiment="):
            needed = PLUGINS.get(key)
            if needed and importlib.util.find_spec(needed[0]) is None:
                return f"error: {key} needs the optional extra '{needed[1]}': pip install -e '.[{needed[1]}]'"
    return None


def main() -> None:
    """`python run.py` / `vae-lab`: refuse early when an optional plugin is missing, then run Hydra."""
    message = _missing_plugin(sys.argv[1:])
    if message:
        print(message, file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
    hydra_main()
