"""Config checks that run before any work, each failing with one line: setting, value, what is allowed.

Three layers, cheapest first:
1. named settings: ranges and choices (below, without torch);
2. every node, by one mechanism: a `_target_` node's keys are bound to its target's
   signature, the task nodes' keys to the dataclasses in options.py, and each value is
   checked against the parameter's type annotation (unknown or missing arguments, a
   number where a path is expected, ...);
3. for training, a dry build of the cheap parts: every `_target_` group but the data,
   the model counted on the meta device (absurd sizes are refused before allocation),
   then built on the CPU and probed with two images, the optimizer on its parameters,
   the scheduler on that optimizer, stepped twice. What torch's own constructors refuse
   comes out as one line naming the group.
Groups added later (priors, objectives, models) are covered by 2 and 3 without new code.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import math
import os
import re
import types
import typing
import warnings
from collections.abc import Callable
from pathlib import Path, PurePath

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from vae_lab.errors import ConfigError, VaeLabError
from vae_lab.options import (
    BUILT_INSIDE, BUILT_WITH_MODEL, EMBEDDINGS, GROUP_BASES, IMAGE_SHAPE, N_COMPONENTS, OWN_PACKAGES, RECONSTRUCTIONS, RETURN_METRICS,
    SAMPLERS, SETTINGS, TASKS, Range, RunSettings, config_entries, in_package, is_finite, is_int, is_number, usable_cores,
)

# Groups the dry build does not build: building the data reads the data set (the task does that once).
NOT_DRY_BUILT = ("data",)
# Training keeps weights, gradients and two Adam moments: about four float32 copies of the parameters.
TRAINING_BYTES_PER_PARAMETER = 16
# Images past this many values (a 3 x 256 x 256 photo) are named when a model sized from them is too large.
LARGE_IMAGE_PIXELS = 3 * 256 * 256


def validate(cfg: DictConfig, trusted_modules=None, image_shape=None) -> None:
    """Raise ConfigError naming the first setting of `cfg` whose value is not allowed.

    Trust comes first: nothing a config names is imported, let alone built, before every
    `_target_` in it is known to come from a trusted package. `trusted_modules` defaults
    to the config's own (a checkpoint's config is checked with the command line's).
    The dry build probes the model at `image_shape`, else at the shape the data loader
    declares for its settings (declared_image_shape); a loader that cannot tell before
    loading (a folder, an .npz) has its run dry-built by the train task once the data is loaded.
    """
    command_line = trusted_modules is None
    if command_line:
        _check(cfg, "trusted_modules", lambda v: OmegaConf.is_list(v) and all(isinstance(m, str) and m for m in v),
               "a list of module names, e.g. [my_lab.models]")
        trusted_modules = tuple(cfg.get("trusted_modules") or ())
    # What each task reads from the command line's config (a checkpoint's holds only what it builds): every group
    # training builds (the posterior may be absent: the diagonal Gaussian), and the task's settings.
    needs = {"train": (*(group for group in GROUP_BASES if group != "posterior"), "train", "evaluate"), "evaluate": ("evaluate", "data"),
             "summarize": ("summarize",)}.get(cfg.get("task"), ()) if command_line else ()
    missing = next((key for key in needs if not isinstance(cfg.get(key), DictConfig)), None)
    if missing is not None:
        raise ConfigError(_removed(missing, f"task={cfg.get('task')} needs it: leave it in, or choose one of its options "
                                            f"({missing}=...; python run.py --help lists them)"))
    _refuse_untrusted(cfg, trusted_modules)
    _one_of(cfg, "task", TASKS)
    if cfg.get("resume") is True and cfg.task != "train":
        raise ConfigError(f"resume=true continues a training run; task={cfg.task} has nothing to continue. Leave resume out.")
    if cfg.get("resume") is True and OmegaConf.select(cfg, "train.resume"):
        raise ConfigError(f"resume=true and train.resume={cfg.train.resume} both say where to continue from: resume=true "
                          "continues the run folder in place, train.resume continues a checkpoint into a new folder. Choose one.")
    # Ranges are declared with the setting (options.Range in a constructor's or a task setting's annotation)
    # and checked with its type in _check_types; only torch's own optimizer and the machine are ruled on here.
    _check(cfg, "optim.lr", lambda v: is_finite(v) and v > 0, "a number > 0 (e.g. 0.001)")
    cores = usable_cores()
    _check(cfg, "threads", lambda v: v is None or v == "auto" or (_is_positive_int(v) and v <= cores),
           f"auto (the cores free now), null (torch's default) or a whole number from 1 to {cores} (the cores this process may use)")
    if not isinstance(OmegaConf.select(cfg, "loss.reconstruction"), DictConfig):  # a node: its class is checked as a build place
        _one_of(cfg, "loss.reconstruction", RECONSTRUCTIONS)
    _one_of(cfg, "train.return_metric", RETURN_METRICS)
    _one_of(cfg, "evaluate.n_components", N_COMPONENTS)
    _one_of(cfg, "evaluate.embedding", EMBEDDINGS)
    _samplers(cfg)
    _check(cfg, "evaluate.sample_metrics", lambda v: isinstance(v, bool), "true or false")
    _check(cfg, "evaluate.disentanglement", lambda v: v == "auto" or isinstance(v, bool),
           "auto (where the data has generating factors), true (required: an error on data without) or false")
    root = OmegaConf.select(cfg, "data.root")
    if OmegaConf.select(cfg, "data.name") != "mnist_5k" and root is not None and Path(str(root)).expanduser().is_file():
        holds = "MNIST/raw and FashionMNIST/raw" if OmegaConf.select(cfg, "data._target_") == "vae_lab.data.load_dataset" else "its files"
        raise ConfigError(f"data.root={root} is a file: point it at the folder that holds {holds}")
    _device(cfg.device)
    _check_types(cfg, strict=command_line)
    if cfg.task == "train":
        _compile_backend(OmegaConf.select(cfg, "train.compile"))
        image_shape = image_shape or declared_image_shape(cfg)
        if image_shape is not None:
            dry_build(cfg, image_shape)


# --- 0. trust -----------------------------------------------------------------------------------


def _refuse_untrusted(cfg: DictConfig, trusted_modules) -> None:
    try:
        config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as error:
        key = error.full_key or "a setting"
        raise ConfigError(f"{key} is not set: give it on the command line, e.g. {key}=...") from None
    except OmegaConfBaseException as error:
        text = str(error).splitlines()[0]
        node = re.search(r"(?:Interpolation key|access) '?([\w]+)\.", text)
        if node and not isinstance(cfg.get(node.group(1)), DictConfig):  # ~train, train=null: other settings refer to it
            raise ConfigError(_removed(node.group(1), f"other settings refer to it ({text}): leave it in")) from None
        raise ConfigError(f"the config cannot be resolved: {text}. Fix that setting.") from None
    present = {group: config[group] for group in GROUP_BASES if group in config}
    problem = untrusted_target(config, trusted_modules, groups=present)
    if problem:
        raise ConfigError(f"refusing to run: {problem}.")


def _removed(key: str, consequence: str) -> str:
    return f"{key} is not in the config (removed with ~{key}, or set to a plain value), and {consequence}"


def untrusted_target(config: dict, trusted_modules=(), groups: dict | None = None, optional=()) -> str | None:
    """Why `config` (plain data) would build something it must not, or None.

    Every `_target_` anywhere in it must name a module of a trusted package (OWN_PACKAGES
    and `trusted_modules`, by whole dotted names), checked by name before anything is
    imported. Only then is each group's target looked up and checked against the group's
    base class (options.GROUP_BASES). `groups` (default: the groups of `config`) must each
    name a class to build, except those in `optional`, which may be absent.
    """
    trusted = (*OWN_PACKAGES, *trusted_modules)
    for where, target in _targets(config):
        module_name = target.rpartition(".")[0] if isinstance(target, str) else ""
        if not in_package(module_name, trusted):
            if not module_name:
                return f"{where} names no class to build ({target!r})"
            return (f"{where} is built by {target!r}, and {module_name} is not a trusted module "
                    "(trusted: vae_lab's own package, torch.optim and the packages you list in trusted_modules=[...])")
        if where not in GROUP_BASES and where not in BUILT_INSIDE and not in_package(module_name, trusted_modules):
            # vae_lab's own functions are trusted as the groups' classes, not as anything a config may call.
            return (f"{where} is built by {target!r}: outside the groups vae_lab builds ({', '.join(GROUP_BASES)}), "
                    "a config may name only the packages you list in trusted_modules=[...]")
    groups = config if groups is None else groups
    places = [(group, node, GROUP_BASES[group]) for group, node in groups.items()
              if group in GROUP_BASES and not (node is None and group in optional)]
    inside = [(where, _node_at(config, where), BUILT_INSIDE[where]) for where, _ in _targets(config) if where in BUILT_INSIDE]
    for where, node, _ in inside:
        keyword = next((key for key in node if str(key).startswith("_") and key != "_target_"), None)
        if keyword is not None:  # Hydra would build it differently (a partial, positional arguments): never what it means here
            return f"{where}: {keyword} is not allowed in a node a config builds inside a group; give the class and its arguments"
    for group, node, (base_module, base_name) in places + inside:
        target = node.get("_target_") if isinstance(node, dict) else None
        if not isinstance(target, str) or "." not in target:
            return f"{group} names no class to build ({target!r})"
        try:
            found = _import_target(target)
        except (ImportError, AttributeError, ValueError) as error:
            return f"{group}._target_={target!r} cannot be imported ({error}): check the module and name"
        base = getattr(importlib.import_module(base_module), base_name)
        if found is base and base.__subclasses__():  # Likelihood, VAE, Prior: a class to derive from, not to build
            names = ", ".join(sorted(f"{c.__module__}.{c.__qualname__}" for c in base.__subclasses__())[:6])
            return f"{group} is built by {target!r}: the base class itself, which builds nothing; name a subclass (e.g. {names})"
        if not _builds(found, base):
            kind = " loader" if group == "data" else " class"
            return f"{group} is built by {target!r}, which is not a {base_module}.{base_name}{kind}"
    return None


def _node_at(config: dict, where: str) -> dict:
    for key in where.split("."):
        config = config[key]
    return config


def _targets(config: dict) -> list[tuple[str, object]]:
    """(where, value) of every `_target_` in a plain config, at any depth; `where` names its node."""
    return [(where.removesuffix("._target_"), value) for keys, where, value in config_entries(config) if keys[-1] == "_target_"]


def _builds(found, base: type) -> bool:
    if isinstance(found, type):
        return issubclass(found, base)
    if callable(found) and base.__name__ == "ImageData":  # a loader function must declare what it returns
        return inspect.signature(found).return_annotation in (base, base.__name__)
    return False


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


# --- 2. every node against its signature --------------------------------------------------------


def _check_types(cfg: DictConfig, strict: bool = True) -> None:
    """Bind each node's keys to the signature that will receive them, and check each value's type.

    `strict` (the command line's config) also refuses keys no one reads: `+train.epoch=5`, the
    spelling Hydra's own hint suggests for a key it does not know, would otherwise be ignored. A
    checkpoint's saved config is not strict: it may hold settings of an older vae_lab."""
    # In the config's order, so that of two faulty groups the same one is named every time; a user's own group too.
    groups = [key for key in cfg if isinstance(cfg.get(key), DictConfig) and "_target_" in cfg[key]]
    _bind_plain(cfg, "", RunSettings, {*GROUP_BASES, *SETTINGS, *groups} if strict else None)
    for name, schema in SETTINGS.items():
        if isinstance(cfg.get(name), DictConfig):
            _bind_plain(cfg[name], f"{name}.", schema, () if strict else None)
    for key in groups:
        _bind_target(cfg[key], f"{key}")


def _bind_plain(node: DictConfig, prefix: str, schema: type, also=None) -> None:
    """The keys of a plain node that `schema` declares must have the declared types; with `also` (the
    other keys the node may hold), a key neither declares is refused, naming the nearest one that is."""
    hints = typing.get_type_hints(schema, include_extras=True)
    for field in dataclasses.fields(schema):
        if field.name in node:
            _check_value(f"{prefix}{field.name}", OmegaConf.select(node, field.name), hints[field.name])
    known = [*hints, *(also or ())]
    unknown = next((str(key) for key in node if also is not None and key not in known), None)
    if unknown is not None:
        near = difflib.get_close_matches(unknown, known, n=1)
        raise ConfigError(f"{prefix}{unknown} is not a setting vae_lab reads, so it would be ignored"
                          + (f" (did you mean {prefix}{near[0]}?)" if near else "")
                          + f". Leave it out; python run.py --cfg job prints every setting{' of ' + prefix.rstrip('.') if prefix else ''}.")


def _bind_target(node: DictConfig, where: str) -> None:
    """Unknown or missing constructor arguments, and values that do not fit their annotations."""
    target = node["_target_"]
    try:
        function = _import_target(target)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"{where}._target_={target!r} cannot be imported ({error}): check the module and name") from None
    _bind_arguments(function, node, where, target)


def _bind_arguments(function, node: DictConfig, where: str, target: str) -> None:
    """The keys of `node` (but `_target_` and the like) as keyword arguments of `function`."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return  # a builtin without a signature: the dry build still calls it
    arguments = {key: node[key] for key in node if not str(key).startswith("_")}
    try:
        # Only unknown names here: some arguments come from the pipeline (the optimizer's parameters,
        # the prior's latent size); a missing one fails the dry build, which supplies them.
        signature.bind_partial(**arguments)
    except TypeError as error:
        group = where.split(".")[0]
        where_to_look = f"its config file under conf/{group}/" if where in GROUP_BASES else f"the arguments of {target}"
        raise ConfigError(f"{where}: {target} does not accept these settings ({error}); see {where_to_look}") from None
    hints = _type_hints(function)
    settings_of = getattr(function, "settings_of", {})  # a mapping argument whose keys another class receives
    for key in arguments:
        value = node[key]
        if isinstance(value, DictConfig) and "_target_" in value:
            _bind_target(value, f"{where}.{key}")
        elif isinstance(value, DictConfig) and key in settings_of:
            receiver = settings_of[key]
            _bind_arguments(receiver, value, f"{where}.{key}", f"{receiver.__module__}.{receiver.__qualname__}")
        elif key in hints:
            _check_value(f"{where}.{key}", OmegaConf.select(node, key), hints[key])


def _import_target(path: str):
    module_name, _, name = path.rpartition(".")
    if not module_name:
        raise ValueError("not a dotted module path")
    module = importlib.import_module(module_name)
    return getattr(module, name)


def _type_hints(function) -> dict:
    try:
        return typing.get_type_hints(function.__init__ if inspect.isclass(function) else function, include_extras=True)
    except Exception:  # unresolvable annotations: binding is still checked
        return {}


# The annotations a config value can be checked against; anything else (a tensor, a
# module, a callable) is left to the dry build.
_SIMPLE = {int: "a whole number", float: "a number", bool: "true or false", str: "text", type(None): "null",
           Path: "a path", PurePath: "a path", os.PathLike: "a path"}


def _check_value(key: str, value, hint) -> None:
    allowed = _allowed_by(hint)
    if allowed is None or any(ok(value) for ok, _ in allowed):
        return
    words = [word for _, word in allowed]
    if "a path" in words:  # str | Path: the text is a path
        words = [word for word in words if word != "text"]
    words = " or ".join(dict.fromkeys(words))
    message = f"{key}={value!r} is not allowed: use {words}"
    if "a path" in words and is_number(value):
        message += f" (quote a name that looks like a number: '{key}=\"{value}\"')"
    raise ConfigError(message)


def _allowed_by(hint) -> list[tuple[Callable[[object], bool], str]] | None:
    """(test, words) for each alternative of `hint`; None when the hint is not one we can check."""
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:  # a number with its bounds (options.Range): in range, and said with them
        base, *extras = typing.get_args(hint)
        allowed, bounds = _allowed_by(base), next((extra for extra in extras if isinstance(extra, Range)), None)
        if allowed is None or bounds is None:
            return allowed
        return [(lambda v, ok=ok: ok(v) and bounds.holds(v), bounds.words(word)) for ok, word in allowed]
    if origin in (typing.Union, types.UnionType):
        parts = [_allowed_by(member) for member in typing.get_args(hint)]
        return None if any(part is None for part in parts) else [item for part in parts for item in part]
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        return [(lambda v: v in choices, "one of " + ", ".join(map(str, choices)))]
    if origin in (tuple, list) or hint in (tuple, list):
        return [(lambda v: isinstance(v, (ListConfig, list, tuple)), "a list like [a, b]")]
    if origin is dict or hint is dict:
        return [(lambda v: isinstance(v, (DictConfig, dict)), "a mapping")]
    if hint not in _SIMPLE:
        return None
    tests = {int: is_int, float: is_number, bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str),
             type(None): lambda v: v is None}
    return [(tests.get(hint, lambda v: isinstance(v, str)), _SIMPLE[hint])]


# --- 3. the dry build ---------------------------------------------------------------------------


def declared_image_shape(cfg: DictConfig) -> tuple[int, ...] | None:
    """(C, H, W) as the data loader declares it for these settings (vae_lab.data.shape_rule), or None."""
    node = cfg.get("data")
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return None
    rule = getattr(_import_target(node._target_), "image_shape_of", None)
    if rule is None:
        return None
    settings = {key: OmegaConf.select(node, key) for key in node if not str(key).startswith("_")}
    try:
        shape = rule(**settings)
    except Exception:  # settings the loader refuses: it says so when it loads
        return None
    return tuple(int(v) for v in shape) if shape is not None else None


def dry_build(cfg: DictConfig, image_shape: tuple[int, ...] = IMAGE_SHAPE) -> None:
    """Build the cheap parts as training would, so torch's own checks speak before any work."""
    import torch  # only here: the checks above answer without waiting for torch
    from hydra.utils import instantiate

    from vae_lab.runtime import build_vae

    groups = [g for g in cfg if isinstance(cfg[g], DictConfig) and "_target_" in cfg[g] and g not in NOT_DRY_BUILT]
    built = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "Initializing zero-element tensors is a no-op"
        model = objective = None
        if all(group in groups for group in BUILT_WITH_MODEL if group != "posterior"):  # no posterior group: the diagonal one
            def build_model():
                return build_vae(cfg.model, cfg.prior, cfg.loss, image_shape, cfg.get("posterior"))

            outputs = _refuse_absurd_size(cfg, build_model, torch, image_shape)
            _refuse_absurd_step(cfg, image_shape, torch, outputs)
            model, objective = attempt(cfg, "model", build_model)
            attempt(cfg, "model", lambda: _probe(model, objective, torch, image_shape))
            batch = OmegaConf.select(cfg, "train.batch_size")
            if is_int(batch) and batch < objective.min_batch:
                raise ConfigError(f"train.batch_size={batch}: loss ({cfg.loss._target_}) needs at least {objective.min_batch} "
                                  f"images per batch (it compares the codes within a batch). Raise train.batch_size.")
        for group in groups:
            if group not in BUILT_WITH_MODEL:
                built[group] = attempt(cfg, group, lambda node=cfg[group]: instantiate(node))
        if isinstance(model, torch.nn.Module):
            optimizer = built.get("optim")
            if callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
                optimizer = attempt(cfg, "optim", lambda: built["optim"](model.parameters()))
            if isinstance(optimizer, torch.optim.Optimizer) and callable(built.get("scheduler")):
                attempt(cfg, "scheduler", lambda: _step_scheduler(built["scheduler"], optimizer))


def attempt(cfg: DictConfig, group: str, action: Callable):
    """Run `action`; whatever it raises becomes one line naming the group and torch's message
    (the dry build's groups, and the data loader when a task loads the data).

    Hydra names the node it was building (`full_key: prior`), which names the group
    when several are built together.
    """
    from hydra.errors import InstantiationException

    try:
        return action()
    except VaeLabError:
        raise
    except Exception as error:
        cause = error
        if isinstance(error, InstantiationException):
            group = next((line.split(":", 1)[1].strip() for line in str(error).splitlines() if line.startswith("full_key:")), group)
            cause = error.__cause__ if error.__cause__ is not None else error
        # The first line only: torch's C++ errors append a stack of native frames.
        text = next((line.strip() for line in str(cause).splitlines() if line.strip()), type(cause).__name__)
        text = text.split(" Exception raised from ")[0]
        node = OmegaConf.select(cfg, group) if OmegaConf.select(cfg, group) is not None else cfg.get(group.split(".")[0])
        settings = ", ".join(f"{key}={node[key]}" for key in node if not str(key).startswith("_")) if isinstance(node, DictConfig) else ""
        raise ConfigError(f"{group} ({node.get('_target_') if isinstance(node, DictConfig) else '?'}) refuses these settings: "
                          f"{text}. Fix {group}: {settings}") from None


def _refuse_absurd_size(cfg: DictConfig, build_model: Callable, torch, image_shape=IMAGE_SHAPE) -> int:
    """Count the model's parameters on the meta device (nothing allocated) against the machine's memory.
    Returns the decoder's outputs per pixel and channel (the likelihood's), for the step's size."""
    try:
        with torch.device("meta"):
            model, objective = build_model()
        count = sum(p.numel() for p in model.parameters())
        # What the objective trains itself (FactorVAE's discriminator) is built with the model, and counts too.
        own = sum(v.numel() for _, _, v in config_entries(objective.state_dict()) if isinstance(v, torch.Tensor))
        count += own
        objective_part = f" ({own:,} of them in the objective's own network)" if own else ""
        # the groups whose parameters count: the user shrinks one of them
        parts = [group for group, module in (("prior", getattr(model, "prior", None)), ("posterior", getattr(model, "posterior_flow", None)))
                 if isinstance(module, torch.nn.Module) and any(True for _ in module.parameters())] + (["loss"] if own else [])
        outputs = int(getattr(getattr(model, "likelihood", None), "outputs_per_channel", 1))
    except Exception:
        return 1  # a model that cannot be built on meta: the CPU build reports real errors
    device = _training_device(cfg, torch)
    needed, available = count * TRAINING_BYTES_PER_PARAMETER, _memory_bytes(device, torch)
    where = "GPU memory" if device.startswith("cuda") and torch.cuda.is_available() else "memory"
    if needed > available:
        raise ConfigError(
            f"model ({cfg.model.get('_target_')}) with these settings has {count:,} parameters, which need about "
            f"{needed / 2**30:,.0f} GiB to train{objective_part}; "
            f"this machine has {available / 2**30:,.0f} GiB of {where}. "
            f"Use smaller model.*{''.join(f', {group}.*' for group in parts)} sizes"
            + (f" or a smaller loss.reconstruction (its {outputs:,} outputs per pixel size the decoder's last layer)" if outputs > 1 else "")
            + (f" or smaller images: the model sizes itself from them ({' x '.join(map(str, image_shape))})."
               if math.prod(image_shape) > LARGE_IMAGE_PIXELS else ".")
        )
    return outputs


# A training step keeps every layer's activations for the backward pass: for the decoders here
# about this many floats per decoded pixel (the reference ConvVAE measures about 10).
ACTIVATION_FLOATS_PER_PIXEL = 16


def _refuse_absurd_step(cfg: DictConfig, image_shape, torch, outputs: int = 1) -> None:
    """A training step decodes train.batch_size x loss.k images (IWAE's samples are not chunked), each to
    `outputs` values per pixel and channel (the likelihood's): refuse, before any work, a step whose
    activations cannot fit in memory."""
    samples = OmegaConf.select(cfg, "loss.k", default=1)
    batch = OmegaConf.select(cfg, "train.batch_size", default=1)
    if not (is_int(samples) and is_int(batch)):
        return
    pixels = math.prod(image_shape) * (ACTIVATION_FLOATS_PER_PIXEL + outputs)
    needed, available = samples * batch * pixels * 4, _memory_bytes(_training_device(cfg, torch), torch)
    if needed > available / 2:
        per_pixel = f", {outputs:,} decoder outputs per pixel for loss.reconstruction" if outputs > 1 else ""
        images = (f"loss.k={samples} importance samples x train.batch_size={batch} images decode {samples * batch:,} images"
                  if OmegaConf.select(cfg, "loss.k") is not None else f"train.batch_size={batch} images decode {batch:,} images")
        raise ConfigError(
            f"{images} per training step{per_pixel}, about {needed / 2**30:,.0f} GiB of activations; this machine has "
            f"{available / 2**30:,.0f} GiB. Lower loss.k or train.batch_size{' or the likelihood size' if outputs > 1 else ''}."
        )


def _training_device(cfg: DictConfig, torch) -> str:
    """The device the run trains on: `auto` is CUDA where there is one (as runtime.resolve_device picks first)."""
    return "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device


def _memory_bytes(device: str, torch) -> int:
    from vae_lab.data import device_memory_bytes

    # `device` is the setting (auto, cpu, cuda:1, ...): anything but an available CUDA device is the machine's memory
    return device_memory_bytes(torch.device(device if device.startswith("cuda") and torch.cuda.is_available() else "cpu"))


def _probe(model, objective, torch, image_shape) -> None:
    """Two images through the objective (encoder, prior, decoder, likelihood) on the CPU."""
    model.eval()  # as evaluation runs it: nothing here is a training step
    with torch.no_grad():
        output = model.decode(model.sample_prior(2))
        likelihood = model.likelihood
        expected = (2, image_shape[0] * likelihood.outputs_per_channel, *image_shape[1:])
        if tuple(output.shape) != expected:  # a model of one's own that does not size its last layer from the likelihood
            raise ValueError(
                f"{type(model).__name__}.decode returns {list(output.shape)} for 2 latents, and {type(likelihood).__name__} "
                f"needs {list(expected)} ({likelihood.outputs_per_channel} output(s) per pixel and channel): size the decoder's "
                "last layer as image channels x self.likelihood.outputs_per_channel")
        objective(model, torch.rand(2, *image_shape))


def _step_scheduler(make_scheduler, optimizer) -> None:
    """Two epochs' steps: some schedules divide by their settings only when stepped."""
    scheduler = make_scheduler(optimizer)
    for _ in range(2):
        optimizer.step()  # no gradients: changes nothing, but keeps torch's step order
        scheduler.step()


def _compile_backend(setting) -> None:
    if not isinstance(setting, str):
        return
    import torch._dynamo

    backends = torch._dynamo.list_backends(exclude_tags=())
    if setting not in backends:
        raise ConfigError(
            f"train.compile={setting!r} is not a torch.compile backend here: use true, false or one of "
            + ", ".join(b for b in torch._dynamo.list_backends())
        )


def _device(name: str) -> None:
    allowed = "auto, cpu, cuda, cuda:N or mps"
    if not isinstance(name, str):
        raise ConfigError(f"device={name!r} is not allowed: use {allowed}")
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


def _is_positive_int(value) -> bool:
    return is_int(value) and value >= 1
