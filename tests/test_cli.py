"""run.py end to end, as a user runs it: a subprocess in the repository."""
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO, TINY


def run_cli(*overrides, executable=(sys.executable, "run.py"), timeout=300):
    return subprocess.run([*executable, *overrides], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_run_py_trains_and_evaluates_into_its_run_directory(tmp_path):
    result = run_cli("task=train", *TINY, "train.evaluate_at_end=true", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("run.log", "metrics.csv", "checkpoints/last.pt", "checkpoints/model_2.pt",
                 "progress/loss_curves.png", "results/metrics.json", "results/reconstruction.png",
                 ".hydra/config.yaml", ".hydra/overrides.yaml"):
        assert (tmp_path / name).is_file(), name
    assert "train.batch_size=64" in yaml.safe_load((tmp_path / ".hydra" / "overrides.yaml").read_text())
    log = (tmp_path / "run.log").read_text()
    assert "epoch 1/2" in log and "likelihood report" in log


def test_console_script_composes_the_same_config_as_run_py():
    script = shutil.which("vae-lab", path=str(Path(sys.executable).parent)) or shutil.which("vae-lab")
    assert script, "the vae-lab console script is not installed (pip install -e .)"
    by_script = run_cli("--cfg", "job", "model.latent_dim=2", executable=(script,))
    by_run_py = run_cli("--cfg", "job", "model.latent_dim=2")
    assert by_script.returncode == by_run_py.returncode == 0, by_script.stderr
    assert by_script.stdout == by_run_py.stdout and "latent_dim: 2" in by_run_py.stdout


def test_every_task_name_has_a_task_function():
    from vae_lab.cli import TASK_FUNCTIONS
    from vae_lab.options import TASKS

    assert tuple(TASK_FUNCTIONS) == TASKS


def test_help_lists_the_groups_and_examples():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "experiment: alpha_latent_sweep, gpu_fast, optuna_search, quick, reference" in result.stdout
    assert "python run.py task=evaluate evaluate.checkpoint=outputs/<date>/<time>" in result.stdout
