"""The names inside a run directory and a sweep directory: the one place they are spelled.

    <run>/  .hydra/  run.log  metrics.csv  job.json (sweep jobs)  .vae_lab.lock (while it runs)
            checkpoints/model_<epoch>.pt, last.pt
            progress/    reconstructions, samples, loss_curves.png
            results/     complete or absent: figures, metrics.json (staged in .results-*)
    <sweep>/ summary.csv  summary.md  summary.png

Users, tests and other tools rely on these names (README, "The run directory").
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePath

LOCK_FILE = ".vae_lab.lock"
REPORT_FILE = "metrics.json"  # the evaluation's report, in results/ (or wherever an evaluation writes)


# The names vae_lab and Hydra give the entries of a run directory; a setting that names a
# folder inside the run (logger.tensorboard.subdir) must pick another.
RUN_ENTRIES = ("checkpoints", "progress", "results", "metrics.csv", "job.json", ".hydra", "run.log", LOCK_FILE)


def folder_in_run(name: str, setting: str) -> str:
    """`name` if it is a new folder inside a run directory, else ConfigError saying what to use."""
    from vae_lab.errors import ConfigError

    parts = PurePath(str(name)).parts
    if not parts or PurePath(str(name)).is_absolute() or ".." in parts:
        raise ConfigError(f"{setting}={name!r} leaves the run directory: use a folder name inside it, e.g. {setting}=tensorboard")
    if parts[0] in RUN_ENTRIES or parts[0].startswith(".results"):
        raise ConfigError(f"{setting}={name!r} is where vae_lab writes {parts[0]}: use another folder name, e.g. {setting}=tensorboard")
    return str(name)


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.pt"

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f"model_{epoch}.pt"

    @property
    def progress(self) -> Path:
        return self.root / "progress"

    def progress_image(self, kind: str, epoch: int) -> Path:
        """progress/<kind>_<epoch, 4 digits>.png: kind "reconstruction" or "samples", drawn every train.plot_every epochs."""
        return self.progress / f"{kind}_{epoch:04d}.png"

    @property
    def loss_curves(self) -> Path:
        return self.progress / "loss_curves.png"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def report(self) -> Path:
        return self.results / REPORT_FILE

    @property
    def metrics_csv(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def job_file(self) -> Path:
        return self.root / "job.json"


@dataclass(frozen=True)
class SweepLayout:
    """The paths of one sweep directory (its jobs are RunLayouts of its subfolders)."""

    root: Path

    @property
    def summary_csv(self) -> Path:
        return self.root / "summary.csv"

    @property
    def summary_md(self) -> Path:
        return self.root / "summary.md"

    @property
    def summary_png(self) -> Path:
        return self.root / "summary.png"
