"""What a task leaves behind, and the short block that tells the user where to look.

Every task returns a TaskOutcome; the CLI prints `closing_block(outcome)` as the last
thing a run says, so the user never has to scroll back for the run directory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from vae_lab.layout import RunLayout, SweepLayout

RELATIVE = RunLayout(Path())  # the run directory's names, relative to it
# The reference project's three figures, the first things to look at after a run.
REFERENCE_FIGURES = ("reconstruction.png", "random_generation.png", "latent_embedding.png")
# Where the data has generating factors (vae_lab.evaluate draws them): listed after the reference figures.
FACTOR_FIGURES = ("factor_information.png",)


@dataclass(frozen=True)
class TaskOutcome:
    value: float                 # what the task returns to a sweeper (the number it minimises)
    run_dir: Path                # the folder the task wrote into
    open_next: tuple[str, ...]   # paths relative to run_dir, in the order a user opens them
    headline: dict[str, str] = field(default_factory=dict)  # two or three numbers, formatted


def _existing(run_dir: Path, paths) -> tuple[str, ...]:
    """The paths a user can open: a run with figures=false has no PNGs to point at."""
    return tuple(path for path in paths if (Path(run_dir) / path.rstrip("/")).exists())


def training_outcome(run_dir: Path, value: float, last_epoch: dict, report: dict | None) -> TaskOutcome:
    """After training: the evaluation's figures when there is one, else the progress images."""
    if report is not None:
        return TaskOutcome(
            value, Path(run_dir),
            _existing(run_dir, (*(str(RELATIVE.results / name) for name in (*REFERENCE_FIGURES, *FACTOR_FIGURES)),
                                str(RELATIVE.report), str(RELATIVE.loss_curves))),
            _report_numbers(report),
        )
    return TaskOutcome(
        value, Path(run_dir), _existing(run_dir, (f"{RELATIVE.progress}/", str(RELATIVE.loss_curves), str(RELATIVE.metrics_csv))),
        {
            "test -ELBO": f"{last_epoch['test_recon'] + last_epoch['test_kl']:.2f} nats",
            "test loss": f"{last_epoch['test_loss']:.2f}",
            "epochs": str(last_epoch["epoch"]),
        },
    )


def evaluation_outcome(run_dir: Path, report: dict) -> TaskOutcome:
    return TaskOutcome(
        report["neg_elbo"], Path(run_dir),
        _existing(run_dir, (*(str(RELATIVE.results / name) for name in (*REFERENCE_FIGURES, *FACTOR_FIGURES)),
                            str(RELATIVE.report))),
        _report_numbers(report),
    )


def summary_outcome(sweep_dir: Path, value: float, rows: list[dict], metric: str) -> TaskOutcome:
    completed = [row for row in rows if row["status"] == "completed"]
    headline = {"jobs completed": f"{len(completed)} of {len(rows)}"}
    scored = [row for row in rows if isinstance(row.get(metric), float)]
    if scored:
        best = min(scored, key=lambda row: row[metric])
        headline[f"best {metric}"] = f"{best[metric]:.2f} (job {best['job']})"
    names = SweepLayout(Path())
    return TaskOutcome(value, Path(sweep_dir), (str(names.summary_md), str(names.summary_png), str(names.summary_csv)), headline)


def _report_numbers(report: dict) -> dict[str, str]:
    return {
        "test -ELBO": f"{report['neg_elbo']:.2f} nats",
        f"IW bound (k={report['iw_samples']})": f"{report['iw_nll']:.2f} nats",
        "active units": f"{report['active_units']}/{report['latent_dim']}",
        **({"MIG": f"{report['mig']:.3f}"} if "mig" in report else {}),
    }


def closing_block(outcome: TaskOutcome) -> str:
    """Three lines: the run directory, what to open next, the headline numbers."""
    return "\n".join([
        f"run directory: {_shown(outcome.run_dir)}",
        "  open next: " + "  ".join(outcome.open_next),
        "  " + "  |  ".join(f"{label} {value}" for label, value in outcome.headline.items()),
    ])


def _shown(path: Path) -> str:
    """Relative to the working directory when inside it (what a user types), else absolute."""
    path = Path(path).absolute()
    try:
        return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)
    except ValueError:  # another drive on Windows
        return str(path)
