"""Checkpoints: what they hold, how they are written (atomically) and read (safely).

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts:

    format      "vae_lab/1", which tells our files from others
    epoch       the last completed epoch
    model, optimizer, scheduler   their state_dicts
    objective   what the objective trains itself (FactorVAE's discriminator and its optimizer); {} or absent for the others
    rng         {"torch": CPU RNG state, "cuda": [per-device states], "shuffle": batch-order generator}
    config      the run's resolved config (model, loss, data, optim, scheduler, train, seed, ...)
    history     the metrics.csv rows so far, so a resumed run continues the log
    data        the data set actually used (differs from config.data.name after a fallback)
    model_sha256  the integrity digest of `model` (see tensors_digest); absent in files
                  written before it existed, which still load

It is written to a temporary file in the same folder and renamed into place, so a
reader (or a crash) never sees half a file. Reading trusts nothing in the file, and
checks, in this order: a regular file of a sane size; an intact zip archive (the CRC of
every record); torch.load(weights_only=True), which refuses any pickle that would
construct arbitrary objects or run code; the structure and types of the dict; the
digest; finite weights. The config inside is checked separately (saved_config) before
anything is built from it.
"""
from __future__ import annotations

import io
import itertools
import logging
import os
import pickle
import re
import stat
import time
import zipfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from vae_lab.errors import CheckpointError, ConfigError, first_line
from vae_lab.files import is_in_use, tensors_digest, write_atomic
from vae_lab.layout import RunLayout
from vae_lab.loggers import METRIC_COLUMNS
from vae_lab.runtime import build_vae
from vae_lab.options import BUILT_INSIDE, EXPERIMENT_GROUPS, IMAGE_SHAPE, RECORDED_ONLY_GROUPS, VALUE_KINDS, config_entries, is_int, is_number
from vae_lab.validate import untrusted_target, validate

log = logging.getLogger(__name__)

FORMAT = "vae_lab/1"
# Where the data lives describes the machine, not the experiment: these data settings come
# from the current config (when it names the same loader), never from a checkpoint.
MACHINE_DATA_PATHS = ("root", "path", "cache_dir")
MACHINE_DATA_KEYS = (*MACHINE_DATA_PATHS, "download", "fallback")
# Every key vae_lab has ever written; a file without one of them was not written by it.
REQUIRED_KEYS = ("format", "epoch", "model", "optimizer", "scheduler", "rng", "config", "history", "data")
# torch.load reads the whole file into memory. A vae_lab checkpoint is a few MB (the
# reference ConvVAE with its Adam state: 1.2 MB; the MLP VAE: about 8 MB); 2 GiB leaves
# room for models a hundred times larger, yet refuses, before a byte is read, a file that
# would exhaust a laptop's memory.
MAX_CHECKPOINT_BYTES = 2 * 1024**3
DIGEST_KEY = "model_sha256"
# A temporary file of save_checkpoint: ".<name>.<12 hex digits>.tmp" beside the checkpoint.
TEMPORARY_NAME = re.compile(r"\..+\.pt\.[0-9a-f]{12}\.tmp")
# A temporary file younger than this may belong to a save that has not yet taken its lock.
STALE_AFTER_SECONDS = 5.0
# Hydra's instantiate keywords other than _target_ and _partial_: vae_lab never writes
# them, and each changes what building a node does.
INSTANTIATE_KEYWORDS = ("_args_", "_recursive_", "_convert_")
# What a checkpoint written before a group existed built without it: the N(0, I) prior, the diagonal posterior.
DEFAULT_GROUPS = {"prior": {"_target_": "vae_lab.priors.NormalPrior"}, "posterior": {"_target_": "vae_lab.posteriors.Diagonal"}}
REQUIRED_GROUPS = tuple(group for group in EXPERIMENT_GROUPS if group not in DEFAULT_GROUPS)
# The parts of a checkpoint's config vae_lab ever reads; the rest (logger, evaluate, ...) is dropped.
READ_FROM_CHECKPOINT = (*EXPERIMENT_GROUPS, "train", "seed")


def save_checkpoint(state: dict, path: Path) -> None:
    """Write `state` to `path` atomically (vae_lab.files.write_atomic): complete old file or
    complete new file, never half, never through a link planted at `path`.

    torch.save writes into memory and the bytes then go to the file, so a failed write (a full
    disk, a folder that became unwritable) is the OSError naming `path` that write_atomic raises,
    never torch's zip writer's RuntimeError ("unexpected pos"), which says nothing of the cause.
    """
    content = {"format": FORMAT, **state}
    if "model" in state:
        content[DIGEST_KEY] = tensors_digest(state["model"])

    def write(file) -> None:
        serialized = io.BytesIO()
        torch.save(content, serialized)
        file.write(serialized.getbuffer())

    write_atomic(path, write)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files that interrupted saves left in `folder`, saying so.

    A save holds a lock on its temporary file until it is renamed (the lock dies with a
    killed process), so a live save's file is never taken; a file younger than
    STALE_AFTER_SECONDS is left too, in case its save has not locked it yet.
    """
    removed = []
    for candidate in sorted(folder.glob(".*.pt.*.tmp")):
        if not TEMPORARY_NAME.fullmatch(candidate.name) or _in_use(candidate):
            continue
        try:
            candidate.unlink()
        except OSError:  # someone else's folder, or removed meanwhile: not ours to insist
            continue
        log.warning("removed %s, the temporary file of a checkpoint save that was interrupted", candidate)
        removed.append(candidate)
    return removed


def _in_use(temporary: Path) -> bool:
    try:
        return time.time() - temporary.stat().st_mtime < STALE_AFTER_SECONDS or is_in_use(temporary)
    except OSError:  # removed meanwhile, or not ours: leave it alone
        return True


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or a run directory (its checkpoints/last.pt)."""
    path = Path(path).expanduser()
    if path.is_dir():
        layout = RunLayout(path)
        for candidate in (layout.last_checkpoint, path / layout.last_checkpoint.name):  # a run, or its checkpoints/
            if os.path.lexists(candidate):  # whatever it is: reading it says if it is not a regular file
                return candidate
        if layout.checkpoints.is_dir():  # a run killed during its first save
            remove_stale_temporaries(layout.checkpoints)
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
    with _open_regular_file(path) as file:
        remove_stale_temporaries(path.parent)
        _check_archive(file, path)
        state = _unpickle(file, path, map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a PyTorch file but not a vae_lab checkpoint (no '{FORMAT}' marker). "
            "Pass a checkpoint written by `python run.py task=train`."
        )
    check_structure(state, path)
    check_digest(state, path)
    check_finite(state, path)
    return state


def _open_regular_file(path: Path):
    """`path` opened for reading, if it is a regular file of a sane size.

    FIFOs, devices and sockets (also behind symlinks) are refused before they are read:
    a FIFO blocks forever and /dev/zero never ends. The type is checked again on the open
    descriptor (opened non-blocking, so a FIFO cannot hang the open), in case the path
    changed in between.
    """
    try:
        kind = os.stat(path).st_mode
        _refuse_special(kind, path)
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        raise CheckpointError(f"cannot open {path}: {error.strerror or error}. Check the path and its permissions.") from error
    file = os.fdopen(descriptor, "rb")
    try:
        status = os.fstat(descriptor)
        _refuse_special(status.st_mode, path)
        if status.st_size > MAX_CHECKPOINT_BYTES:
            raise CheckpointError(
                f"refused {path}: it is {status.st_size / 1024**3:.1f} GiB, and a vae_lab checkpoint is a few MB "
                f"(the limit is {MAX_CHECKPOINT_BYTES // 1024**3} GiB). Pass a checkpoint written by `python run.py task=train`."
            )
    except BaseException:
        file.close()
        raise
    return file


def _refuse_special(mode: int, path: Path) -> None:
    if stat.S_ISREG(mode):
        return
    kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else \
        "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
    if path.is_symlink():
        kind = f"{kind} (it links to {os.path.realpath(path)})"
    raise CheckpointError(f"refused {path}: it is {kind}, not a checkpoint file. Pass a checkpoints/*.pt file or a run directory.")


def _check_archive(file, path: Path) -> None:
    """torch.save writes a zip archive with a CRC per record: check them all before unpickling.

    A bit flipped anywhere in the pickle or in a tensor then reads as corruption, never
    as weights that load, nor as a pickle that "could run code".
    """
    try:
        if not zipfile.is_zipfile(file):  # anything else is not ours
            raise CheckpointError(
                f"cannot read {path}: the file is truncated, corrupted or not a PyTorch file (not a zip archive). "
                "Use another checkpoint, e.g. an earlier checkpoints/model_<epoch>.pt."
            )
        file.seek(0)
        with zipfile.ZipFile(file) as archive:
            damaged = archive.testzip()
    except CheckpointError:
        raise
    except Exception as error:  # a flipped header field can fail the archive reader in many ways
        raise _corrupted(path, first_line(error)) from error
    if damaged is not None:
        raise _corrupted(path, f"record {damaged} fails its CRC check")
    file.seek(0)


def _corrupted(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(
        f"cannot read {path}: the file is corrupted ({detail}). "
        "Use another checkpoint, e.g. an earlier checkpoints/model_<epoch>.pt."
    )


def _unpickle(file, path: Path, map_location) -> object:
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only names the global it refused; other unpickling errors are damage.
        if "GLOBAL" not in str(error):
            raise _corrupted(path, first_line(error, skip_header=True)) from error
        raise CheckpointError(
            f"refused to load {path}: it holds Python objects that could run code when unpickled, "
            "and vae_lab only loads plain tensors and values. Only use checkpoints written by vae_lab."
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise CheckpointError(
            f"cannot read {path}: the file is truncated, corrupted or not a PyTorch file ({first_line(error)}). "
            "Use another checkpoint, e.g. an earlier checkpoints/model_<epoch>.pt."
        ) from error


def check_structure(state: dict, path: str | Path) -> None:
    """Every key vae_lab writes, with the type it writes, before anything uses them."""
    problem = _structure_problem(state)
    if problem:
        raise CheckpointError(
            f"refused {path}: it is not a well-formed vae_lab checkpoint ({problem}). "
            "The file was altered or written by another program; use another checkpoint."
        )


def _structure_problem(state: dict) -> str | None:
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        return f"no {', '.join(missing)}"
    epoch, model, config, rng = state["epoch"], state["model"], state["config"], state["rng"]
    if not is_int(epoch) or epoch < 0:
        return f"epoch is {epoch!r}, not a whole number >= 0"
    if not isinstance(model, dict) or not model:
        return "model is not a dict of tensors"
    for name, tensor in model.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            return f"model[{name!r}] is a {type(tensor).__name__}, not a tensor named by a string"
    for key in ("optimizer", "scheduler", "rng", "objective"):
        if key == "objective" and key not in state:
            continue
        if not isinstance(state[key], dict) or not all(isinstance(k, str) for k in state[key]):
            return f"{key} is a {type(state[key]).__name__}, not a state dict"
    for key in ("torch", "shuffle"):  # both CPU generators, whose state has a fixed size
        found = rng.get(key)
        if not isinstance(found, torch.Tensor) or found.dtype != torch.uint8 or found.shape != torch.get_rng_state().shape:
            return f"rng[{key!r}] is not a random generator state"
    cuda = rng.get("cuda", [])
    if not isinstance(cuda, list) or not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda):
        return "rng['cuda'] is not a list of random generator states"
    history = state["history"]
    if not isinstance(history, list) or not all(_is_metrics_row(row) for row in history):
        return "history is not a list of metrics.csv rows"
    if [row.get("epoch") for row in history] != list(range(1, epoch + 1)):
        return f"history holds {len(history)} rows for epoch {epoch}"
    if not isinstance(state["data"], str) or not state["data"]:
        return f"data is {state['data']!r}, not the name of a data set"
    shape = state.get("image_shape", IMAGE_SHAPE)
    if not (isinstance(shape, (list, tuple)) and len(shape) == 3 and all(is_int(v) and 1 <= v <= 4096 for v in shape)):
        return f"image_shape is {shape!r}, not (channels, height, width)"
    if "data_values" in state and state["data_values"] not in VALUE_KINDS:
        return f"data_values is {state['data_values']!r}, not one of {', '.join(VALUE_KINDS)}"
    if DIGEST_KEY in state and not (isinstance(state[DIGEST_KEY], str) and re.fullmatch(r"[0-9a-f]{64}", state[DIGEST_KEY])):
        return f"{DIGEST_KEY} is not a sha256 digest"
    if not isinstance(config, dict):
        return "config is not a dict"
    for group in (*REQUIRED_GROUPS, "train"):
        if not isinstance(config.get(group), dict):
            return f"config has no {group} group"
    if not is_int(config.get("seed")):
        return "config.seed is not a whole number"
    return None


def _is_metrics_row(row) -> bool:
    """A row as train writes it: metrics.csv's columns, numbers except the data set's name."""
    return (
        isinstance(row, dict) and set(row) <= set(METRIC_COLUMNS)
        and all(isinstance(value, str) if key == "data" else is_number(value) for key, value in row.items())
    )


def check_digest(state: dict, path: str | Path) -> None:
    """The weights are the ones that were saved. Files written before the digest existed
    have none and are accepted (their zip CRCs are still checked)."""
    if DIGEST_KEY in state and tensors_digest(state["model"]) != state[DIGEST_KEY]:
        raise _corrupted(path, "its weights do not match the digest written with them")


def check_finite(state: dict, path: str | Path) -> None:
    """NaN or infinite weights (or optimizer moments, which would put them there at the first step)."""
    optimizer_tensors = {
        f"optimizer state {index}.{key}": value
        for index, entry in state["optimizer"].get("state", {}).items() if isinstance(entry, dict)
        for key, value in entry.items() if isinstance(value, torch.Tensor)
    }
    optimizer_tensors.update({f"objective state {where}": value for _, where, value in config_entries(state.get("objective", {}))
                              if isinstance(value, torch.Tensor)})
    for name, tensor in {**state["model"], **optimizer_tensors}.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not torch.isfinite(tensor).all():
            holder = "its weights hold" if name in state["model"] else "its optimizer state holds"
            raise CheckpointError(
                f"refused {path}: {holder} NaN or infinite values ({name}), with which the model computes nothing. "
                "Use an earlier checkpoint, e.g. checkpoints/model_<epoch>.pt."
            )


def saved_config(state: dict, path: str | Path, trusted_modules=()) -> DictConfig:
    """The run config a checkpoint holds, once it is known to be plain data that builds only
    trusted parts, with settings the command line would accept, for these weights.

    The config's `_target_`s are instantiated later, and instantiating is calling: a
    crafted file could name any function, directly or through an interpolation that
    creates a node when resolved. So the config must be plain data (no interpolation,
    no resolver, nothing for OmegaConf to compute), each group must name a class of a
    trusted module deriving from the group's base (untrusted_target), and no `_target_`
    may hide deeper in the tree. `trusted_modules` comes from the current command line,
    never from the checkpoint.
    """
    config = _resolved_plain_config(state, path)
    _check_target_placement(config, path)
    problem = untrusted_target({key: config.get(key) for key in EXPERIMENT_GROUPS}, trusted_modules, optional=tuple(DEFAULT_GROUPS))
    if problem:
        raise CheckpointError(f"refused {path}: its config builds something vae_lab does not trust: {problem}.")
    config = {**DEFAULT_GROUPS, **{key: config[key] for key in READ_FROM_CHECKPOINT if key in config}}
    saved = OmegaConf.create(config)
    _check_saved_settings(saved, state["data"], path, trusted_modules, state.get("image_shape", IMAGE_SHAPE))
    _check_model_fits(saved, state, path)
    return saved


def _resolved_plain_config(state: dict, path: str | Path) -> dict:
    """The saved config as OmegaConf reads it, refused first if anything in it (or in the
    data name that joins it) could make OmegaConf compute a value: `${...}` in any form
    (escaped ones included, since they turn back into interpolations when copied into
    another config), in values or keys, at any depth."""
    _refuse_non_data(state["config"], path, "config")
    _refuse_non_data(state["data"], path, "data")
    try:
        # With no "${" anywhere there is nothing to resolve; resolving anyway proves it.
        return OmegaConf.to_container(OmegaConf.create(state["config"]), resolve=True)
    except (OmegaConfBaseException, ValueError, TypeError) as error:
        raise CheckpointError(f"refused {path}: its config is not a config OmegaConf can read ({first_line(error)}).") from error


MAX_CONFIG_DEPTH = 16  # vae_lab's own configs are 3 deep


def _refuse_non_data(node, path, where: str) -> None:
    problem = _non_data(node, where)
    if problem:
        raise CheckpointError(
            f"refused {path}: its config holds {problem}; a checkpoint's config is plain data, "
            "and vae_lab writes it with every value resolved. The file was altered or written by another program."
        )


def _non_data(node, where: str) -> str | None:
    """What in `node` is not plain data (and where), or None; walked by config_entries, which
    descends no deeper than the first entry past MAX_CONFIG_DEPTH."""
    for keys, inner, value in itertools.chain([((), where, node)], config_entries(node, where=where)):
        if len(keys) > MAX_CONFIG_DEPTH:
            return f"nesting deeper than {MAX_CONFIG_DEPTH} levels at {inner}"
        if isinstance(value, dict):
            for key in value:
                if not isinstance(key, str):
                    return f"a key {key!r} that is not a string at {inner}"
                if "${" in key:
                    return f"an interpolation or resolver in the key {key!r} at {inner}"
        elif isinstance(value, str) and ("${" in value or value == "???"):
            return f"{'a missing value' if value == '???' else 'an interpolation or resolver'} ({value!r}) at {inner}"
        elif not isinstance(value, (list, str, bool, int, float, type(None))):
            return f"a {type(value).__name__} at {inner}"
    return None


def plain_config(cfg: DictConfig) -> dict:
    """The run's config as a checkpoint stores it: every interpolation resolved, plain data.

    Checked before training starts: a value that still reads as an interpolation once
    resolved (an escaped "\\${...}") would make the checkpoint one that loading refuses.
    """
    config = OmegaConf.to_container(cfg, resolve=True)
    problem = _non_data(config, "config")
    if problem:
        raise ConfigError(f"the config holds {problem}, which a checkpoint cannot store: use a plain value there")
    try:  # what loading will refuse (an instantiate keyword where vae_lab never writes one), refused before training
        _check_target_placement({key: config[key] for key in READ_FROM_CHECKPOINT if key in config}, "this run's checkpoint")
    except CheckpointError as error:
        what = str(error).removeprefix("refused this run's checkpoint: its config has ").rstrip(".")
        raise ConfigError(f"the config has {what}. Leave that key out: a checkpoint holding it could not be evaluated "
                          "or resumed") from None
    return config


def _check_target_placement(config: dict, path: str | Path) -> None:
    """`_target_` only at the top of the groups vae_lab builds (or records); no other
    instantiate keyword anywhere, and `_partial_` only at the top of a group."""
    groups_with_targets = (*EXPERIMENT_GROUPS, *RECORDED_ONLY_GROUPS)
    for keys, _, _ in config_entries(config):
        name = keys[-1]
        misplaced = (
            (name == "_target_" and not (len(keys) == 2 and keys[0] in groups_with_targets)
             and ".".join(map(str, keys[:-1])) not in BUILT_INSIDE)
            or (name == "_partial_" and len(keys) != 2)
            or name in INSTANTIATE_KEYWORDS
        )
        if misplaced:
            raise CheckpointError(
                f"refused {path}: its config has {name} at {'.'.join(map(str, keys))}, where vae_lab never writes one "
                f"(a checkpoint builds only {', '.join(EXPERIMENT_GROUPS)}, each from the top of its group)."
            )


def _check_saved_settings(saved: DictConfig, data_name: str, path: str | Path, trusted_modules, image_shape) -> None:
    """The saved experiment, checked with the command line's rules (vae_lab.validate).

    What describes this machine or this command (task, device, data location, paths to
    other runs) is not the checkpoint's to decide, so it is set to neutral values first.
    """
    probe = saved.copy()
    with open_dict(probe):
        probe.task = "train"
        probe.device = "cpu"
        if "name" in probe.data:
            probe.data.name = data_name
        for key in MACHINE_DATA_PATHS:  # neutral paths: where the data lives is this machine's business
            if key in probe.data:
                probe.data[key] = "."
        for key in ("train.resume", "evaluate.checkpoint", "summarize.sweep_dir"):
            if OmegaConf.select(probe, key) is not None:
                OmegaConf.update(probe, key, None)
    try:
        validate(probe, trusted_modules, image_shape=tuple(image_shape))
    except ConfigError as error:
        raise CheckpointError(f"refused {path}: its saved config has a setting vae_lab does not accept: {error}") from None
    except OmegaConfBaseException as error:
        raise CheckpointError(f"refused {path}: its saved config lacks settings vae_lab needs ({first_line(error)}).") from None


def _check_model_fits(saved: DictConfig, state: dict, path: str | Path) -> None:
    """Build the saved model on the meta device (shapes only, no memory) and compare it
    with the saved weights, so an absurd size in the config (latent_dim=10**9) is refused
    before anything is allocated: weights that fit in a file of at most
    MAX_CHECKPOINT_BYTES bound what the real build allocates."""
    described = OmegaConf.to_container(saved.model)
    image_shape = state.get("image_shape", IMAGE_SHAPE)  # checkpoints before image_shape was saved: MNIST's
    try:
        with torch.device("meta"):
            model, _ = build_vae(saved.model, saved.prior, saved.loss, image_shape, saved.posterior)
    except Exception as error:  # whatever the constructor of an allowed class says about these arguments
        raise CheckpointError(
            f"refused {path}: the model its config describes ({described}) cannot be built: {first_line(error.__cause__ or error)}."
        ) from error
    if not isinstance(model, torch.nn.Module):
        raise CheckpointError(f"refused {path}: its model config ({described}) does not build a model.")
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    found = {name: tuple(tensor.shape) for name, tensor in state["model"].items()}
    if expected != found:
        missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
        shapes = [name for name in sorted(expected.keys() & found.keys()) if expected[name] != found[name]]
        detail = (
            f"no weights for {missing[0]}" if missing else f"unexpected weights {unexpected[0]}" if unexpected
            else f"{shapes[0]} has shape {list(found[shapes[0]])}, the model needs {list(expected[shapes[0]])}"
        )
        raise CheckpointError(
            f"the weights in {path} do not fit the model its own config describes ({described}): "
            f"{detail}. The file was altered or written by another program."
        )


def data_config_here(state: dict, saved: DictConfig, current_data: DictConfig) -> DictConfig:
    """The checkpoint's data config: the data set it actually used (after any fallback),
    at this machine's data location (the MACHINE_DATA_KEYS of `current_data`, when it names
    the same loader and has the key; else the saved values)."""
    data = saved.data.copy()
    same_loader = current_data.get("_target_") == data.get("_target_")
    with open_dict(data):
        if data.get("name") is not None:  # a data set chosen by name: the one it used (after a fallback)
            data.name = state.get("data", data.name)
        for key in MACHINE_DATA_KEYS:
            if key in data and same_loader and key in current_data:
                data[key] = plain_data_value(key, current_data[key])
    return data


def plain_data_value(key: str, value):
    """A value of this command line that joins a checkpoint's data config: a plain scalar.

    Anything else (a node with a `_target_`, a string that reads as an interpolation once
    assigned) would be built along with the checkpoint's checked config.
    """
    if value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and "${" not in value):
        return value
    raise ConfigError(f"data.{key}={value!r} is not allowed here: use a plain value (a path, a number, true or false), not a config node or an interpolation")


def check_data_fits(state: dict, data, path: str | Path) -> None:
    """The data given now has the image shape and pixel kind the checkpoint was trained on."""
    saved = tuple(state.get("image_shape", IMAGE_SHAPE))
    if saved != tuple(data.image_shape):
        raise CheckpointError(
            f"{path} was trained on images of shape {list(saved)} (C, H, W), and the data given now ({data.name}) has "
            f"{list(data.image_shape)}: pass the data it was trained on (data=..., data.path=...)."
        )
    values = state.get("data_values")
    if isinstance(values, str) and values != data.values:
        raise CheckpointError(
            f"{path} was trained on {values} images, and the data given now ({data.name}) is {data.values}: "
            "its likelihoods would not mean the same. Pass the data it was trained on."
        )


def load_model_weights(model: torch.nn.Module, state: dict, path: str | Path) -> None:
    """Load the checkpoint's weights into the model its config describes, or say why they do not fit."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        described = state["config"].get("model", {})
        raise CheckpointError(
            f"the weights in {path} do not fit the model its own config describes ({described}): "
            f"{first_line(error, skip_header=True)}. The file was altered or written by another program."
        ) from error


def load_objective_state(objective, state: dict, path: str | Path) -> None:
    """Load what the objective trains itself (Objective.state_dict), or say why the file's does not fit.

    Its kinds and shapes are compared with a fresh objective's first; an optimizer in it
    (a key of state_dict naming an optimizer attribute of the objective) has each moment
    checked against its parameter's shape, as the model's optimizer has.
    """
    fresh, saved = objective.state_dict(), state.get("objective", {})
    if not fresh:
        return
    problem = "no objective state" if not saved else _kind_mismatch(fresh, saved, "objective state")
    for key in fresh:
        holder = getattr(objective, key, None)
        if problem is None and isinstance(holder, torch.optim.Optimizer):
            problem = _optimizer_state_mismatch(holder, saved[key].get("state"))
    _load_if_fits(problem, lambda: objective.load_state_dict(saved), "objective state",
                  f"cannot use {path}", f"the objective its config describes ({type(objective).__name__})")


def restore_training_state(optimizer: torch.optim.Optimizer, scheduler, state: dict, path: str | Path) -> None:
    """Load the checkpoint's optimizer and scheduler states, or say why they do not fit.

    They were written for the optimizer and scheduler its config describes. An altered
    file can hold states of other kinds or shapes, which torch would take here and fail
    on at the first step, in the middle of an epoch.
    """
    saved_optimizer, saved_scheduler = state["optimizer"], state["scheduler"]
    problem = (
        _kind_mismatch(optimizer.state_dict()["param_groups"], saved_optimizer.get("param_groups"), "optimizer param_groups")
        or _optimizer_state_mismatch(optimizer, saved_optimizer.get("state"))
        or _kind_mismatch(scheduler.state_dict(), saved_scheduler, "scheduler state")
    )

    def load() -> None:
        optimizer.load_state_dict(saved_optimizer)
        scheduler.load_state_dict(saved_scheduler)

    _load_if_fits(problem, load, "optimizer or scheduler state", f"cannot resume from {path}",
                  "the optimizer and scheduler its config describes")


def _load_if_fits(problem: str | None, load, what: str, cannot: str, described: str) -> None:
    """`load()` where the kind check found no `problem`; else, or if torch refuses, one line naming what does not fit."""
    if problem is None:
        try:
            load()
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as error:
            problem = f"{what} ({first_line(error)})"
    if problem:
        raise CheckpointError(f"{cannot}: its {problem} does not fit {described}. "
                              "The file was altered or written by another program; use another checkpoint.")


def _kind_mismatch(fresh, saved, where: str) -> str | None:
    """Where `saved` differs in kind from `fresh` (the state of a freshly built object):
    in the dict keys both have, list lengths, tensor shapes, scalar kinds. Keys only one
    side has are torch's business (its states gain keys between versions)."""
    if isinstance(fresh, dict):
        if not isinstance(saved, dict):
            return where
        pairs = [(fresh[key], saved[key], f"{where}[{key!r}]") for key in fresh if key in saved]
    elif isinstance(fresh, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(fresh):
            return where
        pairs = [(a, b, f"{where}[{index}]") for index, (a, b) in enumerate(zip(fresh, saved))]
    else:
        return None if _same_kind(fresh, saved) else where
    for fresh_value, saved_value, inner in pairs:
        found = _kind_mismatch(fresh_value, saved_value, inner)
        if found:
            return found
    return None


def _same_kind(fresh, saved) -> bool:
    if isinstance(fresh, torch.Tensor):
        return isinstance(saved, torch.Tensor) and saved.shape == fresh.shape
    if fresh is None:  # unset: torch takes None, a flag or a number there
        return saved is None or isinstance(saved, (bool, int, float))
    if isinstance(fresh, bool):
        return isinstance(saved, bool)
    if is_number(fresh):
        return is_number(saved)
    return type(saved) is type(fresh)


def _optimizer_state_mismatch(optimizer: torch.optim.Optimizer, saved_state) -> str | None:
    """Per-parameter optimizer state (Adam's moments, SGD's momentum) has its parameter's shape."""
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    if not isinstance(saved_state, dict):
        return "optimizer state"
    for index, entry in saved_state.items():
        if not is_int(index) or not 0 <= index < len(parameters) or not isinstance(entry, dict):
            return f"optimizer state[{index!r}]"
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != parameters[index].shape:
                return f"optimizer state[{index}][{key!r}]"
    return None
