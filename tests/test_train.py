"""The train task through the real config: artefacts, exact resume, reproducibility, fallback."""
import logging
import math
import os
import re
import stat

import pytest
import torch

from conftest import read_metrics
from vae_lab.checkpoint import load_checkpoint
from vae_lab.cli import run_task
from vae_lab.errors import ConfigError
from vae_lab.loggers import METRIC_COLUMNS


def test_two_epochs_write_the_run_directory_contract(make_cfg, tmp_path):
    cfg = make_cfg("train.checkpoint_every=1", "train.plot_every=1", "figures=true")
    final = run_task(cfg, tmp_path).value

    rows = read_metrics(tmp_path)
    assert list(rows[0]) == list(METRIC_COLUMNS)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        for key in set(METRIC_COLUMNS) - {"epoch", "data", "test_bits_per_dim"}:
            assert math.isfinite(float(row[key])) and float(row[key]) >= 0, key
        assert row["test_bits_per_dim"] == ""  # bce is not a distribution over 8-bit levels
        assert float(row["test_loss"]) == pytest.approx(float(row["test_recon"]) + 0.1 * float(row["test_kl"]))
        assert row["data"] == "mnist_5k"
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])  # it learns
    assert final == float(rows[-1]["test_loss"])

    names = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert {
        "run.log", "metrics.csv",
        "checkpoints/model_1.pt", "checkpoints/model_2.pt", "checkpoints/last.pt",
        "progress/reconstruction_0001.png", "progress/samples_0001.png",
        "progress/reconstruction_0002.png", "progress/samples_0002.png", "progress/loss_curves.png",
    } <= names
    assert not [n for n in names if n.endswith(".tmp")]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "checkpoints" / "last.pt").stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    assert "epoch 2/2" in (tmp_path / "run.log").read_text()


def test_checkpoint_holds_everything_needed_to_rebuild_and_resume(make_cfg, tmp_path):
    run_task(make_cfg("model.latent_dim=3"), tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["epoch"] == 2 and state["data"] == "mnist_5k"
    assert {"model", "optimizer", "scheduler", "rng", "config", "history"} <= set(state)
    assert state["config"]["model"]["latent_dim"] == 3
    assert state["config"]["loss"]["alpha"] == 0.1  # resolved from train.alpha
    assert [row["epoch"] for row in state["history"]] == [1, 2]
    assert state["model"]["encoder_mean.2.weight"].shape == (3, 64)


def test_periodic_checkpoints_follow_checkpoint_every(make_cfg, tmp_path):
    run_task(make_cfg("train.epochs=3", "train.checkpoint_every=2", "train.plot_every=2", "data.limit=64", "figures=true"), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pt", "model_2.pt", "model_3.pt"]
    assert sorted(p.name for p in (tmp_path / "progress").glob("reconstruction_*")) == ["reconstruction_0002.png", "reconstruction_0003.png"]


def test_same_seed_gives_identical_metrics(make_cfg, tmp_path):
    small = ("data.limit=128", "train.batch_size=32")  # four steps an epoch: enough draws to differ by seed
    for name in ("a", "b"):
        run_task(make_cfg("seed=7", *small), tmp_path / name)
    strip = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "a")) == strip(read_metrics(tmp_path / "b"))
    other = tmp_path / "c"
    run_task(make_cfg("seed=8", *small), other)
    assert strip(read_metrics(other)) != strip(read_metrics(tmp_path / "a"))


# One bit-exact resume per kind of state in the fast tier: this one's second case holds the most (the
# scheduler's and the binarization's draws besides model, optimizer and RNG); the plain case is the in-place
# resume of tests/test_resume.py too, so it runs in the full suite only.
@pytest.mark.parametrize("overrides", [pytest.param([], marks=pytest.mark.slow),
                                       ["data.binarize=dynamic", "scheduler=steplr", "scheduler.step_size=1"]])
def test_resume_gives_bitwise_identical_weights(make_cfg, tmp_path, overrides):
    straight, first, second = tmp_path / "straight", tmp_path / "first", tmp_path / "second"
    run_task(make_cfg("train.epochs=4", *overrides), straight)
    run_task(make_cfg("train.epochs=2", *overrides), first)
    # The resumed run repeats no experiment override: model, loss, data come from the file.
    run_task(make_cfg("train.epochs=4", f"train.resume={first / 'checkpoints' / 'last.pt'}"), second)

    expected = load_checkpoint(straight / "checkpoints" / "last.pt")
    resumed = load_checkpoint(second / "checkpoints" / "last.pt")
    assert resumed["epoch"] == 4
    for key, tensor in expected["model"].items():
        assert torch.equal(tensor, resumed["model"][key]), key
    assert read_metrics(second)[:2] == read_metrics(first)  # the log continues the earlier run's
    columns = ["epoch", "lr", "train_loss", "test_loss"]
    assert [[r[c] for c in columns] for r in read_metrics(second)] == [[r[c] for c in columns] for r in read_metrics(straight)]


def test_resume_past_the_last_epoch_says_what_to_do(make_cfg, tmp_path):
    run_task(make_cfg("train.epochs=1", "data.limit=64"), tmp_path / "a")
    with pytest.raises(ConfigError, match=r"train.epochs=1: .* already at epoch 1. Set train.epochs above 1"):
        run_task(make_cfg("train.epochs=1", f"train.resume={tmp_path / 'a' / 'checkpoints' / 'last.pt'}"), tmp_path / "b")


def test_missing_data_falls_back_loudly_and_records_it(make_cfg, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    run_dir = tmp_path / "run"
    run_task(make_cfg("data=mnist", f"data.root={empty}", "data.download=false", "train.epochs=1"), run_dir)
    log = (run_dir / "run.log").read_text()
    assert "WARNING" in log and "falling back to the 5,000-image MNIST sample" in log
    assert read_metrics(run_dir)[0]["data"] == "mnist_5k"
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["data"] == "mnist_5k"


def test_missing_data_without_fallback_is_a_clear_error(make_cfg, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    from vae_lab.data import DataNotFoundError

    with pytest.raises(DataNotFoundError, match=f"mnist not found under {empty}/MNIST/raw"):
        run_task(make_cfg("data=mnist", f"data.root={empty}", "data.download=false", "data.fallback=false"), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_used_run_directory_is_not_written_over(make_cfg, tmp_path):
    run_task(make_cfg("train.epochs=1", "data.limit=64"), tmp_path)
    before = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(Exception, match="already holds a training run"):
        run_task(make_cfg("train.epochs=1", "data.limit=64"), tmp_path)
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == before


def test_tensorboard_logger_writes_scalars_and_images_beside_metrics_csv(make_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_task(make_cfg("logger=tensorboard", "train.plot_every=1", "figures=true"), tmp_path)
    assert len(read_metrics(tmp_path)) == 2
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert {"loss/train", "loss/test", "recon/test", "kl/test", "lr"} <= set(events.Tags()["scalars"])
    test_loss = [event.value for event in events.Scalars("loss/test")]
    assert test_loss == pytest.approx([float(r["test_loss"]) for r in read_metrics(tmp_path)])
    assert {"reconstruction", "samples"} <= set(events.Tags()["images"])


def test_figures_false_writes_no_png_and_the_closing_block_names_only_what_exists(make_cfg, tmp_path):
    outcome = run_task(make_cfg("figures=false", "train.epochs=1", "data.limit=64", "train.evaluate_at_end=true"), tmp_path)
    assert not list(tmp_path.rglob("*.png"))
    assert (tmp_path / "results" / "metrics.json").is_file() and (tmp_path / "checkpoints" / "last.pt").is_file()
    assert outcome.open_next == ("results/metrics.json",)
    with_figures = run_task(make_cfg("figures=true", "train.epochs=1", "data.limit=64"), tmp_path / "on")
    assert (tmp_path / "on" / "progress" / "reconstruction_0001.png").is_file()
    assert with_figures.open_next == ("progress/", "progress/loss_curves.png", "metrics.csv")


@pytest.mark.parametrize("subdir, cause", [("results", "is where vae_lab writes results"), ("checkpoints/tb", "is where vae_lab writes checkpoints"),
                                           ("../elsewhere", "leaves the run directory")])
def test_a_tensorboard_folder_that_clashes_with_the_run_layout_is_refused_before_training(make_cfg, tmp_path, subdir, cause):
    with pytest.raises(ConfigError, match=f"logger.tensorboard.subdir='{re.escape(subdir)}' {cause}"):
        run_task(make_cfg("logger=tensorboard", f"logger.tensorboard.subdir={subdir}", "train.evaluate_at_end=true"), tmp_path)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.csv").exists()


def test_a_training_split_smaller_than_one_batch_trains_and_says_so(make_cfg, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="vae_lab"):
        run_task(make_cfg("data.limit=20", "train.batch_size=64", "train.epochs=1"), tmp_path)
    assert "the training split holds 20 images, fewer than train.batch_size=64: each epoch is one batch of 20" in caplog.text
    assert len(read_metrics(tmp_path)) == 1
