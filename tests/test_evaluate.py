"""The evaluate task: the round trip from training, the likelihood report, the figures."""
import json
import logging
import os
import stat

import pytest
import torch

from conftest import DATA_ROOT, assert_png, needs_full_data, read_metrics
from vae_lab.checkpoint import load_checkpoint
from vae_lab.cli import run_task
from vae_lab.errors import VaeLabError
from vae_lab.metrics import active_units, importance_weighted_nll
from vae_lab.model import ConvVAE

FIGURES = ["reconstruction.png", "random_generation.png", "latent_embedding.png", "latent_traversal.png", "kl_per_dimension.png"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny 2-epoch ConvVAE run directory, shared by the tests that only read it."""
    from conftest import shared_run

    return shared_run(tmp_path_factory, "model.latent_dim=4", "figures=true")


def test_round_trip_gives_back_the_last_test_loss(make_cfg, trained, tmp_path):
    # Only the checkpoint is named: latent_dim=4 comes back from the file.
    outcome = run_task(make_cfg("task=evaluate", f"evaluate.checkpoint={trained}", "figures=true"), tmp_path)
    neg_elbo = outcome.value
    report = json.loads((tmp_path / "results" / "metrics.json").read_text())
    row = read_metrics(trained)[-1]
    assert report["objective"] == pytest.approx(float(row["test_loss"]), abs=1e-4)
    assert report["recon"] == pytest.approx(float(row["test_recon"]), abs=1e-4)
    assert report["neg_elbo"] == pytest.approx(report["recon"] + report["kl"]) == neg_elbo
    assert report["epoch"] == 2 and report["latent_dim"] == 4 and report["alpha"] == 0.1
    assert report["checkpoint"] == str((trained / "checkpoints" / "last.pt").resolve())
    assert report["data"] == "mnist_5k" and report["data_variant"] == "intensities in [0, 1]"
    assert report["iw_nll"] <= report["neg_elbo"] + 1.0
    assert 0 <= report["active_units"] <= 4 and len(report["kl_per_dimension"]) == 4
    assert 0 < report["mse_per_pixel"] < 1
    for name in FIGURES:
        assert_png(tmp_path / "results" / name)
    log = (tmp_path / "run.log").read_text()
    assert "likelihood report" in log
    # It ends saying where the results went and what to open.
    assert outcome.run_dir == tmp_path and f"run directory: {tmp_path}" in log.strip().splitlines()[-3]
    assert outcome.open_next[0] == "results/reconstruction.png" and all((tmp_path / name).is_file() for name in outcome.open_next)
    assert outcome.headline["test -ELBO"] == f"{neg_elbo:.2f} nats"
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "results").stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700


@pytest.mark.slow  # the bound's ordering in k is also checked fast against closed forms (test_objectives, test_posteriors)
def test_iw_bound_is_below_the_elbo_and_tightens_with_k(trained):
    state = load_checkpoint(trained / "checkpoints" / "last.pt")
    model = ConvVAE(latent_dim=4)
    model.load_state_dict(state["model"])
    from vae_lab.data import load_dataset

    images = load_dataset("mnist_5k", limit=128).test_images
    bounds = [importance_weighted_nll(model, images, k, batch_size=64) for k in (1, 10, 100)]
    assert bounds[0] > bounds[1] > bounds[2]
    # 5,000 samples in chunks of 512 decodings: bounded memory, still tighter.
    assert importance_weighted_nll(model, images[:4], 5000, batch_size=64, chunk=512) < bounds[1] + 1.0


def test_iw_bound_with_one_sample_is_the_elbo_in_expectation():
    torch.manual_seed(0)
    model = ConvVAE(latent_dim=2).eval()
    images = torch.rand(16, 1, 28, 28).round()
    from vae_lab.engine import run_epoch
    from vae_lab.objectives import ELBO

    elbo = run_epoch(model, ELBO("bce", 1.0), images, 16)
    iw = [importance_weighted_nll(model, images, 1, batch_size=16, seed=s) for s in range(20)]
    assert sum(iw) / len(iw) == pytest.approx(elbo["loss"], rel=0.01)


def test_active_units_on_a_constructed_case():
    torch.manual_seed(0)
    mu = torch.randn(1000, 3) * torch.tensor([1.0, 0.03, 0.5])  # variances 1, 0.0009, 0.25
    assert active_units(mu).tolist() == [True, False, True]
    assert active_units(mu[:1]).tolist() == [False, False, False]  # one image: no variance, no NaN warning


@pytest.mark.parametrize("overrides, latent_dim", [
    (["model=mlp_vae", "model.latent_dim=2"], 2),  # drawn as it is; traversal over the prior's quantiles
    pytest.param(["evaluate.n_components=3", "evaluate.embedding=tsne"], 16, marks=pytest.mark.slow),  # 3-D t-SNE (3 s); interpolations
    pytest.param(["model.latent_dim=1", "data.binarize=dynamic"], 1, marks=pytest.mark.slow),
])
def test_figures_for_every_latent_shape(make_cfg, tmp_path, overrides, latent_dim):
    run_task(make_cfg("train.epochs=1", "data.limit=128", "train.evaluate_at_end=true", "figures=true", *overrides), tmp_path)
    for name in FIGURES:
        assert_png(tmp_path / "results" / name)
    report = json.loads((tmp_path / "results" / "metrics.json").read_text())
    assert report["latent_dim"] == latent_dim == len(report["kl_per_dimension"])


def test_binarized_data_is_reported_as_such(make_cfg, tmp_path):
    run_task(make_cfg("train.epochs=1", "data.limit=64", "data.binarize=static", "train.evaluate_at_end=true"), tmp_path)
    report = json.loads((tmp_path / "results" / "metrics.json").read_text())
    assert report["binarize"] == "static" and report["data_variant"].startswith("statically binarized")


@needs_full_data
def test_data_chosen_on_the_command_line_is_evaluated_on_and_said_else_the_checkpoints_own(make_cfg, trained, tmp_path, monkeypatch, caplog):
    import vae_lab.evaluate as evaluate_module

    def evaluate(name, *overrides, given=()):
        monkeypatch.setattr(evaluate_module, "_data_overrides_on_command_line", lambda: set(given))
        run_task(make_cfg("task=evaluate", f"evaluate.checkpoint={trained}", *overrides), tmp_path / name)
        return json.loads((tmp_path / name / "results" / "metrics.json").read_text())

    other = ("data=fashion_mnist", f"data.root={DATA_ROOT}", "data.limit=64")
    # data=... from a config file or a default, not this command line: the checkpoint's data
    assert evaluate("not_given", *other)["data"] == "mnist_5k"
    with caplog.at_level(logging.WARNING, logger="vae_lab.evaluate"):
        report = evaluate("chosen", *other, given=("", "root", "limit"))
    assert report["data"] == "fashion_mnist" and report["test_images"] == 64
    assert "other data than the checkpoint was trained on, as this command line asks: mnist_5k -> fashion_mnist; data.limit=64 (trained: 256)" in caplog.text
    # The checkpoint's own data with a setting of this command line's: all of them count, not only the data set's name.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vae_lab.evaluate"):
        report = evaluate("binarized", "data=mnist_5k", "data.binarize=static", "data.limit=32", given=("binarize", "limit"))
    assert report["binarize"] == "static" and report["test_images"] == 32
    assert "data.binarize=static (trained: none); data.limit=32 (trained: 256)" in caplog.text
    with pytest.raises(VaeLabError, match="data.layout: the data the checkpoint was trained on .* has no setting layout; .* data=..."):
        evaluate("unknown", "data=arrays", "data.path=x.npz", "data.layout=NHWC", given=("layout",))
    with pytest.raises(VaeLabError, match="trained on images of shape \\[1, 28, 28\\].*pass the data it was trained on"):
        evaluate("refused", "data=shapes", "data.train_size=64", "data.test_size=16", given=("", "train_size", "test_size"))


def test_evaluate_without_a_checkpoint_says_how(make_cfg, tmp_path):
    with pytest.raises(VaeLabError, match="evaluate.checkpoint is not set: pass evaluate.checkpoint=PATH"):
        run_task(make_cfg("task=evaluate"), tmp_path)


def test_existing_results_are_not_written_over(make_cfg, trained, tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "metrics.json").write_text("{}")
    with pytest.raises(VaeLabError, match="already holds results"):
        run_task(make_cfg("task=evaluate", f"evaluate.checkpoint={trained}"), tmp_path)
    assert (tmp_path / "results" / "metrics.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".results")] == []


@pytest.mark.slow  # two trainings with their evaluations, about 5 s
def test_the_collapse_warning_knows_how_long_the_model_trained(make_cfg, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="vae_lab"):
        run_task(make_cfg("train.epochs=1", "data.limit=64", "train.evaluate_at_end=true"), tmp_path / "short")
    assert "too few epochs to judge posterior collapse" in caplog.text and "posterior collapse: only" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vae_lab"):  # alpha 50: the KL wins, the posterior collapses
        run_task(make_cfg("train.epochs=5", "data.limit=64", "train.alpha=50", "train.evaluate_at_end=true"), tmp_path / "long")
    assert "posterior collapse: only" in caplog.text and "after 5 epochs" in caplog.text


def test_a_long_step_off_a_terminal_logs_that_it_is_alive(monkeypatch, caplog):
    """Off a terminal (run.log, a SLURM job's output) the IW bound says how far it is, about every 30 s."""
    from vae_lab import engine
    from vae_lab.model import MLPVAE

    images = torch.rand(6, 1, 28, 28)
    model = MLPVAE(latent_dim=2, hidden_dim=8)
    with caplog.at_level(logging.INFO, logger="vae_lab"):
        importance_weighted_nll(model, images, k=3, batch_size=2, chunk=2)  # 3 passes of 2 images
    assert not [r for r in caplog.records if "IW bound" in r.getMessage()]  # a quick step stays quiet
    monkeypatch.setattr(engine, "LOG_EVERY_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="vae_lab"):
        importance_weighted_nll(model, images, k=3, batch_size=2, chunk=2)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("IW bound (k=3): ")]
    assert [line.split(" after ")[0] for line in lines] == [f"IW bound (k=3): {i} of 3 batches" for i in (1, 2, 3)]


def test_a_short_training_is_evaluated_with_the_light_settings_unless_full_is_asked_for(tmp_path, caplog):
    """evaluate=auto (the default): under 10 epochs the end-of-run evaluation is evaluate=light's; evaluate=full, or
    a long training, the whole one. The record says preset auto; metrics.json says what was measured."""
    from vae_lab.evaluate import SHORT_RUN_EPOCHS, end_of_run_settings
    from conftest import compose_config

    short = compose_config("evaluate.preset=auto", "train.epochs=1", "train.evaluate_at_end=true", "data.limit=64")
    with caplog.at_level(logging.INFO, logger="vae_lab"):
        run_task(short, tmp_path / "short")
    report = json.loads((tmp_path / "short" / "results" / "metrics.json").read_text())
    assert report["iw_samples"] == 10 and "fid_prior" not in report
    assert "train.epochs=1 is a short run (under 10 epochs)" in caplog.text and "evaluate=full gives the whole one" in caplog.text
    long = compose_config("evaluate.preset=auto", f"train.epochs={SHORT_RUN_EPOCHS}")
    assert end_of_run_settings(long) is long  # a training of 10 epochs or more: the settings as they are
    full = compose_config("evaluate.preset=full", "train.epochs=1", "evaluate.iw_samples=7")
    assert end_of_run_settings(full).evaluate.iw_samples == 7
    light = end_of_run_settings(compose_config("evaluate.preset=auto", "train.epochs=1", "evaluate.iw_samples=7"))
    assert light.evaluate.iw_samples == 10 and light.evaluate.samplers == ["prior"]  # in-process: no command line to respect
