"""Samplers: where the latent codes of generated images come from.

A sampler has a `name` and `latents(n, generator) -> z (n, latent_dim)`, drawn on the
CPU from `generator` so that a seed gives the same codes on every device; images come
from decoding z. `prior` draws from the model's prior. `gmm` is ex-post density
estimation (Ghosh et al. 2020): a Gaussian mixture fitted to the posterior means of
the training images, which follows the codes where the encoder actually put them
(at alpha < 1 they spread beyond N(0, I), and prior samples fall between the digits).
"""
from __future__ import annotations

import logging

import torch

from vae_lab.options import SAMPLERS

log = logging.getLogger(__name__)


class SamplerUnavailable(Exception):
    """A sampler cannot be fitted to what there is (e.g. too few training codes); the reason is the message."""


def prior_latents(model, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n codes (n, latent_dim) from the model's prior, on the CPU."""
    return model.sample_prior(n, generator=generator).cpu()


@torch.no_grad()
def decode_images(model, z: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Images (n, C, H, W) in [0, 1] decoded from codes z (n, latent_dim), on the model's device."""
    device = next(model.parameters()).device
    return torch.cat([model.mean(model.decode(batch.to(device))) for batch in z.split(batch_size)])


class PriorSampler:
    name = "prior"

    def __init__(self, model):
        self.model = model

    def latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return prior_latents(self.model, n, generator)


MAX_MIXTURE_BYTES = 2 * 2**30  # what the gmm sampler's covariance arrays may take


class GaussianMixtureSampler:
    """A full-covariance Gaussian mixture over the posterior means of the training images."""

    name = "gmm"

    def __init__(self, train_means: torch.Tensor, components: int, seed: int):
        from sklearn.mixture import GaussianMixture

        if len(train_means) < 2:
            raise SamplerUnavailable(f"a Gaussian mixture needs at least 2 training codes, and there is {len(train_means)}")
        count, dims = min(components, len(train_means)), train_means.shape[1]
        # scikit-learn keeps several float64 (K, D, D) arrays (covariances, precisions, their Cholesky factors).
        needed = 4 * count * dims * dims * 8
        if needed > MAX_MIXTURE_BYTES:
            raise SamplerUnavailable(
                f"{count} full {dims} x {dims} covariances need about {needed / 2**30:.1f} GiB "
                f"(the limit is {MAX_MIXTURE_BYTES / 2**30:.0f} GiB): lower evaluate.gmm_components or model.latent_dim")
        log.info("fitting the gmm sampler: %d full-covariance components to %d training codes", count, len(train_means))
        self.mixture = GaussianMixture(n_components=count, covariance_type="full", random_state=seed)
        self.mixture.fit(train_means.detach().cpu().double().numpy())

    def latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        # scikit-learn draws from its own random_state: seed it from the generator, so the
        # generator alone decides the codes, as it does for the prior.
        self.mixture.random_state = int(torch.randint(2**31 - 1, (1,), generator=generator))
        z, _ = self.mixture.sample(n)  # (n, D), grouped by component: shuffled below
        order = torch.randperm(n, generator=generator)
        return torch.as_tensor(z, dtype=torch.float32)[order]


def make_sampler(name: str, model, *, train_means: torch.Tensor | None, components: int, seed: int):
    """The sampler called `name` (one of options.SAMPLERS); gmm is fitted to train_means (N, latent_dim)."""
    if name == "prior":
        return PriorSampler(model)
    if name == "gmm":
        return GaussianMixtureSampler(train_means, components, seed)
    raise ValueError(f"unknown sampler {name!r}; choose from {SAMPLERS}")
