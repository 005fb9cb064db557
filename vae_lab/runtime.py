"""The run's surroundings: which device, which seed, how config nodes become objects."""
from __future__ import annotations

import random

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from vae_lab.errors import VaeLabError


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
