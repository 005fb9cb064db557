import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from vae_lab.loss import VAELoss, kl_per_dimension, reconstruction_nll


def test_kl_is_zero_at_the_prior():
    mu, logvar = torch.zeros(3, 4), torch.zeros(3, 4)
    assert torch.equal(kl_per_dimension(mu, logvar), torch.zeros(3, 4))


def test_kl_closed_form_values():
    # KL(N(1, 1) || N(0, 1)) = 1/2;  KL(N(0, e^2) || N(0, 1)) = (e^2 - 1 - 2) / 2
    kl = kl_per_dimension(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]))
    torch.testing.assert_close(kl, torch.tensor([[0.5, (math.exp(2) - 3) / 2]]))


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(8, 5), torch.randn(8, 5)
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0))
    torch.testing.assert_close(kl_per_dimension(mu, logvar), expected)


def test_bce_from_logits_equals_bce_of_probabilities():
    torch.manual_seed(0)
    x, logits = torch.rand(4, 1, 28, 28), torch.randn(4, 1, 28, 28)
    expected = F.binary_cross_entropy(torch.sigmoid(logits), x, reduction="none").flatten(1).sum(1)
    torch.testing.assert_close(reconstruction_nll(x, logits, "bce"), expected)


def test_mse_is_summed_squared_error():
    x, logits = torch.full((2, 1, 28, 28), 0.25), torch.zeros(2, 1, 28, 28)  # sigmoid(0) = 0.5
    torch.testing.assert_close(reconstruction_nll(x, logits, "mse"), torch.full((2,), 784 * 0.0625))


@pytest.mark.parametrize("reconstruction", ["bce", "mse"])
@pytest.mark.parametrize("pixel", [0.0, 1.0])
def test_loss_is_finite_on_all_black_and_all_white_images(reconstruction, pixel):
    x = torch.full((4, 1, 28, 28), pixel)
    logits = torch.full((4, 1, 28, 28), 200.0 if pixel == 0 else -200.0, requires_grad=True)  # confidently wrong
    mu, logvar = torch.zeros(4, 2, requires_grad=True), torch.zeros(4, 2, requires_grad=True)
    terms = VAELoss(reconstruction, alpha=1.0)(x, logits, mu, logvar)
    terms.total.backward()
    assert all(torch.isfinite(t) for t in terms)
    assert torch.isfinite(logits.grad).all()


def test_total_is_recon_plus_alpha_times_kl_per_image():
    torch.manual_seed(0)
    x, logits = torch.rand(6, 1, 28, 28), torch.randn(6, 1, 28, 28)
    mu, logvar = torch.randn(6, 3), torch.randn(6, 3)
    terms = VAELoss("bce", alpha=0.1)(x, logits, mu, logvar)
    torch.testing.assert_close(terms.recon, reconstruction_nll(x, logits, "bce").mean())
    torch.testing.assert_close(terms.kl, kl_per_dimension(mu, logvar).sum(1).mean())
    torch.testing.assert_close(terms.total, terms.recon + 0.1 * terms.kl)


def test_unknown_reconstruction_is_refused():
    with pytest.raises(ValueError, match="unknown reconstruction loss 'l1'"):
        VAELoss("l1")
