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
from pathlib import Path

LOCK_FILE = ".vae_lab.lock"
REPORT_FILE = "metrics.json"  # the evaluation's report, in results/ (or wherever an evaluation writes)


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
