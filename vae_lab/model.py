"""The VAE models: a convolutional one (the reference architecture) and the classic MLP.

Both map images (B, 1, 28, 28) in [0, 1] to a diagonal Gaussian q(z|x) and decode a
latent z (B, latent_dim) to Bernoulli logits over the pixels. The decoder's last
module is a Sigmoid, as in the reference printout; the loss works on the logits
before it (`decode_logits`) for numerical stability.
"""
from __future__ import annotations

import torch
from torch import nn

IMAGE_SHAPE = (1, 28, 28)


class VAE(nn.Module):
    """What every model shares: reparameterisation, decoding, sampling.

    A subclass defines `encode(x) -> (mu, logvar)` and an `nn.Sequential` called
    `decoder` whose last module is the Sigmoid that turns logits into intensities.
    """

    latent_dim: int

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Pixel logits (B, 1, 28, 28): the decoder without its final Sigmoid."""
        *body, _sigmoid = self.decoder
        for layer in body:
            z = layer(z)
        return z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixel intensities (B, 1, 28, 28) in [0, 1]."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, mu, logvar); z is drawn from q(z|x), so the output is random."""
        mu, logvar = self.encode(x)
        return self.decode(reparameterize(mu, logvar)), mu, logvar

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images (n, 1, 28, 28) decoded from z ~ N(0, I).

        z is drawn on the CPU (from `generator`, a CPU generator, if given), so a seed
        gives the same samples on every device.
        """
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, generator=generator)
        return self.decode(z.to(device))


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I) (or the given noise, same shape as mu)."""
    if noise is None:
        noise = torch.randn_like(mu)
    return mu + torch.exp(0.5 * logvar) * noise


class ConvVAE(VAE):
    """The reference convolutional VAE (96,481 parameters with the defaults).

    Encoder: three strided convolutions 28 -> 14 -> 7 -> 2, flattened to
    4 * base_channels * 2 * 2 features, then two MLP heads. `encoder_mean` gives the
    posterior mean; `encoder_std` gives the posterior *log-variance* (the reference's
    name is kept so the printout matches). The decoder mirrors the encoder.
    """

    def __init__(self, latent_dim: int = 16, hidden_dim: int = 64, base_channels: int = 16):
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        c1, c2 = base_channels, 2 * base_channels
        features = c2 * 2 * 2
        self.latent_dim = latent_dim
        self.encoder_conv = nn.Sequential(
            nn.Conv2d(1, c1, kernel_size=4, stride=2, padding=1),  # (B, c1, 14, 14)
            BatchNorm2d(c1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, kernel_size=4, stride=2, padding=1),  # (B, c2, 7, 7)
            BatchNorm2d(c2),
            nn.ReLU(),
            nn.Conv2d(c2, c2, kernel_size=5, stride=2),  # (B, c2, 2, 2)
            BatchNorm2d(c2),
            nn.Flatten(),  # (B, 4 * c2)
        )
        self.encoder_mean = _mlp_head(features, hidden_dim, latent_dim)
        self.encoder_std = _mlp_head(features, hidden_dim, latent_dim)
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, features),
            nn.Unflatten(1, [c2, 2, 2]),  # a list, as in the reference printout
            nn.ConvTranspose2d(c2, c2, kernel_size=5, stride=2),  # (B, c2, 7, 7)
            BatchNorm2d(c2),
            nn.ReLU(),
            nn.ConvTranspose2d(c2, c1, kernel_size=4, stride=2, padding=1),  # (B, c1, 14, 14)
            BatchNorm2d(c1),
            nn.ReLU(),
            nn.ConvTranspose2d(c1, 1, kernel_size=4, stride=2, padding=1),  # (B, 1, 28, 28)
            nn.Sigmoid(),
        )

    def _get_name(self) -> str:
        # The reference printout calls the class "Model"; keep print(model) identical.
        return "Model"

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder_conv(x)
        return self.encoder_mean(h), self.encoder_std(h)


class MLPVAE(VAE):
    """The classic fully connected VAE: 784 -> hidden -> latent and back."""

    def __init__(self, latent_dim: int = 20, hidden_dim: int = 400):
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        pixels = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]
        self.latent_dim = latent_dim
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(pixels, hidden_dim), nn.ReLU())
        self.encoder_mean = nn.Linear(hidden_dim, latent_dim)
        self.encoder_std = nn.Linear(hidden_dim, latent_dim)  # log-variance, as in ConvVAE
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, pixels),
            nn.Unflatten(1, IMAGE_SHAPE),
            nn.Sigmoid(),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.encoder_mean(h), self.encoder_std(h)


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d that prints as torch did when the reference was written.

    Newer torch releases add `bias=True` to the printout; the layer is the same.
    """

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )


def _mlp_head(features: int, hidden_dim: int, latent_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(features, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, latent_dim))
