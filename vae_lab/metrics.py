"""Evaluation metrics: encodings, the importance-weighted bound on -log p(x), active units.

All in nats per image. The single-sample ELBO comes from the engine's evaluation
pass, so training and evaluation report the same number for the same weights.
"""
from __future__ import annotations

import math

import torch

from vae_lab.loss import kl_per_dimension, log_diagonal_normal, log_standard_normal, reconstruction_nll

# Decoder evaluations per forward pass of the IW bound (images x samples), on any k:
# on the CPU small passes stay in cache (256 ConvVAE decodings: ~15 MB of
# activations); on a GPU large ones fill the device (16,384: ~1 GB).
IW_CHUNK = {"cpu": 256, "cuda": 16384}
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2016): Cov_x(E_q[z|x]) above this


@torch.no_grad()
def encode_all(model, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and log-variances (N, D) of all images, in evaluation mode."""
    model.eval()
    pairs = [model.encode(batch) for batch in images.split(batch_size)]
    return torch.cat([mu for mu, _ in pairs]), torch.cat([logvar for _, logvar in pairs])


def active_units(mu: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> torch.Tensor:
    """Which latent dimensions are in use: variance over the data of E_q[z|x] above threshold. (D,) bool."""
    return mu.var(dim=0, unbiased=True) > threshold


def mean_kl_per_dimension(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL to the prior of each latent dimension, averaged over the images: (D,)."""
    return kl_per_dimension(mu, logvar).mean(0)


@torch.no_grad()
def reconstruction_mse(model, images: torch.Tensor, batch_size: int) -> float:
    """Mean squared error per pixel of the reconstruction from the posterior mean."""
    model.eval()
    total = 0.0
    for batch in images.split(batch_size):
        mu, _ = model.encode(batch)
        total += (model.decode(mu) - batch).pow(2).sum().item()
    return total / images.numel()


@torch.no_grad()
def importance_weighted_nll(
    model,
    images: torch.Tensor,
    k: int,
    reconstruction: str,
    *,
    batch_size: int,
    seed: int = 0,
    chunk: int | None = None,
) -> float:
    """-log p(x) estimated with the k-sample importance-weighted bound (Burda et al., 2016).

    log p(x) >= E[log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x)], z_i ~ q(z|x). The k
    samples are taken in chunks and combined with a running logsumexp, so memory
    depends on `chunk`, not on k. Returns the mean over images, in nats (for the mse
    loss, up to the same constant as its reconstruction term).
    """
    model.eval()
    chunk = chunk or IW_CHUNK.get(images.device.type, IW_CHUNK["cpu"])
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    images_per_pass = max(1, min(batch_size, chunk))
    for x in images.split(images_per_pass):  # (B, 1, 28, 28)
        mu, logvar = model.encode(x)  # (B, D)
        samples_per_pass = max(1, chunk // len(x))
        log_sum = torch.full((len(x),), -math.inf, dtype=torch.float64, device=x.device)
        done = 0
        while done < k:
            c = min(samples_per_pass, k - done)
            eps = torch.randn(c, *mu.shape, generator=generator).to(x.device)  # (c, B, D)
            z = mu + torch.exp(0.5 * logvar) * eps
            logits = model.decode_logits(z.flatten(0, 1)).view(c, *x.shape)  # (c, B, 1, 28, 28)
            log_px_z = -reconstruction_nll(x, logits, reconstruction)  # (c, B)
            log_w = log_px_z + log_standard_normal(z) - log_diagonal_normal(z, mu, logvar)  # (c, B)
            log_sum = torch.logaddexp(log_sum, torch.logsumexp(log_w.double(), dim=0))
            done += c
        total += (math.log(k) - log_sum).sum().item()
    return total / len(images)
