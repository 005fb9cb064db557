"""data=arrays: images from an .npz file (x_train, x_test; optionally y_train, y_test).

Optionally too, the images' generating factors, for the disentanglement metrics:
f_train and f_test, (N, K) numbers, and factor_names, K strings (else factor_0, ...).

uint8 arrays are 8-bit images (0..255); float arrays must lie in [0, 1]. Images are
(N, C, H, W) or (N, H, W, C) with C = 1 or 3 (`layout`, or inferred where only one
reading is possible), or (N, H, W) for one channel. The file is read with
allow_pickle=False: an .npz holding Python objects is refused, never unpickled.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from vae_lab.data import Binarize, DataCorruptError, DataNotFoundError, ImageData, Limit, finish, refuse_too_large, values_of

LAYOUTS = ("auto", "NCHW", "NHWC")
IMAGE_KEYS = ("x_train", "x_test")
LABEL_KEYS = ("y_train", "y_test")
FACTOR_KEYS = ("f_train", "f_test")


def load_arrays(path: str | Path, layout: Literal[LAYOUTS] = "auto", limit: Limit = None, binarize: Binarize = "none",
                name: str | None = None) -> ImageData:
    """The splits of the .npz at `path`; see the module docstring."""
    path = Path(path).expanduser()
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if path.is_dir():
        raise DataNotFoundError(f"data.path={path} is a folder; data=arrays reads an .npz file "
                                "(for a folder of images use data=image_folder)")
    if not path.is_file():
        raise DataNotFoundError(f"data.path={path}: no such file. Point data.path at an .npz holding x_train and x_test.")
    arrays = _read(path)
    missing = [key for key in IMAGE_KEYS if key not in arrays]
    if missing:
        raise _bad(path, f"it has no {missing[0]} (it holds: {', '.join(sorted(arrays)) or 'nothing'}); "
                         "an .npz for data=arrays holds x_train and x_test, optionally y_train and y_test")
    images = {key: _images(path, key, arrays[key], layout) for key in IMAGE_KEYS}
    if images["x_train"].shape[1:] != images["x_test"].shape[1:]:
        raise _bad(path, f"x_train images are {tuple(images['x_train'].shape[1:])} but x_test images are "
                         f"{tuple(images['x_test'].shape[1:])}; both splits need one image shape")
    kinds = {values_of(arrays[key]) for key in IMAGE_KEYS}
    labels = _labels(path, arrays, {key: len(images[key]) for key in IMAGE_KEYS})
    factors = _factors(path, arrays, {key: len(images[key]) for key in IMAGE_KEYS})
    data = ImageData(
        name or path.stem, images["x_train"], labels[0], images["x_test"], labels[1],
        values="8bit" if "8bit" in kinds else "binary" if kinds == {"binary"} else "continuous",
        labelled=labels[2], **factors,
    )
    return finish(data, limit, binarize)


def _read(path: Path) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):  # an .npy, a text file, a truncated archive
        raise _bad(path, "it is not an .npz archive (np.savez writes one); save x_train and x_test with np.savez")
    _refuse_too_large(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except ValueError as error:  # numpy: "Object arrays cannot be loaded when allow_pickle=False"
        raise _bad(path, f"it holds Python objects ({str(error).splitlines()[0]}), which vae_lab never unpickles; "
                         "save plain numeric arrays") from None
    except (OSError, zipfile.BadZipFile, EOFError, KeyError) as error:
        raise _bad(path, f"it is not a readable .npz file ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None


def _refuse_too_large(path: Path) -> None:
    """Before reading: the arrays' uncompressed sizes, as the archive lists them (a large set, or a compressed bomb)."""
    try:
        with zipfile.ZipFile(path) as archive:
            needed = sum(member.file_size for member in archive.infolist())
    except (OSError, zipfile.BadZipFile):
        return  # reported as unreadable by the reader
    refuse_too_large(f"cannot use {path}: its arrays", needed, " uncompressed", "Save fewer or smaller images (uint8 takes a "
                     "quarter of float32), or load them with a loader of your own.")


def _images(path: Path, key: str, array: np.ndarray, layout: str) -> torch.Tensor:
    """(N, C, H, W) uint8 (kept so, converted per batch) or float32 in [0, 1], checked."""
    if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
        raise _bad(path, f"{key} has dtype {array.dtype}; use uint8 (0..255) or float in [0, 1]")
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim != 4:
        raise _bad(path, f"{key} has shape {array.shape}; images are (N, C, H, W), (N, H, W, C) or (N, H, W)")
    elif layout == "NHWC" or (layout == "auto" and _channels_last(path, key, array.shape)):
        array = array.transpose(0, 3, 1, 2)
    if array.shape[1] not in (1, 3):
        raise _bad(path, f"{key} has {array.shape[1]} channels (shape {array.shape} read as NCHW); images have 1 or 3 "
                         "(set data.layout=NHWC for channels-last arrays)")
    if len(array) == 0:
        raise _bad(path, f"{key} holds no images")
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array))
    if not np.isfinite(array).all():
        raise _bad(path, f"{key} holds NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 1:
        raise _bad(path, f"{key} holds values from {low:g} to {high:g}; float images must lie in [0, 1] (or save uint8 0..255)")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _channels_last(path: Path, key: str, shape: tuple) -> bool:
    first, last = shape[1] in (1, 3), shape[3] in (1, 3)
    if first and last:
        raise _bad(path, f"{key} has shape {shape}: it reads as NCHW and as NHWC. Set data.layout=NCHW or data.layout=NHWC")
    return last


def _labels(path: Path, arrays: dict, counts: dict) -> tuple[torch.Tensor, torch.Tensor, bool]:
    present = [key for key in LABEL_KEYS if key in arrays]
    if not present:  # no labels: one class, and the metrics that need labels are left out
        return torch.zeros(counts["x_train"], dtype=torch.long), torch.zeros(counts["x_test"], dtype=torch.long), False
    if len(present) == 1:
        raise _bad(path, f"it has {present[0]} but not {({*LABEL_KEYS} - {present[0]}).pop()}; give labels for both splits or neither")
    out = []
    for key, images_key in zip(LABEL_KEYS, IMAGE_KEYS):
        labels = arrays[key]
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise _bad(path, f"{key} has shape {labels.shape} and dtype {labels.dtype}; labels are one whole number per image")
        if len(labels) != counts[images_key]:
            raise _bad(path, f"{key} holds {len(labels):,} labels but {images_key} holds {counts[images_key]:,} images")
        if len(labels) and labels.min() < 0:
            raise _bad(path, f"{key} holds the label {labels.min()}; labels are 0, 1, 2, ...")
        out.append(torch.from_numpy(labels.astype(np.int64)))
    return out[0], out[1], True


def _factors(path: Path, arrays: dict, counts: dict) -> dict:
    """ImageData's train_factors, test_factors and factor_names from f_train, f_test and factor_names, checked."""
    present = [key for key in FACTOR_KEYS if key in arrays]
    if not present:
        return {}
    if len(present) == 1:
        raise _bad(path, f"it has {present[0]} but not {({*FACTOR_KEYS} - {present[0]}).pop()}; give factors for both splits or neither")
    out = {}
    for key, images_key, split in zip(FACTOR_KEYS, IMAGE_KEYS, ("train", "test")):
        factors = arrays[key]
        if factors.ndim != 2 or len(factors) != counts[images_key] or not np.issubdtype(factors.dtype, np.number):
            raise _bad(path, f"{key} has shape {factors.shape} and dtype {factors.dtype}; factors are ({counts[images_key]:,}, K) "
                             "numbers, one row per image of " + images_key)
        if not np.isfinite(factors).all():
            raise _bad(path, f"{key} holds NaN or infinite values")
        out[f"{split}_factors"] = torch.from_numpy(factors.astype(np.float32))
    count = out["train_factors"].shape[1]
    if out["test_factors"].shape[1] != count:
        raise _bad(path, f"f_train has {count} factors but f_test has {out['test_factors'].shape[1]}")
    names = arrays.get("factor_names", np.array([f"factor_{k}" for k in range(count)]))
    if names.shape != (count,) or names.dtype.kind != "U":
        raise _bad(path, f"factor_names has shape {names.shape} and dtype {names.dtype}; it holds {count} strings, one per factor")
    return {**out, "factor_names": tuple(str(name) for name in names)}


def _bad(path: Path, what: str) -> DataCorruptError:
    return DataCorruptError(f"cannot use {path}: {what}.")
