"""The run's surroundings: which device, which seed, how config nodes become objects."""
from __future__ import annotations

import random

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from vae_lab.errors import ConfigError, VaeLabError


def resolve_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; anything else is taken as written."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def build(node, **kwargs):
    """hydra.utils.instantiate(node, **kwargs), except that our own errors come out as themselves.

    Hydra wraps whatever a `_target_` raises; a VaeLabError's message is meant for the
    user as it is.
    """
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, VaeLabError):
            raise error.__cause__ from None
        raise


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def build_vae(model_cfg, prior_cfg, loss_cfg, image_shape: tuple[int, ...], posterior_cfg=None):
    """(model, objective) from their config nodes, for images of `image_shape` (C, H, W).

    The objective's likelihood becomes the model's, so its parameters (a learned
    variance) train, checkpoint and evaluate with the model; the `posterior` group's
    flow (none: the diagonal Gaussian) is sized from the model's latent and context;
    then the objective is bound to the model (an auxiliary network of the objective is
    sized from it, and an objective that needs a Gaussian posterior says so).
    """
    from vae_lab.posteriors import Diagonal
    from vae_lab.priors import Prior

    objective = build(loss_cfg)
    image_shape = tuple(int(v) for v in image_shape)
    prior = build(prior_cfg, latent_dim=model_cfg.latent_dim, image_shape=image_shape)
    model = build(model_cfg, image_shape=image_shape, prior=prior, likelihood=objective.likelihood)
    if posterior_cfg is not None:
        flow = build(posterior_cfg, latent_dim=model.latent_dim, context_dim=model.context_dim)
        name = f"posterior ({type(flow).__name__})"
        if flow.identity and type(flow) is not Diagonal:
            raise ConfigError(f"{name} with no steps is the diagonal posterior, and its settings mean nothing: "
                              "use posterior=diagonal, or give it steps >= 1.")
        if not flow.identity:
            if not getattr(model, "takes_flow", True):
                raise ConfigError(f"{name} is a flow over a one-layer model's Gaussian; {type(model).__name__} builds its "
                                  "own posterior. Use posterior=diagonal with this model.")
            if type(model.prior).log_prob is Prior.log_prob:
                raise ConfigError(f"{name} needs a prior that scores its samples (log_prob), and {type(model.prior).__name__} "
                                  "has none: the KL of a flow posterior has no closed form. Use prior=normal|mog|vamp.")
            model.posterior_flow = flow
    objective.bind(model)
    return model, objective
