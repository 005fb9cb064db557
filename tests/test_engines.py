"""Sweeps on real engines: a local SLURM cluster (scripts/slurm-local.sh), a local Ray
instance, MLflow tracking read back through its client, and an Optuna study that
continues after an interruption.

Each engine that this machine cannot host is skipped with the reason printed (`-ra`).
All but the config checks at the end are in the slow tier (`-m slow`).
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from forked import ForkedRun, run_py

SLURM_SCRIPT = REPO / "scripts" / "slurm-local.sh"
# A sweep job is a whole process (a SLURM job, a Ray task): the smallest job that still evaluates.
JOB = [
    "device=cpu", "data=mnist_5k", "data.limit=64", "train.epochs=1", "train.batch_size=32",
    "evaluate.batch_size=64", "evaluate.iw_samples=2", "evaluate.embedding_points=64",
    "evaluate.reconstruction_rows=1", "evaluate.generation_samples=16",
]
# The slurm preset asks for what a GPU job on a real cluster needs; the loopback node has 1 GB to spare and no GPU.
SMALL_SLURM_JOB = [
    "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10",
]


def read_summary(sweep_dir: Path) -> list[dict]:
    with (sweep_dir / "summary.csv").open() as file:
        return list(csv.DictReader(file))


def job_id(job_dir: Path) -> str:
    """The scheduler's id of a job, as Hydra recorded it in the job's folder."""
    return str(yaml.safe_load((job_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["id"])


def assert_complete(job_dir: Path) -> None:
    for name in ("metrics.csv", "checkpoints/last.pt", "progress/loss_curves.png", "results/metrics.json", "run.log"):
        assert (job_dir / name).is_file(), f"{job_dir}/{name}"
    assert json.loads((job_dir / "job.json").read_text())["status"] == "completed"


# --- SLURM ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def slurm_env():
    """The environment of a shell that talks to the local cluster; started here if it is not running.

    Session-scoped: the SLURM tests share one xdist worker (xdist_group), which may run other
    modules' tests between them. Only a cluster this fixture started is stopped afterwards.
    """
    if shutil.which("bash") is None:
        pytest.skip("SLURM: no bash to run scripts/slurm-local.sh")
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        pytest.skip("SLURM: hydra-submitit-launcher is not installed: pip install -e '.[slurm]'")
    was_running = subprocess.run([SLURM_SCRIPT, "status"], capture_output=True, text=True).returncode == 0
    started = subprocess.run([SLURM_SCRIPT, "start"], capture_output=True, text=True, timeout=300)
    reason = ((started.stderr or started.stdout).strip().splitlines() or ["no output"])[-1]
    if started.returncode == 2:  # the machine cannot host it (not root, no packages): said, and skipped
        pytest.skip(f"SLURM: {reason}")
    assert started.returncode == 0, f"the local cluster could host SLURM but did not start: {reason}"
    conf = started.stdout.strip().splitlines()[-1].removeprefix("export SLURM_CONF=")
    yield {**os.environ, "SLURM_CONF": conf, "OMP_NUM_THREADS": "1"}
    if not was_running:
        subprocess.run([SLURM_SCRIPT, "stop"], capture_output=True, timeout=120)


def slurm(arguments: list[str], env: dict) -> str:
    return subprocess.run(arguments, capture_output=True, text=True, env=env, check=True, timeout=60).stdout


UNSETTLED = ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "SUSPENDED", "")


def accounted_states(job_ids: list[str], env: dict, timeout: float = 60) -> dict[str, str]:
    """sacct's final state of each job (its allocation line, not the batch/step lines).

    The accounting records a job's end a moment after the job has written its result (and the
    launcher has returned), so this waits until no job reads as pending or running."""
    deadline = time.monotonic() + timeout
    while True:
        out = slurm(["sacct", "--noheader", "--parsable2", "-o", "JobID,State", *[f"-j{j}" for j in job_ids]], env)
        states = dict(line.split("|")[:2] for line in out.splitlines() if line)
        states = {j: states.get(j, "") for j in job_ids}
        if all((state.split() or [""])[0] not in UNSETTLED for state in states.values()) or time.monotonic() > deadline:
            return states
        time.sleep(1)


def start_sweep(sweep_dir: Path, overrides: list[str], env: dict) -> ForkedRun:
    return ForkedRun(["run.py", "-m", *JOB, *SMALL_SLURM_JOB, *overrides, f"hydra.sweep.dir={sweep_dir}"], env=env)


def sweep_while(sweep_dir: Path, overrides: list[str], env: dict, during, timeout: float):
    """Run a SLURM sweep, call `during()` while it runs, and wait for it: (returncode, stdout, stderr, what during returned)."""
    process = start_sweep(sweep_dir, overrides, env)
    try:
        done = during()
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, out, err, done


@pytest.mark.slow
@pytest.mark.xdist_group("slurm")  # one local cluster: its tests share one worker
def test_a_sweep_runs_as_slurm_jobs_and_sacct_records_them(slurm_env, tmp_path):
    sweep_dir = tmp_path / "sweep"
    process = start_sweep(sweep_dir, ["train.alpha=0.1,1.0"], slurm_env)
    queued = set()
    while process.poll() is None:  # what squeue sees while the sweep runs
        queued |= set(slurm(["squeue", "--noheader", "--array", "--format=%i"], slurm_env).split())
        time.sleep(0.5)
    out, err = process.communicate()
    assert process.returncode == 0, err[-3000:]

    ids = [job_id(sweep_dir / job) for job in ("0", "1")]
    array = ids[0].split("_")[0]
    assert ids == [f"{array}_0", f"{array}_1"]  # one SLURM array, one task per sweep point
    assert set(ids) <= queued
    assert accounted_states(ids, slurm_env) == dict.fromkeys(ids, "COMPLETED")
    for job in ("0", "1"):
        assert_complete(sweep_dir / job)
        assert (sweep_dir / ".submitit" / job_id(sweep_dir / job)).is_dir()
    rows = read_summary(sweep_dir)
    assert [(row["train.alpha"], row["status"]) for row in rows] == [("0.1", "completed"), ("1.0", "completed")]
    assert "sweep summary:" in out


@pytest.mark.slow
@pytest.mark.xdist_group("slurm")
def test_a_failed_and_a_cancelled_slurm_job_are_reported_and_the_others_finish(slurm_env, tmp_path):
    sweep_dir = tmp_path / "sweep"
    # latent_dim=0 fails its config check; latent_dim=3 is cancelled with scancel after its first epoch.
    long = ["train.epochs=60", "train.checkpoint_every=1000", "train.plot_every=1000"]  # long enough to cancel, as the requeue tests
    returncode, out, err, cancelled = sweep_while(
        sweep_dir, ["model.latent_dim=0,2,3", *long], slurm_env, lambda: _cancel_after_first_epoch(sweep_dir / "2", slurm_env), 300)
    assert returncode == 1, err[-3000:]

    rows = {row["model.latent_dim"]: row for row in read_summary(sweep_dir)}
    assert rows["0"]["status"] == "failed" and "model.latent_dim=0 is not allowed" in rows["0"]["error"]
    assert rows["2"]["status"] == "completed"
    assert_complete(sweep_dir / "1")
    assert rows["3"]["status"] == "interrupted" and "train.resume=" in rows["3"]["error"]
    assert 1 <= int(rows["3"]["epochs"]) < 60
    assert (sweep_dir / "2" / "checkpoints" / "last.pt").is_file()  # what the resume command names
    assert "error: 2 of 3 jobs did not complete" in err
    states = accounted_states([job_id(sweep_dir / job) for job in ("0", "1", "2")], slurm_env)
    assert states[cancelled].startswith("CANCELLED")
    assert list(states.values()).count("COMPLETED") == 2  # the failed job itself ended cleanly


@pytest.mark.slow
@pytest.mark.xdist_group("slurm")
def test_a_requeued_slurm_job_continues_in_its_folder_to_the_weights_of_an_uninterrupted_run(slurm_env, tmp_path):
    import torch

    from vae_lab.checkpoint import load_checkpoint

    sweep_dir, straight = tmp_path / "sweep", tmp_path / "straight"
    run = ["threads=1", "train.epochs=60", "train.checkpoint_every=1000", "train.plot_every=1000", "model.latent_dim=3"]
    returncode, out, err, job = sweep_while(sweep_dir, run, slurm_env, lambda: _requeue_after_first_epoch(sweep_dir / "0", slurm_env), 400)
    assert returncode == 0, err[-3000:]
    assert accounted_states([job], slurm_env)[job] == "COMPLETED"
    assert int(slurm(["scontrol", "show", "job", job], slurm_env).split("Restarts=")[1].split()[0]) == 1
    assert_complete(sweep_dir / "0")
    assert [row["epoch"] for row in csv.DictReader((sweep_dir / "0" / "metrics.csv").open())] == [str(e) for e in range(1, 61)]
    assert "resumed from" in (sweep_dir / "0" / "run.log").read_text()
    # The same job without SLURM and without the requeue: the same final weights.
    done = run_py(["run.py", *JOB, *run, f"hydra.run.dir={straight}"], env=slurm_env)
    assert done.returncode == 0, done.stderr[-2000:]
    expected, requeued = (load_checkpoint(folder / "checkpoints" / "last.pt") for folder in (straight, sweep_dir / "0"))
    assert all(torch.equal(tensor, requeued["model"][key]) for key, tensor in expected["model"].items())


@pytest.mark.slow
@pytest.mark.xdist_group("slurm")
def test_a_job_at_its_time_limit_is_requeued_by_submitit_and_completes_in_one_folder(slurm_env, tmp_path):
    """SLURM warns a job of its time limit with USR2 (`--signal=USR2@signal_delay_s`, which the launcher sets);
    here the same signal is sent with scancel after the first epochs, so the test does not hang on SLURM's
    once-a-minute limit checks. submitit requeues the job, which continues where it stood."""
    sweep_dir = tmp_path / "sweep"
    run = ["threads=1", "train.epochs=60", "train.checkpoint_every=1000", "train.plot_every=1000", "model.latent_dim=3"]
    returncode, out, err, _ = sweep_while(
        sweep_dir, run, slurm_env, lambda: _requeue_after_first_epoch(sweep_dir / "0", slurm_env, how=["scancel", "--signal=USR2"]), 400)
    assert returncode == 0, err[-3000:]
    assert_complete(sweep_dir / "0")
    log = (sweep_dir / "0" / "run.log").read_text()
    assert "Caught signal SIGUSR2" in log and "being requeued by SLURM" in log and "resumed from" in log
    assert [row["epoch"] for row in csv.DictReader((sweep_dir / "0" / "metrics.csv").open())] == [str(e) for e in range(1, 61)]


@pytest.mark.slow
@pytest.mark.xdist_group("slurm")
def test_a_slurm_job_of_two_tasks_trains_one_model_data_parallel(slurm_env, tmp_path):
    sweep_dir = tmp_path / "sweep"
    run = ["threads=1", "data.limit=256", "train.epochs=3", "train.batch_size=64", "hydra.launcher.tasks_per_node=2"]
    returncode, out, err, _ = sweep_while(sweep_dir, run, slurm_env, lambda: None, 300)
    assert returncode == 0, err[-3000:]
    assert_complete(sweep_dir / "0")
    job = job_id(sweep_dir / "0")
    logs = sorted(p.name for p in (sweep_dir / ".submitit" / job).glob("*_log.out"))
    assert logs == [f"{job}_0_log.out", f"{job}_1_log.out"]  # two tasks ran
    assert [row["epoch"] for row in csv.DictReader((sweep_dir / "0" / "metrics.csv").open())] == ["1", "2", "3"]
    assert "data-parallel over 2 processes (gloo)" in (sweep_dir / "0" / "run.log").read_text()


def _requeue_after_first_epoch(job_dir: Path, env: dict, timeout: float = 240, how=("scontrol", "requeue")) -> str:
    """Requeue the job of `job_dir` once it has trained an epoch (`how`: scontrol requeue, or the time limit's
    USR2 to which submitit answers with a requeue), and lift the hold SLURM puts on a requeued job (about two
    minutes on the local cluster) so that it restarts at once; return its id."""
    deadline = time.monotonic() + timeout
    job = _after_first_epoch(job_dir, env, deadline)
    slurm([*how, job], env)
    requeued = time.monotonic()
    while time.monotonic() < deadline:
        state = slurm(["squeue", "--noheader", f"--jobs={job}", "--format=%T"], env).strip()
        # slurmd refuses a job whose credential was revoked (by the requeue) in the same second as its start
        # ("Killing non-startable batch JobId: Job credential revoked"), and the job then ends failed: let the
        # clock pass the revocation's second before lifting the hold (a loaded machine hit that race).
        if state == "PENDING" and time.monotonic() - requeued > 2.0:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, capture_output=True)
        elif state == "RUNNING" and "Restarts=1" in slurm(["scontrol", "show", "job", job], env):
            return job
        time.sleep(0.5)
    raise AssertionError(f"{job_dir} was not requeued and restarted in {timeout} s")


def _cancel_after_first_epoch(job_dir: Path, env: dict, timeout: float = 240) -> str:
    """scancel the job of `job_dir` once its metrics.csv has an epoch; return its id."""
    job = _after_first_epoch(job_dir, env, time.monotonic() + timeout)
    assert slurm(["squeue", "--noheader", "--array", f"--jobs={job}", "--format=%T"], env).strip() == "RUNNING"
    slurm(["scancel", job], env)
    return job


def _after_first_epoch(job_dir: Path, env: dict, deadline: float) -> str:
    """The SLURM id of the job of `job_dir`, once its metrics.csv has an epoch."""
    while time.monotonic() < deadline:
        metrics = job_dir / "metrics.csv"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            return job_id(job_dir)
        time.sleep(0.2)
    raise AssertionError(f"{job_dir} never started an epoch")


# --- Ray --------------------------------------------------------------------------------

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None,
    reason="Ray: hydra-ray-launcher is not installed: pip install -e '.[ray]'",
)


@pytest.fixture
def ray_dir():
    """Ray's session folder, short: its socket paths must stay under the 107 characters Unix allows."""
    folder = Path(tempfile.mkdtemp(prefix="vl-ray-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def processes_using(text: str) -> list[str]:
    """Command lines of the live processes that mention `text` (a Ray session folder)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in line:
            found.append(line)
    return found


def ray_sweep(sweep_dir: Path, init: list[str], alphas: str = "0.1,1.0") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "run.py", "-m", *JOB, "hydra/launcher=ray_cluster", f"train.alpha={alphas}",
         *init, f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO, env=ray_env(), capture_output=True, text=True, timeout=300,
    )


def ray_env() -> dict:
    # Token authentication on (Ray's ports listen on every interface); the driver must
    # be told so to send the token that `ray start` wrote to ~/.ray/auth_token.
    return {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}


def assert_stopped(ray_dir: Path) -> None:
    deadline = time.monotonic() + 30
    while processes_using(str(ray_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_using(str(ray_dir)) == []


def assert_ray_sweep(sweep_dir: Path, result: subprocess.CompletedProcess, alphas: tuple = ("0.1", "1.0")) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Ray Launcher is launching {len(alphas)} jobs" in result.stderr + result.stdout
    for job in range(len(alphas)):
        assert_complete(sweep_dir / str(job))
    assert [(row["job"], row["status"]) for row in read_summary(sweep_dir)] == [(str(j), "completed") for j in range(len(alphas))]
    assert [json.loads((sweep_dir / str(j) / "results" / "metrics.json").read_text())["alpha"] for j in range(len(alphas))] == [
        float(a) for a in alphas]


@pytest.mark.slow
@needs_ray
def test_a_sweep_runs_on_a_local_ray_instance_that_stops_with_it(tmp_path, ray_dir):
    bounded = [
        "hydra.launcher.ray.init.num_cpus=2", "hydra.launcher.ray.init.object_store_memory=78643200",
        "+hydra.launcher.ray.init._node_ip_address=127.0.0.1", f"+hydra.launcher.ray.init._temp_dir={ray_dir}",
    ]
    result = ray_sweep(tmp_path / "sweep", bounded)
    assert_ray_sweep(tmp_path / "sweep", result)
    assert list(ray_dir.glob("session_*")), "Ray did not use the session folder given to it"
    assert_stopped(ray_dir)


@pytest.mark.slow
@needs_ray
def test_a_sweep_joins_a_running_ray_cluster(tmp_path, ray_dir):
    """The plugin's own preset injects object_store_memory, which Ray refuses when joining; ray_cluster does not."""
    port, client_port = _free_port(), _free_port()
    head = subprocess.Popen(
        [Path(sys.executable).parent / "ray", "start", "--head", "--block", f"--port={port}",
         f"--ray-client-server-port={client_port}", "--num-cpus=2", "--object-store-memory=78643200",
         "--include-dashboard=false", f"--temp-dir={ray_dir}", "--disable-usage-stats"],
        env=ray_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        # One job: the 2-job sweep above already shows jobs running side by side.
        result = ray_sweep(tmp_path / "sweep", [f"hydra.launcher.ray.init.address=127.0.0.1:{port}"], alphas="0.5")
        assert "Connecting to existing Ray cluster" in result.stderr + result.stdout
        assert_ray_sweep(tmp_path / "sweep", result, alphas=("0.5",))
    finally:
        head.terminate()  # --block: the head's processes stop with it
        head.wait(timeout=60)
    assert_stopped(ray_dir)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- MLflow -----------------------------------------------------------------------------

needs_mlflow = pytest.mark.skipif(
    importlib.util.find_spec("mlflow") is None, reason="MLflow: mlflow is not installed: pip install -e '.[mlflow]'"
)


@pytest.mark.slow
@needs_mlflow
def test_mlflow_records_each_sweep_job_as_a_run_beside_csv_and_tensorboard(tmp_path):
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'tracking' / 'mlflow.db'}"
    sweep_dir = tmp_path / "sweep"
    result = run_py(["run.py", "-m", *JOB, "train.epochs=2", "train.plot_every=1", "train.alpha=0.1,1.0",
                     "logger=[csv,tensorboard,mlflow]", f"logger.mlflow.tracking_uri={store}", f"hydra.sweep.dir={sweep_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("vae_lab")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.sweep = '{sweep_dir.resolve()}'")
    by_job = {run.data.tags["job"]: run for run in runs}
    assert sorted(by_job) == ["0", "1"]
    for job, alpha in (("0", "0.1"), ("1", "1.0")):
        run, job_dir = by_job[job], sweep_dir / job
        assert run.info.status == "FINISHED" and run.info.run_name == f"sweep/{job}"
        assert run.data.params["train.alpha"] == alpha and run.data.params["model._target_"] == "vae_lab.model.ConvVAE"
        with (job_dir / "metrics.csv").open() as file:
            rows = list(csv.DictReader(file))
        history = client.get_metric_history(run.info.run_id, "test_loss")
        assert [(m.step, m.value) for m in history] == [(int(r["epoch"]), pytest.approx(float(r["test_loss"]))) for r in rows]
        report = json.loads((job_dir / "results" / "metrics.json").read_text())
        assert run.data.metrics["final/neg_elbo"] == pytest.approx(report["neg_elbo"])
        assert run.data.metrics["final/active_units"] == report["active_units"]
        artifacts = _artifact_paths(client, run.info.run_id)
        assert {"config.yaml", "progress/reconstruction_0001.png", "progress/samples_0002.png",
                "progress/loss_curves.png", "results/metrics.json"} <= artifacts
        assert {f"results/{p.name}" for p in (job_dir / "results").glob("*.png")} <= artifacts
        assert list((job_dir / "tensorboard").glob("events.out.tfevents.*"))  # the loggers compose


def _artifact_paths(client, run_id: str, folder: str | None = None) -> set[str]:
    paths = set()
    for item in client.list_artifacts(run_id, folder):
        paths |= _artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return paths


# --- Data-parallel training (torchrun, gloo) ---------------------------------------------

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "run.py"]
DDP_RUN = ["device=cpu", "threads=1", "data=mnist_5k", "data.limit=512", "train.epochs=3", "train.batch_size=64",
           "figures=false", "evaluate.sample_metrics=false", "evaluate.iw_samples=2", "evaluate.embedding_points=64"]


@pytest.mark.slow
def test_torchrun_trains_one_model_in_two_processes_into_one_run_directory(tmp_path):
    from vae_lab.checkpoint import load_checkpoint

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, parallel = tmp_path / "single", tmp_path / "parallel"
    done = run_py(["run.py", *DDP_RUN, f"hydra.run.dir={single}"], env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([*TORCHRUN, *DDP_RUN, f"hydra.run.dir={parallel}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # One run directory, one record, one metrics.csv: rank 1 wrote nothing of its own.
    assert sorted(p.name for p in parallel.iterdir()) == sorted(p.name for p in single.iterdir())
    assert len(list(tmp_path.rglob("metrics.csv"))) == 2 and not list(REPO.glob("outputs/*/*-ddp"))
    rows = {name: list(csv.DictReader((folder / "metrics.csv").open())) for name, folder in (("1", single), ("2", parallel))}
    assert [r["epoch"] for r in rows["2"]] == ["1", "2", "3"]
    assert "data-parallel over 2 processes (gloo)" in (parallel / "run.log").read_text()
    for one, two in zip(rows["1"], rows["2"]):  # the same curve, within the noise of other latent samples
        assert float(two["test_loss"]) == pytest.approx(float(one["test_loss"]), rel=0.03)
    assert float(rows["2"][-1]["test_loss"]) < float(rows["2"][0]["test_loss"])
    # Its checkpoint is a plain one: it evaluates in one process.
    evaluated = run_py(["run.py", "task=evaluate", f"evaluate.checkpoint={parallel}", "evaluate.sample_metrics=false",
                        "evaluate.iw_samples=2", "figures=false", "device=cpu", "data=mnist_5k", f"hydra.run.dir={tmp_path / 'evaluated'}"], env=env)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert load_checkpoint(parallel / "checkpoints" / "last.pt")["epoch"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [
    (["train.batch_size=1"], "torchrun starts 2 processes, and train.batch_size=1"),
    (["loss=factor_vae"], "trains a network of its own"),
    (["-m", "train.alpha=0.1,1.0"], "does not run sweeps"),
])
def test_torchrun_refuses_what_cannot_be_split(tmp_path, overrides, message):
    done = subprocess.run([*TORCHRUN, *DDP_RUN, *overrides, f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and message in done.stdout + done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- Weights & Biases -------------------------------------------------------------------

needs_wandb = pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None, reason="W&B: wandb is not installed: pip install -e '.[wandb]'"
)


def wandb_records(run_file: Path) -> list:
    """The records of an offline W&B run file, parsed with wandb's own protobuf definitions.

    The file is a LevelDB-style log (a 7-byte header, 32 KiB blocks of records framed by a
    CRC, a length and a FULL / FIRST / MIDDLE / LAST type); wandb 0.31 reads it in its Go
    core and ships no Python reader, so the framing is read here.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    raw, block, position, records, pending = run_file.read_bytes(), 32768, 7, [], b""
    assert raw[:4] == b":W&B"
    while position + 7 <= len(raw):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[position:position + 7])
        if length == 0 and kind == 0:
            position += left
            continue
        data, position = raw[position + 7:position + 7 + length], position + 7 + length
        if kind == 1:
            records.append(data)
        elif kind == 2:
            pending = data
        elif kind == 3:
            pending += data
        elif kind == 4:
            records.append(pending + data)
    parsed = []
    for data in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        parsed.append(record)
    return parsed


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


@pytest.mark.slow
@needs_wandb
def test_wandb_records_each_sweep_job_offline_with_its_config_metrics_report_and_figures(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "run.py", "-m", *JOB, "train.epochs=2", "train.plot_every=1", "train.alpha=0.1,1.0",
         "logger=[csv,wandb]", f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO, env={**{k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}, "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for job, alpha in (("0", 0.1), ("1", 1.0)):
        job_dir = sweep_dir / job
        (run_file,) = (job_dir / "wandb").glob("offline-run-*/run-*.wandb")  # offline: one run, nothing sent
        records = wandb_records(run_file)
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert run.display_name == f"sweep/{job}" and run.run_group == "sweep" and run.project == "vae_lab"
        config = {}
        for record in records:
            if record.WhichOneof("record_type") == "config":
                config.update(_items(record.config.update))
        assert config["train"]["alpha"] == alpha and config["model"]["_target_"] == "vae_lab.model.ConvVAE"
        history = [_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
        with (job_dir / "metrics.csv").open() as file:
            rows = list(csv.DictReader(file))
        logged = [(h["_step"], h["test_loss"]) for h in history if "test_loss" in h]
        assert logged == [(int(r["epoch"]), pytest.approx(float(r["test_loss"]))) for r in rows]
        logged_keys = {key for h in history for key in h}
        assert {"progress/samples/_type", "progress/reconstruction/_type", "results/reconstruction/_type"} <= logged_keys
        summary = {}
        for record in records:
            if record.WhichOneof("record_type") == "summary":
                summary.update(_items(record.summary.update))
        report = json.loads((job_dir / "results" / "metrics.json").read_text())
        assert summary["final/neg_elbo"] == pytest.approx(report["neg_elbo"])
        assert next(r.exit for r in records if r.WhichOneof("record_type") == "exit").exit_code == 0


def test_logger_wandb_without_the_package_names_the_extra(monkeypatch, tmp_path):
    import builtins

    from vae_lab.errors import VaeLabError
    from vae_lab.loggers import WandbLogger

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "wandb" else real_import(name, *a, **k))
    with pytest.raises(VaeLabError, match=r"logger=wandb needs the wandb package: pip install -e '.\[wandb\]'"):
        WandbLogger(tmp_path)


# --- Optuna -----------------------------------------------------------------------------


def _optuna_storage_unusable() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        optuna, sqlalchemy = (int(version(name).split(".")[0]) for name in ("optuna", "sqlalchemy"))
    except PackageNotFoundError:
        return "Optuna: not installed: pip install -e '.[sweep]'"
    if optuna < 3 and sqlalchemy >= 2:
        return "Optuna: optuna 2 cannot store studies with SQLAlchemy 2 here: pip install -e '.[sweep]' pins SQLAlchemy < 2"
    return None


def optuna_sweep(sweep_dir: Path, storage: str, *overrides: str) -> list[str]:
    return [sys.executable, "run.py", "-m", *JOB, "train.evaluate_at_end=false", "experiment=optuna_search",
            f"hydra.sweeper.storage={storage}", *overrides, f"hydra.sweep.dir={sweep_dir}"]


@pytest.mark.slow
@pytest.mark.skipif(_optuna_storage_unusable() is not None, reason=str(_optuna_storage_unusable()))
def test_an_optuna_study_in_sqlite_continues_after_the_sweep_is_killed(tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(optuna_sweep(tmp_path / "first", storage, "hydra.sweeper.n_trials=2"),
                             cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # killed outright (a lost node, a time limit) once trial 0 is told and trial 1 is training
        deadline = time.monotonic() + 240
        while not (tmp_path / "first" / "1" / "metrics.csv").is_file() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        first.kill()
        first.wait()
    study = optuna.load_study(study_name="vae_lab_neg_elbo", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING"]

    # A new sampler seed: the same seed would propose trial 0's point again.
    second = run_py(optuna_sweep(tmp_path / "second", storage, "hydra.sweeper.n_trials=1", "hydra.sweeper.sampler.seed=1")[1:])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Using an existing study" in second.stderr + second.stdout
    trials = optuna.load_study(study_name="vae_lab_neg_elbo", storage=storage).trials
    assert [t.number for t in trials] == [0, 1, 2]
    assert [t.state.name for t in trials] == ["COMPLETE", "RUNNING", "COMPLETE"]
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 3
    assert (tmp_path / "second" / "0" / "metrics.csv").is_file()



# --- Config and command-line checks (fast) ------------------------------------------------


def test_loggers_compose_from_a_list_and_csv_is_always_on(make_cfg, tmp_path):
    from vae_lab.loggers import CSVLogger, Loggers, TensorBoardLogger
    from vae_lab.runtime import build

    pytest.importorskip("tensorboard", reason="logger=tensorboard needs the tensorboard package")
    cfg = make_cfg("logger=[csv,tensorboard,mlflow]")
    assert set(cfg.logger) == {"_target_", "_partial_", "tensorboard", "mlflow"}
    assert cfg.logger.mlflow.tracking_uri == "sqlite:///mlruns/mlflow.db"
    loggers = build(make_cfg("logger=tensorboard").logger)(tmp_path)
    assert isinstance(loggers, Loggers) and [type(x) for x in loggers.loggers] == [CSVLogger, TensorBoardLogger]
    loggers.close()
    assert [type(x) for x in build(make_cfg().logger)(tmp_path).loggers] == [CSVLogger]


def test_a_persistent_optuna_study_that_cannot_work_is_refused_with_the_install_command(monkeypatch):
    import importlib.metadata

    from vae_lab.cli import _optuna_storage_problem

    versions = {"optuna": "2.10.1", "sqlalchemy": "2.0.30"}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: versions[name])
    message = _optuna_storage_problem(["experiment=optuna_search", "hydra.sweeper.storage=sqlite:///optuna.db"])
    assert message.startswith("error: hydra.sweeper.storage needs SQLAlchemy < 2") and "pip install -e '.[sweep]'" in message
    assert _optuna_storage_problem(["experiment=optuna_search", "hydra.sweeper.storage=null"]) is None
    versions["sqlalchemy"] = "1.4.54"
    assert _optuna_storage_problem(["hydra.sweeper.storage=sqlite:///optuna.db"]) is None


def test_an_mlflow_run_ends_killed_when_a_signal_stops_training_and_failed_on_an_error():
    from vae_lab.errors import VaeLabError
    from vae_lab.loggers import _run_status
    from vae_lab.train import TrainingInterrupted

    assert _run_status(None) == "FINISHED"
    assert _run_status(TrainingInterrupted("interrupted during epoch 3", 15)) == "KILLED"  # scancel's SIGTERM
    assert _run_status(KeyboardInterrupt()) == "KILLED"
    assert _run_status(VaeLabError("training diverged")) == "FAILED"
