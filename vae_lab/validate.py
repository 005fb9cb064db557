"""Config checks that run before any work, each failing with one line: setting, value, what is allowed."""
from __future__ import annotations

import numbers
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from vae_lab.errors import ConfigError
from vae_lab.options import BINARIZE, DATASETS, EMBEDDINGS, N_COMPONENTS, RECONSTRUCTIONS, RETURN_METRICS, SAMPLERS, TASKS

# precision and recall need k + 1 = 4 neighbours within a set; FID a covariance.
MIN_SAMPLE_COUNT = 10


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first setting of `cfg` whose value is not allowed."""
    _one_of(cfg, "task", TASKS)
    _device(cfg.device)
    for key in ("train.batch_size", "train.epochs", "train.checkpoint_every", "train.plot_every", "model.latent_dim",
                "model.hidden_dim", "evaluate.batch_size", "evaluate.iw_samples", "evaluate.reconstruction_rows",
                "evaluate.images_per_row", "evaluate.generation_samples", "evaluate.embedding_points",
                "evaluate.gmm_components"):
        _check(cfg, key, _is_positive_int, "a whole number >= 1")
    _check(cfg, "optim.lr", lambda v: _is_number(v) and v > 0, "a number > 0 (e.g. 0.001)")
    _check(cfg, "train.alpha", lambda v: _is_number(v) and v >= 0, "a number >= 0 (0.1 in the reference, 1 for the ELBO)")
    _check(cfg, "seed", lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number")
    _one_of(cfg, "loss.reconstruction", RECONSTRUCTIONS)
    _one_of(cfg, "train.return_metric", RETURN_METRICS)
    for key in ("train.amp", "train.channels_last", "train.evaluate_at_end"):
        _check(cfg, key, lambda v: isinstance(v, bool), "true or false")
    _check(cfg, "train.compile", lambda v: isinstance(v, (bool, str)), "false, true or a torch.compile backend name (e.g. aot_eager)")
    _one_of(cfg, "evaluate.n_components", N_COMPONENTS)
    _one_of(cfg, "evaluate.embedding", EMBEDDINGS)
    _samplers(cfg)
    _check(cfg, "evaluate.sample_count", lambda v: _is_positive_int(v) and v >= MIN_SAMPLE_COUNT,
           f"a whole number >= {MIN_SAMPLE_COUNT} (10000 for figures comparable with the README)")
    _check(cfg, "evaluate.sample_metrics", lambda v: isinstance(v, bool), "true or false")
    _one_of(cfg, "data.name", DATASETS)
    _one_of(cfg, "data.binarize", BINARIZE)
    _check(cfg, "data.limit", lambda v: v is None or _is_positive_int(v), "null (all images) or a whole number >= 1")
    root = OmegaConf.select(cfg, "data.root")
    if cfg.data.name != "mnist_5k" and root is not None and Path(str(root)).expanduser().is_file():
        raise ConfigError(f"data.root={root} is a file: point it at the folder that holds MNIST/raw and FashionMNIST/raw")


def _samplers(cfg: DictConfig) -> None:
    allowed = "a list of distinct names from " + ", ".join(SAMPLERS) + " (e.g. evaluate.samplers=[prior,gmm])"
    _check(cfg, "evaluate.samplers", lambda v: isinstance(v, ListConfig) and all(s in SAMPLERS for s in v) and len(set(v)) == len(v), allowed)


def _check(cfg: DictConfig, key: str, ok: Callable[[object], bool], allowed: str) -> None:
    if OmegaConf.select(cfg, key, default="<absent>") == "<absent>":
        return  # not every model or optimizer has every key
    value = OmegaConf.select(cfg, key)
    if not ok(value):
        raise ConfigError(f"{key}={value!r} is not allowed: use {allowed}")


def _one_of(cfg: DictConfig, key: str, allowed: tuple) -> None:
    _check(cfg, key, lambda v: v in allowed, "one of " + ", ".join(map(str, allowed)))


def _device(name: str) -> None:
    allowed = "auto, cpu, cuda, cuda:N or mps"
    if name in ("auto", "cpu"):
        return
    import torch  # only here: a config error should not wait for torch to load
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={name!r} is not allowed: use {allowed}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name} but this machine has no CUDA GPU: use device=cpu or device=auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={name} but this machine has {torch.cuda.device_count()} CUDA GPU(s): use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device={name} but MPS is not available here: use device=cpu or device=auto")
    elif device.type != "cpu":
        raise ConfigError(f"device={name!r} is not allowed: use {allowed}")


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
