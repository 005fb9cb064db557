"""The run's surroundings: which device, which seed, where the log goes."""
from __future__ import annotations

import logging
import random
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from vae_lab.errors import VaeLabError

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def resolve_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; anything else is taken as written."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def build(node):
    """hydra.utils.instantiate, except that our own errors come out as themselves.

    Hydra wraps whatever a `_target_` raises; a VaeLabError's message is meant for the
    user as it is.
    """
    try:
        return instantiate(node)
    except InstantiationException as error:
        if isinstance(error.__cause__, VaeLabError):
            raise error.__cause__ from None
        raise


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


@contextmanager
def log_file(path: Path):
    """Send vae_lab's INFO log to `path` for the duration, unless Hydra already does.

    Under `python run.py` Hydra's job logging writes run.log; when a task is called
    directly (tests, notebooks) this gives it the same file.
    """
    root = logging.getLogger()
    target = str(path.resolve())
    if any(isinstance(h, logging.FileHandler) and h.baseFilename == target for h in root.handlers):
        yield
        return
    package = logging.getLogger("vae_lab")
    old_level = package.level
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(target)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.INFO)
    package.addHandler(handler)
    if package.getEffectiveLevel() > logging.INFO:
        package.setLevel(logging.INFO)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(old_level)
        handler.close()
