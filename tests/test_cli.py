"""The command line as a user runs it: three entry points, configs of their own, the closing block, threads."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from conftest import DATA_ROOT, REPO, TINY, compose_config, needs_full_data
from forked import run_py
from vae_lab.checkpoint import load_checkpoint
from vae_lab.cli import CONFIG_DIR, run_task, threads_per_job
from vae_lab.errors import ConfigError
from vae_lab.options import usable_cores

# The checkout first on the path, so every entry point (the vae-lab script too) runs this code.
CHECKOUT_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def run_cli(*overrides, executable=(sys.executable, "run.py"), cwd=REPO, timeout=300):
    """The command, its output captured; run.py by a fork of tests/forked.py's server (the same
    script without the interpreter's start), the other entry points as processes of their own."""
    if tuple(executable) == (sys.executable, "run.py"):
        return run_py(["run.py", *overrides], cwd=cwd, env=CHECKOUT_ENV, timeout=timeout)
    return subprocess.run([*executable, *overrides], cwd=cwd, env=CHECKOUT_ENV, capture_output=True, text=True, timeout=timeout)


def vae_lab_script() -> str:
    script = shutil.which("vae-lab", path=str(Path(sys.executable).parent)) or shutil.which("vae-lab")
    assert script, "the vae-lab console script is not installed (pip install -e .)"
    return script


@pytest.mark.slow
def test_run_py_trains_and_evaluates_into_its_run_directory(tmp_path):
    result = run_cli("task=train", *TINY, "train.evaluate_at_end=true", "figures=true", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("run.log", "metrics.csv", "checkpoints/last.pt", "checkpoints/model_2.pt",
                 "progress/loss_curves.png", "results/metrics.json", "results/reconstruction.png",
                 ".hydra/config.yaml", ".hydra/overrides.yaml"):
        assert (tmp_path / name).is_file(), name
    assert "train.batch_size=64" in yaml.safe_load((tmp_path / ".hydra" / "overrides.yaml").read_text())
    log = (tmp_path / "run.log").read_text()
    assert "epoch 1/2" in log and "likelihood report" in log
    # The last thing on the console names the run directory and what to open.
    assert result.stdout.strip().splitlines()[-3].endswith(f"run directory: {tmp_path}")


@pytest.mark.slow
@needs_full_data
def test_data_given_on_the_command_line_of_evaluate_is_the_data_evaluated_on(tmp_path):
    run_task(compose_config(), tmp_path / "train")  # the bundled digits
    result = run_cli("task=evaluate", f"evaluate.checkpoint={tmp_path / 'train'}", "device=cpu", "threads=1", "evaluate=light",
                     "data=fashion_mnist", f"data.root={DATA_ROOT}", "data.limit=64", f"hydra.run.dir={tmp_path / 'eval'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert yaml.safe_load((tmp_path / "eval" / "results" / "metrics.json").read_text())["data"] == "fashion_mnist"
    assert "other data than the checkpoint was trained on, as this command line asks: mnist_5k -> fashion_mnist" in (tmp_path / "eval" / "run.log").read_text()


def test_run_py_vae_lab_and_python_m_compose_the_same_config():
    outputs = [
        run_cli("--cfg", "job", "model.latent_dim=2", executable=executable)
        for executable in ((sys.executable, "run.py"), (vae_lab_script(),), (sys.executable, "-m", "vae_lab"))
    ]
    for result in outputs:
        assert result.returncode == 0, result.stderr
    assert outputs[0].stdout == outputs[1].stdout == outputs[2].stdout
    assert "latent_dim: 2" in outputs[0].stdout


def test_every_task_name_has_a_task_function():
    from vae_lab.cli import TASK_FUNCTIONS
    from vae_lab.options import TASKS

    assert tuple(TASK_FUNCTIONS) == TASKS


def test_help_lists_the_groups_and_examples():
    result = run_cli("--help", executable=(sys.executable, "-m", "vae_lab"))
    assert result.returncode == 0
    experiments = next(line for line in result.stdout.splitlines() if line.startswith("experiment: "))
    assert "quick" in experiments and "reference" in experiments  # a subset: recipes get added
    assert "python run.py task=evaluate evaluate.checkpoint=outputs/<date>/<time>" in result.stdout


def test_an_unknown_option_names_its_group_and_the_known_options():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        with pytest.raises(MissingConfigException) as error:
            compose(config_name="config", overrides=["model=transformer"])
    assert "Available options in 'model'" in str(error.value) and "conv_vae" in str(error.value)


def write_user_recipe(folder: Path) -> Path:
    """A user's own experiment, outside the package: experiment/mine.yaml."""
    (folder / "experiment").mkdir(parents=True)
    (folder / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /data: mnist_5k\nmodel:\n  latent_dim: 3\ntrain:\n  epochs: 7\n"
    )
    return folder


@pytest.mark.parametrize("how", ["--config-dir", "hydra.searchpath"])
def test_a_users_own_configs_are_found_beside_the_packaged_ones(tmp_path, how):
    folder = write_user_recipe(tmp_path / "my_conf")
    where = ["--config-dir", str(folder)] if how == "--config-dir" else [f"hydra.searchpath=[file://{folder}]"]
    result = run_cli(*where, "experiment=mine", "--cfg", "job", executable=(sys.executable, "-m", "vae_lab"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert (cfg["model"]["latent_dim"], cfg["train"]["epochs"], cfg["data"]["name"]) == (3, 7, "mnist_5k")
    assert cfg["optim"]["_target_"] == "torch.optim.Adam"  # the packaged groups are still there


@pytest.mark.parametrize("content, kind", [("- model=mlp_vae\n- train.epochs=1\n", "list"), ("mlp_vae\n", "str")])
def test_a_chosen_config_file_that_is_not_a_mapping_is_refused_not_ignored(tmp_path, content, kind):
    (tmp_path / "my_conf" / "experiment").mkdir(parents=True)
    (tmp_path / "my_conf" / "experiment" / "mine.yaml").write_text(content)
    result = run_cli("--config-dir", str(tmp_path / "my_conf"), "experiment=mine", f"hydra.run.dir={tmp_path / 'run'}", *TINY)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"experiment=mine: {tmp_path / 'my_conf' / 'experiment' / 'mine.yaml'} holds a {kind}, not a mapping" in result.stdout + result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # Hydra would have trained the default experiment


def test_training_ends_with_the_run_directory_the_files_to_open_and_the_numbers(tmp_path):
    outcome = run_task(compose_config("train.epochs=1", "data.limit=64", "train.evaluate_at_end=true", "figures=true"), tmp_path)
    assert outcome.run_dir == tmp_path
    assert outcome.open_next[:3] == ("results/reconstruction.png", "results/random_generation.png", "results/latent_embedding.png")
    for name in outcome.open_next:
        assert (tmp_path / name).exists(), name
    assert set(outcome.headline) == {"test -ELBO", "IW bound (k=5)", "active units"}
    last_lines = (tmp_path / "run.log").read_text().strip().splitlines()[-3:]
    assert last_lines[0].endswith(f"run directory: {tmp_path}")
    assert last_lines[1] == "  open next: " + "  ".join(outcome.open_next)
    assert last_lines[2].startswith("  test -ELBO ") and "nats" in last_lines[2]
    # task=evaluate ends with the same block: tests/test_evaluate.py's round trip checks it.


def test_without_evaluation_the_block_points_at_the_progress_images(tmp_path):
    outcome = run_task(compose_config("train.epochs=1", "data.limit=64"), tmp_path)
    for name in outcome.open_next:
        assert (tmp_path / name).exists(), name
    assert outcome.headline["epochs"] == "1" and "test -ELBO" in outcome.headline


@pytest.mark.parametrize("threads, launcher, cores, expected", [
    (None, None, 8, None),                                                              # torch's default
    (3, None, 8, 3),                                                                    # the user's setting
    (None, {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 2}, 8, 4),
    (None, {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 3}, 2, 1),
    (None, {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": -1}, 8, 1),
    (None, {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": -3}, 8, 1),  # 6 at once
    (2, {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 4}, 8, 2),
    (None, {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher", "cpus_per_task": None}, 8, 1),
    (None, {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher", "cpus_per_task": 4}, 8, 4),
    (None, {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}, 8, None),  # one job at a time
])
def test_threads_per_job(threads, launcher, cores, expected):
    assert threads_per_job(threads, launcher, cores) == expected


JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"


@pytest.mark.parametrize("launcher, free, expected", [
    (None, 3, 3),                                     # the cores free now
    (None, None, None),                               # no way to tell (not Linux): torch's default
    ({"_target_": JOBLIB, "n_jobs": 2}, 1, 4),        # a parallel sweep shares the cores as it does for null
    ({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}, 2, 2),
])
def test_threads_auto_takes_the_free_cores_unless_jobs_share_them(launcher, free, expected):
    assert threads_per_job("auto", launcher, 8, free) == expected


def test_the_free_cores_are_read_from_the_machine_and_auto_says_how_many(tmp_path):
    from vae_lab.cli import free_cores

    cores = usable_cores()
    if not os.path.exists("/proc/stat"):
        pytest.skip("free cores are read from /proc/stat, which this system lacks (threads=auto is torch's default here)")
    assert 1 <= free_cores(cores) <= cores
    from threadpoolctl import threadpool_info, threadpool_limits

    before = torch.get_num_threads()
    pools = {pool["user_api"]: pool["num_threads"] for pool in threadpool_info()}
    try:
        run_task(compose_config("threads=auto", "train.epochs=1", "data.limit=32"), tmp_path)
        assert re.search(rf"torch threads: (\d+) \(threads=auto: \1 of {cores} cores free\)", (tmp_path / "run.log").read_text())
    finally:
        torch.set_num_threads(before)
        threadpool_limits(limits=pools)


def test_threads_setting_is_applied_before_the_work_and_validated(tmp_path):
    from threadpoolctl import threadpool_info, threadpool_limits

    if usable_cores() < 2:
        pytest.skip("threads=2 needs a machine with 2 cores (threads above the core count are refused)")
    before = torch.get_num_threads()
    pools = {pool["user_api"]: pool["num_threads"] for pool in threadpool_info()}
    try:
        # The tests run with one thread (conftest); the setting must change that, in every pool.
        run_task(compose_config("threads=2", "train.epochs=1", "data.limit=32"), tmp_path)
        assert torch.get_num_threads() == 2
        assert all(pool["num_threads"] == 2 for pool in threadpool_info())  # numpy's BLAS, scikit-learn's OpenMP
        assert "torch threads: 2 (threads=2)" in (tmp_path / "run.log").read_text()
    finally:
        torch.set_num_threads(before)
        threadpool_limits(limits=pools)
    for bad in ("0", "-2", "two", "100000"):  # 100000: more threads than cores, whose pools fail to map
        with pytest.raises(ConfigError, match=f"threads={bad!r}" if bad == "two" else f"threads={bad} is not allowed"):
            run_task(compose_config(f"threads={bad}"), tmp_path / bad)


@pytest.mark.slow
def test_a_joblib_sweep_gives_each_job_its_share_of_the_cores(tmp_path):
    result = run_cli("-m", *TINY, "train.epochs=1", "data.limit=32", "train.alpha=0.5,1.0", "hydra/launcher=joblib",
                     "hydra.launcher.n_jobs=2", "threads=null", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    cores = usable_cores()
    for job in ("0", "1"):
        assert f"torch threads: {max(1, cores // 2)} (JoblibLauncher runs jobs side by side)" in (tmp_path / job / "run.log").read_text()


@pytest.mark.slow
def test_a_resumed_runs_record_says_what_ran_not_what_was_typed(tmp_path):
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    assert run_cli(*TINY, "train.epochs=1", "data.limit=32", f"hydra.run.dir={first}").returncode == 0
    result = run_cli(*TINY, "train.epochs=2", "data.limit=32", "model.latent_dim=4",
                     f"train.resume={first / 'checkpoints' / 'last.pt'}", f"hydra.run.dir={resumed}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "settings of model come from the checkpoint" in result.stdout + result.stderr  # said, and then recorded as run
    record = OmegaConf.load(resumed / ".hydra" / "config.yaml")
    assert record.model.latent_dim == 16 == load_checkpoint(resumed / "checkpoints" / "last.pt")["config"]["model"]["latent_dim"]


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--help", "--cfg=job"])
def test_printing_into_a_closed_pipe_ends_quietly(flag):
    reader, writer = os.pipe()
    os.close(reader)  # `vae-lab --help | head` after head has exited
    result = subprocess.run([sys.executable, "run.py", *flag.split("=")], cwd=REPO, env=CHECKOUT_ENV, stdout=writer,
                            stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(writer)
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, result.stderr[-2000:]


def test_hydra_flags_after_overrides_are_moved_before_them_with_their_values():
    from vae_lab.cli import flags_first

    assert flags_first(["hydra.run.dir=x", "--config-dir", "d", "model=tiny"]) == ["--config-dir", "d", "hydra.run.dir=x", "model=tiny"]
    assert flags_first(["a=1", "-m", "b=1,2", "--cfg", "job", "-p", "train"]) == ["-m", "--cfg", "job", "-p", "train", "a=1", "b=1,2"]
    # --info takes a value only when the next word is one of its choices; --flag=value is one word
    assert flags_first(["a=1", "--info", "c=2"]) == ["--info", "a=1", "c=2"]
    assert flags_first(["a=1", "--info", "plugins", "--config-dir=d"]) == ["--info", "plugins", "--config-dir=d", "a=1"]


def test_a_users_module_is_found_in_the_folder_the_command_runs_from_whatever_starts_it(tmp_path):
    """`vae-lab` and `python path/to/run.py` start sys.path elsewhere; README: run from the folder that holds my_lab."""
    (tmp_path / "my_lab").mkdir()
    (tmp_path / "my_lab" / "__init__.py").write_text("")
    (tmp_path / "my_lab" / "models.py").write_text(
        "from vae_lab.model import VAE\n\nclass Refusing(VAE):\n"
        "    def __init__(self, latent_dim=2, image_shape=None, prior=None, likelihood=None):\n"
        "        raise ValueError('my_lab was imported and says no')\n")
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "mine.yaml").write_text("_target_: my_lab.models.Refusing\nlatent_dim: 2\n")
    # the flags after an override, as a user may type them
    result = run_py([str(REPO / "run.py"), "data=mnist_5k", "--config-dir", "conf", "model=mine", "trusted_modules=[my_lab]",
                     f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "my_lab was imported and says no" in result.stdout + result.stderr
