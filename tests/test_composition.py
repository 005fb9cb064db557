"""Every prior x objective x likelihood trains, evaluates and resumes; a user's own module plugs in."""
import json
import sys
import re
import textwrap

import pytest
import torch

from conftest import REPO, compose_config
from vae_lab.checkpoint import load_checkpoint, save_checkpoint
from vae_lab.cli import run_task
from vae_lab.errors import CheckpointError, ConfigError
from vae_lab.validate import validate

PRIORS = ["normal", "vamp", "mog"]
OBJECTIVES = ["elbo", "iwae"]
LIKELIHOODS = ["bce", "mse", "continuous_bernoulli", "gaussian", "gaussian_per_pixel"]
# A small model and a few components keep each run at a fraction of a second.
SMALL = ["model=mlp_vae", "model.hidden_dim=32", "model.latent_dim=3", "data.limit=64", "train.batch_size=32",
         "evaluate.batch_size=64", "prior.components=3", "loss.k=3", "train.plot_every=100", "train.checkpoint_every=100"]


def small(prior, objective, likelihood, *extra):
    overrides = [f"prior={prior}", f"loss={objective}", f"loss.reconstruction={likelihood}", *SMALL, *extra]
    if prior == "normal":
        overrides.remove("prior.components=3")
    if objective != "iwae":
        overrides.remove("loss.k=3")
    return compose_config(*overrides)


def weights(run_dir):
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


# Every combination; the fast tier keeps three that between them use every prior and objective and the learned likelihoods (bce, the default, and mse are trained throughout the suite).
# The fast tier resumes each kind of learned state once: a VampPrior's pseudo-inputs with a learned
# likelihood scale under IWAE, a mixture prior's parameters; the plain ConvVAE and the RNG and
# scheduler states are resumed in tests/test_train.py. Every other combination is in the slow tier.
FAST = {("vamp", "iwae", "gaussian"), ("mog", "elbo", "continuous_bernoulli"), ("normal", "elbo", "gaussian_per_pixel")}
COMBINATIONS = [
    pytest.param(p, o, l, marks=() if (p, o, l) in FAST else pytest.mark.slow, id=f"{p}-{o}-{l}")
    for p in PRIORS for o in OBJECTIVES for l in LIKELIHOODS
]


@pytest.mark.parametrize("prior, objective, likelihood", COMBINATIONS)
def test_every_combination_trains_resumes_bit_exactly_and_evaluates(tmp_path, prior, objective, likelihood):
    straight, first, resumed = tmp_path / "straight", tmp_path / "first", tmp_path / "resumed"
    run_task(small(prior, objective, likelihood, "train.epochs=2", "train.kl_warmup_epochs=2"), straight)
    run_task(small(prior, objective, likelihood, "train.epochs=1", "train.kl_warmup_epochs=2"), first)
    # The resume gives only the new epoch count: prior, objective, likelihood and warm-up come from the checkpoint.
    run_task(compose_config(*SMALL[3:5], "train.epochs=2", f"train.resume={first / 'checkpoints' / 'last.pt'}"), resumed)
    expected = weights(straight)
    assert set(expected) == set(weights(resumed))
    for key, tensor in weights(resumed).items():
        assert torch.equal(tensor, expected[key]), key
    if likelihood == "gaussian":
        assert "likelihood.log_scale" in expected
    if prior != "normal":
        assert any(key.startswith("prior.") for key in expected)
    # The resumed checkpoint evaluates, rebuilt from its own config, to the -ELBO its last epoch logged.
    run_task(compose_config("task=evaluate", f"evaluate.checkpoint={resumed}", "evaluate.samplers=[prior]",
                            "evaluate.sample_metrics=false", "evaluate.iw_samples=2", "evaluate.batch_size=32"), tmp_path / "evaluated")
    report = json.loads((tmp_path / "evaluated" / "results" / "metrics.json").read_text())
    last = load_checkpoint(resumed / "checkpoints" / "last.pt")["history"][-1]
    assert report["neg_elbo"] == pytest.approx(last["test_recon"] + last["test_kl"], abs=1e-4, rel=1e-6)  # warm-up or not


# The posterior group and the hierarchical model against every prior and objective that can take them:
# the fast tier keeps one of each kind of new learned state (an IAF, a planar flow, an MLP and a conv hierarchy).
DEEPER = {"iaf": ["posterior=iaf", "posterior.hidden=8"], "planar": ["posterior=planar", "posterior.steps=2"],
          "hvae": ["model=hvae", "model.lower_dims=[2]", "model.hidden_layers=1"],
          "hvae_conv": ["model=hvae", "model.layers=3", "model.backbone=conv", "model.channels=4", "model.hidden_layers=1",
                        "model.decoder_input=all"]}
DEEPER_FAST = {("iaf", "vamp", "iwae"), ("planar", "mog", "elbo"), ("hvae", "vamp", "elbo"), ("hvae_conv", "normal", "iwae")}
DEEPER_COMBINATIONS = [
    pytest.param(kind, p, o, marks=() if (kind, p, o) in DEEPER_FAST else pytest.mark.slow, id=f"{kind}-{p}-{o}")
    for kind in DEEPER for p in PRIORS for o in [*OBJECTIVES, *(["factor_vae", "dip_vae"] if p == "normal" else [])]
]


@pytest.mark.parametrize("kind, prior, objective", DEEPER_COMBINATIONS)
def test_every_posterior_and_hierarchy_trains_resumes_bit_exactly_and_evaluates(tmp_path, kind, prior, objective):
    extra = [*DEEPER[kind], "train.kl_warmup_epochs=2", "loss.free_bits=0.1" if objective == "elbo" else "seed=0"]
    if kind.startswith("hvae"):  # replaces SMALL's model=mlp_vae (one value per group)
        extra = [*extra, "model.hidden_dim=16"]
    cfg = lambda *more: _deeper(prior, objective, extra, *more)  # noqa: E731
    straight, first, resumed = tmp_path / "straight", tmp_path / "first", tmp_path / "resumed"
    run_task(cfg("train.epochs=2"), straight)
    run_task(cfg("train.epochs=1"), first)
    run_task(compose_config(*SMALL[3:5], "train.epochs=2", f"train.resume={first / 'checkpoints' / 'last.pt'}"), resumed)
    expected = weights(straight)
    assert set(expected) == set(weights(resumed)) and any(k.startswith(("posterior_flow.", "top_down")) for k in expected)
    for key, tensor in weights(resumed).items():
        assert torch.equal(tensor, expected[key]), key
    run_task(compose_config("task=evaluate", f"evaluate.checkpoint={resumed}", "evaluate.samplers=[prior,gmm]",
                            "evaluate.sample_metrics=false", "evaluate.iw_samples=3", "evaluate.batch_size=32"), tmp_path / "evaluated")
    report = json.loads((tmp_path / "evaluated" / "results" / "metrics.json").read_text())
    last = load_checkpoint(resumed / "checkpoints" / "last.pt")["history"][-1]
    assert report["neg_elbo"] == pytest.approx(last["test_recon"] + last["test_kl"], abs=1e-4, rel=1e-6)
    assert report["iw_nll"] <= report["neg_elbo"] + 1.0  # k = 3 samples: at most a little above the ELBO by chance
    if kind.startswith("hvae"):
        layers = report["layer_sizes"]
        assert len(layers) == len(report["kl_per_layer"]) == len(report["active_units_per_layer"]) == (3 if kind == "hvae_conv" else 2)
        assert sum(report["kl_per_layer"]) == pytest.approx(report["kl"], rel=0.5)  # one draw each: the same quantity
    else:
        assert report["posterior"] == {"iaf": "IAF", "planar": "Planar"}[kind] and report["kl_per_dimension"] is None


def _deeper(prior, objective, extra, *more):
    overrides = [f"prior={prior}", f"loss={objective}", *SMALL, *extra, *more]
    if any(o.startswith("model=") for o in extra):
        overrides.remove("model=mlp_vae")
    for setting, needed in (("prior.components=3", prior != "normal"), ("loss.k=3", objective == "iwae")):
        if not needed and setting in overrides:
            overrides.remove(setting)
    return compose_config(*overrides)


@pytest.mark.parametrize("prior, objective, likelihood", [  # the fast tier keeps the one whose nats are not a likelihood
    pytest.param("vamp", "iwae", "gaussian", marks=pytest.mark.slow),
    pytest.param("mog", "elbo", "continuous_bernoulli", marks=pytest.mark.slow), ("normal", "elbo", "mse"),
])
def test_a_combination_evaluates_and_says_what_its_nats_are(tmp_path, prior, objective, likelihood):
    run_task(small(prior, objective, likelihood, "train.epochs=1", "train.evaluate_at_end=true", "figures=true"), tmp_path)
    report = json.loads((tmp_path / "results" / "metrics.json").read_text())
    assert report["prior"] == {"vamp": "VampPrior", "mog": "MixturePrior", "normal": "NormalPrior"}[prior]
    assert report["kl_estimator"].startswith("closed form" if prior == "normal" else "Monte Carlo")
    assert report["true_log_likelihood"] is (likelihood != "mse")
    assert report["neg_elbo"] == pytest.approx(report["recon"] + report["kl"])
    assert (tmp_path / "results" / "kl_per_dimension.png").exists() is (prior == "normal")
    assert (report["kl_per_dimension"] is None) is (prior != "normal")
    if likelihood == "gaussian":
        assert report["likelihood_scale"] > 0


USER_MODULE = textwrap.dedent('''
    """A user's own model, in a module of their own."""
    from typing import Annotated

    from torch import nn

    from vae_lab.model import VAE
    from vae_lab.options import Range


    class TinyVAE(VAE):
        # `channels` here: extra hidden units, 0 = none (vae_lab's ResNetVAE takes channels >= 1; that rule is its own)
        def __init__(self, latent_dim=2, width: Annotated[int, Range(8, note="hidden units")] = 16, channels: int = 0,
                     image_shape=(1, 28, 28), prior=None, likelihood=None):
            super().__init__(latent_dim, prior, likelihood)
            pixels = image_shape[0] * image_shape[1] * image_shape[2]
            width += channels
            self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(pixels, width), nn.ReLU(), nn.Linear(width, 2 * latent_dim))
            self.decoder = nn.Sequential(nn.Linear(latent_dim, width), nn.ReLU(), nn.Linear(width, pixels),
                                         nn.Unflatten(1, tuple(image_shape)))

        def posterior(self, x):
            return self.encoder(x).chunk(2, dim=1)

        def decode(self, z):
            return self.decoder(z)
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    package = tmp_path / "my_lab"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_lab.models"
    for name in [n for n in sys.modules if n.startswith("my_lab")]:
        del sys.modules[name]


def user_config(*overrides):
    return compose_config("model._target_=my_lab.models.TinyVAE", "~model.hidden_dim", "~model.base_channels",
                          "+model.width=16", "model.latent_dim=2", "data.limit=64", *overrides)


def test_a_user_model_trains_evaluates_and_resumes(tmp_path, user_module):
    run = tmp_path / "run"
    run_task(user_config("trusted_modules=[my_lab.models]", "train.evaluate_at_end=true", "train.epochs=1"), run)
    assert (run / "results" / "metrics.json").exists()
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["config"]["model"]["_target_"] == "my_lab.models.TinyVAE"
    resumed = tmp_path / "resumed"
    run_task(compose_config("trusted_modules=[my_lab]", "train.epochs=2", f"train.resume={run}/checkpoints/last.pt"), resumed)
    assert load_checkpoint(resumed / "checkpoints" / "last.pt")["epoch"] == 2
    evaluated = tmp_path / "evaluated"
    run_task(compose_config("task=evaluate", "trusted_modules=[my_lab.models]", f"evaluate.checkpoint={resumed}"), evaluated)
    assert json.loads((evaluated / "results" / "metrics.json").read_text())["model"] == "TinyVAE"


def test_a_range_is_the_declaring_classs_own_and_a_users_class_declares_its_own(user_module):
    """Bounds live in the annotation of the argument that takes them (options.Range), not on a setting's name."""
    validate(user_config("trusted_modules=[my_lab.models]", "+model.channels=0"))  # ResNetVAE's channels >= 1 is not TinyVAE's
    with pytest.raises(ConfigError, match=re.escape("model.width=4 is not allowed: use a whole number >= 8 (hidden units)")):
        validate(user_config("trusted_modules=[my_lab.models]", "model.width=4"))
    with pytest.raises(ConfigError, match=re.escape("model.channels=0 is not allowed: use a whole number >= 1")):
        validate(compose_config("model=resnet_vae", "model.channels=0"))
    with pytest.raises(ConfigError, match=re.escape("train.alpha=inf is not allowed")):  # never in range: infinite
        validate(compose_config("train.alpha=inf"))
    huge = "1" + "0" * 400  # a whole number past any float: compared as it is, never converted (no OverflowError)
    with pytest.raises(ConfigError, match=re.escape(f"seed={huge} is not allowed: use a whole number from 0 to 4,294,967,295")):
        validate(compose_config(f"seed={huge}"))
    with pytest.raises(ConfigError, match=re.escape("optim.lr=nan is not allowed")):
        validate(compose_config("optim.lr=nan"))
    validate(compose_config(f"optim.lr={huge}"))  # finite, > 0: the optimizer's business, as before


def test_a_user_model_is_refused_until_its_module_is_trusted(tmp_path, user_module):
    with pytest.raises(ConfigError, match=r"model is built by 'my_lab.models.TinyVAE', and my_lab.models is not a trusted module"):
        run_task(user_config(), tmp_path / "refused")
    assert not (tmp_path / "refused" / "checkpoints").exists()


@pytest.mark.parametrize("overrides", [
    ["loss._target_=builtins.open", "+loss.file={victim}", "+loss.mode=w"],          # a group's own target
    ["+model.encoder._target_=builtins.open", "+model.encoder.file={victim}", "+model.encoder.mode=w"],  # nested
    ["logger._target_=builtins.open", "+logger.file={victim}", "+logger.mode=w"],    # a recorded-only group
    ["+sampler._target_=builtins.open", "+sampler.file={victim}", "+sampler.mode=w"],  # a group vae_lab lacks
])
def test_a_config_naming_an_untrusted_module_is_refused_before_anything_runs(tmp_path, overrides):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    cfg = compose_config(*(o.format(victim=victim) for o in overrides))
    with pytest.raises(ConfigError, match="builtins is not a trusted module"):
        run_task(cfg, tmp_path / "run")
    assert victim.read_text() == "precious\n"
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("node", ["+sampler", "+model.encoder"])
def test_vae_labs_own_functions_are_trusted_only_as_the_groups_classes(tmp_path, node):
    victim = tmp_path / "written.txt"
    cfg = compose_config(f"{node}._target_=vae_lab.files.write_atomic", f"{node}.path={victim}", f"{node}.content=pwned")
    with pytest.raises(ConfigError, match="outside the groups vae_lab builds .* trusted_modules"):
        run_task(cfg, tmp_path / "run")
    assert not victim.exists()


def test_trust_is_by_whole_package_name_never_a_string_prefix(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "vae_lab_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Net: pass\n")
    (tmp_path / "my_lab_extra.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Net: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for target, trusted in (("vae_lab_evil.Net", "[vae_lab]"), ("my_lab_extra.Net", "[my_lab]")):
        with pytest.raises(ConfigError, match=f"{target.split('.')[0]} is not a trusted module"):
            run_task(compose_config(f"model._target_={target}", f"trusted_modules={trusted}"), tmp_path / "run")
    assert not marker.exists() and "vae_lab_evil" not in sys.modules and "my_lab_extra" not in sys.modules


def test_a_checkpoint_naming_an_untrusted_module_is_refused_before_anything_is_imported(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run_task(compose_config("data.limit=32", "train.epochs=1"), run)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    marker = tmp_path / "imported"
    (tmp_path / "evil_lab.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Net: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    forged = tmp_path / "forged.pt"
    save_checkpoint(dict(state, config={**state["config"], "model": {"_target_": "evil_lab.Net"}}), forged)
    with pytest.raises(CheckpointError, match="evil_lab is not a trusted module"):
        run_task(compose_config("task=evaluate", f"evaluate.checkpoint={forged}"), tmp_path / "eval")
    assert not marker.exists() and "evil_lab" not in sys.modules
    # A trusted module's class that is not a VAE is refused too (base-class rule).
    save_checkpoint(dict(state, config={**state["config"], "model": {"_target_": "vae_lab.data.ImageData"}}), forged)
    with pytest.raises(CheckpointError, match="'vae_lab.data.ImageData', which is not a vae_lab.model.VAE class"):
        run_task(compose_config("task=evaluate", f"evaluate.checkpoint={forged}"), tmp_path / "eval2")


def test_an_old_checkpoint_without_a_prior_or_posterior_still_evaluates_and_resumes(tmp_path):
    run = tmp_path / "run"
    run_task(compose_config("data.limit=32", "train.epochs=1"), run)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    config = {key: value for key, value in state["config"].items() if key not in ("prior", "posterior")}
    config["loss"] = {"_target_": "vae_lab.loss.VAELoss", "reconstruction": "bce", "alpha": 0.1}
    config["train"] = {key: value for key, value in config["train"].items() if key != "kl_warmup_epochs"}
    old = tmp_path / "old.pt"
    save_checkpoint(dict(state, config=config), old)
    run_task(compose_config("task=evaluate", f"evaluate.checkpoint={old}"), tmp_path / "eval")
    run_task(compose_config("data.limit=32", "train.epochs=2", f"train.resume={old}"), tmp_path / "resumed")
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["epoch"] == 2


def test_the_readmes_own_model_trains_with_every_likelihood_and_one_that_ignores_it_is_one_line(tmp_path, monkeypatch):
    """The README's TinyVAE, as printed there, sizes its decoder from the likelihood; a decoder that does not
    is refused by the dry build, naming the shape the likelihood needs."""
    readme = (REPO / "README.md").read_text()
    source = re.search(r"```python\n(# my_lab/models.py\n.*?)```", readme, re.S).group(1)
    (tmp_path / "my_lab").mkdir()
    (tmp_path / "my_lab" / "__init__.py").write_text("")
    (tmp_path / "my_lab" / "models.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_lab", raising=False)
    monkeypatch.delitem(sys.modules, "my_lab.models", raising=False)
    mine = ["model._target_=my_lab.models.TinyVAE", "~model.hidden_dim", "~model.base_channels", "+model.width=32",
            "trusted_modules=[my_lab]", "data.limit=64", "train.epochs=1"]
    for likelihood in ("bce", "gaussian_per_pixel"):
        run_task(compose_config(*mine, f"loss.reconstruction={likelihood}"), tmp_path / likelihood)
        assert (tmp_path / likelihood / "checkpoints" / "last.pt").is_file()
    (tmp_path / "my_lab" / "models.py").write_text(source.replace("pixels * outputs", "pixels").replace("image_shape[0] * outputs", "image_shape[0]"))
    monkeypatch.delitem(sys.modules, "my_lab.models")
    with pytest.raises(ConfigError, match=r"TinyVAE.decode returns \[2, 1, 28, 28\] .*PixelGaussian needs \[2, 2, 28, 28\]"):
        validate(compose_config(*mine, "loss.reconstruction=gaussian_per_pixel"))
