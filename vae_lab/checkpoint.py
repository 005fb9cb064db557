"""Checkpoints: what they hold, how they are written (atomically) and read (safely).

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts:

    format      "vae_lab/1", which tells our files from others
    epoch       the last completed epoch
    model, optimizer, scheduler   their state_dicts
    rng         {"torch": CPU RNG state, "cuda": [per-device states], "shuffle": batch-order generator}
    config      the run's resolved config (model, loss, data, optim, scheduler, train, seed, ...)
    history     the metrics.csv rows so far, so a resumed run continues the log
    data        the data set actually used (differs from config.data.name after a fallback)

It is written to a temporary file in the same folder and renamed into place, so a
reader (or a crash) never sees half a file, and read with torch.load(weights_only=True),
which refuses any pickle that would construct arbitrary objects or run code.
"""
from __future__ import annotations

import importlib
import inspect
import os
import pickle
import uuid
import zipfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from vae_lab.errors import CheckpointError

FORMAT = "vae_lab/1"
# Where the data lives describes the machine, not the experiment: these data settings
# always come from the current config, never from a checkpoint.
MACHINE_DATA_KEYS = ("root", "download", "fallback")
REQUIRED_KEYS = ("format", "epoch", "model", "config")


# What each config group may build: a class from a trusted module that derives from the
# group's base class (for data: a loader whose declared return type is ImageData). Trusted
# are vae_lab's own modules, torch's optimizers and schedulers, and the modules a user
# lists in `trusted_modules` (with their submodules). Nothing else is ever imported.
GROUP_BASES = {
    "model": ("vae_lab.model", "VAE"),
    "prior": ("vae_lab.priors", "Prior"),
    "loss": ("vae_lab.objectives", "Objective"),
    "data": ("vae_lab.data", "ImageData"),
    "optim": ("torch.optim", "Optimizer"),
    "scheduler": ("torch.optim.lr_scheduler", "LRScheduler"),
}
OWN_MODULES = ("vae_lab.model", "vae_lab.priors", "vae_lab.objectives", "vae_lab.loss", "vae_lab.data",
               "torch.optim", "torch.optim.lr_scheduler")
DEFAULT_PRIOR = {"_target_": "vae_lab.priors.NormalPrior"}  # checkpoints from before priors existed
# The parts of a checkpoint's config vae_lab ever reads; the rest (logger, evaluate, ...) is dropped.
READ_FROM_CHECKPOINT = (*GROUP_BASES, "train", "seed")


def untrusted_target(config: dict, trusted_modules=()) -> str | None:
    """Why `config` (a plain dict) would build something it must not, or None.

    The module of each group's `_target_` is checked by name before it is imported; only
    then is the target looked up and checked against the group's base class. A
    `_target_` anywhere else in the tree is refused: vae_lab never writes one there.
    """
    read = {key: config[key] for key in READ_FROM_CHECKPOINT if key in config}
    hidden = [key for key in _target_paths(read) if key.count(".") != 1 or key.split(".")[0] not in GROUP_BASES]
    if hidden:
        return f"it has a _target_ at {hidden[0]}, where vae_lab never puts one"
    for group, (base_module, base_name) in GROUP_BASES.items():
        node = config.get(group)
        if node is None and group == "prior":
            continue
        target = node.get("_target_") if isinstance(node, dict) else None
        if not isinstance(target, str) or "." not in target:
            return f"{group} names no class to build ({target!r})"
        module_name, _, name = target.rpartition(".")
        if not _is_trusted(module_name, trusted_modules):
            return (f"{group} is built by {target!r}, and {module_name} is not a trusted module "
                    "(trusted: vae_lab's own modules and those you list in trusted_modules=[...])")
        found = getattr(importlib.import_module(module_name), name, None)
        base = getattr(importlib.import_module(base_module), base_name)
        if not _builds(found, base):
            return f"{group} is built by {target!r}, which is not a {base_module}.{base_name}{' loader' if group == 'data' else ' class'}"
    return None


def _is_trusted(module_name: str, trusted_modules) -> bool:
    own = module_name in OWN_MODULES
    listed = any(module_name == m or module_name.startswith(m + ".") for m in trusted_modules if isinstance(m, str) and m)
    return own or listed


def _builds(found, base: type) -> bool:
    if isinstance(found, type):
        return issubclass(found, base)
    if callable(found) and base.__name__ == "ImageData":  # a loader function must declare what it returns
        return inspect.signature(found).return_annotation in (base, base.__name__)
    return False


def save_checkpoint(state: dict, path: Path) -> None:
    """Write `state` to `path` atomically: complete old file or complete new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name opened with "x" (not mkstemp, whose 0600 mode the final file would keep).
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(temporary, "xb") as file:
            torch.save({"format": FORMAT, **state}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or a run directory (its checkpoints/last.pt)."""
    path = Path(path).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.pt", path / "last.pt"):
            if candidate.is_file():
                return candidate
        raise CheckpointError(
            f"{path} is a folder without checkpoints (looked for checkpoints/last.pt and last.pt). "
            "Pass a checkpoint file or a training run's directory."
        )
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the file does not exist. Check the path (runs live under outputs/<date>/<time>/checkpoints/).")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read and check a checkpoint file (or a run directory's last.pt); never runs code from it."""
    path = resolve_checkpoint_path(path)
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is not ours
        raise CheckpointError(
            f"cannot read {path}: the file is truncated, corrupted or not a PyTorch file (not a zip archive). "
            "Use another checkpoint, e.g. an earlier checkpoints/model_<epoch>.pt."
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refused to load {path}: it holds Python objects that could run code when unpickled, "
            "and vae_lab only loads plain tensors and values. Only use checkpoints written by vae_lab."
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise CheckpointError(
            f"cannot read {path}: the file is truncated, corrupted or not a PyTorch file ({_first_line(error)}). "
            "Use another checkpoint, e.g. an earlier checkpoints/model_<epoch>.pt."
        ) from error
    if not isinstance(state, dict) or state.get("format") != FORMAT or not all(k in state for k in REQUIRED_KEYS):
        raise CheckpointError(
            f"{path} is a PyTorch file but not a vae_lab checkpoint (no '{FORMAT}' marker). "
            "Pass a checkpoint written by `python run.py task=train`."
        )
    return state


def saved_config(state: dict, path: str | Path, trusted_modules=()) -> DictConfig:
    """The run config a checkpoint holds, once it is known to build only trusted parts.

    The config's `_target_`s are instantiated later, and instantiating is calling: a
    crafted file could name any function. `trusted_modules` comes from the current
    command line, never from the checkpoint.
    """
    config = state["config"]
    if not isinstance(config, dict):
        raise CheckpointError(f"refused {path}: its config is not a mapping.")
    problem = untrusted_target(config, trusted_modules)
    if problem:
        raise CheckpointError(f"refused {path}: its config builds something vae_lab does not trust: {problem}.")
    return OmegaConf.create({"prior": DEFAULT_PRIOR, **{key: config[key] for key in READ_FROM_CHECKPOINT if key in config}})


def _target_paths(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        found = [f"{prefix}{key}" for key in node if key == "_target_"]
        for key, value in node.items():
            found += _target_paths(value, f"{prefix}{key}.")
        return found
    if isinstance(node, list):
        return [path for i, value in enumerate(node) for path in _target_paths(value, f"{prefix}{i}.")]
    return []


def data_config_here(state: dict, saved: DictConfig, current_data: DictConfig) -> DictConfig:
    """The checkpoint's data config: the data set it actually used (after any fallback),
    at this machine's data location (root, download, fallback come from `current_data`)."""
    data = saved.data.copy()
    with open_dict(data):
        data.name = state.get("data", data.name)
        for key in MACHINE_DATA_KEYS:
            data[key] = current_data[key]
    return data


def load_model_weights(model: torch.nn.Module, state: dict, path: str | Path) -> None:
    """Load the checkpoint's weights into the model its config describes, or say why they do not fit."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        described = state["config"].get("model", {})
        raise CheckpointError(
            f"the weights in {path} do not fit the model its own config describes ({described}): "
            f"{_first_line(error, skip_header=True)}. The file was altered or written by another program."
        ) from error


def _first_line(error: BaseException, skip_header: bool = False) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if skip_header and len(lines) > 1:
        lines = lines[1:]
    return lines[0] if lines else type(error).__name__
