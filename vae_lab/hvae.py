"""The hierarchical VAE: several stochastic layers with top-down inference (the ladder VAE's form).

Generative model, top to bottom: z_L ~ p(z_L) (the `prior` group), z_l ~ N(mu_p, sigma_p^2)
from a top-down network of z_{l+1}, and x ~ p(x | z_1) (the likelihood). Inference runs
the same way down (Sonderby et al. 2016): a deterministic bottom-up pass d_1 .. d_L of x
gives each layer an estimate N(mu_b, sigma_b^2); q(z_L|x) is the top one, and below it
q(z_l | z_{l+1}, x) is the precision-weighted combination of the bottom-up estimate with
the top-down prior p(z_l | z_{l+1}). This form shares the generative path between
p and q (so the lower posteriors track their priors from the start, which keeps the
upper layers in use), needs no network beyond the two passes, and with one layer it is
exactly the one-layer VAE of the same networks. NVAE's residual form, q = N(mu_p + d_mu,
(sigma_p * d_sigma)^2) with spatial latents, is the step past this one and not built.

The joint latent z (B, sum of the layer sizes) is the layers concatenated bottom to top, so
every objective, the IW bound, the samplers and the figures take it as they take a
one-layer code; `layer_sizes` says where each layer lies in it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from vae_lab.likelihoods import Likelihood
from vae_lab.model import ACTIVATIONS, VAE, _dense_stack, halved_twice
from vae_lab.options import IMAGE_SHAPE, Count
from vae_lab.posteriors import Posterior, log_diagonal_normal
from vae_lab.priors import NormalPrior, Prior

# Every layer's log-variance (bottom-up estimate, conditional prior) is clamped to this range: a
# conditional prior whose variance collapses would otherwise overflow its log-density (the range is
# the identity for any sensible code, so a one-layer model stays the plain VAE).
LOGVAR_RANGE = (-12.0, 8.0)
MAX_LAYERS = 64  # NVAE's deepest models have about 40 groups; past this a typo, refused before anything is built
BACKBONES = ("mlp", "conv")
DECODER_INPUTS = ("bottom", "all")  # the decoder reads z_1 (the ladder VAE) or every layer (the VampPrior paper's HVAE)


def gaussian_kl(mu_q, logvar_q, mu_p, logvar_p) -> torch.Tensor:
    """KL(N(mu_q, e^logvar_q) || N(mu_p, e^logvar_p)) summed over the last dimension."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) / logvar_p.exp() - 1).sum(-1)


class HierarchicalVAE(VAE):
    """`layers` stochastic layers, top-down inference; see the module docstring.

    latent_dim: the top layer's size (the prior's); lower_dims: the sizes of the layers below
    it, bottom first (null: latent_dim each). Each deterministic block (bottom-up, top-down,
    decoder) is `hidden_layers` dense layers of `hidden_dim` units (0: the heads read their
    input directly); backbone=conv puts two strided convolutions (and the mirror transposed
    ones) at the pixel end, with `channels` and twice that. decoder_input=all feeds the decoder
    every layer (p(x | z_1, ..., z_L), as Tomczak & Welling's HVAE), which gives the upper layers
    a direct path to the pixels; bottom (the default) is p(x | z_1).
    """

    takes_flow = False  # the posterior is built here, not by the `posterior` group

    def __init__(self, latent_dim: Count = 32, layers: int = 2, lower_dims=None, hidden_dim: Count = 256, hidden_layers: Count = 2,
                 activation: str = "silu", backbone: str = "mlp", channels: Count = 32, decoder_input: str = "bottom",
                 image_shape=IMAGE_SHAPE,
                 prior: Prior | None = None, likelihood: Likelihood | None = None):
        if not 1 <= layers <= MAX_LAYERS:
            raise ValueError(f"layers must be between 1 and {MAX_LAYERS}, got {layers}")
        sizes = [latent_dim] * (layers - 1) if lower_dims is None else [int(v) for v in lower_dims]
        if len(sizes) != layers - 1:
            raise ValueError(f"lower_dims lists {len(sizes)} sizes for the {layers - 1} layers below the top; give {layers - 1}")
        sizes.append(latent_dim)
        if min(sizes) < 1 or hidden_layers < 0 or hidden_dim < 1 or channels < 1:
            raise ValueError(f"layer sizes, hidden_dim and channels must be >= 1 and hidden_layers >= 0, got sizes {sizes}")
        if activation not in ACTIVATIONS or backbone not in BACKBONES or decoder_input not in DECODER_INPUTS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, backbone one of {BACKBONES} and decoder_input "
                             f"one of {DECODER_INPUTS}, got {activation!r}, {backbone!r} and {decoder_input!r}")
        super().__init__(sum(sizes), prior if prior is not None else NormalPrior(latent_dim), likelihood)
        self.layer_sizes = tuple(sizes)
        self.decoder_width = sizes[0] if decoder_input == "bottom" else sum(sizes)  # the first entries of z it reads
        pixels, outputs = math.prod(image_shape), self.likelihood.outputs_per_channel
        width = hidden_dim if hidden_layers else None  # a block's output width (None: its input's)

        if backbone == "conv":
            stem, self.decoder = _conv_ends(image_shape, channels, hidden_dim, self.decoder_width, outputs, activation)
            first = hidden_dim
        else:
            stem = nn.Sequential(nn.Flatten(), *_dense_stack(pixels, hidden_dim, hidden_layers, activation))
            first = width or pixels
            self.decoder = nn.Sequential(
                *_dense_stack(self.decoder_width, hidden_dim, hidden_layers, activation),
                nn.Linear(width or self.decoder_width, pixels * outputs),
                nn.Unflatten(1, (image_shape[0] * outputs, *image_shape[1:])),
            )
        self.bottom_up = nn.ModuleList(
            [stem] + [nn.Sequential(*_dense_stack(first if l == 1 else hidden_dim, hidden_dim, hidden_layers, activation))
                      for l in range(1, layers)])
        widths = [first] + [width or first for _ in range(1, layers)]
        # A mean and a log-variance head per layer, apart (as the one-layer models have them, so one layer is that model)
        self.bottom_up_mean = nn.ModuleList(nn.Linear(w, d) for w, d in zip(widths, sizes))
        self.bottom_up_logvar = nn.ModuleList(nn.Linear(w, d) for w, d in zip(widths, sizes))
        self.top_down = nn.ModuleList(nn.Sequential(*_dense_stack(sizes[l + 1], hidden_dim, hidden_layers, activation))
                                      for l in range(layers - 1))
        self.top_down_mean = nn.ModuleList(nn.Linear(width or sizes[l + 1], sizes[l]) for l in range(layers - 1))
        self.top_down_logvar = nn.ModuleList(nn.Linear(width or sizes[l + 1], sizes[l]) for l in range(layers - 1))

    # --- the two passes ---------------------------------------------------------------------------

    def bottom_up_gaussians(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(mu_b, logvar_b) (B, d_l) of every layer, bottom first."""
        gaussians, h = [], x
        for block, mean, logvar in zip(self.bottom_up, self.bottom_up_mean, self.bottom_up_logvar):
            h = block(h)
            gaussians.append((mean(h), logvar(h).clamp(*LOGVAR_RANGE)))
        return gaussians

    def conditional_prior(self, layer: int, z_above: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu_p, logvar_p) of p(z_layer | z_{layer+1}) (0 = the bottom layer)."""
        h = self.top_down[layer](z_above)
        return self.top_down_mean[layer](h), self.top_down_logvar[layer](h).clamp(*LOGVAR_RANGE)

    def split(self, z: torch.Tensor) -> list[torch.Tensor]:
        return list(z.split(self.layer_sizes, dim=-1))

    def posterior_parameters(self, x):
        gaussians = self.bottom_up_gaussians(x)
        if len(gaussians) == 1:
            return gaussians[0]
        return HierarchicalPosterior(self, gaussians)

    def top_gaussian(self, x):
        return self.bottom_up_gaussians(x)[-1]

    def decode(self, z):
        return self.decoder(z[..., : self.decoder_width])

    def prior_log_prob(self, z):
        layers = self.split(z)
        log_p = self.prior.log_prob(layers[-1], self.top_gaussian)
        for l in range(len(layers) - 1):
            log_p = log_p + log_diagonal_normal(layers[l], *self.conditional_prior(l, layers[l + 1]))
        return log_p

    def sample_prior(self, n, generator=None):
        z = self.prior.sample(n, generator, self.top_gaussian)
        layers = [z]
        for l in reversed(range(len(self.layer_sizes) - 1)):
            mu, logvar = self.conditional_prior(l, layers[0])
            noise = torch.randn(mu.shape, generator=generator).to(mu.device, mu.dtype)
            layers.insert(0, mu + torch.exp(0.5 * logvar) * noise)
        return torch.cat(layers, dim=-1)

    def kl_layers(self, q, z):
        if len(self.layer_sizes) == 1:
            return super().kl_layers(q, z)
        posteriors, priors = q.layer_parameters(z)
        top = self.split(z)[-1]
        if self.prior.closed_form_kl:
            kls = [self.prior.kl(*posteriors[-1]).sum(-1)]
        else:
            kls = [log_diagonal_normal(top, *posteriors[-1]) - self.prior.log_prob(top, self.top_gaussian)]
        kls = [gaussian_kl(*posteriors[l], *priors[l]) for l in range(len(priors))] + kls
        return torch.stack(torch.broadcast_tensors(*kls), dim=-1)

    def kl(self, q, z):
        if len(self.layer_sizes) == 1:
            return super().kl(q, z)
        return self.kl_layers(q, z).sum(-1)

    @property
    def kl_estimator(self):
        if len(self.layer_sizes) == 1:
            return super().kl_estimator
        top = "closed form" if self.prior.closed_form_kl else "Monte Carlo"
        return f"per layer: {top} at the top, the Gaussians' closed form below given the sampled layers above"


class HierarchicalPosterior(Posterior):
    """q(z|x) = q(z_L|x) prod_l q(z_l | z_{l+1}, x) of a HierarchicalVAE for a batch (see the module docstring)."""

    def __init__(self, model: HierarchicalVAE, bottom_up: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__(bottom_up[0][0].shape[0], model.latent_dim, bottom_up[0][0])
        self.model, self.bottom_up = model, bottom_up
        self._drawn = None  # (z, posteriors, priors) of the last top-down pass

    def _top_down(self, noise: torch.Tensor | None = None, z: torch.Tensor | None = None):
        """Sample from noise (..., B, D) or follow the given z: (z, per-layer (mu_q, logvar_q), per-layer (mu_p, logvar_p))."""
        given = self.model.split(z) if z is not None else None
        eps = self.model.split(noise) if noise is not None else None
        count = len(self.bottom_up)
        layers, posteriors, priors = [None] * count, [None] * count, [None] * (count - 1)
        for l in reversed(range(count)):
            mu, logvar = self.bottom_up[l]
            if l < count - 1:
                mu_p, logvar_p = priors[l] = self.model.conditional_prior(l, layers[l + 1])
                logvar_b = logvar
                logvar = -torch.logaddexp(-logvar_b, -logvar_p)  # precisions add
                mu = mu * torch.exp(logvar - logvar_b) + mu_p * torch.exp(logvar - logvar_p)
            posteriors[l] = (mu, logvar)
            layers[l] = given[l] if given is not None else mu + torch.exp(0.5 * logvar) * eps[l] if eps is not None else mu
        return torch.cat(layers, dim=-1), posteriors, priors

    def rsample(self, noise=None, samples=None):
        if noise is None:
            noise = self.standard_noise(samples)
        self._drawn = self._top_down(noise=noise)
        return self._drawn[0]

    def layer_parameters(self, z):
        """The per-layer posterior and conditional-prior Gaussians along z."""
        drawn = self._drawn if self._drawn is not None and z is self._drawn[0] else self._top_down(z=z)
        return drawn[1], drawn[2]

    def log_prob(self, z):
        posteriors, _ = self.layer_parameters(z)
        return sum(log_diagonal_normal(part, *gaussian) for part, gaussian in zip(self.model.split(z), posteriors))

    @property
    def mean(self):
        return self._top_down()[0]  # each layer's mean given the means above

    @property
    def encoder_gaussian(self):
        return self.bottom_up[-1]


def _conv_ends(image_shape, channels: int, hidden_dim: int, bottom_dim: int, outputs: int, activation: str):
    """The conv backbone's bottom-up stem (x -> hidden_dim) and decoder (z_1 -> outputs per pixel)."""
    image_channels, height, width = image_shape
    if min(height, width) < 4:
        raise ValueError(f"backbone=conv halves the image twice and needs at least 4 x 4 pixels, got {height} x {width}; "
                         "use backbone=mlp")
    sizes, pad = halved_twice(height, width)
    c, act, low = channels, ACTIVATIONS[activation], sizes[2][0] * sizes[2][1]
    stem = nn.Sequential(
        nn.Conv2d(image_channels, c, 4, stride=2, padding=1), act(), nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), act(),
        nn.Flatten(), nn.Linear(2 * c * low, hidden_dim), act(),
    )
    decoder = nn.Sequential(
        nn.Linear(bottom_dim, hidden_dim), act(), nn.Linear(hidden_dim, 2 * c * low), act(), nn.Unflatten(1, (2 * c, *sizes[2])),
        nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1, output_padding=pad[0]), act(),
        nn.ConvTranspose2d(c, image_channels * outputs, 4, stride=2, padding=1, output_padding=pad[1]),
    )
    return stem, decoder
