"""Where per-epoch metrics and progress images go.

metrics.csv is part of the run-directory contract, so every logger writes it;
TensorBoardLogger also writes TensorBoard event files, so that
`tensorboard --logdir multirun/<date>/<time>` shows a whole sweep side by side.
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from vae_lab.errors import VaeLabError

METRIC_COLUMNS = (
    "epoch", "lr", "train_loss", "train_recon", "train_kl",
    "test_loss", "test_recon", "test_kl", "train_seconds", "seconds", "data",
)


class CSVLogger:
    """metrics.csv in the run directory: a header, then one row per epoch, flushed as it comes."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.csv"

    def start(self, history: list[dict]) -> None:
        """Begin the log with the rows of earlier epochs (those of a resumed run)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows(history)

    def log_epoch(self, row: dict) -> None:
        with self.path.open("a", newline="") as file:
            csv.DictWriter(file, fieldnames=METRIC_COLUMNS).writerow(row)

    def log_images(self, tag: str, grid: torch.Tensor, epoch: int) -> None:
        """grid: (3, H, W) in [0, 1], as torchvision.utils.make_grid gives."""

    def close(self) -> None:
        pass


class TensorBoardLogger(CSVLogger):
    """metrics.csv plus TensorBoard scalars (loss, recon, kl per split; lr) and progress images."""

    def __init__(self, run_dir: Path, subdir: str = "tensorboard"):
        super().__init__(run_dir)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise VaeLabError(
                "logger=tensorboard needs the tensorboard package: pip install -e '.[tensorboard]' "
                "(or use the default logger=csv)"
            ) from None
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / subdir))

    def start(self, history: list[dict]) -> None:
        super().start(history)
        for row in history:
            self._scalars(row)

    def log_epoch(self, row: dict) -> None:
        super().log_epoch(row)
        self._scalars(row)
        self.writer.flush()

    def log_images(self, tag: str, grid: torch.Tensor, epoch: int) -> None:
        self.writer.add_image(tag, grid, epoch)

    def close(self) -> None:
        self.writer.close()

    def _scalars(self, row: dict) -> None:
        for key in ("loss", "recon", "kl"):
            for split in ("train", "test"):
                self.writer.add_scalar(f"{key}/{split}", row[f"{split}_{key}"], row["epoch"])
        self.writer.add_scalar("lr", row["lr"], row["epoch"])
