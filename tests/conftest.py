"""Shared fixtures and helpers: the real config, composed with Hydra and shrunk to tiny CPU runs;
one reader of metrics.csv and one check of a PNG figure, used by every test module.

Tiers: `python -m pytest` runs everything (CI); `python -m pytest -m "not slow"` skips the
end-to-end subprocess runs, sweeps, launchers and the wheel build, for quick iteration.
"""
from __future__ import annotations

import copy
import csv
import functools
import os
from pathlib import Path

# One thread per process, set before torch loads: pytest-xdist runs one worker per core, and
# the run.py subprocesses that tests start inherit it (a test that is about threads sets its own).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from PIL import Image  # noqa: E402

from vae_lab.cli import CONFIG_DIR  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# The full MNIST / Fashion-MNIST IDX files: $VAE_LAB_DATA, else ../shared/data beside the checkout.
DATA_ROOT = Path(os.environ.get("VAE_LAB_DATA", REPO.parent / "shared" / "data"))
HAS_FULL_DATA = (DATA_ROOT / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()
needs_full_data = pytest.mark.skipif(not HAS_FULL_DATA, reason=f"no MNIST IDX files under {DATA_ROOT} (set VAE_LAB_DATA)")

# Tiny, fast, CPU: the bundled 5,000-digit sample, 256 images per split, 2 epochs.
TINY = [
    "device=cpu",
    "threads=1",  # each xdist worker owns one core; torch's default threads would fight over both
    "figures=false",  # PNGs are half a tiny run's time; tests about figures compose with figures=true
    "data=mnist_5k",
    "data.limit=256",
    "train.epochs=2",
    "train.batch_size=64",
    "train.evaluate_at_end=false",
    "evaluate.preset=full",  # the settings below as written; evaluate=auto's light end-of-run evaluation has its own test
    "evaluate.batch_size=128",
    "evaluate.iw_samples=5",
    "evaluate.embedding_points=256",
    "evaluate.reconstruction_rows=2",
    "evaluate.generation_samples=32",
    "evaluate.sample_metrics=false",  # on by default for users; tests/test_sample_quality.py switches it on
]


def compose_config(*overrides: str):
    """The real config with TINY and these overrides, as Hydra's compose gives it.

    A full compose costs about 75 ms (the defaults tree and every YAML file, each time) and the
    suite composes several hundred times. Hydra builds the defaults tree from the overrides that
    choose a config group, then applies the ones that set values, in order. So the composition of
    the group choices is cached, and the value overrides are applied to a copy of it by Hydra's
    own override code; a sweep or a hydra.* override composes in full. tests/test_config.py
    checks that both give the same config and the same errors."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [*TINY, *overrides]
    parsed = OverridesParser.create().parse_overrides(lines)
    if any(override.is_sweep_override() or override.key_or_group.split(".")[0] == "hydra" for override in parsed):
        return copy.deepcopy(_composed(tuple(lines)))
    chooses = [override.package is not None or (CONFIG_DIR / override.key_or_group.replace(".", "/")).is_dir() for override in parsed]
    cfg = copy.deepcopy(_composed(tuple(line for line, group in zip(lines, chooses) if group)))
    ConfigLoaderImpl._apply_overrides_to_config([override for override, group in zip(parsed, chooses) if not group], cfg)
    return cfg


@functools.lru_cache(maxsize=None)
def _composed(overrides: tuple[str, ...]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def make_cfg():
    """make_cfg("model.latent_dim=2", ...) -> the real config with TINY and these overrides."""
    return compose_config


def read_csv(path: Path) -> list[dict]:
    """The rows of a CSV file (metrics.csv, summary.csv) as dicts of strings."""
    with Path(path).open(newline="") as file:
        return list(csv.DictReader(file))


def read_metrics(run_dir: Path) -> list[dict]:
    """A run directory's metrics.csv: one dict per epoch."""
    return read_csv(Path(run_dir) / "metrics.csv")


def assert_png(path: Path, min_side: int = 100) -> None:
    """`path` is a complete, readable PNG of a figure (not an empty or truncated file)."""
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        image.verify()
        assert min(image.size) > min_side, (path, image.size)


def shared_run(tmp_path_factory, *overrides: str) -> Path:
    """A finished tiny run with these overrides, trained once per test session and shared by
    every xdist worker (a file lock on the common temporary folder): tests read it, or copy
    what they damage, never write into it."""
    import hashlib

    from filelock import FileLock, Timeout

    from vae_lab.cli import run_task

    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # the folder all workers share
    key = hashlib.sha256("\0".join(overrides).encode()).hexdigest()[:12]
    run = root / f"shared-run-{key}"
    lock = FileLock(str(run) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:  # another worker is training it: meanwhile load what this worker's own first run needs
        _warm_up()
        lock.acquire()
    try:
        if not (run / "checkpoints" / "last.pt").is_file():
            run_task(compose_config(*overrides), run)
    finally:
        lock.release()
    return run


def _warm_up() -> None:
    """The first run in a process pays about 3 s of imports (scikit-learn, and torch._dynamo through Adam)."""
    import sklearn.model_selection  # noqa: F401
    import torch

    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])


@pytest.fixture(autouse=True, scope="session")
def feature_classifier_cache(tmp_path_factory):
    """Feature classifiers of every test, and of every run.py a test starts, go to a temporary folder, never ~/.cache.

    The bundled sample's cache file is written there first: otherwise the first test of a worker to load
    the sample writes it, and the tests that count torch.save's calls to fail one of them count it too."""
    from vae_lab.data import load_dataset

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VAE_LAB_CACHE", str(tmp_path_factory.mktemp("vae_lab_cache")))
        load_dataset("mnist_5k")
        yield


def pytest_collection_modifyitems(config, items):
    """The slow tier first, the rest in file order behind it.

    pytest-xdist hands out tests in collection order. In file order the long end-to-end runs of
    the last files started near the end, and one worker ran them while the other sat idle; run
    first, they overlap the many short tests, which then fill both workers to the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
