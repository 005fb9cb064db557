"""The VAE models: the reference convolutional VAE, the classic MLP, and a residual one.

A VAE is an encoder x (B, C, H, W) -> the Gaussian N(mu, diag(exp(logvar))) and features h,
a posterior q(z|x) built from them (the `posterior` group: the Gaussian itself, or a flow
over it conditioned on h; vae_lab.posteriors), a decoder z (B, D) -> one logit per pixel,
a prior p(z) (vae_lab.priors) and a likelihood p(x | decoder output) (vae_lab.likelihoods).
Subclasses define only the networks: `posterior_parameters(x)` and `decode(z)`; every
figure, bound and sampler goes through the methods of the base class, so a new prior,
posterior or likelihood changes nothing here. The hierarchical VAE is vae_lab.hvae.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from vae_lab.likelihoods import Bernoulli, Likelihood
from vae_lab.options import IMAGE_SHAPE, Count, Size0
from vae_lab.posteriors import Diagonal, Flow, Posterior
from vae_lab.priors import NormalPrior, Prior


class VAE(nn.Module):
    """Encoder + decoder + prior + likelihood (+ a posterior flow); see the module docstring.

    A subclass calls `super().__init__(latent_dim, prior, likelihood)` and defines
    `posterior_parameters(x) -> (mu, logvar)` or `(mu, logvar, context)` (the encoder's
    Gaussian, and the features a flow posterior is conditioned on; without them the
    flow reads (mu, logvar)), or a Posterior object of its own (the hierarchical VAE),
    and `decode(z) -> logits (B, C, H, W)`. A subclass written against the older
    contract, `posterior(x) -> (mu, logvar)`, works unchanged (see __init_subclass__).
    """

    layer_sizes: tuple[int, ...]  # latent sizes of the stochastic layers, bottom to top: (latent_dim,) here

    def __init__(self, latent_dim: Count, prior: Prior | None = None, likelihood: Likelihood | None = None):
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        self.latent_dim = latent_dim
        self.layer_sizes = (latent_dim,)
        self.prior = prior if prior is not None else NormalPrior(latent_dim)
        self.likelihood = likelihood if likelihood is not None else Bernoulli()
        self.posterior_flow: Flow = Diagonal(latent_dim)  # runtime.build_vae sets the `posterior` group's
        self.context_dim = 2 * latent_dim  # the flow's context: (mu, logvar) unless the subclass gives features

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("posterior")
        if own is not None and "posterior_parameters" not in cls.__dict__:  # the older contract
            cls.posterior_parameters = own
            cls.posterior = VAE.posterior

    def posterior_parameters(self, x: torch.Tensor):
        raise NotImplementedError

    def posterior(self, x: torch.Tensor) -> Posterior:
        """q(z|x) for the batch x: the encoder's Gaussian through the `posterior` flow (vae_lab.posteriors)."""
        out = self.posterior_parameters(x)
        if isinstance(out, Posterior):
            return out
        mu, logvar = out[0], out[1]
        context = out[2] if len(out) > 2 else None
        if context is None and not self.posterior_flow.identity:
            context = torch.cat([mu, logvar], dim=-1)
        return self.posterior_flow.posterior(mu, logvar, context)

    def top_gaussian(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's Gaussian (mu, logvar) over the latent the prior models (the VampPrior encodes with it)."""
        out = self.posterior_parameters(x)
        return out[0], out[1]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's (mu, logvar); the name the reference and older code use."""
        return self.top_gaussian(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mean(self, output: torch.Tensor) -> torch.Tensor:
        """The images (in [0, 1]) a decoder output stands for: the likelihood's mean."""
        return self.likelihood.mean(output)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decoded posterior means, as images."""
        return self.mean(self.decode(self.posterior(x).mean))

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return self.prior.log_prob(z, self.top_gaussian)

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """z (n, latent_dim) from the prior, drawn from `generator` (CPU) where given."""
        return self.prior.sample(n, generator, self.top_gaussian)

    def prior_frozen(self):
        """Within: the prior's derived parameters fixed (evaluation): see Prior.frozen."""
        return self.prior.frozen(self.top_gaussian)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images decoded from z ~ p(z)."""
        return self.mean(self.decode(self.sample_prior(n, generator)))

    def kl(self, q: Posterior, z: torch.Tensor) -> torch.Tensor:
        """KL(q(z|x) || p(z)) per image: the closed form where the posterior is a diagonal Gaussian and
        the prior has one (B,), else the Monte-Carlo estimate log q(z|x) - log p(z) at the given z (..., B)."""
        if self.prior.closed_form_kl and q.gaussian is not None:
            return self.prior.kl(*q.gaussian).sum(-1)
        return q.log_prob(z) - self.prior_log_prob(z)

    def kl_layers(self, q: Posterior, z: torch.Tensor) -> torch.Tensor:
        """The KL split by stochastic layer (..., B, layers), summing to kl(q, z): one layer here."""
        return self.kl(q, z)[..., None]

    def log_weights(self, x: torch.Tensor, z: torch.Tensor, q: Posterior) -> torch.Tensor:
        """log p(x|z) + log p(z) - log q(z|x) for z (k, B, D) drawn from q: the importance weights (k, B)."""
        output = self.decode(z.flatten(0, 1)).unflatten(0, z.shape[:2])
        return self.likelihood.log_prob(x, output) + self.prior_log_prob(z) - q.log_prob(z)

    @property
    def kl_estimator(self) -> str:
        """How kl() estimates the KL, in words, for the report."""
        if self.prior.closed_form_kl and self.posterior_is_gaussian:
            return "closed form"
        return "Monte Carlo (log q(z|x) - log p(z) at the sampled z)"

    @property
    def posterior_is_gaussian(self) -> bool:
        """Whether q(z|x) is the encoder's diagonal Gaussian (what a factorised decomposition needs)."""
        return self.posterior_flow.identity and len(self.layer_sizes) == 1

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction images, mu, logvar) with z drawn from q(z|x), so the output is random;
        mu and logvar are the encoder's Gaussian (before a flow)."""
        q = self.posterior(x)
        return (self.mean(self.decode(q.rsample())), *q.encoder_gaussian)

    def __repr__(self) -> str:
        # The reference printout lists the networks only: leave out the standard N(0, I)
        # prior, the Bernoulli likelihood and the diagonal posterior, which add no parameters. Others are shown.
        modules = self._modules
        self._modules = {name: m for name, m in modules.items() if not getattr(m, "implicit", False)}
        try:
            return super().__repr__()
        finally:
            self._modules = modules


class ConvVAE(VAE):
    """The reference convolutional VAE (96,481 parameters with the defaults, 28 x 28 images).

    Encoder: three strided convolutions 28 -> 14 -> 7 -> 2, flattened to
    4 * base_channels * 2 * 2 features, then two MLP heads. `encoder_mean` gives the
    posterior mean; `encoder_std` gives the posterior *log-variance* (the reference's
    name is kept so the printout matches). The decoder mirrors the encoder and ends in
    the reference's Sigmoid, which `decode` leaves out: the likelihood works on logits.
    Other image sizes get the same layers, with the transposed convolutions' output
    padding chosen to land on the input size.
    """

    def __init__(self, latent_dim: Count = 16, hidden_dim: Count = 64, base_channels: Count = 16,
                 image_shape=IMAGE_SHAPE, prior: Prior | None = None, likelihood: Likelihood | None = None):
        super().__init__(latent_dim, prior, likelihood)
        channels, height, width = image_shape
        sizes = [_conv_sizes(height), _conv_sizes(width)]  # per axis: input, after conv 1, 2, 3
        c1, c2 = base_channels, 2 * base_channels
        features = c2 * sizes[0][3] * sizes[1][3]
        self.encoder_conv = nn.Sequential(
            nn.Conv2d(channels, c1, kernel_size=4, stride=2, padding=1),  # (B, c1, 14, 14)
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
        self.context_dim = features
        pad = [tuple(axis[2] - ((axis[3] - 1) * 2 + 5) for axis in sizes), tuple(axis[1] - 2 * axis[2] for axis in sizes),
               tuple(axis[0] - 2 * axis[1] for axis in sizes)]
        if any(p not in (0, 1) for step in pad for p in step):
            raise ValueError(f"ConvVAE cannot decode back to {height} x {width} images; use model=resnet_vae or mlp_vae")
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, features),
            nn.Unflatten(1, [c2, sizes[0][3], sizes[1][3]]),  # a list, as in the reference printout
            nn.ConvTranspose2d(c2, c2, kernel_size=5, stride=2, output_padding=pad[0]),  # (B, c2, 7, 7)
            BatchNorm2d(c2),
            nn.ReLU(),
            nn.ConvTranspose2d(c2, c1, kernel_size=4, stride=2, padding=1, output_padding=pad[1]),  # (B, c1, 14, 14)
            BatchNorm2d(c1),
            nn.ReLU(),
            # (B, C * outputs per channel, 28, 28): one logit per pixel for every likelihood but the mixtures
            nn.ConvTranspose2d(c1, channels * self.likelihood.outputs_per_channel, kernel_size=4, stride=2, padding=1,
                               output_padding=pad[2]),
            nn.Sigmoid(),  # in the printout; decode() stops before it
        )

    def _get_name(self) -> str:
        # The reference printout calls the class "Model"; keep print(model) identical.
        return "Model"

    def posterior_parameters(self, x):
        h = self.encoder_conv(x)
        return self.encoder_mean(h), self.encoder_std(h), h

    def decode(self, z):
        return self.decoder[:-1](z)


def _conv_sizes(size: int) -> tuple[int, int, int, int]:
    """One axis through ConvVAE's encoder: input, then after each of its three convolutions."""
    first = (size + 2 - 4) // 2 + 1
    second = (first + 2 - 4) // 2 + 1
    third = (second - 5) // 2 + 1
    if third < 1:
        raise ValueError(f"ConvVAE needs images of at least 20 x 20 pixels, got an axis of {size} (model=mlp_vae takes any size)")
    return size, first, second, third


class MLPVAE(VAE):
    """The classic fully connected VAE: pixels -> hidden (x hidden_layers) -> latent and back.

    The defaults are pytorch/examples' (784-400-20, ReLU); hidden_layers=2, hidden_dim=200,
    activation=tanh, latent_dim=50 is the one-layer model of Burda et al. (2016).
    """

    def __init__(self, latent_dim: Count = 20, hidden_dim: Count = 400, hidden_layers: Count = 1, activation: str = "relu",
                 image_shape=IMAGE_SHAPE, prior: Prior | None = None, likelihood: Likelihood | None = None):
        super().__init__(latent_dim, prior, likelihood)
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {tuple(ACTIVATIONS)}")
        if hidden_layers < 1:
            raise ValueError(f"hidden_layers must be >= 1, got {hidden_layers}")
        pixels = math.prod(image_shape)
        self.encoder = nn.Sequential(nn.Flatten(), *_dense_stack(pixels, hidden_dim, hidden_layers, activation))
        self.encoder_mean = nn.Linear(hidden_dim, latent_dim)
        self.encoder_std = nn.Linear(hidden_dim, latent_dim)  # log-variance, as in ConvVAE
        self.context_dim = hidden_dim
        self.decoder = nn.Sequential(
            *_dense_stack(latent_dim, hidden_dim, hidden_layers, activation),
            nn.Linear(hidden_dim, pixels * self.likelihood.outputs_per_channel),
            nn.Unflatten(1, (image_shape[0] * self.likelihood.outputs_per_channel, *image_shape[1:])),
        )

    def posterior_parameters(self, x):
        h = self.encoder(x)
        return self.encoder_mean(h), self.encoder_std(h), h

    def decode(self, z):
        return self.decoder(z)


class ResNetVAE(VAE):
    """A deeper convolutional VAE: residual blocks at three resolutions, a wider decoder.

    Encoder: a 3x3 stem to `channels`, then at each of full, 1/2 and 1/4 resolution
    `blocks` residual blocks, downsampling by strided 4x4 convolutions (doubling the
    channels), flattened to a `hidden_dim` layer and the two posterior heads.
    Decoder: the mirror image with `decoder_width` times the channels, upsampling by
    transposed convolutions, ending in a 3x3 convolution to one logit per pixel.
    No batch normalisation: the model is a deterministic function of each image, which
    the VampPrior's pseudo-inputs and the importance-weighted bound rely on.
    """

    def __init__(self, latent_dim: Count = 32, channels: Count = 16, blocks: Size0 = 1, decoder_width: Count = 2,
                 hidden_dim: Count = 256, image_shape=IMAGE_SHAPE, prior: Prior | None = None,
                 likelihood: Likelihood | None = None):
        super().__init__(latent_dim, prior, likelihood)
        if min(channels, decoder_width, hidden_dim) < 1 or blocks < 0:
            raise ValueError("channels, decoder_width and hidden_dim must be >= 1, blocks >= 0")
        image_channels, height, width = image_shape
        self.sizes, pad = halved_twice(height, width)
        c, d = channels, channels * decoder_width
        low = self.sizes[2][0] * self.sizes[2][1]
        self.encoder = nn.Sequential(
            nn.Conv2d(image_channels, c, 3, padding=1), *_res_stack(c, blocks),
            nn.SiLU(), nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), *_res_stack(2 * c, blocks),
            nn.SiLU(), nn.Conv2d(2 * c, 4 * c, 4, stride=2, padding=1), *_res_stack(4 * c, blocks),
            nn.SiLU(), nn.Flatten(), nn.Linear(4 * c * low, hidden_dim), nn.SiLU(),
        )
        self.encoder_mean = nn.Linear(hidden_dim, latent_dim)
        self.encoder_logvar = nn.Linear(hidden_dim, latent_dim)
        self.context_dim = hidden_dim
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, 4 * d * low), nn.SiLU(),
            nn.Unflatten(1, (4 * d, *self.sizes[2])), *_res_stack(4 * d, blocks),
            nn.SiLU(), nn.ConvTranspose2d(4 * d, 2 * d, 4, stride=2, padding=1, output_padding=pad[0]), *_res_stack(2 * d, blocks),
            nn.SiLU(), nn.ConvTranspose2d(2 * d, d, 4, stride=2, padding=1, output_padding=pad[1]), *_res_stack(d, blocks),
            nn.SiLU(), nn.Conv2d(d, image_channels * self.likelihood.outputs_per_channel, 3, padding=1),
        )

    def posterior_parameters(self, x):
        h = self.encoder(x)
        return self.encoder_mean(h), self.encoder_logvar(h), h

    def decode(self, z):
        return self.decoder(z)


def halved_twice(height: int, width: int):
    """(sizes, output paddings) of an image through two 4x4 stride-2 convolutions (which halve, rounding
    down) and back through two transposed ones: sizes at full, 1/2 and 1/4 resolution, and the
    output_padding of the transposed convolution to 1/2 and then to full size."""
    sizes = [(height, width), (height // 2, width // 2), (height // 4, width // 4)]
    return sizes, [tuple(big - 2 * small for big, small in zip(sizes[i], sizes[i + 1])) for i in (1, 0)]


class ResidualBlock(nn.Module):
    """x + conv(act(conv(act(x)))), 3x3, same channels; the second conv starts at zero (identity block)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                  nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x):
        return x + self.body(x)


def _res_stack(channels: int, blocks: int) -> list[nn.Module]:
    return [ResidualBlock(channels) for _ in range(blocks)]


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}


def _dense_stack(inputs: int, hidden: int, layers: int, activation: str) -> list[nn.Module]:
    stack = []
    for i in range(layers):
        stack += [nn.Linear(inputs if i == 0 else hidden, hidden), ACTIVATIONS[activation]()]
    return stack


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
