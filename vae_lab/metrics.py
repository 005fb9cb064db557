"""Evaluation metrics: encodings, the importance-weighted bound on -log p(x), active units.

All in nats per image, and all through the model's own posterior, prior and likelihood
(vae_lab.model.VAE), so they hold for any prior, likelihood or architecture. The
single-sample ELBO comes from the engine's evaluation pass, so training and evaluation
report the same number for the same weights.
"""
from __future__ import annotations

import math

import torch

from vae_lab.data import image_batches
from vae_lab.engine import progress

# Decoder evaluations per forward pass of the IW bound (images x samples), on any k:
# on the CPU small passes stay in cache (256 ConvVAE decodings: ~15 MB of
# activations); on a GPU large ones fill the device (16,384: ~1 GB).
IW_CHUNK = {"cpu": 256, "cuda": 16384}
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2016): Cov_x(E_q[z|x]) above this


@torch.no_grad()
def encode_all(model, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Posterior means (N, D) of all images, in evaluation mode, and their log-variances where
    the posterior is a diagonal Gaussian (else None: a flow or hierarchical posterior has none)."""
    model.eval()
    posteriors = [model.posterior(batch) for batch in image_batches(images, batch_size)]
    means = torch.cat([q.mean for q in posteriors])
    gaussian = all(q.gaussian is not None for q in posteriors)
    return means, torch.cat([q.gaussian[1] for q in posteriors]) if gaussian else None


def active_units(mu: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> torch.Tensor:
    """Which latent dimensions are in use: variance over the data of E_q[z|x] above threshold. (D,) bool.

    One image has no variance: none is active (rather than torch's NaN and its warning)."""
    if len(mu) < 2:
        return torch.zeros(mu.shape[1], dtype=torch.bool, device=mu.device)
    return mu.var(dim=0, unbiased=True) > threshold


def mean_kl_per_dimension(prior, mu: torch.Tensor, logvar: torch.Tensor | None) -> torch.Tensor | None:
    """KL to the prior of each latent dimension, averaged over the images (D,); None where the
    prior does not factorise over dimensions (a mixture) or the posterior is not a diagonal
    Gaussian (logvar None), so no per-dimension KL exists."""
    return prior.kl(mu, logvar).mean(0) if prior.closed_form_kl and logvar is not None else None


@torch.no_grad()
def kl_per_layer(model, images: torch.Tensor, batch_size: int, seed: int = 0) -> list[float]:
    """The KL of each stochastic layer (bottom to top), nats per image averaged over the images, at
    one z per image from q(z|x) (the closed form or analytic conditional where the model has one)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(len(model.layer_sizes), dtype=torch.float64)
    with model.prior_frozen():
        for x in image_batches(images, batch_size):
            q = model.posterior(x)
            z = q.rsample(q.standard_noise(generator=generator))
            total += model.kl_layers(q, z).double().sum(0).cpu()
    return (total / len(images)).tolist()


@torch.no_grad()
def reconstruction_mse(model, images: torch.Tensor, batch_size: int) -> float:
    """Mean squared error per pixel of the reconstruction from the posterior mean."""
    model.eval()
    total = sum((model.reconstruct(batch) - batch).pow(2).sum().item() for batch in image_batches(images, batch_size))
    return total / images.numel()


@torch.no_grad()
def importance_weighted_nll(model, images: torch.Tensor, k: int, *, batch_size: int, seed: int = 0, chunk: int | None = None) -> float:
    """-log p(x) estimated with the k-sample importance-weighted bound (Burda et al., 2016).

    log p(x) >= E[log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x)], z_i ~ q(z|x). The k
    samples are taken in chunks and combined with a running logsumexp, so memory
    depends on `chunk`, not on k. Returns the mean over images, in nats (a true
    log-likelihood bound only where the likelihood is a normalised density of the data).
    """
    model.eval()
    chunk = chunk or IW_CHUNK.get(images.device.type, IW_CHUNK["cpu"])
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    images_per_pass = max(1, min(batch_size, chunk))
    with model.prior_frozen():
        for x in progress(image_batches(images, images_per_pass), f"IW bound (k={k})", total=-(-len(images) // images_per_pass)):  # (B, C, H, W)
            total += _iw_log_ratio_sum(model, x, k, chunk, generator)
    return total / len(images)


def _iw_log_ratio_sum(model, x: torch.Tensor, k: int, chunk: int, generator: torch.Generator) -> float:
    """Sum over the images x (B, C, H, W) of log k - log sum_i w_i, the k samples in chunks."""
    q = model.posterior(x)  # (B, D)
    samples_per_pass = max(1, chunk // len(x))
    log_sum = torch.full((len(x),), -math.inf, dtype=torch.float64, device=x.device)
    done = 0
    while done < k:
        c = min(samples_per_pass, k - done)
        log_w = model.log_weights(x, q.rsample(q.standard_noise(c, generator)), q)  # (c, B)
        log_sum = torch.logaddexp(log_sum, torch.logsumexp(log_w.double(), dim=0))
        done += c
    return (math.log(k) - log_sum).sum().item()
