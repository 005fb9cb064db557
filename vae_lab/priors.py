"""Priors p(z): the standard normal, a learned mixture of Gaussians, and the VampPrior.

A prior is an nn.Module of the VAE (so its parameters train and checkpoint with it):
`log_prob(z, posterior)` -> (...,) for z (..., D), `sample(n, generator, posterior)` ->
(n, D) on the prior's device, and, where the KL to a diagonal Gaussian posterior has a
closed form, `kl(mu, logvar)` -> (B, D). `posterior` is the model's encoder
x -> (mu, logvar), which the VampPrior needs; the others ignore it.

Samples are drawn on the CPU from `generator` (a CPU generator) and then moved, so a
seed gives the same latents on every device.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from vae_lab.options import Count
from vae_lab.posteriors import log_diagonal_normal  # noqa: F401 (also imported from here)


class Prior(nn.Module):
    closed_form_kl = False
    implicit = False  # left out of print(model), see likelihoods.Likelihood

    def log_prob(self, z: torch.Tensor, posterior=None) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None, posterior=None) -> torch.Tensor:
        raise NotImplementedError

    def kl(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no closed-form KL; use a Monte-Carlo estimate")

    @contextmanager
    def frozen(self, posterior=None):
        """Within: the prior's parameters are taken as fixed (evaluation), so a prior that
        derives them (the VampPrior encodes its pseudo-inputs) does so once, not per call."""
        yield


class NormalPrior(Prior):
    """N(0, I): the reference's prior, with the closed-form KL."""

    closed_form_kl = True
    implicit = True

    def __init__(self, latent_dim: int, image_shape=None):
        super().__init__()
        self.latent_dim = latent_dim
        self.register_buffer("_device_anchor", torch.zeros(0), persistent=False)

    def log_prob(self, z, posterior=None):
        return -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(-1)

    def sample(self, n, generator=None, posterior=None):
        return torch.randn(n, self.latent_dim, generator=generator).to(self._device_anchor.device)

    def kl(self, mu, logvar):
        return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


class _Mixture(Prior):
    """A uniform or learned mixture of diagonal Gaussians, given by its component parameters."""

    _fixed_components = None

    @contextmanager
    def frozen(self, posterior=None):
        with torch.no_grad():
            self._fixed_components = self.components_of(posterior)
        try:
            yield
        finally:
            self._fixed_components = None

    def _components(self, posterior):
        return self._fixed_components if self._fixed_components is not None else self.components_of(posterior)

    def components_of(self, posterior) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(means (K, D), log-variances (K, D), mixture logits (K,))."""
        raise NotImplementedError

    def log_prob(self, z, posterior=None):
        return mixture_log_prob(z, *self._components(posterior))

    def sample(self, n, generator=None, posterior=None):
        means, logvars, logits = self._components(posterior)
        chosen = torch.multinomial(logits.detach().softmax(0).cpu(), n, replacement=True, generator=generator)
        noise = torch.randn(n, means.shape[1], generator=generator).to(means.device)
        chosen = chosen.to(means.device)
        return means[chosen] + torch.exp(0.5 * logvars[chosen]) * noise


def mixture_log_prob(z: torch.Tensor, means: torch.Tensor, logvars: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log sum_k softmax(logits)_k N(z; means_k, diag(exp(logvars_k))) for z (..., D) -> (...).

    The same number as torch.distributions.MixtureSameFamily (tests compare them), computed
    with (z - m)^2 / v expanded into two matrix products: MixtureSameFamily broadcasts a
    (..., K, D) tensor through every step, which made a 500-component VampPrior 6x slower
    than the whole rest of a training step on the CPU.
    """
    precision = torch.exp(-logvars)  # (K, D)
    squared = (z * z) @ precision.T - 2 * z @ (means * precision).T + (means * means * precision).sum(-1)  # (..., K)
    log_components = -0.5 * (squared + logvars.sum(-1) + means.shape[-1] * math.log(2 * math.pi))
    return torch.logsumexp(log_components + logits.log_softmax(0), dim=-1)


class MixturePrior(_Mixture):
    """A learned mixture of `components` diagonal Gaussians (means spread at start, unit variances)."""

    def __init__(self, latent_dim: int, components: Count = 10, image_shape=None):
        super().__init__()
        if components < 1:
            raise ValueError(f"components must be >= 1, got {components}")
        self.means = nn.Parameter(torch.randn(components, latent_dim))
        self.logvars = nn.Parameter(torch.zeros(components, latent_dim))
        self.logits = nn.Parameter(torch.zeros(components))

    def components_of(self, posterior=None):
        return self.means, self.logvars, self.logits


class VampPrior(_Mixture):
    """Tomczak & Welling (2018): the mean of the posteriors of `components` learned pseudo-inputs.

    The pseudo-inputs are images (K, C, H, W) in [0, 1] (a sigmoid of free parameters),
    encoded by the model's own encoder at every use, so the prior follows the encoder.
    """

    def __init__(self, latent_dim: int, image_shape=(1, 28, 28), components: Count = 500):
        super().__init__()
        if components < 1:
            raise ValueError(f"components must be >= 1, got {components}")
        # Start as faint noise around a dark image, like the data's mostly black pixels.
        self.pseudo_inputs = nn.Parameter(torch.randn(components, *image_shape) * 0.5 - 2.0)
        self.register_buffer("uniform_logits", torch.zeros(components), persistent=False)

    def components_of(self, posterior):
        if posterior is None:
            raise ValueError("the VampPrior needs the model's encoder (posterior) to evaluate")
        with batch_statistics_frozen(posterior):
            means, logvars = posterior(torch.sigmoid(self.pseudo_inputs))
        return means, logvars, self.uniform_logits


@contextmanager
def batch_statistics_frozen(posterior):
    """The encoder's BatchNorm layers in eval mode for the duration: pseudo-inputs are
    normalised with the running statistics of real images, and never move them (gradients
    still reach the pseudo-inputs and the encoder)."""
    owner = getattr(posterior, "__self__", None)
    layers = [m for m in owner.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training] \
        if isinstance(owner, nn.Module) else []
    for layer in layers:
        layer.eval()
    try:
        yield
    finally:
        for layer in layers:
            layer.train()
