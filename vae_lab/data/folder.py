"""data=image_folder: any folder of PNG/JPEG images, in torchvision's ImageFolder layout.

    DIR/<class>/*.png        one subfolder per class (labels), or
    DIR/*.png                a flat folder: no labels
    DIR/train/..., DIR/test/...   the splits, when both are present; else a seeded split
                                  with `test_fraction` of the images in the test set

Images are decoded once (Pillow, through torchvision's loader) and cached as uint8 tensors
in `cache_dir`, never in the user's folder: the cache's key is the list of files (names,
sizes, modification times) and the settings, so an added or changed file rebuilds it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from vae_lab.data import (
    Binarize, DataCorruptError, DataNotFoundError, ImageData, Limit, finish, read_tensor_cache, refuse_too_large, write_tensor_cache,
)

log = logging.getLogger(__name__)

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
CACHE_VERSION = 3  # 2: the cache carries the digest of its tensors; 3: 16-bit images scaled, no longer clipped
# Pillow's modes of one-channel images deeper than 8 bits: 16-bit PNGs ("I" in older Pillow releases).
SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")
# What a cache file must hold (vae_lab.data.read_tensor_cache); it also holds the class names.
CACHE_TENSORS = {"train_images": (torch.uint8, (None, None, None, None)), "train_labels": (torch.int64, (None,)),
                 "test_images": (torch.uint8, (None, None, None, None)), "test_labels": (torch.int64, (None,))}


def load_image_folder(path: str | Path, image_size: int | None = None, channels: int | None = None,
                      test_fraction: float = 0.1, seed: int = 0, limit: Limit = None, binarize: Binarize = "none",
                      cache_dir: str | Path | None = None) -> ImageData:
    """The images under `path` as (train, test) splits; see the module docstring."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise DataNotFoundError(f"data.path={folder}: no such folder. Point data.path at a folder of images.")
    if not folder.is_dir():
        raise DataNotFoundError(f"data.path={folder} is a file; data=image_folder reads a folder of images "
                                "(for an .npz use data=arrays)")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or null (as the images are), got {channels}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be >= 1 pixel or null (keep the size), got {image_size}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie between 0 and 1, got {test_fraction}")
    splits = _listing(folder)
    settings = {"image_size": image_size, "channels": channels, "test_fraction": test_fraction, "seed": seed}
    cache = _cache_path(cache_dir, folder, splits, settings)
    tensors = read_tensor_cache(cache, CACHE_TENSORS) if cache is not None else None
    if tensors is not None and not (isinstance(tensors.get("classes"), list) and all(isinstance(c, str) for c in tensors["classes"])):
        tensors = None
    if tensors is None and cache is not None and cache.is_file():
        log.warning("ignoring the damaged image cache %s; decoding the images again", cache)
    if tensors is None:
        started = time.perf_counter()
        tensors = _decode(folder, splits, image_size, channels, test_fraction, seed)
        log.info("decoded %d images from %s in %.1f s", len(tensors["train_images"]) + len(tensors["test_images"]),
                 folder, time.perf_counter() - started)
        if cache is not None:
            write_tensor_cache(cache, tensors, CACHE_TENSORS, "the decoded images")
    classes = tuple(tensors["classes"])
    data = ImageData(
        folder.name, tensors["train_images"], tensors["train_labels"], tensors["test_images"], tensors["test_labels"], values="8bit",
        classes=classes if classes else ("image",), labelled=bool(classes),
    )
    return finish(data, limit, binarize)


def _listing(folder: Path) -> dict[str, dict[str, list[Path]]]:
    """{split: {class name ('' without classes): sorted image files}}; split '' when not split on disk."""
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        splits = {"train": _classes(folder / "train"), "test": _classes(folder / "test")}
        if set(splits["train"]) != set(splits["test"]):
            raise DataCorruptError(f"cannot use {folder}: train/ has the classes {sorted(splits['train'])} "
                                   f"and test/ has {sorted(splits['test'])}; both splits need the same class folders")
    else:
        splits = {"": _classes(folder)}
    return splits


def _classes(folder: Path) -> dict[str, list[Path]]:
    files = _images_in(folder)
    classes = {sub.name: _images_in(sub) for sub in sorted(folder.iterdir()) if sub.is_dir() and not sub.name.startswith(".")}
    classes = {name: found for name, found in classes.items() if found}
    if files and classes:
        raise DataCorruptError(f"cannot use {folder}: it holds images ({files[0].name}, ...) beside class folders "
                               f"({', '.join(list(classes)[:3])}); put every image in a class folder, or use a flat folder")
    if not files and not classes:
        others = [p.name for p in folder.iterdir() if not p.name.startswith(".")][:3]
        raise DataNotFoundError(f"data.path={folder} holds no images of a known format ({', '.join(EXTENSIONS)})"
                                + (f"; it holds {', '.join(others)}" if others else ": it is empty"))
    return classes if classes else {"": files}


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS and not p.name.startswith("."))


def _cache_path(cache_dir, folder: Path, splits: dict, settings: dict) -> Path | None:
    if cache_dir is None:
        return None
    digest = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "folder": str(folder.resolve()), **settings}).encode())
    for split, classes in splits.items():
        for name, files in classes.items():
            for file in files:
                status = file.stat()
                digest.update(f"{split}/{name}/{file.name}\0{status.st_size}\0{status.st_mtime_ns}\n".encode())
    return Path(cache_dir).expanduser() / "image_folder" / f"{digest.hexdigest()[:32]}.pt"


def _decode(folder: Path, splits: dict, image_size, channels, test_fraction: float, seed: int) -> dict:
    first = next(iter(splits.values()))
    labelled = "" not in first
    class_names = sorted(first) if labelled else []
    decoded = {split: [(path, class_names.index(name) if labelled else 0)
                       for name, files in classes.items() for path in files] for split, classes in splits.items()}
    # First the headers (mode and size, no pixels decoded), then each image decoded into its place:
    # memory holds the result, never every decoded picture at its own size.
    paths = [path for items in decoded.values() for path, _ in items]
    headers = [_open(path, decode=False) for path in paths]
    floats = next((path for path, (mode, _) in zip(paths, headers) if mode == "F"), None)
    if floats is not None:  # no scale to read them on: their values are whatever the program that wrote them chose
        raise DataCorruptError(f"cannot use {floats}: it holds floating-point pixels, which have no 8-bit scale. "
                               "Save the images as 8- or 16-bit PNGs, or as floats in [0, 1] in an .npz (data=arrays)")
    deep = sum(mode in SIXTEEN_BIT for mode, _ in headers)
    if deep:
        log.warning("%d of the %d images in %s have 16-bit pixels: they are reduced to 8 bits (value / 257), "
                    "as every image here is stored", deep, len(headers), folder)
    if channels is None:
        channels = 3 if any(mode not in ("1", "L", "LA", *SIXTEEN_BIT) for mode, _ in headers) else 1
    sizes = {size for _, size in headers}
    if image_size is None and len(sizes) > 1:
        (w1, h1), (w2, h2) = sorted(sizes)[:2]
        raise DataCorruptError(f"cannot use {folder}: its images have different sizes ({w1}x{h1}, {w2}x{h2}, ...); "
                               "set data.image_size=N to resize and centre-crop every image to N x N")
    height, width = (image_size, image_size) if image_size is not None else next(iter(sizes))[::-1]
    refuse_too_large(f"cannot use {folder}: {len(headers):,} images of {channels} x {height} x {width}",
                     len(headers) * channels * height * width, " as uint8", "Use a smaller data.image_size, or fewer images.")
    arrays = {}
    for split, items in decoded.items():
        arrays[split] = np.empty((len(items), channels, height, width), dtype=np.uint8)
        for index, (path, _) in enumerate(items):
            arrays[split][index] = _pixels(_open(path), channels, image_size)
    labels = {split: np.array([label for _, label in items], dtype=np.int64) for split, items in decoded.items()}
    if "" in arrays:  # not split on disk: a seeded split
        order = np.random.default_rng(seed).permutation(len(labels[""]))
        test_count = max(1, round(len(order) * test_fraction))
        if len(order) < 2:
            raise DataCorruptError(f"cannot use {folder}: it holds one image, and a train and a test split need two")
        test, train = order[:test_count], order[test_count:]
        arrays = {"train": arrays[""][train], "test": arrays[""][test]}
        labels = {"train": labels[""][train], "test": labels[""][test]}
    return {"train_images": torch.from_numpy(arrays["train"]), "train_labels": torch.from_numpy(labels["train"]),
            "test_images": torch.from_numpy(arrays["test"]), "test_labels": torch.from_numpy(labels["test"]),
            "classes": class_names}


def _open(path: Path, decode: bool = True):
    """The picture at `path`, decoded; or (mode, size) from its header alone (decode=False)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            if not decode:
                return picture.mode, picture.size
            picture.load()
            return _eight_bit(picture.copy(), path)
    except Image.DecompressionBombError as error:  # a small file that would decode to gigapixels
        raise DataCorruptError(f"cannot use {path}: {str(error).splitlines()[0]} Remove it, or shrink it.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise DataCorruptError(f"cannot use {path}: it is not a readable image ({str(error).splitlines()[0] if str(error) else type(error).__name__}). "
                               "Remove or replace it.") from None


def _eight_bit(picture, path: Path):
    """A 16-bit picture scaled to 8 bits (Pillow's own conversion clips at 255, which turns most of such an image white)."""
    if picture.mode not in SIXTEEN_BIT:
        return picture
    from PIL import Image

    values = np.asarray(picture).astype(np.int64)
    if values.min() < 0 or values.max() > 65535:
        raise DataCorruptError(f"cannot use {path}: its pixels run from {values.min()} to {values.max()}, outside 16 bits. "
                               "Save it as an 8- or 16-bit PNG")
    return Image.fromarray(((values + 128) // 257).astype(np.uint8), "L")


def _pixels(picture, channels: int, image_size: int | None) -> np.ndarray:
    """(C, H, W) uint8: converted to grey or RGB, resized (shorter side) and centre-cropped when asked."""
    from torchvision.transforms import functional as F

    picture = picture.convert("L" if channels == 1 else "RGB")
    if image_size is not None:
        picture = F.center_crop(F.resize(picture, image_size), image_size)
    array = np.asarray(picture, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
