"""Disentanglement: the metrics on codes whose answer is known, the objectives' closed-form maths,
FactorVAE's auxiliary network through a checkpoint, and the report, figures and refusals of a run."""
import json
import math

import numpy as np
import pytest
import torch

from conftest import assert_png, compose_config, read_metrics
from vae_lab.checkpoint import load_checkpoint
from vae_lab.cli import run_task
from vae_lab.data.shapes import DSPRITES_GRID, make_shapes
from vae_lab.disentanglement import dci, disentanglement_report, factor_levels, factor_vae_score, mig, sap
from vae_lab.errors import CheckpointError, ConfigError
from vae_lab.model import MLPVAE
from vae_lab.objectives import DIPVAE, ELBO, BetaTCVAE, FactorVAE, kl_decomposition
from vae_lab.options import DISENTANGLEMENT_METRICS
from vae_lab.priors import log_diagonal_normal
from vae_lab.sweep import write_summary

SHAPES_TINY = ["data=shapes", "data.preset=dsprites", "data.train_size=256", "data.test_size=128", "data.image_size=16",
               "model=mlp_vae", "model.hidden_dim=32", "model.latent_dim=4"]


@pytest.fixture(scope="module")
def factors():
    return make_shapes(train_size=8, test_size=3000, preset="dsprites").test_factors.double().numpy()


def scores(codes, factors):
    levels = factor_levels(factors, 20)
    return {"mig": mig(codes, levels), **dci(codes, levels, trees=10), "sap": sap(codes, factors, levels)}


def oracle(factors, extra=3, seed=0):
    """The factors themselves, one per dimension (standardised), and a few near-constant dimensions."""
    rng = np.random.default_rng(seed)
    standard = (factors - factors.mean(0)) / factors.std(0)
    return np.concatenate([standard, 0.01 * rng.normal(size=(len(factors), extra))], axis=1)


def test_the_dsprites_preset_is_the_factor_grid(factors):
    data = make_shapes(train_size=64, test_size=8, image_size=20, preset="dsprites")
    assert data.image_shape == (1, 20, 20) and data.values == "binary" and data.factor_names == tuple(DSPRITES_GRID)
    assert set(data.train_images.unique().tolist()) == {0.0, 1.0}
    for k, values in enumerate(DSPRITES_GRID.values()):  # every factor value is one of the grid's
        assert np.isin(factors[:, k].astype(np.float32), values).all()
    assert [len(np.unique(factors[:, k])) for k in range(5)] == [len(v) for v in DSPRITES_GRID.values()]


def test_oracle_codes_score_near_one_and_independent_codes_near_zero(factors):
    perfect = scores(oracle(factors), factors)
    assert perfect["mig"] > 0.8 and perfect["dci_disentanglement"] > 0.9 and perfect["sap"] > 0.9, perfect
    assert perfect["dci_completeness"] > 0.9 and perfect["dci_informativeness"] > 0.95, perfect
    noise = scores(np.random.default_rng(1).normal(size=(len(factors), 8)), factors)
    assert noise["mig"] < 0.05 and noise["dci_disentanglement"] < 0.1 and noise["sap"] < 0.05, noise
    levels = factor_levels(factors, 20)
    assert factor_vae_score(oracle(factors), levels, votes=500) > 0.95
    assert factor_vae_score(np.random.default_rng(1).normal(size=(len(factors), 8)), levels, votes=500) < 0.5


def test_a_rotation_of_the_oracle_codes_scores_lower(factors):
    codes = oracle(factors, extra=0)
    rotation, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(codes.shape[1], codes.shape[1])))
    perfect, rotated = scores(codes, factors), scores(codes @ rotation, factors)
    for key in ("mig", "dci_disentanglement", "dci_completeness", "sap"):
        assert rotated[key] < perfect[key] - 0.3, (key, perfect[key], rotated[key])


def test_a_factor_duplicated_into_two_dimensions_lowers_mig_and_completeness(factors):
    codes = oracle(factors, extra=0)
    twice = np.concatenate([codes, codes[:, :1] + 1e-3 * np.random.default_rng(3).normal(size=(len(codes), 1))], axis=1)
    perfect, split = scores(codes, factors), scores(twice, factors)
    # The shape factor's top two dimensions now carry the same information: its gap is 0 of 5 factors' gaps.
    assert split["mig"] == pytest.approx(perfect["mig"] * 4 / 5, abs=0.05)
    assert split["dci_completeness"] < perfect["dci_completeness"] - 0.05
    assert split["dci_disentanglement"] > 0.9  # each dimension still captures one factor


def test_the_report_holds_every_metric_its_settings_and_costs(factors):
    report = disentanglement_report(oracle(factors), factors, tuple(DSPRITES_GRID), votes=200)
    assert set(DISENTANGLEMENT_METRICS) <= set(report)
    settings = report["disentanglement_settings"]
    assert settings["codes"] == len(factors) and settings["factor_levels"] == [3, 6, 40, 32, 32]
    assert settings["categorical_factors"] == ["shape"] and set(settings["seconds"]) >= {"mig", "dci", "sap", "total"}
    information = report["factor_mutual_information"]  # x is dimension 3 of the oracle: 20 code bins hold
    assert information["x"][3] > 0.8 and max(information[name][3] for name in ("shape", "scale", "y")) < 0.05  # <= log 20 / log 32


def test_the_tc_estimate_matches_the_exact_tc_of_a_correlated_gaussian():
    """x ~ N(0, S), q(z|x) = N(x, s^2 I): the aggregate posterior is N(0, S + s^2 I), whose TC is
    (sum_d log C_dd - log det C) / 2. The whole data set in one batch makes the estimate the mixture itself."""
    torch.manual_seed(0)
    n, s2 = 3000, 0.3
    cov_x = torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
    x = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64), cov_x).sample((n,))
    logvar = torch.full_like(x, math.log(s2))
    z = x + math.sqrt(s2) * torch.randn_like(x)
    total = cov_x + s2 * torch.eye(2, dtype=torch.float64)
    exact = 0.5 * (torch.log(torch.diagonal(total)).sum() - torch.logdet(total)).item()
    log_pz = log_diagonal_normal(z, torch.zeros_like(z), torch.zeros_like(z))
    mi, tc, dwkl = kl_decomposition(z, x, logvar, log_pz, n, "mws")
    assert tc.mean().item() == pytest.approx(exact, abs=0.03)
    # The three terms add up to the Monte-Carlo KL at every z, whatever the estimator.
    for estimator in ("mws", "mss"):
        parts = kl_decomposition(z[:64], x[:64], logvar[:64], log_pz[:64], n, estimator)
        assert torch.allclose(sum(parts), log_diagonal_normal(z[:64], x[:64], logvar[:64]) - log_pz[:64])


def test_beta_tcvae_at_unit_weights_is_the_elbo():
    torch.manual_seed(0)
    objective = BetaTCVAE(alpha=1.0, beta=1.0, gamma=1.0)
    model = MLPVAE(latent_dim=3, hidden_dim=16, image_shape=(1, 6, 6), likelihood=objective.likelihood)
    objective.bind(model)
    objective.start_pass(1000, training=True)
    x = torch.rand(32, 1, 6, 6).bernoulli()
    noise = torch.randn(32, 3)
    terms = objective(model, x, noise)
    mu, logvar = model.encode(x)
    z = mu + torch.exp(0.5 * logvar) * noise
    monte_carlo = (log_diagonal_normal(z, mu, logvar) - model.prior_log_prob(z)).mean()
    assert terms.total.item() == pytest.approx((terms.recon + monte_carlo).item(), rel=1e-6)  # at the same z: exactly
    # In expectation over z: the closed-form ELBO.
    draws = torch.stack([objective(model, x, torch.randn(32, 3)).total for _ in range(400)]).mean()
    assert draws.item() == pytest.approx(_elbo_expectation(model, x), rel=2e-3)


def _elbo_expectation(model, x):
    """E_q[-log p(x|z)] + closed-form KL, the expectation over 2,000 z of the reconstruction."""
    mu, logvar = model.encode(x)
    recon = torch.stack([-model.likelihood.log_prob(x, model.decode(mu + torch.exp(0.5 * logvar) * torch.randn_like(mu))).mean()
                         for _ in range(2000)]).mean()
    return (recon + model.prior.kl(mu, logvar).sum(-1).mean()).item()


def test_dip_vae_penalty_is_zero_for_identity_covariance_codes():
    objective = DIPVAE(lambda_od=5.0, lambda_d=7.0, dip_type="i")

    class Fixed(MLPVAE):
        def posterior(self, x):
            return codes, torch.full_like(codes, -30.0)

    torch.manual_seed(0)
    codes = torch.randn(4096, 3)
    codes = (codes - codes.mean(0)) @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(codes.T, correction=0))).T
    model = Fixed(latent_dim=3, hidden_dim=8, image_shape=(1, 4, 4), likelihood=objective.likelihood)
    x = torch.rand(4096, 1, 4, 4)
    terms = objective(model, x, torch.zeros(4096, 3))
    assert terms.total.item() == pytest.approx((terms.recon + terms.kl).item(), abs=1e-3)  # the penalty vanishes
    codes = codes * torch.tensor([1.0, 2.0, 1.0])  # one variance of 4: lambda_d * (4 - 1)^2
    terms = objective(model, x, torch.zeros(4096, 3))
    assert (terms.total - terms.recon - terms.kl).item() == pytest.approx(7.0 * 9.0, rel=1e-3)


def test_factor_vae_discriminator_trains_checkpoints_and_resumes_bit_exactly(tmp_path):
    common = [*SHAPES_TINY, "loss=factor_vae", "loss.discriminator_hidden=16", "loss.discriminator_layers=2"]
    straight, first, second = tmp_path / "straight", tmp_path / "first", tmp_path / "second"
    run_task(compose_config(*common, "train.epochs=3"), straight)
    run_task(compose_config(*common, "train.epochs=1"), first)
    state = load_checkpoint(first / "checkpoints" / "last.pt")
    assert state["objective"]["optimizer"]["state"], "the discriminator's optimizer has stepped"
    run_task(compose_config("train.epochs=3", f"train.resume={first / 'checkpoints' / 'last.pt'}"), second)
    expected, resumed = (load_checkpoint(run / "checkpoints" / "last.pt") for run in (straight, second))
    for key, tensor in expected["model"].items():
        assert torch.equal(tensor, resumed["model"][key]), key
    for key, tensor in expected["objective"]["discriminator"].items():
        assert torch.equal(tensor, resumed["objective"]["discriminator"][key]), key
        assert not torch.equal(tensor, state["objective"]["discriminator"][key]), f"{key} did not train"
    damaged = dict(state, objective={"discriminator": {}, "optimizer": state["objective"]["optimizer"]})
    torch.save(damaged, tmp_path / "damaged.pt")
    with pytest.raises(CheckpointError, match="objective state"):
        run_task(compose_config("train.epochs=3", f"train.resume={tmp_path / 'damaged.pt'}"), tmp_path / "third")


@pytest.mark.parametrize("loss", ["beta_tcvae", "dip_vae"])
def test_each_objective_trains_and_logs_the_plain_elbo_beside_it(loss, tmp_path):
    run_task(compose_config(*SHAPES_TINY, f"loss={loss}", "train.epochs=1"), tmp_path)
    row = {key: float(value) for key, value in read_metrics(tmp_path)[0].items() if key not in ("data", "test_bits_per_dim")}
    assert all(math.isfinite(value) for value in row.values()) and row["test_recon"] > 0 and row["test_kl"] > 0
    if loss == "dip_vae":  # the ELBO plus a penalty >= 0
        assert row["test_loss"] >= row["test_recon"] + row["test_kl"] - 1e-6


def test_a_run_on_factor_data_reports_the_metrics_and_draws_their_figures(tmp_path, caplog):
    caplog.set_level("INFO", logger="vae_lab.evaluate")
    run_task(compose_config(*SHAPES_TINY, "loss=beta_tcvae", "train.epochs=1", "train.evaluate_at_end=true", "figures=true",
                            "evaluate.disentanglement=true"), tmp_path)
    report = json.loads((tmp_path / "results" / "metrics.json").read_text())
    assert all(0 <= report[key] <= 1 for key in DISENTANGLEMENT_METRICS)
    assert report["disentanglement_settings"]["codes"] == 128
    for name in ("dimension_traversal.png", "factor_information.png"):
        assert_png(tmp_path / "results" / name)
    assert f"MIG / SAP / FactorVAE score      {report['mig']:.3f} / {report['sap']:.3f}" in caplog.text
    # The sweep summary carries the metrics (a one-job "sweep": the job folder's overrides as Hydra writes them).
    sweep = tmp_path.parent / f"{tmp_path.name}-sweep"
    job = sweep / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- loss.beta=6\n")
    (job / "results").mkdir()
    (job / "results" / "metrics.json").write_text(json.dumps(report))
    rows, _ = write_summary(sweep)
    assert rows[0]["mig"] == report["mig"]
    assert "dci_disentanglement" in (sweep / "summary.md").read_text().splitlines()[2]


def test_data_without_factors_leaves_the_metrics_out_unless_asked_for(tmp_path):
    with pytest.raises(ConfigError, match="evaluate.disentanglement=true.*no generating factors"):
        run_task(compose_config("evaluate.disentanglement=true", "train.evaluate_at_end=true"), tmp_path / "asked")
    assert not (tmp_path / "asked" / "metrics.csv").exists()  # refused before the first epoch


@pytest.mark.parametrize("overrides, message", [
    (["loss=factor_vae", "train.batch_size=1"], "train.batch_size=1: loss .* needs at least 2 images"),
    (["loss=beta_tcvae", "loss.beta=-1"], r"loss.beta=-1 is not allowed: use a number >= 0"),
    (["loss=beta_tcvae", "loss.beta=nan"], r"loss.beta=nan is not allowed: use a number >= 0"),
    (["loss=dip_vae", "loss.lambda_od=-0.5"], r"loss.lambda_od=-0.5 is not allowed: use a number >= 0"),
    (["loss=factor_vae", "loss.gamma=-2"], r"loss.gamma=-2 is not allowed: use a number >= 0"),
    (["loss=factor_vae", "loss.gamma=inf"], r"loss.gamma=inf is not allowed: use a number >= 0"),
    (["loss=factor_vae", "loss.discriminator_lr=nan"], r"loss \(vae_lab.objectives.FactorVAE\) refuses .*discriminator_lr > 0"),
    (["evaluate.disentanglement=maybe"], "evaluate.disentanglement"),
    (["loss=factor_vae", "loss.discriminator_hidden=10000000"], "of them in the objective's own network.*loss"),
])
def test_bad_disentanglement_settings_are_refused_in_one_line(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message) as refused:
        run_task(compose_config(*overrides), tmp_path)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("weight", [-1.0, math.nan, math.inf])
@pytest.mark.parametrize("make", [lambda w: BetaTCVAE(beta=w), lambda w: DIPVAE(lambda_d=w), lambda w: FactorVAE(gamma=w),
                                  lambda w: ELBO(alpha=w), lambda w: ELBO(free_bits=w)],
                         ids=["beta_tcvae", "dip_vae", "factor_vae", "elbo_alpha", "elbo_free_bits"])
def test_an_objective_built_in_python_refuses_a_weight_that_is_not_a_finite_number_at_least_0(make, weight):
    with pytest.raises(ValueError, match="weights must be finite and >= 0"):
        make(weight)


def test_an_npz_with_factors_is_judged_like_shapes(tmp_path):
    """A user's own data carries factors through data=arrays (f_train, f_test, factor_names): the metrics follow."""
    from vae_lab.data.arrays import load_arrays
    from vae_lab.errors import VaeLabError

    data = make_shapes(train_size=64, test_size=32, image_size=12, preset="dsprites")
    arrays = {"x_train": data.train_images.numpy(), "x_test": data.test_images.numpy(),
              "f_train": data.train_factors.numpy(), "f_test": data.test_factors.numpy(),
              "factor_names": np.array(data.factor_names)}
    np.savez(tmp_path / "mine.npz", **arrays)
    loaded = load_arrays(tmp_path / "mine.npz")
    assert loaded.factor_names == data.factor_names and torch.equal(loaded.test_factors, data.test_factors)
    np.savez(tmp_path / "half.npz", **{k: v for k, v in arrays.items() if k != "f_test"})
    with pytest.raises(VaeLabError, match="has f_train but not f_test"):
        load_arrays(tmp_path / "half.npz")
    np.savez(tmp_path / "short.npz", **{**arrays, "f_test": arrays["f_test"][:5]})
    with pytest.raises(VaeLabError, match=r"f_test has shape \(5, 5\).*\(32, K\)"):
        load_arrays(tmp_path / "short.npz")


def test_continuous_factors_of_few_codes_are_binned_so_every_metric_is_defined():
    """32 codes of two continuous factors: each value is held by one code, so the levels are bins
    (a level of one code would leave the FactorVAE score no vote to take)."""
    rng = np.random.default_rng(0)
    factors = rng.uniform(size=(32, 2))
    levels = factor_levels(factors, bins=8)
    assert levels.max() < 8 and np.bincount(levels[:, 0]).min() >= 2
    report = disentanglement_report(rng.normal(size=(32, 4)), factors, ("a", "b"), votes=200)
    assert all(0 <= report[name] <= 1 for name in ("mig", "sap", "factor_vae_score"))
