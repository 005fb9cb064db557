"""Sweeps through the real CLI: job directories, the summary, failures, launchers, summarize."""
import json
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, assert_png, read_csv
from forked import run_py
from vae_lab.cli import _missing_plugin, run_task

# Smaller than TINY: a sweep job is a whole process; evaluation stays on so the summary has results.
JOB = [
    "device=cpu", "data=mnist_5k", "data.limit=64", "train.epochs=1", "train.batch_size=32",
    "evaluate.batch_size=64", "evaluate.iw_samples=2", "evaluate.embedding_points=64",
    "evaluate.reconstruction_rows=1", "evaluate.generation_samples=16",
]


def sweep(sweep_dir, *overrides, timeout=600):
    return run_py(["run.py", "-m", *JOB, *overrides, f"hydra.sweep.dir={sweep_dir}"], timeout=timeout)


def read_summary(sweep_dir):
    return read_csv(sweep_dir / "summary.csv")


@pytest.fixture(scope="module")
def sweep_2x2(tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("sweep") / "2x2"
    result = sweep(sweep_dir, "train.alpha=0.1,1.0", "model.latent_dim=2,3")
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir, result


@pytest.mark.slow
def test_a_2x2_sweep_gives_four_job_directories_and_one_summary(sweep_2x2):
    sweep_dir, result = sweep_2x2
    for job in ("0", "1", "2", "3"):
        for name in ("metrics.csv", "checkpoints/last.pt", "progress/loss_curves.png", "results/metrics.json", "job.json"):
            assert (sweep_dir / job / name).is_file(), f"{job}/{name}"
    rows = read_summary(sweep_dir)
    assert [(r["train.alpha"], r["model.latent_dim"]) for r in rows] == [("0.1", "2"), ("0.1", "3"), ("1.0", "2"), ("1.0", "3")]
    for row in rows:
        report = json.loads((sweep_dir / row["job"] / "results" / "metrics.json").read_text())
        assert row["status"] == "completed"
        assert float(row["neg_elbo"]) == pytest.approx(report["neg_elbo"])
        assert float(row["iw_nll"]) == pytest.approx(report["iw_nll"])
        assert int(row["active_units"]) == report["active_units"]
        assert float(row["seconds"]) > 0
    assert "| job | train.alpha | model.latent_dim | status |" in (sweep_dir / "summary.md").read_text()
    assert_png(sweep_dir / "summary.png")
    assert "sweep summary:" in result.stdout


@pytest.mark.slow
def test_summarize_rebuilds_an_interrupted_sweep(sweep_2x2, make_cfg, tmp_path):
    sweep_dir = tmp_path / "copy"
    shutil.copytree(sweep_2x2[0], sweep_dir)
    for name in ("summary.csv", "summary.md", "summary.png"):
        (sweep_dir / name).unlink()
    (sweep_dir / "3" / "job.json").unlink()  # as if job 3 was killed
    shutil.rmtree(sweep_dir / "3" / "results")
    outcome = run_task(make_cfg("task=summarize", f"summarize.sweep_dir={sweep_dir}"), tmp_path / "run")
    best = outcome.value
    assert outcome.run_dir == sweep_dir and outcome.headline["jobs completed"] == "3 of 4"
    assert all((sweep_dir / name).is_file() for name in outcome.open_next)
    rows = read_summary(sweep_dir)
    assert [r["status"] for r in rows] == ["completed"] * 3 + ["not finished (epoch 1)"]
    assert best == pytest.approx(min(float(r["neg_elbo"]) for r in rows[:3] + rows[3:]))
    assert_png(sweep_dir / "summary.png")


@pytest.mark.slow
def test_a_failing_job_is_summarised_and_fails_the_sweep_with_joblib(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = sweep(sweep_dir, "model.latent_dim=2,0", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert result.returncode == 1
    rows = read_summary(sweep_dir)
    assert [r["status"] for r in rows] == ["completed", "failed"]
    assert rows[1]["error"] == "model.latent_dim=0 is not allowed: use a whole number >= 1"
    assert "1 of 2 jobs did not complete" in result.stderr
    assert (sweep_dir / "0" / "results" / "metrics.json").is_file()


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_sweep(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = sweep(sweep_dir, "train.alpha=0.5,1.0", "hydra/launcher=submitit_local")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["status"] for r in read_summary(sweep_dir)] == ["completed", "completed"]


@pytest.mark.slow
def test_optuna_search_minimises_the_test_neg_elbo(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = sweep(sweep_dir, "experiment=optuna_search", "hydra.sweeper.n_trials=2")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_summary(sweep_dir)
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows)
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())["best_value"]
    assert best == pytest.approx(min(float(r["neg_elbo"]) for r in rows), abs=1e-3)


def test_a_missing_plugin_names_the_extra_to_install(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert _missing_plugin(["train.alpha=1", "hydra/launcher=joblib"]) == (
        "error: hydra/launcher=joblib needs the optional extra 'sweep': pip install -e '.[sweep]'"
    )
    assert "pip install -e '.[slurm]'" in _missing_plugin(["hydra/launcher=slurm"])
    assert _missing_plugin(["train.alpha=1"]) is None


SLOW_JOB = ["train.evaluate_at_end=false", "data.limit=128", "train.batch_size=16", "train.checkpoint_every=1000",
            "train.plot_every=1000"]


def sigterm_sweep_once(sweep_dir, overrides: list[str], ready) -> str:
    """Start `run.py -m` with these overrides, SIGTERM it once ready() holds, and return its output (exit 143 checked)."""
    import signal
    import time

    process = subprocess.Popen([sys.executable, "run.py", "-m", *JOB, *SLOW_JOB, *overrides, f"hydra.sweep.dir={sweep_dir}"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not ready():
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()[-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "Traceback" not in output
    return output


@pytest.mark.slow
def test_sigterm_stops_the_sweep_and_writes_the_summary_of_what_finished(tmp_path):
    sweep_dir = tmp_path / "sweep"
    output = sigterm_sweep_once(sweep_dir, ["train.epochs=1,200,1"],
                                ready=lambda: (sweep_dir / "1" / "checkpoints" / "last.pt").exists())  # job 1 is training
    assert "sweep interrupted by SIGTERM in job 1: 1 job(s) completed" in output
    assert not (sweep_dir / "2").exists()  # the remaining job was not started
    rows = read_summary(sweep_dir)
    assert [r["status"] for r in rows] == ["completed", "interrupted"]
    assert "continue with: python run.py task=train train.resume=" in rows[1]["error"]


@pytest.mark.slow
def test_sigterm_to_a_parallel_sweep_stops_it_and_summarises_what_finished(tmp_path):
    """joblib runs the jobs in worker processes: the signal reaches the command, which writes the summary."""
    sweep_dir = tmp_path / "sweep"
    output = sigterm_sweep_once(
        sweep_dir, ["train.epochs=1,300", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
        ready=lambda: (sweep_dir / "0" / "job.json").exists() and (sweep_dir / "1" / "checkpoints" / "last.pt").exists())
    assert "sweep interrupted by SIGTERM: 1 job(s) completed" in output
    rows = read_summary(sweep_dir)
    assert rows[0]["status"] == "completed" and rows[1]["status"] != "completed"
