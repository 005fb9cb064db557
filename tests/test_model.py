from pathlib import Path

import pytest
import torch

from vae_lab.model import ConvVAE, MLPVAE

REFERENCE_PRINTOUT = (Path(__file__).parent / "data" / "reference_printout.txt").read_text().rstrip("\n")


def test_conv_vae_prints_exactly_as_the_reference():
    assert repr(ConvVAE()) == REFERENCE_PRINTOUT


def test_conv_vae_has_the_reference_parameter_count():
    assert sum(p.numel() for p in ConvVAE().parameters()) == 96_481


@pytest.mark.parametrize("model_class", [ConvVAE, MLPVAE])
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
    assert model.decode_logits(z).shape == (5, 1, 28, 28)
    assert model.sample(7).shape == (7, 1, 28, 28)


@pytest.mark.parametrize("model_class", [ConvVAE, MLPVAE])
def test_decode_is_the_sigmoid_of_decode_logits(model_class):
    model = model_class(latent_dim=3).eval()
    z = torch.randn(4, 3)
    torch.testing.assert_close(model.decode(z), torch.sigmoid(model.decode_logits(z)))


def test_sample_is_reproducible_from_a_generator():
    model = ConvVAE(latent_dim=2).eval()
    first = model.sample(4, generator=torch.Generator().manual_seed(3))
    second = model.sample(4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)


@pytest.mark.parametrize("model_class", [ConvVAE, MLPVAE])
def test_rejects_an_empty_latent(model_class):
    with pytest.raises(ValueError, match="latent_dim must be >= 1"):
        model_class(latent_dim=0)
