"""The probabilistic core checked against closed forms: likelihoods, priors, objectives, IW bound."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, Independent, MixtureSameFamily, MultivariateNormal, Normal, kl_divergence

from vae_lab.likelihoods import Bernoulli, ContinuousBernoulli, Gaussian, Likelihood, SquaredError, make_likelihood
from vae_lab.metrics import importance_weighted_nll
from vae_lab.model import MLPVAE, VAE
from vae_lab.objectives import ELBO, IWAE
from vae_lab.priors import MixturePrior, NormalPrior, VampPrior

# ---------------------------------------------------------------- likelihoods


def test_bernoulli_from_logits_equals_bce_of_probabilities():
    torch.manual_seed(0)
    x, logits = torch.rand(4, 1, 28, 28), torch.randn(4, 1, 28, 28)
    expected = -F.binary_cross_entropy(torch.sigmoid(logits), x, reduction="none").flatten(1).sum(1)
    torch.testing.assert_close(Bernoulli().log_prob(x, logits), expected)


def test_mse_is_minus_the_summed_squared_error():
    x, logits = torch.full((2, 1, 28, 28), 0.25), torch.zeros(2, 1, 28, 28)  # sigmoid(0) = 0.5
    torch.testing.assert_close(SquaredError().log_prob(x, logits), torch.full((2,), -784 * 0.0625))


@pytest.mark.parametrize("name", ["bce", "mse", "continuous_bernoulli", "gaussian", "gaussian_per_pixel"])
@pytest.mark.parametrize("pixel", [0.0, 1.0])
def test_every_likelihood_is_finite_on_black_and_white_images_with_confidently_wrong_logits(name, pixel):
    x = torch.full((4, 1, 28, 28), pixel)
    likelihood = make_likelihood(name)
    logits = torch.full((4, likelihood.outputs_per_channel, 28, 28), 200.0 if pixel == 0 else -200.0, requires_grad=True)
    log_p = likelihood.log_prob(x, logits)
    log_p.sum().backward()
    assert torch.isfinite(log_p).all() and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("logit", [-30.0, -4.0, -1e-3, 0.0, 1e-4, 0.02, 3.0, 30.0])
def test_the_continuous_bernoulli_is_normalised_on_the_unit_interval(logit):
    """Numerical integration of exp(log p(x)) over [0, 1], near 0.5 (logit 0) and at the extremes."""
    x = torch.linspace(0, 1, 200_001, dtype=torch.float64).view(-1, 1, 1, 1)
    output = torch.full((1, 1, 1), logit, dtype=torch.float64)
    density = ContinuousBernoulli().log_prob(x, output).exp()
    assert torch.trapezoid(density, x.flatten()).item() == pytest.approx(1.0, abs=2e-4)


def test_the_continuous_bernoulli_mean_is_its_expectation():
    x = torch.linspace(0, 1, 100_001, dtype=torch.float64)
    for logit in (-3.0, 0.5, 4.0):
        output = torch.full((1, 1, 1), logit, dtype=torch.float64)
        density = ContinuousBernoulli().log_prob(x.view(-1, 1, 1, 1), output).exp()
        expected = torch.trapezoid(density * x, x).item()
        assert ContinuousBernoulli().mean(output).item() == pytest.approx(expected, abs=1e-4)


def test_the_gaussian_has_a_learned_shared_scale_and_is_a_density():
    likelihood = Gaussian()
    assert [name for name, _ in likelihood.named_parameters()] == ["log_scale"]
    x, output = torch.rand(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    expected = Normal(torch.sigmoid(output), likelihood.log_scale.exp()).log_prob(x).sum((1, 2, 3))
    torch.testing.assert_close(likelihood.log_prob(x, output), expected)


def test_the_per_pixel_gaussian_is_normal_with_the_decoders_mean_and_scale_for_each_pixel():
    from vae_lab.likelihoods import PixelGaussian

    likelihood = PixelGaussian()
    assert not list(likelihood.parameters()) and likelihood.outputs_per_channel == 2
    torch.manual_seed(0)
    x, means, log_scales = torch.rand(3, 2, 4, 5), torch.randn(3, 2, 4, 5), torch.rand(3, 2, 4, 5) * 4 - 3  # inside the clamp
    output = torch.cat([means, log_scales], dim=1)  # (B, 2C, H, W): the C mean logits, then the C log-scales
    expected = Normal(torch.sigmoid(means), log_scales.exp()).log_prob(x).sum((1, 2, 3))
    torch.testing.assert_close(likelihood.log_prob(x, output), expected)
    torch.testing.assert_close(likelihood.mean(output), torch.sigmoid(means))
    samples = torch.randn(7, *output.shape)  # importance samples: (k, B, 2C, H, W) against x (B, C, H, W)
    assert likelihood.log_prob(x, samples).shape == (7, 3)
    constant = torch.cat([means, torch.full_like(log_scales, -50.0)], dim=1)  # a scale driven to 0 is held at e^-7
    clamped = Normal(torch.sigmoid(means), math.exp(-7.0)).log_prob(x).sum((1, 2, 3))
    torch.testing.assert_close(likelihood.log_prob(x, constant), clamped)


def test_which_nats_are_a_true_log_likelihood():
    assert Bernoulli().is_true_log_likelihood(binary_data=True)
    assert not Bernoulli().is_true_log_likelihood(binary_data=False)
    assert ContinuousBernoulli().is_true_log_likelihood(binary_data=False)
    assert not SquaredError().is_true_log_likelihood(binary_data=True)


def test_an_unknown_likelihood_is_refused():
    with pytest.raises(ValueError, match="unknown reconstruction 'l1'"):
        ELBO("l1")

# ---------------------------------------------------------------- priors


def test_the_closed_form_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(8, 5), torch.randn(8, 5)
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0))
    torch.testing.assert_close(NormalPrior(5).kl(mu, logvar), expected)
    assert torch.equal(NormalPrior(5).kl(torch.zeros(2, 5), torch.zeros(2, 5)), torch.zeros(2, 5))


def test_the_mixture_prior_density_is_the_mixture_of_its_components():
    torch.manual_seed(0)
    prior = MixturePrior(3, components=4)
    with torch.no_grad():
        prior.logits.copy_(torch.randn(4))
        prior.logvars.copy_(torch.randn(4, 3) * 0.3)
    z = torch.randn(7, 3)
    expected = MixtureSameFamily(Categorical(logits=prior.logits),
                                 Independent(Normal(prior.means, torch.exp(0.5 * prior.logvars)), 1)).log_prob(z)
    torch.testing.assert_close(prior.log_prob(z), expected)
    # and by hand: log sum_k pi_k N(z; m_k, s_k)
    by_hand = torch.logsumexp(prior.logits.log_softmax(0) + Normal(prior.means, torch.exp(0.5 * prior.logvars)).log_prob(z[:, None]).sum(-1), 1)
    torch.testing.assert_close(prior.log_prob(z), by_hand)


def test_the_vampprior_is_the_uniform_mixture_of_the_posteriors_of_its_pseudo_inputs():
    torch.manual_seed(0)
    model = MLPVAE(latent_dim=3, hidden_dim=16, prior=VampPrior(3, components=5)).eval()
    mu, logvar = model.encode(torch.sigmoid(model.prior.pseudo_inputs))
    expected = MixtureSameFamily(Categorical(logits=torch.zeros(5)), Independent(Normal(mu, torch.exp(0.5 * logvar)), 1))
    z = torch.randn(6, 3)
    torch.testing.assert_close(model.prior_log_prob(z), expected.log_prob(z))
    with model.prior_frozen():  # evaluation encodes the pseudo-inputs once
        torch.testing.assert_close(model.prior_log_prob(z), expected.log_prob(z))

# ---------------------------------------------------------------- objectives


def small_model(prior=None, likelihood=None):
    torch.manual_seed(0)
    return MLPVAE(latent_dim=4, hidden_dim=32, prior=prior or NormalPrior(4), likelihood=likelihood).eval()


@pytest.mark.parametrize("prior", [lambda: VampPrior(4, components=3), lambda: MixturePrior(4, components=3)])
def test_iwae_with_one_sample_is_the_elbo(prior):
    model = small_model(prior())
    x, noise = torch.rand(6, 1, 28, 28).bernoulli(), torch.randn(6, 4)
    elbo, iwae = ELBO("bce")(model, x, noise), IWAE("bce", k=1)(model, x, noise.unsqueeze(1))
    for a, b in zip(elbo, iwae):
        torch.testing.assert_close(a, b)


def test_iwae_with_one_sample_is_the_elbo_in_expectation_with_the_closed_form_kl():
    model = small_model()
    x = torch.rand(4, 1, 28, 28).bernoulli().repeat(5000, 1, 1, 1)
    torch.manual_seed(1)
    elbo, iwae = ELBO("bce")(model, x).total.item(), IWAE("bce", k=1)(model, x).total.item()
    assert elbo == pytest.approx(iwae, rel=2e-3)


def test_more_importance_samples_give_a_tighter_objective():
    model = small_model()
    x = torch.rand(64, 1, 28, 28).bernoulli()
    torch.manual_seed(2)
    values = [IWAE("bce", k=k)(model, x).total.item() for k in (1, 10, 100)]
    assert values[0] > values[1] > values[2]


def test_the_elbo_is_recon_plus_alpha_kl_and_reports_the_plain_elbo():
    model = small_model()
    x, noise = torch.rand(6, 1, 28, 28), torch.randn(6, 4)
    terms = ELBO("bce", alpha=0.1)(model, x, noise)
    mu, logvar = model.encode(x)
    z = mu + torch.exp(0.5 * logvar) * noise
    torch.testing.assert_close(terms.recon, -Bernoulli().log_prob(x, model.decode(z)).mean())
    torch.testing.assert_close(terms.kl, NormalPrior(4).kl(mu, logvar).sum(1).mean())
    torch.testing.assert_close(terms.total, terms.recon + 0.1 * terms.kl)


def test_free_bits_raise_each_dimension_to_its_floor_without_touching_the_reported_elbo():
    model = small_model()
    x, noise = torch.rand(6, 1, 28, 28), torch.randn(6, 4)
    plain, free = ELBO("bce", free_bits=0.0)(model, x, noise), ELBO("bce", free_bits=5.0)(model, x, noise)
    mu, logvar = model.encode(x)
    per_dimension = NormalPrior(4).kl(mu, logvar).mean(0)
    torch.testing.assert_close(free.total, plain.recon + per_dimension.clamp(min=5.0).sum())
    assert free.total > plain.total
    torch.testing.assert_close((free.recon, free.kl), (plain.recon, plain.kl))


def test_warm_up_scales_the_kl_weight_without_touching_the_reported_elbo():
    from vae_lab.train import kl_warmup

    assert [kl_warmup(e, 4) for e in (1, 2, 3, 5, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert kl_warmup(1, 0) == 1.0
    model = small_model()
    x, noise = torch.rand(6, 1, 28, 28), torch.randn(6, 4)
    objective = ELBO("bce", alpha=1.0)
    full = objective(model, x, noise)
    objective.kl_scale = 0.25
    warm = objective(model, x, noise)
    torch.testing.assert_close(warm.total, full.recon + 0.25 * full.kl)
    torch.testing.assert_close((warm.recon, warm.kl), (full.recon, full.kl))

# ---------------------------------------------------------------- an exact likelihood: probabilistic PCA


class IdentityGaussian(Likelihood):
    """N(x; output, sigma^2 I) with a fixed sigma: with a linear decoder, probabilistic PCA."""

    def __init__(self, sigma: float):
        super().__init__()
        self.sigma = sigma

    def log_prob(self, x, output):
        return Normal(output, self.sigma).log_prob(x).sum((-3, -2, -1))

    def mean(self, output):
        return output

    def is_true_log_likelihood(self, binary_data):
        return True


class LinearGaussianVAE(VAE):
    """x = W z + b + noise, z ~ N(0, I), with its exact posterior as the encoder (W's columns orthogonal)."""

    def __init__(self, weight, bias, sigma, posterior_scale=1.0):
        super().__init__(weight.shape[1], NormalPrior(weight.shape[1]), IdentityGaussian(sigma))
        self.weight, self.bias, self.sigma, self.posterior_scale = weight, bias, sigma, posterior_scale
        m = weight.T @ weight + sigma**2 * torch.eye(weight.shape[1])  # diagonal
        self.m_inverse = torch.linalg.inv(m)

    def posterior(self, x):
        mu = (x.flatten(1) - self.bias) @ self.weight @ self.m_inverse.T
        variance = self.sigma**2 * torch.diagonal(self.m_inverse) * self.posterior_scale
        return mu, variance.log().expand_as(mu)

    def decode(self, z):
        return (z @ self.weight.T + self.bias).view(*z.shape[:-1], 1, 2, 2)

    def exact_log_px(self, x):
        covariance = self.weight @ self.weight.T + self.sigma**2 * torch.eye(4)
        return MultivariateNormal(self.bias, covariance).log_prob(x.flatten(1))


@pytest.fixture
def ppca():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    weight = q[:, :2] * torch.tensor([2.0, 0.7], dtype=torch.float64)  # orthogonal columns
    model = LinearGaussianVAE(weight, torch.randn(4, dtype=torch.float64), sigma=0.5)
    x = (torch.randn(200, 2, dtype=torch.float64) @ weight.T + model.bias + 0.5 * torch.randn(200, 4, dtype=torch.float64))
    return model, x.view(200, 1, 2, 2)


def test_the_elbo_with_the_exact_posterior_is_the_exact_log_likelihood(ppca):
    model, x = ppca
    torch.manual_seed(3)
    terms = ELBO("bce")(model, x.repeat(200, 1, 1, 1))  # 200 draws of z per image: the ELBO's expectation
    assert -terms.total.item() == pytest.approx(model.exact_log_px(x).mean().item(), abs=0.02)
    # and the IW bound, whatever k, is exact too (every weight equals p(x))
    iw = importance_weighted_nll(model, x, k=3, batch_size=50)
    assert -iw == pytest.approx(model.exact_log_px(x).mean().item(), abs=1e-9)


def test_the_iw_bound_approaches_the_exact_likelihood_from_below_as_k_grows(ppca):
    model, x = ppca
    model.posterior_scale = 3.0  # a too-wide posterior: the ELBO is loose
    exact = -model.exact_log_px(x).mean().item()
    bounds = [importance_weighted_nll(model, x, k=k, batch_size=200, seed=0) for k in (1, 10, 100, 2000)]
    assert all(b > exact for b in bounds)  # -log p(x) <= each bound
    assert bounds[0] > bounds[1] > bounds[2] > bounds[3]
    assert bounds[-1] - exact < 0.02 < bounds[0] - exact


# --- the discretized logistic mixture (8-bit data) ------------------------------------------------


def _all_levels(shape=(1, 2, 3)):
    """x (256, C, H, W): every pixel at each of the 256 levels in turn."""
    return (torch.arange(256, dtype=torch.float64) / 255).view(256, 1, 1, 1).expand(256, *shape)


@pytest.mark.parametrize("components", [1, 3])
def test_the_discretized_logistic_gives_the_256_levels_probabilities_that_sum_to_one(components):
    from vae_lab.likelihoods import DiscretizedLogistic

    likelihood = DiscretizedLogistic(components)
    torch.manual_seed(components)
    for _ in range(5):  # random mixture logits, means and log-scales for one pixel
        output = (torch.randn(1, 3 * components, 1, 1, dtype=torch.float64) * 2).expand(256, -1, -1, -1)
        log_p = likelihood.log_prob(_all_levels((1, 1, 1)), output)  # (256,): each level of the one pixel
        assert torch.logsumexp(log_p, 0).exp().item() == pytest.approx(1.0, abs=1e-6)


def test_a_uniform_discretized_logistic_scores_exactly_8_bits_per_dimension():
    from vae_lab.likelihoods import DiscretizedLogistic

    # A uniform distribution over the 256 levels: 256 equally weighted components, one narrow one on each level.
    likelihood = DiscretizedLogistic(256)
    means = (torch.arange(256, dtype=torch.float64) / 255 * 2 - 1).view(1, 256, 1, 1, 1)
    output = torch.cat([torch.zeros(1, 256, 1, 1, 1, dtype=torch.float64), means,
                        torch.full((1, 256, 1, 1, 1), -12.0, dtype=torch.float64)], dim=1).view(1, 3 * 256, 1, 1)
    likelihood.MIN_LOG_SCALE = -12.0
    x = _all_levels((1, 1, 1))
    bits = -likelihood.log_prob(x, output) / math.log(2)
    assert torch.allclose(bits, torch.full((256,), 8.0, dtype=torch.float64), atol=1e-6)


def test_the_edge_levels_take_the_tails():
    from vae_lab.likelihoods import DiscretizedLogistic

    likelihood = DiscretizedLogistic(1)
    far_below = torch.tensor([0.0, -30.0, 0.0], dtype=torch.float64).view(1, 3, 1, 1)  # mean far below 0 (in [-1, 1] space)
    far_above = torch.tensor([0.0, 30.0, 0.0], dtype=torch.float64).view(1, 3, 1, 1)
    black, white = torch.zeros(1, 1, 1, 1, dtype=torch.float64), torch.ones(1, 1, 1, 1, dtype=torch.float64)
    assert likelihood.log_prob(black, far_below).exp().item() == pytest.approx(1.0, abs=1e-9)  # all mass in level 0
    assert likelihood.log_prob(white, far_above).exp().item() == pytest.approx(1.0, abs=1e-9)  # all mass in level 255
    # level 255 under a logistic(-30, 1): its upper tail from the bin's lower edge, 1 - 1/255 (in [-1, 1] space)
    assert likelihood.log_prob(white, far_below).item() == pytest.approx(-F.softplus(torch.tensor(31 - 1 / 255, dtype=torch.float64)).item(), abs=1e-9)


def test_models_size_their_last_layer_from_the_likelihood():
    from vae_lab.likelihoods import DiscretizedLogistic
    from vae_lab.model import ConvVAE, MLPVAE, ResNetVAE

    for model_class in (ConvVAE, MLPVAE, ResNetVAE):
        model = model_class(latent_dim=3, image_shape=(3, 32, 32), likelihood=DiscretizedLogistic(2)).eval()
        output = model.decode(torch.randn(4, 3))
        assert output.shape == (4, 3 * 2 * 3, 32, 32), model_class.__name__
        assert model.mean(output).shape == (4, 3, 32, 32) and 0 <= model.mean(output).min() <= model.mean(output).max() <= 1
        x = torch.randint(0, 256, (4, 3, 32, 32)).double().div(255).float()
        assert torch.isfinite(model.likelihood.log_prob(x, output)).all()
