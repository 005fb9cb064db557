"""The VAE objective, in one place: reconstruction term + alpha * KL(q(z|x) || N(0, I)).

All terms are per image, in nats, summed over pixels (reconstruction) and latent
dimensions (KL). The reconstruction term is computed from the decoder's logits, so it
stays finite on all-black or all-white images.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from vae_lab.options import RECONSTRUCTIONS


class LossTerms(NamedTuple):
    """Batch means of the per-image terms; `total = recon + alpha * kl`."""

    total: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor


def kl_per_dimension(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) for each image and latent dimension: (B, D)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def reconstruction_nll(x: torch.Tensor, logits: torch.Tensor, kind: str) -> torch.Tensor:
    """-log p(x|z) per image, summed over the pixels (the last three dimensions).

    x (..., 1, 28, 28) broadcasts against logits (..., 1, 28, 28), so k samples per
    image (k, B, 1, 28, 28) are scored against x (B, 1, 28, 28) without copying x.
    bce: Bernoulli likelihood, softplus(l) - x * l, stable for any logit (exact for
    binary x; the usual surrogate for intensities).
    mse: squared error, i.e. the NLL of a Gaussian with variance 1/2 less its
    constant (D/2) log(pi); every "nats" figure of an mse model carries that offset.
    """
    if kind == "bce":
        per_pixel = F.softplus(logits) - x * logits
    elif kind == "mse":
        per_pixel = (torch.sigmoid(logits) - x).pow(2)
    else:
        raise ValueError(f"unknown reconstruction loss {kind!r}; choose one of {RECONSTRUCTIONS}")
    return per_pixel.sum((-3, -2, -1))


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last dimension."""
    return -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(-1)


def log_diagonal_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the last dimension."""
    return -0.5 * ((z - mu).pow(2) / logvar.exp() + logvar + math.log(2 * math.pi)).sum(-1)


class VAELoss:
    """reconstruction + alpha * KL, batch-averaged; `alpha` is train.alpha."""

    def __init__(self, reconstruction: str = "bce", alpha: float = 1.0):
        if reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"unknown reconstruction loss {reconstruction!r}; choose one of {RECONSTRUCTIONS}")
        self.reconstruction = reconstruction
        self.alpha = float(alpha)

    def __call__(self, x: torch.Tensor, logits: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> LossTerms:
        recon = reconstruction_nll(x, logits, self.reconstruction).mean()
        kl = kl_per_dimension(mu, logvar).sum(1).mean()
        return LossTerms(recon + self.alpha * kl, recon, kl)

    def __repr__(self) -> str:
        return f"VAELoss(reconstruction={self.reconstruction!r}, alpha={self.alpha})"
