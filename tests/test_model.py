from pathlib import Path

import numpy as np
import pytest
import torch

from vae_lab.likelihoods import ContinuousBernoulli, Gaussian
from vae_lab.model import ConvVAE, MLPVAE, ResNetVAE
from vae_lab.priors import MixturePrior, VampPrior

REFERENCE_PRINTOUT = (Path(__file__).parent / "data" / "reference_printout.txt").read_text().rstrip("\n")


def test_conv_vae_prints_exactly_as_the_reference():
    assert repr(ConvVAE()) == REFERENCE_PRINTOUT


def test_conv_vae_has_the_reference_parameter_count():
    assert sum(p.numel() for p in ConvVAE().parameters()) == 96_481


def test_a_non_standard_prior_or_likelihood_shows_in_the_printout():
    model = ConvVAE(prior=MixturePrior(16, components=3), likelihood=Gaussian())
    assert "(prior): MixturePrior()" in repr(model) and "(likelihood): Gaussian()" in repr(model)
    assert repr(model).replace("  (prior): MixturePrior()\n  (likelihood): Gaussian()\n", "") == REFERENCE_PRINTOUT


@pytest.mark.parametrize("model_class", [ConvVAE, MLPVAE, ResNetVAE])
@pytest.mark.parametrize("latent_dim", [1, 2, 16])
def test_shapes(model_class, latent_dim):
    model = model_class(latent_dim=latent_dim)
    x = torch.rand(5, 1, 28, 28)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (5, latent_dim)
    reconstruction, mu2, logvar2 = model(x)
    assert reconstruction.shape == (5, 1, 28, 28)
    assert torch.equal(mu, mu2) and torch.equal(logvar, logvar2)
    assert 0 <= reconstruction.min() and reconstruction.max() <= 1
    z = torch.randn(5, latent_dim)
    assert model.decode(z).shape == (5, 1, 28, 28)
    assert model.sample(7).shape == (7, 1, 28, 28)


@pytest.mark.parametrize("model_class", [ConvVAE, MLPVAE, ResNetVAE])
@pytest.mark.parametrize("image_shape", [(1, 32, 32), (3, 28, 28), (1, 27, 29), (1, 20, 20), (3, 32, 32), (3, 64, 64)])
def test_models_take_the_image_shape_from_the_data(model_class, image_shape):
    model = model_class(latent_dim=3, image_shape=image_shape).eval()
    x = torch.rand(2, *image_shape)
    assert model.encode(x)[0].shape == (2, 3)
    assert model.decode(torch.randn(2, 3)).shape == (2, *image_shape)
    assert model.reconstruct(x).shape == x.shape


@pytest.mark.parametrize("model_class", [ConvVAE, MLPVAE])
def test_the_reference_decoder_ends_in_its_sigmoid_and_decode_stops_before_it(model_class):
    model = model_class(latent_dim=3).eval()
    z = torch.randn(4, 3)
    torch.testing.assert_close(model.mean(model.decode(z)), torch.sigmoid(model.decode(z)))
    if model_class is ConvVAE:
        torch.testing.assert_close(model.decoder(z), model.mean(model.decode(z)))


def test_pictures_use_the_likelihood_mean():
    model = MLPVAE(latent_dim=2, likelihood=ContinuousBernoulli()).eval()
    output = model.decode(torch.randn(3, 2))
    expected = torch.distributions.ContinuousBernoulli(logits=output).mean
    torch.testing.assert_close(model.mean(output), expected)


@pytest.mark.parametrize("prior", [MixturePrior(2, components=4), VampPrior(2, components=6)])
def test_samples_come_from_the_model_prior_and_are_seeded(prior):
    model = MLPVAE(latent_dim=2, hidden_dim=16, prior=prior).eval()
    first = model.sample_prior(5, torch.Generator().manual_seed(1))
    assert torch.equal(first, model.sample_prior(5, torch.Generator().manual_seed(1)))
    assert model.sample(5).shape == (5, 1, 28, 28)


def test_sample_is_reproducible_from_a_generator():
    model = ConvVAE(latent_dim=2).eval()
    first = model.sample(4, generator=torch.Generator().manual_seed(3))
    second = model.sample(4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)


@pytest.mark.parametrize("model_class", [ConvVAE, MLPVAE])
def test_rejects_an_empty_latent(model_class):
    with pytest.raises(ValueError, match="latent_dim must be >= 1"):
        model_class(latent_dim=0)


def test_the_vampprior_neither_uses_nor_moves_the_encoders_batch_statistics():
    torch.manual_seed(0)
    model = ConvVAE(latent_dim=4, prior=VampPrior(4, components=5))
    model.train()
    x = torch.rand(8, 1, 28, 28)
    model.encode(x)  # one training batch: the running statistics move from their start
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms, "the reference ConvVAE has BatchNorm layers"
    before = [(m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked)) for m in norms]
    means, logvars, _ = model.prior.components_of(model.top_gaussian)
    after = [(m.running_mean, m.running_var, int(m.num_batches_tracked)) for m in norms]
    for (mean0, var0, n0), (mean1, var1, n1) in zip(before, after):
        assert torch.equal(mean0, mean1) and torch.equal(var0, var1) and n0 == n1
    assert all(m.training for m in norms)  # the model is left in training mode
    model.eval()  # the pseudo-inputs were encoded as evaluation encodes an image: running statistics
    expected, _ = model.encode(torch.sigmoid(model.prior.pseudo_inputs))
    assert torch.allclose(means, expected, atol=1e-6)
    model.train()
    means.sum().backward()  # and the pseudo-inputs still learn
    assert model.prior.pseudo_inputs.grad is not None and model.prior.pseudo_inputs.grad.abs().sum() > 0


def test_image_grids_draw_colour_images_in_colour(tmp_path):
    from PIL import Image

    from vae_lab.plots import image_grid

    red, blue = torch.zeros(3, 8, 8), torch.zeros(3, 8, 8)
    red[0], blue[2] = 1.0, 1.0
    image_grid(torch.stack([red, blue]), tmp_path / "grid.png", nrow=2, title="colour")
    with Image.open(tmp_path / "grid.png") as png:
        pixels = torch.from_numpy(np.asarray(png.convert("RGB")).reshape(-1, 3).astype(np.int64))
    reddish = ((pixels[:, 0] > 200) & (pixels[:, 1] < 60) & (pixels[:, 2] < 60)).sum()
    blueish = ((pixels[:, 2] > 200) & (pixels[:, 0] < 60) & (pixels[:, 1] < 60)).sum()
    assert reddish > 50 and blueish > 50  # a grey grid of channel 0 would have neither
