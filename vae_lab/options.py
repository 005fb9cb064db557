"""The allowed values of the settings that take a name, and the types of the task settings:
one place, importable without torch.

The modules that act on a setting import its choices from here, and so does the
config validation, which runs before torch is even imported.
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

TASKS = ("train", "evaluate", "summarize")
DATASETS = ("mnist", "fashion_mnist", "mnist_5k")
BINARIZE = ("none", "static", "dynamic")
# What an image's pixels are, before any binarization: 0/1, 256 levels scaled to [0, 1], or any value in [0, 1].
VALUE_KINDS = ("binary", "8bit", "continuous")
RECONSTRUCTIONS = ("bce", "mse", "continuous_bernoulli", "gaussian", "gaussian_per_pixel", "discretized_logistic")
EMBEDDINGS = ("pca", "tsne")
N_COMPONENTS = (2, 3)
RETURN_METRICS = ("test_loss", "test_neg_elbo")
SAMPLERS = ("prior", "gmm")
# The image sets every sample metric is computed for: each sampler's images, the decoded
# posterior means of the test images, and the floor (a part of the training set).
SAMPLE_SETS = (*SAMPLERS, "reconstruction", "floor")
SAMPLE_METRICS = ("fid", "kid", "precision", "recall", "class_kl")
# The likelihood report's numbers that every run has (metrics.json, the sweep summary, MLflow's final/<key>).
LIKELIHOOD_METRICS = ("neg_elbo", "recon", "kl", "iw_nll", "active_units", "objective")
# The disentanglement report's numbers, where the data carries its generating factors (vae_lab.disentanglement).
DISENTANGLEMENT_METRICS = ("mig", "dci_disentanglement", "dci_completeness", "dci_informativeness", "sap", "factor_vae_score")


def sample_metric_keys() -> tuple[str, ...]:
    """The sample-quality keys of metrics.json (the sweep summary reads them): `<metric>_<set>` and two more."""
    return (*(f"{metric}_{name}" for name in SAMPLE_SETS for metric in SAMPLE_METRICS),
            "latent_probe_accuracy", "classifier_test_accuracy")

SEED_RANGE = (0, 2**32 - 1)  # what numpy's and Python's seeding accept
IMAGE_SHAPE = (1, 28, 28)  # MNIST's: the probe shape before a run, and that of checkpoints written before they saved one

# The config groups that build something, declared once: the class (module, name) a
# group's `_target_` must be (or, for data, return). The trust check, the checkpoint's
# config, resume and the dry build all read this; a new group is one line here.
GROUP_BASES = {
    "model": ("vae_lab.model", "VAE"),
    "prior": ("vae_lab.priors", "Prior"),
    "posterior": ("vae_lab.posteriors", "Flow"),
    "loss": ("vae_lab.objectives", "Objective"),
    "data": ("vae_lab.data", "ImageData"),
    "optim": ("torch.optim", "Optimizer"),
    "scheduler": ("torch.optim.lr_scheduler", "LRScheduler"),
    "logger": ("vae_lab.loggers", "Loggers"),
}
# Settings inside a group that may also be a node of their own (`_target_` and arguments) instead of a
# name: where it stands, and the class it must be. The trust check and the checkpoint's config read this.
BUILT_INSIDE = {"loss.reconstruction": ("vae_lab.likelihoods", "Likelihood")}
# Where the run logged is not part of the experiment: a checkpoint records it, never builds it.
RECORDED_ONLY_GROUPS = ("logger",)
# Built together, as runtime.build_vae builds them (the prior gets the model's latent size, the
# model the prior and the objective's likelihood); the dry build builds them the same way.
BUILT_WITH_MODEL = ("model", "prior", "loss", "posterior")
EXPERIMENT_GROUPS = tuple(group for group in GROUP_BASES if group not in RECORDED_ONLY_GROUPS)
# Trusted without being listed in trusted_modules: vae_lab's own package, torch's optimizers
# and schedulers. Trust is by whole dotted package (vae_lab covers vae_lab.model, never vae_lab_evil).
OWN_PACKAGES = ("vae_lab", "torch.optim")


def config_entries(node, keys: tuple = (), where: str = ""):
    """(keys, where, value) for every entry of a plain config (dicts and lists), depth first:
    `keys` the keys and list indices leading to it, `where` its name as messages spell it
    ("model.layers[0].size"). The one walker of the config checks."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        inner = f"{where}[{key}]" if isinstance(node, list) else f"{where}.{key}" if where else str(key)
        yield (*keys, key), inner, value
        yield from config_entries(value, (*keys, key), inner)


def usable_cores() -> int:
    """The cores this process may run on (taskset and cgroups' CPU sets included)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def is_number(value) -> bool:
    """A real number that is not a bool (YAML's true is not 1 here)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite(value) -> bool:
    """A number that is not inf or nan (a whole number is, however large: no float conversion)."""
    return is_int(value) or (is_number(value) and math.isfinite(value))


def in_package(module_name: str, packages) -> bool:
    """Whether `module_name` is one of `packages` or inside one, by whole dotted names."""
    return any(isinstance(p, str) and p and (module_name == p or module_name.startswith(p + ".")) for p in packages)


@dataclass(frozen=True)
class Range:
    """The bounds of a number setting, carried by its type annotation where the setting is declared: a
    constructor's argument (`k: Annotated[int, Range(1)]`) or a task setting's field below. The config
    check reads them from there, for whichever class declares the key, and says them in its message;
    a class of a user's own declares its bounds the same way. Infinite values are never in range."""
    low: float | None = None
    high: float | None = None
    note: str = ""

    def holds(self, value) -> bool:
        return (is_finite(value) and (self.low is None or value >= self.low)
                and (self.high is None or value <= self.high))

    def words(self, kind: str) -> str:
        """'a whole number >= 1', 'a number from 0 to 1 (a share)', ... for `kind` ('a whole number', 'a number')."""
        bounds = (f"from {self.low:,} to {self.high:,}" if self.low is not None and self.high is not None
                  else f">= {self.low:,}" if self.low is not None else f"<= {self.high:,}")
        return f"{kind} {bounds}" + (f" ({self.note})" if self.note else "")


Count = Annotated[int, Range(1)]  # a size, a number of steps or samples: a whole number >= 1
Size0 = Annotated[int, Range(0)]  # a whole number >= 0 (0 = none)
MAX_FIGURE_IMAGES = 10_000
FigureCount = Annotated[int, Range(1, MAX_FIGURE_IMAGES)]  # drawn in one figure, at once: a huge number is unreadable and may not fit


# The plain (non-_target_) nodes, typed like a constructor's arguments, so that the one
# signature check in validate.py covers them too. Keys not listed here are not type-checked.
@dataclass
class TrainSettings:
    batch_size: Count
    epochs: Count
    alpha: Annotated[float, Range(0, note="0.1 in the reference, 1 for the ELBO")]
    checkpoint_every: Count
    plot_every: Count
    resume: Path | None
    evaluate_at_end: bool
    return_metric: str
    amp: bool
    compile: bool | str
    channels_last: bool
    kl_warmup_epochs: Size0


@dataclass
class EvaluateSettings:
    preset: Literal["auto", "full", "light"]
    checkpoint: Path | None
    batch_size: Count
    n_components: int
    embedding: str
    # The published bounds use 1,000 to 5,000 samples; 10**8 would run for days on one test image.
    iw_samples: Annotated[int, Range(1, 100_000, "the published bounds use 1,000 to 5,000")]
    reconstruction_rows: FigureCount
    images_per_row: FigureCount
    generation_samples: FigureCount
    embedding_points: Count
    iw_limit: Count | None
    gmm_components: Count
    sample_metrics: bool
    # precision and recall need k + 1 = 4 neighbours within a set; FID a covariance
    sample_count: Annotated[int, Range(10, note="10000 for figures comparable with the README")]
    samplers: list
    cache_dir: Path
    disentanglement: bool | str
    disentanglement_codes: Annotated[int, Range(100)]


@dataclass
class SummarizeSettings:
    sweep_dir: Path | None


@dataclass
class RunSettings:
    task: str
    seed: Annotated[int, Range(*SEED_RANGE)]
    device: str
    figures: bool
    resume: bool
    resume_failed: bool
    threads: int | str | None  # auto, null or a count: checked against the machine's cores in validate
    trusted_modules: list


SETTINGS = {"train": TrainSettings, "evaluate": EvaluateSettings, "summarize": SummarizeSettings}
