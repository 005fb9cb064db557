"""Every option of every config group composes and builds what it names."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import DATA_ROOT, TINY, compose_config, needs_full_data
from vae_lab.cli import CONFIG_DIR
from vae_lab.data import ImageData
from vae_lab.model import VAE
from vae_lab.objectives import ELBO, BetaTCVAE, Objective
from vae_lab.priors import Prior
from vae_lab.runtime import build_vae


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def test_the_options_other_issues_and_users_rely_on_exist():
    # A subset check: adding an option must not break this test.
    assert {"conv_vae", "mlp_vae", "resnet_vae"} <= set(options("model"))
    assert {"normal", "vamp", "mog"} <= set(options("prior"))
    assert {"bce_kl", "mse_kl", "elbo", "iwae"} <= set(options("loss"))
    assert {"adam", "adamw", "sgd"} <= set(options("optim"))
    assert {"cosine", "none", "steplr"} <= set(options("scheduler"))
    assert {"fashion_mnist", "mnist", "mnist_5k"} <= set(options("data"))


def test_defaults_equal_the_reference_config():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config")
    assert cfg.task == "train"
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.alpha) == (128, 90, 0.1)
    assert (cfg.train.checkpoint_every, cfg.train.plot_every, cfg.train.resume) == (10, 10, None)
    assert (cfg.evaluate.batch_size, cfg.evaluate.n_components) == (256, 2)
    assert cfg.optim._target_ == "torch.optim.Adam" and cfg.optim.lr == 0.001
    assert cfg.scheduler._target_ == "torch.optim.lr_scheduler.StepLR"
    assert (cfg.scheduler.step_size, cfg.scheduler.gamma) == (30, 0.1)
    assert cfg.loss.reconstruction == "bce" and cfg.data.name == "mnist"
    assert cfg.model.latent_dim == 16


@pytest.mark.parametrize("overrides", [
    (), ("model.latent_dim=3", "train.alpha=0.5"), ("+train.extra=1",), ("++train.alpha=2",),
    ("~evaluate.embedding_points",), ("data.limit=null", "optim.lr=1e-2"), ("train.epochs=[1,2]",),
    ("model=hvae", "model.layers=3"), ("model.latent_dim=4", "model=hvae", "posterior=iaf", "posterior.steps=3"),
    ("experiment=best_nll", "train.epochs=1"), ("hydra.job.name=x",),
])
def test_the_tests_shortcut_compose_gives_hydras_config(overrides):
    """compose_config applies value-only overrides to a cached composition: the same config as Hydra's compose."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        full = compose(config_name="config", overrides=[*TINY, *overrides])
    fast = compose_config(*overrides)
    assert OmegaConf.to_yaml(fast) == OmegaConf.to_yaml(full)
    assert OmegaConf.is_struct(fast) == OmegaConf.is_struct(full) and OmegaConf.is_readonly(fast) == OmegaConf.is_readonly(full)
    fast.train.alpha = 7.0  # a copy: what one test changes, the next does not see
    assert compose_config(*overrides).train.alpha != 7.0


@pytest.mark.parametrize("bad", [
    "train.no_such_key=1", "+train.alpha=2", "~train.no_such_key", "model.latent_dim=1,2", "model=no_such_model", "model.no_such=1"])
def test_the_tests_shortcut_compose_refuses_what_hydra_refuses(bad):
    with pytest.raises(Exception) as full, initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        compose(config_name="config", overrides=[*TINY, bad])
    with pytest.raises(type(full.value)) as fast:
        compose_config(bad)
    assert str(fast.value).splitlines()[0] == str(full.value).splitlines()[0]


@pytest.mark.parametrize("option", options("model"))
@pytest.mark.parametrize("prior", options("prior"))
def test_model_and_prior_options_build(make_cfg, option, prior):
    cfg = make_cfg(f"model={option}", f"prior={prior}", "model.latent_dim=2")
    model, objective = build_vae(cfg.model, cfg.prior, cfg.loss, (1, 28, 28), cfg.posterior)
    # model.latent_dim is the prior's (a hierarchical model's top layer); the code z spans every layer
    assert isinstance(model, VAE) and model.layer_sizes[-1] == 2 and isinstance(model.prior, Prior)
    assert model.latent_dim == sum(model.layer_sizes) and model.sample_prior(3).shape == (3, model.latent_dim)
    assert model(torch.rand(2, 1, 28, 28))[0].shape == (2, 1, 28, 28)
    assert model.likelihood is objective.likelihood


@pytest.mark.parametrize("optim", options("optim"))
@pytest.mark.parametrize("scheduler", options("scheduler"))
def test_optimizer_and_scheduler_options_build(make_cfg, optim, scheduler):
    cfg = make_cfg(f"optim={optim}", f"scheduler={scheduler}", "optim.lr=0.5")
    parameters = [torch.nn.Parameter(torch.ones(3))]
    optimizer = instantiate(cfg.optim)(parameters)
    scheduler_ = instantiate(cfg.scheduler)(optimizer)
    assert optimizer.param_groups[0]["lr"] == 0.5
    parameters[0].sum().backward()
    optimizer.step()
    scheduler_.step()
    assert not torch.equal(parameters[0].detach(), torch.ones(3))


@pytest.mark.parametrize("option", options("loss"))
def test_loss_options_build_an_objective_and_take_alpha_from_train_alpha(make_cfg, option):
    loss = instantiate(make_cfg(f"loss={option}", "train.alpha=0.37").loss)
    assert isinstance(loss, Objective)
    if isinstance(loss, ELBO):  # alpha weighs the whole KL
        assert loss.alpha == 0.37
    elif isinstance(loss, BetaTCVAE):  # alpha weighs one of the KL's three parts (the index-code MI): its own setting
        assert loss.alpha == 1.0


@pytest.mark.parametrize("legacy, reconstruction", [("bce_kl", "bce"), ("mse_kl", "mse")])
def test_the_legacy_loss_names_keep_their_meaning(make_cfg, legacy, reconstruction):
    assert instantiate(make_cfg(f"loss={legacy}").loss).reconstruction == reconstruction


def test_bundled_data_option_builds(make_cfg):
    data = instantiate(make_cfg("data=mnist_5k", "data.limit=null").data)
    assert isinstance(data, ImageData) and data.name == "mnist_5k"
    assert len(data.train_images) == 4000 and len(data.test_images) == 1000


@needs_full_data
@pytest.mark.parametrize("option", ["mnist", "fashion_mnist"])
def test_torchvision_data_options_build(make_cfg, option):
    data = instantiate(make_cfg(f"data={option}", f"data.root={DATA_ROOT}", "data.limit=100").data)
    assert data.name == option and not data.fallback
    assert data.train_images.shape == (100, 1, 28, 28) and data.test_labels.shape == (100,)


def test_the_light_evaluation_is_the_full_one_with_less_sampling_and_the_sweep_recipes_use_it():
    def evaluate_settings(*overrides):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return OmegaConf.to_container(compose(config_name="config", overrides=list(overrides)).evaluate)

    full, light, auto = evaluate_settings("evaluate=full"), evaluate_settings("evaluate=light"), evaluate_settings()
    assert auto == {**full, "preset": "auto"} and full["iw_samples"] == 100 and full["sample_metrics"] is True
    assert {key for key in full if full[key] != light[key]} == {
        "preset", "iw_samples", "iw_limit", "embedding_points", "samplers", "sample_metrics", "disentanglement_codes"}
    assert light["iw_samples"] < full["iw_samples"] and light["sample_metrics"] is False and light["samplers"] == ["prior"]
    assert evaluate_settings("evaluate=light", "evaluate.iw_samples=50")["iw_samples"] == 50  # any key still set alone
    for recipe in ("alpha_latent_sweep", "optuna_search"):
        assert evaluate_settings(f"experiment={recipe}") == light, recipe


@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_every_device_setting_passes_the_memory_guards(make_cfg, device):
    """The size guards read the device's memory for every value of `device` (auto: the machine's without a GPU)."""
    from vae_lab.validate import validate

    validate(make_cfg(f"device={device}"))
