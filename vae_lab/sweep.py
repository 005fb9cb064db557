"""Sweep summaries: one table and one plot for a whole multirun.

Everything is read back from the job directories (their .hydra/overrides.yaml,
job.json, results/metrics.json and metrics.csv), so the same code serves the Hydra
callback at the end of a sweep, with any launcher, and `task=summarize` on an
existing or interrupted sweep.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import sys
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from vae_lab.errors import ConfigError, VaeLabError, first_line
from vae_lab.files import write_atomic
from vae_lab.layout import RunLayout, SweepLayout
from vae_lab.outcome import TaskOutcome, summary_outcome
from vae_lab.options import DISENTANGLEMENT_METRICS, LIKELIHOOD_METRICS, sample_metric_keys

log = logging.getLogger(__name__)


METRICS = LIKELIHOOD_METRICS
MAIN_METRIC = "neg_elbo"
# Every sample-quality metric goes to summary.csv; the Markdown table keeps to these.
SAMPLE_COLUMNS = ("fid_prior", "fid_gmm", "fid_floor", "latent_probe_accuracy")


class SweepSummary(Callback):
    """Hydra callback: when a multirun ends, write summary.csv, summary.md and summary.png.

    If any job failed, say so and exit with status 1 once the summary is written.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows, swept = write_summary(sweep_dir)
        print(markdown_table(rows, swept))
        print(f"sweep summary: {sweep_dir / 'summary.md'}, {sweep_dir / 'summary.csv'}, {sweep_dir / 'summary.png'}")
        failed = [row for row in rows if row["status"] != "completed"]
        if failed:
            print(f"error: {len(failed)} of {len(rows)} jobs did not complete: "
                  + "; ".join(f"job {row['job']}: {row['status']} {row['error']}".strip() for row in failed),
                  file=sys.stderr)
            sys.exit(1)


def summarize(cfg: DictConfig, run_dir: Path) -> TaskOutcome:
    """The task: rebuild the summary of cfg.summarize.sweep_dir; its value is the best main metric.

    A job whose files cannot be read is listed with what is wrong, the others are
    summarised, and the task then fails (exit status 1) so the damage is not missed.
    """
    sweep_dir = cfg.summarize.sweep_dir
    if not sweep_dir:
        raise ConfigError("summarize.sweep_dir is not set: pass summarize.sweep_dir=multirun/<date>/<time>")
    rows, swept = write_summary(Path(sweep_dir))
    log.info("summary of %d jobs written to %s\n%s", len(rows), SweepLayout(Path(sweep_dir)).summary_md, markdown_table(rows, swept))
    damaged = [row for row in rows if row["status"] == UNREADABLE]
    if damaged:
        raise SweepDamaged(
            f"{len(damaged)} of {len(rows)} jobs could not be read; the summary lists the other jobs in full: "
            + "; ".join(f"job {row['job']}: {row['error']}" for row in damaged)
        )
    values = [row[MAIN_METRIC] for row in rows if isinstance(row[MAIN_METRIC], float)]
    return summary_outcome(Path(sweep_dir), min(values) if values else math.nan, rows, MAIN_METRIC)


class SweepDamaged(VaeLabError):
    """Some jobs' files are unreadable (truncated, not what vae_lab writes); the summary holds the rest."""

    exit_code = 1


UNREADABLE = "unreadable"


def write_summary(sweep_dir: Path) -> tuple[list[dict], list[str]]:
    """Read every job of `sweep_dir`, write summary.csv, summary.md and summary.png there.

    Returns the rows and the swept override keys.
    """
    if not sweep_dir.is_dir():
        raise ConfigError(f"summarize.sweep_dir={sweep_dir} is not a folder: pass a multirun/<date>/<time> directory")
    jobs = sorted((p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()), key=_job_order)
    if not jobs:
        raise ConfigError(f"summarize.sweep_dir={sweep_dir} holds no Hydra jobs (no */.hydra/overrides.yaml)")
    rows = [_readable_job_row(job) for job in jobs]
    swept = swept_keys(rows)
    columns = ["job", "status", *swept, *METRICS, *sample_metric_keys(), *DISENTANGLEMENT_METRICS, "epochs", "seconds", "error", "overrides"]
    layout = SweepLayout(sweep_dir)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(layout.summary_csv, table.getvalue())
    write_atomic(layout.summary_md, f"# Sweep {sweep_dir}\n\n{markdown_table(rows, swept)}\n")
    _plot(rows, swept, layout.summary_png)
    return rows, swept


class JobFileError(Exception):
    """One file of a job is not what vae_lab writes; the message names it and says how."""


def _readable_job_row(job_dir: Path) -> dict:
    """job_row, or a row that says what is wrong with the job's files."""
    try:
        return job_row(job_dir)
    except JobFileError as error:
        return {"job": job_dir.name, "overrides": "", "params": {}, "status": UNREADABLE, "error": str(error),
                "seconds": "", "epochs": "", **{key: "" for key in METRICS}}


def job_row(job_dir: Path) -> dict:
    """One job's overrides, status, final test metrics and wall time."""
    overrides = _read_structured(job_dir, ".hydra/overrides.yaml", yaml.safe_load, list, "a list of overrides") or []
    row = {"job": job_dir.name, "overrides": " ".join(map(str, overrides)),
           "params": dict(str(o).split("=", 1) for o in overrides if "=" in str(o))}
    job_file = RunLayout(job_dir).job_file
    status = _read_structured(job_dir, job_file.name, json.loads, dict, "a JSON object") if job_file.is_file() else {}
    row["status"] = status.get("status", "not finished")
    row["error"] = status.get("error", "")
    row["seconds"] = status.get("seconds", "")
    history = _read_metrics(RunLayout(job_dir).metrics_csv)
    row["epochs"] = int(history[-1]["epoch"]) if history else 0
    results = RunLayout(job_dir).report
    if results.is_file():
        report = _read_structured(job_dir, str(results.relative_to(job_dir)), json.loads, dict, "a JSON object")
        row.update({key: report.get(key, "") for key in (*METRICS, *sample_metric_keys(), *DISENTANGLEMENT_METRICS)})
    elif history:  # no evaluation: the last epoch's test pass
        last = history[-1]
        recon, kl = last["test_recon"], last["test_kl"]
        row.update(neg_elbo=recon + kl, recon=recon, kl=kl, iw_nll="", active_units="", objective=last["test_loss"])
    else:
        row.update({key: "" for key in METRICS})
    if row["status"] == "not finished" and history:
        row["status"] = f"not finished (epoch {row['epochs']})"
    return row


def _read_structured(job_dir: Path, name: str, parse, kind: type, described: str):
    """The parsed content of job_dir/name, which must be `kind`; JobFileError saying what is wrong otherwise."""
    try:
        value = parse((job_dir / name).read_text())
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as error:
        reason = getattr(error, "strerror", None) or first_line(error)
        raise JobFileError(f"{name} cannot be read ({reason}; truncated?)") from None
    if value is not None and not isinstance(value, kind):
        raise JobFileError(f"{name} holds a {type(value).__name__}, not {described}")
    return value


def swept_keys(rows: list[dict]) -> list[str]:
    """The override keys whose values differ between jobs, in the order first seen."""
    keys = list(dict.fromkeys(key for row in rows for key in row["params"]))
    swept = [key for key in keys if len({row["params"].get(key) for row in rows}) > 1]
    for row in rows:
        row.update({key: row["params"].get(key, "") for key in swept})
    return swept


def markdown_table(rows: list[dict], swept: list[str]) -> str:
    disentanglement = [key for key in DISENTANGLEMENT_METRICS if any(row.get(key) not in ("", None) for row in rows)]
    columns = ["job", *swept, "status", *METRICS, *SAMPLE_COLUMNS, *disentanglement, "epochs", "seconds"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(column, "")) for column in columns) + " |" for row in rows]
    errors = [f"- job {row['job']}: {row['error']}" for row in rows if row["error"]]
    return "\n".join(lines + ([""] + errors if errors else []))


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value).replace("|", "\\|")


def _plot(rows: list[dict], swept: list[str], path: Path) -> None:
    """The main metric against the first swept parameter, one line per value of the second; beside it,
    where the jobs report them, MIG and DCI disentanglement against the same parameter."""
    import seaborn as sns
    from matplotlib.figure import Figure

    x_key = swept[0] if swept else "job"
    hue_key = swept[1] if len(swept) > 1 else None
    done = [row for row in rows if isinstance(row[MAIN_METRIC], float)]
    x = [_number(row[x_key]) for row in done]
    judged = [row for row in done if isinstance(row.get("mig"), float)]
    figure = Figure(figsize=(12 if judged else 7, 4.5), dpi=100, layout="constrained")
    ax, *others = figure.subplots(1, 2 if judged else 1, squeeze=False)[0]
    if judged:
        side = others[0]
        for key, label in (("mig", "MIG"), ("dci_disentanglement", "DCI disentanglement")):
            sns.lineplot(x=[_number(row[x_key]) for row in judged], y=[row[key] for row in judged], marker="o",
                         errorbar=None, ax=side, label=label)
        side.set_xlabel(x_key)
        side.set_ylabel("score (0..1)")
        side.set_title(f"Disentanglement by {x_key}" + (f" (mean over {hue_key})" if hue_key else ""))
        side.grid(alpha=0.3)
    if done:
        # With more than two swept keys, the remaining ones are averaged over.
        sns.lineplot(x=x, y=[row[MAIN_METRIC] for row in done], hue=[row[hue_key] for row in done] if hue_key else None,
                     marker="o", errorbar=None, ax=ax)
        if hue_key:
            ax.legend(title=hue_key)
    if x and all(isinstance(v, float) and v > 0 for v in x) and max(x) / min(x) >= 10:
        ax.set_xscale("log")
    ax.set_xlabel(x_key)
    ax.set_ylabel("test -ELBO (nats per image)")
    ax.set_title(f"Sweep: test -ELBO by {x_key}" + (f", one line per {hue_key}" if hue_key else "")
                 + (f" ({len(rows) - len(done)} jobs without a result)" if len(done) < len(rows) else ""))
    ax.grid(alpha=0.3)
    write_atomic(path, lambda file: figure.savefig(file, format="png"))


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _read_metrics(path: Path) -> list[dict]:
    """metrics.csv's rows with the test metrics as numbers; JobFileError for a damaged row (a half-written last one)."""
    if not path.is_file():
        return []
    try:
        with path.open(newline="") as file:
            rows = list(csv.DictReader(file))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise JobFileError(f"metrics.csv cannot be read ({getattr(error, 'strerror', None) or error})") from None
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        try:
            row["epoch"] = int(row["epoch"])
            for key in ("test_loss", "test_recon", "test_kl"):
                row[key] = float(row[key])
        except (KeyError, TypeError, ValueError):
            raise JobFileError(f"metrics.csv line {number} is incomplete or damaged (half-written?)") from None
    return rows


def _job_order(path: Path):
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)
