"""Where per-epoch metrics, progress images and the final report go.

`Loggers` is what the train task builds from the `logger` config group: metrics.csv
(part of the run-directory contract, so always written) plus any of TensorBoard, MLflow
and Weights & Biases, chosen together with `logger=[tensorboard,mlflow,wandb]`. Every logger has the same
methods: start, log_epoch, log_images, log_report, close.
"""
from __future__ import annotations

import csv
import sys
import time
from collections.abc import Mapping
from typing import Literal
from pathlib import Path

import torch

from vae_lab.errors import ConfigError, VaeLabError, first_line
from vae_lab.files import open_append, sqlite_problem
from vae_lab.layout import RunLayout, folder_in_run

METRIC_COLUMNS = (
    "epoch", "lr", "train_loss", "train_recon", "train_kl",
    "test_loss", "test_recon", "test_kl", "train_seconds", "seconds", "data",
    "test_bits_per_dim",  # the test -ELBO in bits per dimension, for a discrete 8-bit likelihood only (else empty)
)


class CSVLogger:
    """metrics.csv in the run directory: a header, then one row per epoch, flushed as it comes."""

    def __init__(self, run_dir: Path):
        self.path = RunLayout(Path(run_dir)).metrics_csv

    def start(self, history: list[dict], config: dict | None = None) -> None:
        """Begin the log with the rows of earlier epochs (those of a resumed run).

        config: the composed config as plain data, for loggers that record it.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open_append(self.path, truncate=True) as file:
            writer = csv.DictWriter(file, fieldnames=METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows(history)

    def log_epoch(self, row: dict) -> None:
        with open_append(self.path) as file:
            csv.DictWriter(file, fieldnames=METRIC_COLUMNS).writerow(row)

    def log_images(self, tag: str, grid: torch.Tensor, epoch: int) -> None:
        """grid: (3, H, W) in [0, 1], as torchvision.utils.make_grid gives."""

    def log_report(self, report: dict, results_dir: Path) -> None:
        """The evaluation at the end: report as in results/metrics.json, figures in results_dir."""

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """TensorBoard scalars (loss, recon, kl per split; lr) and progress images in <run>/<subdir>."""

    def __init__(self, run_dir: Path, subdir: str = "tensorboard"):
        folder_in_run(subdir, "logger.tensorboard.subdir")  # before the first epoch, not at the end-of-run evaluation
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise VaeLabError(
                "logger=tensorboard needs the tensorboard package: pip install -e '.[tensorboard]' "
                "(or use the default logger=csv)"
            ) from None
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / subdir))

    def start(self, history: list[dict], config: dict | None = None) -> None:
        for row in history:
            self._scalars(row)

    def log_epoch(self, row: dict) -> None:
        self._scalars(row)
        self.writer.flush()

    def log_images(self, tag: str, grid: torch.Tensor, epoch: int) -> None:
        self.writer.add_image(tag, grid, epoch)

    def log_report(self, report: dict, results_dir: Path) -> None:
        pass

    def close(self) -> None:
        self.writer.close()

    def _scalars(self, row: dict) -> None:
        for key in ("loss", "recon", "kl"):
            for split in ("train", "test"):
                self.writer.add_scalar(f"{key}/{split}", row[f"{split}_{key}"], row["epoch"])
        self.writer.add_scalar("lr", row["lr"], row["epoch"])


class MLflowLogger:
    """One MLflow run per training run: the config as parameters, per-epoch metrics,
    progress images, and at the end the report's numbers and the results/ figures.

    Written through MlflowClient with an explicit run id (no global active run), so
    several runs in one process, and the report after close(), work. A sweep job is
    tagged with its sweep folder and job number, so one sweep is one filter in the UI
    (`tags.sweep = '...'`), and the run is named `<sweep>/<job>`.
    """

    def __init__(self, run_dir: Path, tracking_uri: str, experiment: str = "vae_lab"):
        problem = sqlite_problem(tracking_uri, "logger.mlflow.tracking_uri")
        if problem:
            raise ConfigError(problem)
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise VaeLabError(
                "logger=mlflow needs the mlflow package: pip install -e '.[mlflow]' (or leave it out of logger=[...])"
            ) from None
        run_dir = Path(run_dir)
        store = _sqlite_folder(tracking_uri)
        self.run_dir = run_dir
        try:
            self.client = MlflowClient(tracking_uri=tracking_uri)
            found = self.client.get_experiment_by_name(experiment)
            # A local store keeps its artifacts beside the database, not in the folder the command ran from.
            artifacts = (store / "artifacts").as_uri() if store is not None else None
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment, artifacts)
        except Exception as error:  # sqlalchemy's or MLflow's: a damaged, locked or foreign store
            raise ConfigError(f"logger.mlflow.tracking_uri={tracking_uri}: the MLflow store cannot be opened "
                              f"({first_line(error)}); point it at a store that MLflow wrote, or at a new file") from None
        tags = {"run_dir": str(run_dir.resolve())}
        sweep_dir = run_dir.parent if (run_dir.parent / "multirun.yaml").is_file() else None  # Hydra writes it per sweep
        if sweep_dir is not None:
            tags.update(sweep=str(sweep_dir.resolve()), job=run_dir.name)
        name = f"{sweep_dir.name}/{run_dir.name}" if sweep_dir is not None else run_dir.name
        self.run_id = self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id

    def start(self, history: list[dict], config: dict | None = None) -> None:
        from mlflow.entities import Param

        if config is not None:
            params = [Param(key, str(value)[:6000]) for key, value in _flatten(config).items()]
            for first in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
                self.client.log_batch(self.run_id, params=params[first:first + 100])
            self.client.log_dict(self.run_id, config, "config.yaml")
        for row in history:
            self.log_epoch(row)

    def log_epoch(self, row: dict) -> None:
        from mlflow.entities import Metric

        stamp = _milliseconds()
        metrics = [Metric(key, float(value), stamp, int(row["epoch"]))
                   for key, value in row.items() if key not in ("epoch", "data")]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_images(self, tag: str, grid: torch.Tensor, epoch: int) -> None:
        image = (grid.detach().cpu().clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        self.client.log_image(self.run_id, image, artifact_file=f"progress/{tag}_{epoch:04d}.png")

    def log_report(self, report: dict, results_dir: Path) -> None:
        from mlflow.entities import Metric

        stamp = _milliseconds()
        step = int(report.get("epoch", 0))
        numbers = [Metric(f"final/{key}", float(value), stamp, step) for key, value in report.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)]
        self.client.log_batch(self.run_id, metrics=numbers)
        if Path(results_dir).is_dir():
            self.client.log_artifacts(self.run_id, str(results_dir), RunLayout(self.run_dir).results.name)

    def close(self) -> None:
        curves = RunLayout(self.run_dir).loss_curves
        if curves.is_file():
            self.client.log_artifact(self.run_id, str(curves), curves.parent.name)
        self.client.set_terminated(self.run_id, _run_status(sys.exc_info()[1]))


class WandbLogger:
    """One Weights & Biases run per training run, offline by default: everything under <run>/wandb,
    nothing sent (`wandb sync <run>/wandb/offline-run-*` uploads it later; mode=online logs live once
    `wandb login` has been run). The same as the MLflow logger: the config, per-epoch metrics at
    step = epoch, progress images, the report's numbers under final/ in the run's summary and the
    results/ figures; a sweep's jobs share the group <sweep folder name> and are named <sweep>/<job>.
    """

    MODES = ("offline", "online", "disabled")

    def __init__(self, run_dir: Path, project: str = "vae_lab", mode: Literal["offline", "online", "disabled"] = "offline",
                 entity: str | None = None):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        try:
            import wandb
        except ImportError:
            raise VaeLabError(
                "logger=wandb needs the wandb package: pip install -e '.[wandb]' (or leave it out of logger=[...])"
            ) from None
        self.wandb = wandb
        run_dir = Path(run_dir)
        self.run_dir = run_dir
        sweep_dir = run_dir.parent if (run_dir.parent / "multirun.yaml").is_file() else None
        name = f"{sweep_dir.name}/{run_dir.name}" if sweep_dir is not None else run_dir.name
        self.run = wandb.init(
            project=project, entity=entity, dir=str(run_dir), mode=mode, name=name,
            group=sweep_dir.name if sweep_dir is not None else None, reinit="create_new",
            tags=[f"job:{run_dir.name}"] if sweep_dir is not None else None,
            settings=wandb.Settings(silent=True, console="off", save_code=False, x_disable_stats=True),
        )

    def start(self, history: list[dict], config: dict | None = None) -> None:
        if config is not None:
            self.run.config.update(config, allow_val_change=True)
        for row in history:
            self.log_epoch(row)

    def log_epoch(self, row: dict) -> None:
        self.run.log({key: value for key, value in row.items() if key not in ("epoch", "data")}, step=int(row["epoch"]))

    def log_images(self, tag: str, grid: torch.Tensor, epoch: int) -> None:
        image = (grid.detach().cpu().clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        self.run.log({f"progress/{tag}": self.wandb.Image(image)}, step=epoch)

    def log_report(self, report: dict, results_dir: Path) -> None:
        self.run.summary.update({f"final/{key}": value for key, value in report.items()
                                 if isinstance(value, (int, float)) and not isinstance(value, bool)})
        figures = sorted(Path(results_dir).glob("*.png")) if Path(results_dir).is_dir() else []
        if figures:
            self.run.log({f"results/{path.stem}": self.wandb.Image(str(path)) for path in figures}, step=int(report.get("epoch", 0)))

    def close(self) -> None:
        status = _run_status(sys.exc_info()[1])
        self.run.finish(exit_code={"FINISHED": 0, "KILLED": 130}.get(status, 1))


def _run_status(error: BaseException | None) -> str:
    """MLflow's end state of a run, from the exception leaving the train task, if any.

    close() runs in the train task's `finally`, so an exception on its way out means
    the run did not finish; a signal (Ctrl-C, scancel's SIGTERM) exits above 128.
    """
    if error is None:
        return "FINISHED"
    if isinstance(error, KeyboardInterrupt) or getattr(error, "exit_code", 0) > 128:
        return "KILLED"
    return "FAILED"


def _flatten(config: dict) -> dict:
    """{"model": {"latent_dim": 2}} -> {"model.latent_dim": 2}: MLflow parameters are flat."""
    import pandas  # an MLflow dependency

    return pandas.json_normalize(config, sep=".").iloc[0].to_dict()


def _sqlite_folder(tracking_uri: str) -> Path | None:
    """The folder of a sqlite:/// store, created (SQLite creates the file, not its folder); None for other stores."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    folder = Path(tracking_uri.removeprefix("sqlite:///")).expanduser().resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _milliseconds() -> int:
    return int(time.time() * 1000)


class Loggers:
    """metrics.csv and the loggers switched on in the config, called in turn.

    tensorboard, mlflow, wandb: the keyword arguments of TensorBoardLogger / MLflowLogger / WandbLogger, or
    None for off. (Settings rather than nested `_target_`s: a checkpoint's config may
    name a class only at the top of a group.) `settings_of` names the class each mapping's
    keys go to: the config validation checks them against its signature.
    """

    settings_of = {"tensorboard": TensorBoardLogger, "mlflow": MLflowLogger, "wandb": WandbLogger}

    def __init__(self, run_dir: Path, tensorboard: Mapping | None = None, mlflow: Mapping | None = None,
                 wandb: Mapping | None = None):
        self.loggers = [CSVLogger(run_dir)]
        for settings, kind in ((tensorboard, TensorBoardLogger), (mlflow, MLflowLogger), (wandb, WandbLogger)):
            if settings is not None:
                self.loggers.append(kind(run_dir, **settings))

    def start(self, history: list[dict], config: dict | None = None) -> None:
        for logger in self.loggers:
            logger.start(history, config)

    def log_epoch(self, row: dict) -> None:
        for logger in self.loggers:
            logger.log_epoch(row)

    def log_images(self, tag: str, grid: torch.Tensor, epoch: int) -> None:
        for logger in self.loggers:
            logger.log_images(tag, grid, epoch)

    def log_report(self, report: dict, results_dir: Path) -> None:
        for logger in self.loggers:
            logger.log_report(report, results_dir)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
