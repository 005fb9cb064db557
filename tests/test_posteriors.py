"""Posteriors as distributions: flows (IAF, planar) and the hierarchical VAE, checked against closed-form maths."""
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch.autograd.functional import jacobian

from conftest import compose_config
from vae_lab.errors import ConfigError
from vae_lab.hvae import HierarchicalVAE
from vae_lab.likelihoods import Likelihood
from vae_lab.metrics import importance_weighted_nll, kl_per_layer
from vae_lab.model import MLPVAE
from vae_lab.objectives import ELBO, IWAE
from vae_lab.posteriors import IAF, DiagonalGaussian, FlowPosterior, Planar
from vae_lab.priors import NormalPrior, Prior
from vae_lab.runtime import build_vae
from vae_lab.validate import validate


def _randomised(flow):
    """The flow in float64 with every parameter drawn away from its (near-identity) start."""
    flow = flow.double()
    torch.manual_seed(1)
    for parameter in flow.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    return flow


@pytest.mark.parametrize("flow", [IAF(5, 3, steps=3, hidden=16), Planar(5, 3, steps=4)], ids=["iaf", "planar"])
def test_each_flows_log_determinant_is_that_of_its_full_jacobian(flow):
    flow = _randomised(flow)
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        z = torch.randn(1, 5, generator=generator, dtype=torch.float64)
        context = torch.randn(1, 3, generator=generator, dtype=torch.float64)
        full = jacobian(lambda v: flow(v, context)[0], z)[0, :, 0, :]  # (5, 5)
        assert flow(z, context)[1].item() == pytest.approx(torch.linalg.slogdet(full)[1].item(), abs=1e-6)
    # leading sample dimensions (k, B, D) broadcast against the context (B, C)
    z, context = torch.randn(4, 2, 5, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    out, log_det = flow(z, context)
    assert out.shape == (4, 2, 5) and log_det.shape == (4, 2)
    assert torch.allclose(flow(z[1], context)[1], log_det[1])


def test_an_iaf_step_is_autoregressive_in_its_order_and_the_order_reverses_between_steps():
    flow = _randomised(IAF(6, 2, steps=2, hidden=24))
    z, context = torch.randn(1, 6, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64)
    for index, made in enumerate(flow.steps):
        def one_step(v, made=made):
            m, s = made(v, context)
            gate = torch.sigmoid(s + flow.forget_bias)
            return gate * v + (1 - gate) * m
        step = jacobian(one_step, z)[0, :, 0, :]
        ordered = step if index == 0 else step.flip(0).flip(1)  # the second step reads the dimensions backwards
        assert torch.count_nonzero(torch.triu(ordered, diagonal=1)) == 0  # output d reads only inputs before d
        assert torch.count_nonzero(torch.tril(ordered, diagonal=-1)) > 0  # and does read them


def _same_noise_numbers(model, x):
    torch.manual_seed(5)
    noise = torch.randn(len(x), model.latent_dim)
    elbo = ELBO(alpha=1.0)(model, x, noise)
    iwae = IWAE(k=4)(model, x, torch.randn(len(x), 4, model.latent_dim))
    return [*elbo, *iwae, importance_weighted_nll(model, x, k=7, batch_size=4, seed=2)]


@pytest.mark.parametrize("flow", [IAF, Planar])
def test_a_flow_of_zero_steps_gives_exactly_the_diagonal_numbers(flow):
    torch.manual_seed(0)
    model = MLPVAE(latent_dim=3, hidden_dim=16).eval()
    x = torch.rand(6, 1, 28, 28).bernoulli()
    diagonal = _same_noise_numbers(model, x)
    model.posterior_flow = flow(3, model.context_dim, steps=0)
    assert model.posterior_is_gaussian
    assert _same_noise_numbers(model, x) == diagonal


def test_a_flow_posterior_scores_its_own_codes_with_the_change_of_variables_and_refuses_others():
    torch.manual_seed(0)
    flow = _randomised(IAF(2, 1, steps=2, hidden=8))
    mu, logvar, context = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 1, dtype=torch.float64)
    q = flow.posterior(mu, logvar, context)
    assert isinstance(q, FlowPosterior) and q.gaussian is None
    eps = torch.randn(3, 2, dtype=torch.float64)
    z = q.rsample(eps)
    base = DiagonalGaussian(mu, logvar)
    expected = base.log_prob(base.rsample(eps)) - flow(base.rsample(eps), context)[1]
    torch.testing.assert_close(q.log_prob(z), expected)
    with pytest.raises(ValueError, match="scores only the codes it drew"):
        q.log_prob(z.clone())
    torch.testing.assert_close(q.mean, flow(mu, context)[0])


def test_a_flow_posterior_is_a_normalised_density():
    """Integrated over a grid, exp(log q) of a 1-D flow posterior is 1: its log-determinant is right."""
    flow = _randomised(Planar(1, 1, steps=3))
    mu, logvar, context = (torch.zeros(1, 1, dtype=torch.float64),) * 2 + (torch.ones(1, 1, dtype=torch.float64),)
    q = flow.posterior(mu, logvar, context)
    eps = torch.linspace(-9, 9, 20001, dtype=torch.float64).view(-1, 1, 1)  # (N, B=1, D=1)
    z = q.rsample(eps)
    density = q.log_prob(z).exp().squeeze()
    assert torch.all(z[1:] > z[:-1])  # invertible: increasing in 1-D
    assert torch.trapezoid(density, z.squeeze()).item() == pytest.approx(1.0, abs=1e-4)


# --- the hierarchical VAE -----------------------------------------------------------------------


def test_a_hierarchical_model_of_one_layer_is_exactly_the_one_layer_vae():
    torch.manual_seed(0)
    flat = MLPVAE(latent_dim=3, hidden_dim=16, hidden_layers=2, activation="silu").eval()
    deep = HierarchicalVAE(latent_dim=3, layers=1, hidden_dim=16, hidden_layers=2, activation="silu").eval()
    ours = dict(deep.named_parameters())
    theirs = dict(flat.named_parameters())
    with torch.no_grad():
        for (a, b) in [("bottom_up.0.1", "encoder.1"), ("bottom_up.0.3", "encoder.3"), ("decoder.0", "decoder.0"),
                       ("decoder.2", "decoder.2"), ("decoder.4", "decoder.4"),
                       ("bottom_up_mean.0", "encoder_mean"), ("bottom_up_logvar.0", "encoder_std")]:
            for kind in ("weight", "bias"):
                ours[f"{a}.{kind}"].copy_(theirs[f"{b}.{kind}"])
    x = torch.rand(6, 1, 28, 28).bernoulli()
    assert _same_noise_numbers(deep, x) == _same_noise_numbers(flat, x)
    generator = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(deep.sample(4, generator()), flat.sample(4, generator()))


def test_decoder_input_all_feeds_every_layer_to_the_decoder_and_bottom_only_z1():
    torch.manual_seed(0)
    z = torch.randn(5, 7)  # layers of 4 (bottom) and 3 (top)
    moved = z.clone()
    moved[:, 4:] += 1.0  # the top layer only
    for decoder_input, top_matters in (("bottom", False), ("all", True)):
        for backbone in ("mlp", "conv"):
            model = HierarchicalVAE(latent_dim=3, layers=2, lower_dims=[4], hidden_dim=16, backbone=backbone,
                                    channels=2, decoder_input=decoder_input).eval()
            with torch.no_grad():
                changed = not torch.equal(model.decode(z), model.decode(moved))
            assert changed == top_matters, (decoder_input, backbone)
    # one layer: "all" is the bottom layer, the same network
    torch.manual_seed(1)
    one = HierarchicalVAE(latent_dim=3, layers=1, hidden_dim=16, decoder_input="all")
    torch.manual_seed(1)
    assert torch.equal(one.decode(z[:, :3]), HierarchicalVAE(latent_dim=3, layers=1, hidden_dim=16).decode(z[:, :3]))


class IdentityGaussian(Likelihood):
    """N(x; output, sigma^2): a linear decoder makes the model linear-Gaussian."""

    def __init__(self, sigma):
        super().__init__()
        self.sigma = sigma

    def log_prob(self, x, output):
        return (-0.5 * ((x - output) / self.sigma).pow(2) - math.log(self.sigma) - 0.5 * math.log(2 * math.pi)).sum((-3, -2, -1))

    def mean(self, output):
        return output


def _linear_two_layer(posterior_widening=1.0):
    """z2 ~ N(0, 1), z1 | z2 ~ N(a z2 + c, s^2), x | z1 ~ N(B z1 + b, sigma^2 I): p(x) and p(z | x) are Gaussian.

    With one-dimensional layers the ladder posterior can be the exact one: q(z2|x) from the joint
    Gaussian of (z2, x), and q(z1|z2, x) the precision-weighted product of p(z1|z2) with the
    likelihood's N(z1; B'(x - b)/B'B, sigma^2/B'B). posterior_widening > 1 multiplies q's variances.
    """
    a, c, s, sigma = 1.5, 0.3, 0.7, 0.4
    B, b = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), torch.tensor([0.2, 0.1, -0.3], dtype=torch.float64)
    model = HierarchicalVAE(latent_dim=1, layers=2, lower_dims=[1], hidden_layers=0, image_shape=(1, 1, 3),
                            prior=NormalPrior(1), likelihood=IdentityGaussian(sigma)).double()
    mean_x = b + B * c
    cov_x = (a**2 + s**2) * torch.outer(B, B) + sigma**2 * torch.eye(3, dtype=torch.float64)
    gain = a * B @ torch.linalg.inv(cov_x)  # E[z2 | x] = gain (x - mean_x)
    var_z2 = 1 - a**2 * B @ torch.linalg.inv(cov_x) @ B
    btb = B @ B
    widen = math.log(posterior_widening)
    with torch.no_grad():
        model.top_down_mean[0].weight.fill_(a)
        model.top_down_mean[0].bias.fill_(c)
        model.top_down_logvar[0].weight.zero_()
        model.top_down_logvar[0].bias.fill_(math.log(s**2))
        model.decoder[0].weight.copy_(B.view(3, 1))
        model.decoder[0].bias.copy_(b)
        model.bottom_up_mean[0].weight.copy_(B.view(1, 3) / btb)
        model.bottom_up_mean[0].bias.fill_(-(B @ b).item() / btb.item())
        model.bottom_up_logvar[0].weight.zero_()
        model.bottom_up_logvar[0].bias.fill_(math.log(sigma**2 / btb.item()) + widen)
        model.bottom_up_mean[1].weight.copy_(gain.view(1, 3))
        model.bottom_up_mean[1].bias.fill_(-(gain @ mean_x).item())
        model.bottom_up_logvar[1].weight.zero_()
        model.bottom_up_logvar[1].bias.fill_(var_z2.log().item() + widen)
    x = torch.distributions.MultivariateNormal(mean_x, cov_x).sample((300,))
    exact = torch.distributions.MultivariateNormal(mean_x, cov_x).log_prob(x).mean().item()
    return model.eval(), x.view(300, 1, 1, 3), exact


def test_with_the_exact_posterior_every_bound_of_a_two_layer_linear_model_is_log_px():
    torch.manual_seed(0)
    model, x, exact = _linear_two_layer()
    assert -importance_weighted_nll(model, x, k=3, batch_size=100) == pytest.approx(exact, abs=1e-9)  # every weight is p(x)
    assert -IWAE(k=1)(model, x).total.item() == pytest.approx(exact, abs=1e-9)  # the one-sample ELBO, pointwise
    # the ELBO objective (analytic KL of each layer given the sampled layer above) is log p(x) in expectation
    torch.manual_seed(1)
    elbo = ELBO(alpha=1.0)(model, x.repeat(200, 1, 1, 1))
    assert -elbo.total.item() == pytest.approx(exact, abs=0.02)


def test_the_iw_bound_of_a_two_layer_model_approaches_log_px_from_below_as_k_grows():
    torch.manual_seed(0)
    model, x, exact = _linear_two_layer(posterior_widening=4.0)  # a too-wide posterior: the ELBO is loose
    bounds = [importance_weighted_nll(model, x, k=k, batch_size=300, seed=0) for k in (1, 10, 100, 2000)]
    assert all(bound > -exact for bound in bounds)
    assert bounds[0] > bounds[1] > bounds[2] > bounds[3]
    assert bounds[-1] + exact < 0.02 < bounds[0] + exact


def test_the_kl_per_layer_adds_up_to_the_kl_and_matches_its_monte_carlo_estimate():
    torch.manual_seed(0)
    model = HierarchicalVAE(latent_dim=2, layers=3, lower_dims=[4, 3], hidden_dim=16).double().eval()
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    q = model.posterior(x)
    z = q.rsample(samples=40000)
    layers = model.kl_layers(q, z)
    assert layers.shape == (40000, 3, 3)
    torch.testing.assert_close(layers.sum(-1), model.kl(q, z))
    monte_carlo = (q.log_prob(z) - model.prior_log_prob(z)).mean(0)
    assert torch.allclose(model.kl(q, z).mean(0), monte_carlo, atol=0.05)
    torch.testing.assert_close(q.log_prob(z.clone()), q.log_prob(z))  # any z, not only its own draws, is scored
    assert len(kl_per_layer(model, x, batch_size=2)) == 3
    model.float()
    assert model.sample_prior(5).shape == (5, 9) and model.decode(z[0].float()).shape == (3, 1, 28, 28)


# --- bad input: one line, before any work -------------------------------------------------------


class ClosedFormOnlyPrior(Prior):
    """A prior that can give the KL of a Gaussian and nothing else."""

    closed_form_kl = True

    def __init__(self, latent_dim, image_shape=None):
        super().__init__()

    def kl(self, mu, logvar):
        return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


@pytest.mark.parametrize("overrides, message", [
    (["posterior=iaf", "posterior.steps=0"], r"posterior \(IAF\) with no steps is the diagonal posterior.*use posterior=diagonal"),
    (["posterior=planar", "posterior.steps=-1"], "steps must be from 0 to 256"),
    (["posterior=iaf", "posterior.steps=100000"], r"posterior \(vae_lab.posteriors.IAF\) refuses .*steps must be from 0 to 256.*got steps=100000"),  # before 100,000 are built
    (["posterior=iaf", "posterior.hidden=100000000"], r"parameters, which need about .* Use smaller model.\*, posterior.\* sizes"),
    (["posterior=iaf", "model=hvae"], "flow over a one-layer model's Gaussian; HierarchicalVAE builds its own posterior"),
    (["posterior=planar", "loss=beta_tcvae"], "loss=beta_tcvae needs the diagonal Gaussian posterior of a one-layer model"),
    (["model=hvae", "loss=dip_vae", "loss.dip_type=ii"], "dip_type=ii needs the diagonal Gaussian posterior"),
    (["model=hvae", "model.layers=1000"], "layers must be between 1 and 64, got 1000"),
    (["model=hvae", "model.layers=3", "model.lower_dims=[8]"], "lower_dims lists 1 sizes for the 2 layers below the top"),
    (["model=hvae", "model.layers=0"], "layers must be between 1 and 64, got 0"),
    (["model=hvae", "model.decoder_input=top"], r"decoder_input one of \('bottom', 'all'\).*'top'"),
])
def test_a_posterior_or_hierarchy_that_cannot_work_is_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(*overrides))


def test_a_hierarchy_that_does_not_fit_the_images_and_a_flow_whose_prior_cannot_score_are_refused():
    cfg = compose_config("model=hvae", "model.backbone=conv")
    with pytest.raises(ConfigError, match="backbone=conv halves the image twice and needs at least 4 x 4 pixels"):
        validate(cfg, image_shape=(1, 3, 3))
    prior = OmegaConf.create({"_target_": f"{__name__}.ClosedFormOnlyPrior"})
    cfg = compose_config("posterior=iaf")
    with pytest.raises(ConfigError, match="needs a prior that scores its samples .*ClosedFormOnlyPrior has none"):
        build_vae(cfg.model, prior, cfg.loss, (1, 28, 28), cfg.posterior)
