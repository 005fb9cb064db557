"""data=cifar10 | svhn | celeba: torchvision's classes, over files already under data.root.

Nothing is downloaded (a cluster node or this project's machines have no network): the
files are torchvision's own, in torchvision's layout under data.root, and torchvision
checks each one's MD5 before it is read:

    cifar10   <root>/cifar-10-batches-py/   the extracted cifar-10-python.tar.gz
    svhn      <root>/svhn/                  train_32x32.mat, test_32x32.mat
    celeba    <root>/celeba/                img_align_celeba/ and the list_*.txt files

CIFAR-10 and SVHN are 3 x 32 x 32 with 10 classes. CelebA's aligned 178 x 218 faces are
centre-cropped to 178 x 178 and resized to data.image_size (64 by default); it has no
classes here (its 40 attributes are not one label). `limit` is applied before CelebA's
JPEGs are decoded, so a small run reads only the images it uses.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from vae_lab.data import Binarize, DataNotFoundError, ImageData, Limit, finish, shape_rule

SETS = ("cifar10", "svhn", "celeba")
# name -> (the folder under data.root, what goes there)
FOLDERS = {"cifar10": ("cifar-10-batches-py", "the extracted cifar-10-python.tar.gz (data_batch_1 ... test_batch)"),
           "svhn": ("svhn", "train_32x32.mat and test_32x32.mat"),
           "celeba": ("celeba", "img_align_celeba/ and list_eval_partition.txt, identity_CelebA.txt, list_attr_celeba.txt, "
                                "list_bbox_celeba.txt, list_landmarks_align_celeba.txt")}
CLASSES = {"cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
           "svhn": tuple(str(digit) for digit in range(10)), "celeba": ()}


@shape_rule(lambda name="cifar10", image_size=64, **_: (3, image_size, image_size) if name == "celeba" else (3, 32, 32))
def load_torchvision_set(name: Literal[SETS] = "cifar10", root: str | Path = "data", image_size: int = 64,
                         limit: Limit = None, binarize: Binarize = "none") -> ImageData:
    """Both splits of `name` from torchvision's files under `root`; see the module docstring."""
    if name not in SETS:
        raise ValueError(f"name must be one of {', '.join(SETS)}, got {name!r}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    root = Path(root).expanduser()
    folder, what = FOLDERS[name]
    if root.exists() and not root.is_dir():
        raise DataNotFoundError(f"data.root={root} is a file; it must be the folder that holds {folder}/")
    try:
        (train_x, train_y), (test_x, test_y) = (_split(name, root, split, image_size, limit) for split in ("train", "test"))
    except RuntimeError:  # torchvision's "Dataset not found or corrupted", whose advice (download=True) cannot work here
        raise DataNotFoundError(
            f"data={name}: not found, or damaged (torchvision checks each file's MD5), under {root.absolute() / folder}: "
            f"put {what} there, or point data.root (or $VAE_LAB_DATA) at the folder that holds {folder}/. "
            "vae_lab does not download it.") from None
    data = ImageData(name, train_x, train_y, test_x, test_y, classes=CLASSES[name], labelled=bool(CLASSES[name]))
    return finish(data, None, binarize)


def _split(name: str, root: Path, split: str, image_size: int, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 3, H, W) uint8, labels (N,)) of one split, at most `limit` images."""
    from torchvision import datasets

    if name == "cifar10":
        found = datasets.CIFAR10(str(root), train=split == "train", download=False)
        images, labels = torch.from_numpy(found.data[:limit]).permute(0, 3, 1, 2), torch.tensor(found.targets[:limit])
    elif name == "svhn":
        found = datasets.SVHN(str(root / "svhn"), split=split, download=False)  # labels 0..9 (torchvision maps 10 to 0)
        images, labels = torch.from_numpy(found.data[:limit]), torch.from_numpy(found.labels[:limit])
    else:
        from torchvision.transforms import v2

        found = datasets.CelebA(str(root), split=split, target_type=[], download=False)
        crop = v2.Compose([v2.PILToTensor(), v2.CenterCrop(178), v2.Resize(image_size, antialias=True)])
        count = len(found) if limit is None else min(limit, len(found))
        images = torch.stack([crop(found[i][0]) for i in range(count)]) if count else torch.zeros(0, 3, image_size, image_size)
        labels = torch.zeros(count, dtype=torch.int64)
    return images.contiguous(), labels.long()
