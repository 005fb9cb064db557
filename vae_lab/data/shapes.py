"""data=shapes: a generated data set with known generating factors, no files needed.

preset=shapes (default): each image is one shape (circle, square or triangle) of one of
six colours on a black background, at a size, a position and an orientation drawn
uniformly. preset=dsprites: dSprites' factor grid (Matthey et al. 2017): a white shape on
black, 1 channel, binary, its factors drawn from 3 shapes x 6 scales x 40 orientations x
32 x 32 positions, as disentanglement metrics expect (a factor takes few values, so codes
can be grouped by it). Rendered here, not the original files: the shapes are a circle, a
square and a triangle (dSprites: square, ellipse, heart), drawn without anti-aliasing.

The same seed gives the same images on every machine. The label is the shape; all
factors are kept (`ImageData.train_factors`, `factor_names`) for disentanglement metrics.
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from vae_lab.data import Binarize, ImageData, Limit, finish, refuse_too_large, shape_rule

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (1.0, 0.15, 0.1), "green": (0.15, 0.85, 0.2), "blue": (0.2, 0.35, 1.0),
           "yellow": (1.0, 0.9, 0.1), "magenta": (0.95, 0.2, 0.9), "cyan": (0.1, 0.9, 0.95)}
FACTORS = ("shape", "colour", "size", "x", "y", "orientation")
# dSprites' grid: each factor's values (shape is an index into SHAPES).
DSPRITES_GRID = {
    "shape": np.arange(3, dtype=np.float32),
    "scale": np.linspace(0.5, 1.0, 6, dtype=np.float32),
    "orientation": np.linspace(0, 2 * math.pi, 40, endpoint=False, dtype=np.float32),
    "x": np.linspace(0.0, 1.0, 32, dtype=np.float32),
    "y": np.linspace(0.0, 1.0, 32, dtype=np.float32),
}
Preset = Literal["shapes", "dsprites"]
CHUNK = 4096  # images rendered at once: (CHUNK, H, W) float32 coordinates stay small
# Rendering holds a split as float32 twice (the masks times the colours, then rounded) besides its uint8 result.
RENDER_BYTES_PER_PIXEL = 9


@shape_rule(lambda image_size=32, preset="shapes", **_: (1 if preset == "dsprites" else 3, image_size, image_size))
def make_shapes(train_size: int = 10_000, test_size: int = 1_000, image_size: int = 32, seed: int = 0,
                limit: Limit = None, binarize: Binarize = "none", preset: Preset = "shapes") -> ImageData:
    """`train_size` + `test_size` images (3 or, for dsprites, 1, image_size, image_size); the test split has its own seed."""
    if train_size < 1 or test_size < 1:
        raise ValueError(f"train_size and test_size must be >= 1, got {train_size} and {test_size}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
    if preset not in ("shapes", "dsprites"):
        raise ValueError(f"preset must be shapes or dsprites, got {preset!r}")
    count, channels = train_size + test_size, 3 if preset == "shapes" else 1
    refuse_too_large(f"data=shapes: {count:,} images of {channels} x {image_size} x {image_size}",
                     count * channels * image_size * image_size * RENDER_BYTES_PER_PIXEL, " while they are drawn",
                     "Lower data.train_size, data.test_size or data.image_size.")
    draw = render if preset == "shapes" else render_dsprites
    train_x, train_f = draw(train_size, image_size, np.random.default_rng([seed, 0]))
    test_x, test_f = draw(test_size, image_size, np.random.default_rng([seed, 1]))
    data = ImageData(
        preset, train_x, train_f[:, 0].long(), test_x, test_f[:, 0].long(),
        values="8bit" if preset == "shapes" else "binary", classes=SHAPES,
        train_factors=train_f, test_factors=test_f, factor_names=FACTORS if preset == "shapes" else tuple(DSPRITES_GRID),
    )
    return finish(data, limit, binarize)


def render_dsprites(count: int, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (count, 1, size, size) of 0/1, factors (count, 5)): each image's factors drawn from DSPRITES_GRID."""
    factors = np.stack([values[rng.integers(0, len(values), count)] for values in DSPRITES_GRID.values()], axis=1)
    shape, scale, angle, x, y = factors.T
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    images = np.empty((count, 1, size, size), dtype=np.float32)
    for start in range(0, count, CHUNK):
        part = slice(start, start + CHUNK)
        # The largest shape spans 44% of the side; centres cover the middle 56%, so no shape leaves the image.
        images[part, 0] = _masks(shape[part].astype(np.int64), 0.22 * scale[part], 0.22 + 0.56 * x[part],
                                 0.22 + 0.56 * y[part], angle[part], grid)
    return torch.from_numpy(images), torch.from_numpy(factors.astype(np.float32))


def render(count: int, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (count, 3, size, size) uint8, 8-bit images as they would be saved, factors (count, 6) float32)."""
    shape = rng.integers(0, len(SHAPES), count)
    colour = rng.integers(0, len(COLOURS), count)
    radius = rng.uniform(0.18, 0.32, count)  # half the shape's extent, as a fraction of the image side
    centre_x = rng.uniform(0.35, 0.65, count)
    centre_y = rng.uniform(0.35, 0.65, count)
    angle = rng.uniform(0, 2 * math.pi, count)
    factors = np.stack([shape, colour, radius, centre_x, centre_y, angle], axis=1).astype(np.float32)
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    images = np.empty((count, 3, size, size), dtype=np.float32)
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    for start in range(0, count, CHUNK):
        part = slice(start, start + CHUNK)
        mask = _masks(shape[part], radius[part], centre_x[part], centre_y[part], angle[part], grid)  # (n, H, W)
        images[part] = mask[:, None] * palette[colour[part]][:, :, None, None]
    images = np.round(images * 255).astype(np.uint8)  # 8-bit images: a discrete likelihood applies
    return torch.from_numpy(images), torch.from_numpy(factors)


def _masks(shape, radius, cx, cy, angle, grid) -> np.ndarray:
    """Anti-aliased-free 0/1 masks: each pixel centre tested against its image's shape."""
    dx = grid[None, None, :] - cx[:, None, None]
    dy = grid[None, :, None] - cy[:, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # coordinates in the shape's own frame
    r = radius[:, None, None]
    circle = u * u + v * v <= r * r
    square = (np.abs(u) <= r / math.sqrt(2)) & (np.abs(v) <= r / math.sqrt(2))
    # An equilateral triangle inscribed in the circle of radius r: three half-planes.
    triangle = (v <= r / 2) & (math.sqrt(3) * u - v <= r) & (-math.sqrt(3) * u - v <= r)
    kind = shape[:, None, None]
    return np.where(kind == 0, circle, np.where(kind == 1, square, triangle)).astype(np.float32)
