"""Figures: pure functions from tensors (or metric rows) to one PNG file each.

Matplotlib's object API is used directly (no pyplot), so nothing here touches global
state or needs a display.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torchvision.utils import make_grid

from vae_lab.files import write_atomic

PADDING = 2
DPI = 100


def image_grid(images: torch.Tensor, path: Path, *, nrow: int, title: str, row_labels: Sequence[str] = ()) -> torch.Tensor:
    """Save images (N, C, H, W) in [0, 1], C = 1 (grey) or 3 (colour), as a titled grid with `nrow` images per row.

    Returns the grid itself, (3, H', W'), for loggers that keep images too.
    """
    grid = make_grid(images.detach().float().cpu().clamp(0, 1), nrow=nrow, padding=PADDING, pad_value=1.0)
    colour = images.shape[1] == 3
    pixels = grid.permute(1, 2, 0).numpy() if colour else grid[0].numpy()  # (rows * (H + pad) + pad, cols * (W + pad) + pad[, 3])
    height, width = pixels.shape[:2]
    figure = Figure(figsize=(width / DPI * 2.2 + 1.6, height / DPI * 2.2 + 0.7), dpi=DPI)
    ax = figure.add_subplot()
    ax.imshow(pixels, cmap=None if colour else "gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title)
    ax.set_xticks([])
    if row_labels:
        cell = images.shape[-2] + PADDING
        ax.set_yticks([PADDING + cell * i + images.shape[-2] / 2 for i in range(len(row_labels))], labels=row_labels, fontsize=7)
        ax.tick_params(axis="y", length=0)
    else:
        ax.set_yticks([])
    _save(figure, path)
    return grid


def reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path: Path, *, per_row: int, title: str) -> torch.Tensor:
    """Pairs of rows: odd rows originals, even rows their reconstructions (the reference's layout).

    originals, reconstructions: (R * per_row, 1, H, W).
    """
    rows = originals.shape[0] // per_row
    pairs = torch.stack([originals[: rows * per_row].view(rows, per_row, *originals.shape[1:]),
                         reconstructions[: rows * per_row].view(rows, per_row, *originals.shape[1:])], dim=1)
    labels = ["original", "reconstruction"] * rows
    return image_grid(pairs.reshape(-1, *originals.shape[1:]), path, nrow=per_row, title=title, row_labels=labels)


def loss_curves(history: Sequence[dict], path: Path) -> Path:
    """Train and test loss, reconstruction and KL per epoch, one panel each."""
    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(13, 3.8), dpi=DPI, layout="constrained")
    panels = [("loss", "objective: recon + alpha * KL"), ("recon", "reconstruction"), ("kl", "KL(q(z|x) || p(z))")]
    for i, (key, title) in enumerate(panels):
        ax = figure.add_subplot(1, 3, i + 1)
        for split, style in (("train", "-"), ("test", "--")):
            ax.plot(epochs, [row[f"{split}_{key}"] for row in history], style, marker="o" if len(epochs) < 20 else None, label=split)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats per image")
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(figure, path)


def latent_embedding(points: np.ndarray, labels: np.ndarray, path: Path, *, title: str, axis_label: str, class_names: Sequence[str] | None = None) -> Path:
    """Scatter of encoded test images (N, 2) or (N, 3), coloured by class, with a legend."""
    import seaborn as sns

    names = np.asarray(class_names)[labels] if class_names is not None else labels
    order = list(class_names) if class_names is not None else sorted(set(labels.tolist()))
    palette = dict(zip(order, sns.color_palette("tab10", len(order))))
    figure = Figure(figsize=(8, 7), dpi=DPI, layout="constrained")
    if points.shape[1] == 2:
        ax = figure.add_subplot()
        sns.scatterplot(x=points[:, 0], y=points[:, 1], hue=names, hue_order=order, palette=palette, s=8, linewidth=0, alpha=0.8, ax=ax)
        ax.legend(title="class", markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    else:
        ax = figure.add_subplot(projection="3d")
        for name in order:
            mask = names == name
            ax.scatter(*points[mask].T, s=4, color=palette[name], label=str(name), alpha=0.8)
        ax.set_zlabel(f"{axis_label} 3")
        ax.legend(title="class", markerscale=3, loc="center left", bbox_to_anchor=(1.05, 0.5))
    ax.set_xlabel(f"{axis_label} 1")
    ax.set_ylabel(f"{axis_label} 2")
    ax.set_title(title)
    return _save(figure, path)


def kl_per_dimension(kl: np.ndarray, active: np.ndarray, path: Path, *, title: str) -> Path:
    """Bar chart of the KL of each latent dimension, largest first; active units highlighted."""
    order = np.argsort(kl)[::-1]
    figure = Figure(figsize=(max(6, 0.35 * len(kl) + 2), 4), dpi=DPI, layout="constrained")
    ax = figure.add_subplot()
    colours = np.where(active[order], "tab:blue", "tab:gray")
    ax.bar(range(len(kl)), kl[order], color=colours)
    ax.set_xticks(range(len(kl)), [str(i) for i in order], fontsize=7 if len(kl) > 32 else 9)
    ax.set_xlabel("latent dimension (sorted by KL)")
    ax.set_ylabel("KL per image (nats)")
    ax.set_title(title)
    ax.legend(handles=[Patch(color="tab:blue", label="active unit"), Patch(color="tab:gray", label="inactive")])
    ax.grid(axis="y", alpha=0.3)
    return _save(figure, path)


def factor_information(information: dict[str, Sequence[float]], order: Sequence[int], path: Path, *, title: str) -> Path:
    """Heatmap: factors (rows) by latent dimensions (columns, in `order`), I(z_d; v_k) / H(v_k) in [0, 1]."""
    import seaborn as sns

    names = list(information)
    matrix = np.array([[information[name][d] for d in order] for name in names])
    figure = Figure(figsize=(max(5, 0.45 * len(order) + 2.5), 0.45 * len(names) + 1.6), dpi=DPI, layout="constrained")
    ax = figure.add_subplot()
    sns.heatmap(matrix, ax=ax, vmin=0, vmax=1, cmap="viridis", annot=len(order) <= 16, fmt=".2f", annot_kws={"size": 7},
                xticklabels=[str(d) for d in order], yticklabels=names, cbar_kws={"label": "I(z_d; factor) / H(factor)"})
    ax.set_xlabel("latent dimension (sorted by KL)")
    ax.set_title(title)
    return _save(figure, path)


def _save(figure: Figure, path: Path) -> Path:
    write_atomic(path, lambda file: figure.savefig(file, format="png", bbox_inches="tight"))
    return path


def class_coverage(histograms: dict[str, np.ndarray], class_names: Sequence[str], path: Path, *, title: str) -> Path:
    """Grouped bars: the share of each image set's images per predicted class, with the uniform share marked.

    histograms: set name -> counts per class (K,).
    """
    import seaborn as sns

    names = list(histograms)
    width = 0.8 / len(names)
    figure = Figure(figsize=(max(7, 0.9 * len(class_names) + 2), 4), dpi=DPI, layout="constrained")
    ax = figure.add_subplot()
    positions = np.arange(len(class_names))
    for i, (name, colour) in enumerate(zip(names, sns.color_palette("tab10", len(names)))):
        counts = np.asarray(histograms[name], dtype=float)
        ax.bar(positions + (i - (len(names) - 1) / 2) * width, counts / max(counts.sum(), 1), width, color=colour, label=name)
    ax.axhline(1 / len(class_names), color="black", linestyle="--", linewidth=1, label="uniform")
    ax.set_xticks(positions, [str(c) for c in class_names], fontsize=8)
    ax.set_xlabel("class predicted by the data set's classifier")
    ax.set_ylabel("share of the images")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.grid(axis="y", alpha=0.3)
    return _save(figure, path)
