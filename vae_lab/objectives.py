"""Training objectives: objective(model, x, noise) -> LossTerms. The engine only calls them.

Every term is per image, in nats, averaged over the batch. Besides the quantity that
is minimised (`total`), every objective reports the plain single-sample terms of the
ELBO at alpha = 1 (`recon` = -log p(x|z), `kl` = KL(q(z|x) || p(z))), so that runs with
different objectives, weights or tricks compare on one number, recon + kl.

The KL is the closed form where the prior has one (N(0, I)) and otherwise the
Monte-Carlo estimate log q(z|x) - log p(z) from the same z (VAE.kl decides).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from vae_lab.likelihoods import make_likelihood
from vae_lab.priors import log_diagonal_normal


class LossTerms(NamedTuple):
    """Batch means: what is minimised, and the -ELBO's two terms at alpha = 1."""

    total: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor


class Objective:
    """What every objective shares: its likelihood (built from `reconstruction`) and the warm-up.

    `kl_scale` multiplies the KL weight; the train task sets it each epoch for
    train.kl_warmup_epochs (0 -> 1 linearly), and it is 1 otherwise.
    """

    samples = 1  # latent samples per image per step

    def __init__(self, reconstruction: str = "bce"):
        self.reconstruction = reconstruction
        self.likelihood = make_likelihood(reconstruction)
        self.kl_scale = 1.0

    def noise_shape(self, latent_dim: int) -> tuple[int, ...]:
        """Shape of the standard-normal noise one image needs; evaluation passes fixed noise of it."""
        return (latent_dim,)

    def __call__(self, model, x: torch.Tensor, noise: torch.Tensor | None = None) -> LossTerms:
        raise NotImplementedError


class ELBO(Objective):
    """recon + alpha * KL with one z ~ q(z|x); `free_bits` nats of KL per latent dimension are free.

    Free bits (Kingma et al. 2016): each dimension's batch-mean KL counts as at least
    `free_bits` in the objective, so the optimiser gains nothing by collapsing it
    further. With a prior without closed-form KL the floor applies to the total KL
    (free_bits * latent_dim), since the KL does not split by dimension.
    """

    def __init__(self, reconstruction: str = "bce", alpha: float = 1.0, free_bits: float = 0.0):
        super().__init__(reconstruction)
        if alpha < 0 or free_bits < 0:
            raise ValueError(f"alpha and free_bits must be >= 0, got {alpha} and {free_bits}")
        self.alpha = float(alpha)
        self.free_bits = float(free_bits)

    def __call__(self, model, x, noise=None):
        mu, logvar = model.posterior(x)
        z = mu + torch.exp(0.5 * logvar) * (torch.randn_like(mu) if noise is None else noise)
        recon = -model.likelihood.log_prob(x, model.decode(z))  # (B,)
        kl = model.kl(z, mu, logvar)  # (B,)
        penalised = kl.mean()
        if self.free_bits > 0 and model.prior.closed_form_kl:
            penalised = model.prior.kl(mu, logvar).mean(0).clamp(min=self.free_bits).sum()
        elif self.free_bits > 0:
            penalised = penalised.clamp(min=self.free_bits * mu.shape[1])
        total = recon.mean() + self.alpha * self.kl_scale * penalised
        return LossTerms(total, recon.mean(), kl.mean())

    def __repr__(self) -> str:
        return f"ELBO(reconstruction={self.reconstruction!r}, alpha={self.alpha}, free_bits={self.free_bits})"


class IWAE(Objective):
    """The importance-weighted bound with k samples (Burda et al. 2016) as the objective.

    -log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x), z_i ~ q(z|x); k = 1 is the ELBO with a
    Monte-Carlo KL. `kl_scale` (warm-up) weights log p(z) - log q(z|x) inside the weights.
    The reported recon and kl are the ELBO's, averaged over the k samples.
    """

    def __init__(self, reconstruction: str = "bce", k: int = 5):
        super().__init__(reconstruction)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = int(k)
        self.samples = self.k

    def noise_shape(self, latent_dim):
        return (self.k, latent_dim)

    def __call__(self, model, x, noise=None):
        mu, logvar = model.posterior(x)  # (B, D)
        eps = torch.randn(self.k, *mu.shape, device=mu.device, dtype=mu.dtype) if noise is None else noise.transpose(0, 1)
        z = mu + torch.exp(0.5 * logvar) * eps  # (k, B, D)
        output = model.decode(z.flatten(0, 1)).unflatten(0, (self.k, x.shape[0]))
        log_px = model.likelihood.log_prob(x, output)  # (k, B)
        log_prior_ratio = model.prior_log_prob(z) - log_diagonal_normal(z, mu, logvar)  # (k, B)
        log_w = log_px + self.kl_scale * log_prior_ratio
        bound = torch.logsumexp(log_w, dim=0) - math.log(self.k)  # (B,)
        kl = model.kl(z, mu, logvar)  # (B,) closed form, or (k, B) Monte Carlo
        return LossTerms(-bound.mean(), -log_px.mean(), kl.mean())

    def __repr__(self) -> str:
        return f"IWAE(reconstruction={self.reconstruction!r}, k={self.k})"
