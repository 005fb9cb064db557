"""Posteriors q(z|x) as distribution objects, and the flows of the `posterior` config group.

`model.posterior(x)` returns a Posterior for the batch x (B, C, H, W):
  rsample(noise)    z (..., B, D) by the reparameterisation, from standard-normal noise
                    of that shape (drawn when not given; `samples=k` draws (k, B, D))
  log_prob(z)       log q(z|x) (..., B): at any z where it is tractable (the diagonal
                    Gaussian, the hierarchical posterior), else at the codes it drew
  mean              (B, D): the codes of figures, embeddings and the gmm sampler
  gaussian          (mu, logvar) where q is exactly N(mu, diag(exp(logvar))), else None:
                    the closed-form KL, the KL per dimension and beta-TC's decomposition need it

A flow (the `posterior` group: Diagonal, IAF, Planar) turns the encoder's Gaussian
q0 = N(mu, sigma^2) and a context vector from the encoder into a richer posterior:
z_0 ~ q0, z_K = f_K(... f_1(z_0)), log q(z_K|x) = log q0(z_0) - sum_k log |det df_k/dz|.
Flows are not inverted here, so a flow posterior scores the codes it drew (the ones
every objective and the IW bound score) and refuses others with a message.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def log_diagonal_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the last dimension; z (..., D) broadcasts against mu."""
    return -0.5 * ((z - mu).pow(2) / logvar.exp() + logvar + math.log(2 * math.pi)).sum(-1)


class Posterior:
    """q(z|x) for a batch: see the module docstring."""

    gaussian: tuple[torch.Tensor, torch.Tensor] | None = None

    def __init__(self, batch: int, latent_dim: int, like: torch.Tensor):
        self.shape = (batch, latent_dim)
        self._like = like  # device and dtype of the codes

    def standard_noise(self, samples: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """N(0, I) noise (B, D), or (samples, B, D); from `generator` (a CPU generator, then moved) where given."""
        shape = self.shape if samples is None else (samples, *self.shape)
        if generator is not None:
            return torch.randn(shape, generator=generator).to(self._like.device)
        if tuple(self._like.shape) == shape:
            return torch.randn_like(self._like)
        return torch.randn(shape, device=self._like.device, dtype=self._like.dtype)

    def rsample(self, noise: torch.Tensor | None = None, samples: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def mean(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def encoder_gaussian(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's (mu, logvar) over the latent the prior models, before any flow (what model(x) returns)."""
        return self.gaussian


class DiagonalGaussian(Posterior):
    """N(mu, diag(exp(logvar))): the encoder's Gaussian, every model's default posterior."""

    def __init__(self, mu: torch.Tensor, logvar: torch.Tensor):
        super().__init__(mu.shape[0], mu.shape[-1], mu)
        self.mu, self.logvar = mu, logvar
        self.gaussian = (mu, logvar)

    def rsample(self, noise=None, samples=None):
        if noise is None:
            noise = self.standard_noise(samples)
        return self.mu + torch.exp(0.5 * self.logvar) * noise

    def log_prob(self, z):
        return log_diagonal_normal(z, self.mu, self.logvar)

    @property
    def mean(self):
        return self.mu


class FlowPosterior(Posterior):
    """A flow over the encoder's Gaussian: z = flow(z_0, context), z_0 ~ base."""

    def __init__(self, base: DiagonalGaussian, flow: Flow, context: torch.Tensor):
        super().__init__(*base.shape, base.mu)
        self.base, self.flow, self.context = base, flow, context
        self._drawn: tuple[torch.Tensor, torch.Tensor] | None = None

    def rsample(self, noise=None, samples=None):
        z0 = self.base.rsample(noise, samples)
        z, log_det = self.flow(z0, self.context)
        self._drawn = (z, self.base.log_prob(z0) - log_det)
        return z

    def log_prob(self, z):
        if self._drawn is not None and z is self._drawn[0]:
            return self._drawn[1]
        raise ValueError(f"a {type(self.flow).__name__} posterior scores only the codes it drew itself (the flow is not inverted)")

    @property
    def mean(self):
        return self.flow(self.base.mu, self.context)[0]  # the flow of the base mean: its codes for figures

    @property
    def encoder_gaussian(self):
        return self.base.gaussian


class Flow(nn.Module):
    """The `posterior` group's base: forward(z (..., B, D), context (B, C)) -> (z', log|det dz'/dz| (..., B))."""

    implicit = False  # left out of print(model) when True (the diagonal posterior has no parameters)

    def __init__(self, latent_dim: int, context_dim: int):
        super().__init__()
        self.latent_dim, self.context_dim = latent_dim, context_dim

    @property
    def identity(self) -> bool:
        """True for a flow of no steps: its posterior is exactly the encoder's Gaussian."""
        return False

    def posterior(self, mu: torch.Tensor, logvar: torch.Tensor, context: torch.Tensor) -> Posterior:
        if self.identity:  # the same numbers as the diagonal posterior, closed-form KL included
            return DiagonalGaussian(mu, logvar)
        return FlowPosterior(DiagonalGaussian(mu, logvar), self, context)


class Diagonal(Flow):
    """No flow: q(z|x) is the encoder's diagonal Gaussian (the default)."""

    implicit = True

    identity = True

    def __init__(self, latent_dim: int = 1, context_dim: int = 1):
        super().__init__(latent_dim, context_dim)

    def forward(self, z, context):
        return z, torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)


MAX_STEPS = 256  # published flow posteriors use up to about 80 steps; past this a typo, refused before anything is built


def _check_steps(steps: int, hidden: int = 1) -> None:
    if not 0 <= steps <= MAX_STEPS or hidden < 1:
        raise ValueError(f"steps must be from 0 to {MAX_STEPS} and hidden >= 1, got steps={steps} and hidden={hidden}")


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (MADE, Germain et al. 2015)."""

    def __init__(self, inputs: int, outputs: int, mask: torch.Tensor):
        super().__init__(inputs, outputs)
        self.register_buffer("mask", mask.float(), persistent=False)

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """(m, s) (..., D) each, output d depending only on the inputs before d in `order`, and on the context.

    One hidden layer of `hidden` ELU units, the context added to it (Kingma et al. 2016's
    conditioning on the encoder's h); degrees in the usual MADE way.
    """

    def __init__(self, latent_dim: int, context_dim: int, hidden: int, order: torch.Tensor):
        super().__init__()
        hidden_degrees = torch.arange(hidden) % max(1, latent_dim - 1)
        self.input = MaskedLinear(latent_dim, hidden, hidden_degrees[:, None] >= order[None, :])
        self.context = nn.Linear(context_dim, hidden, bias=False)
        out_mask = order[:, None] > hidden_degrees[None, :]
        self.output = MaskedLinear(hidden, 2 * latent_dim, torch.cat([out_mask, out_mask]))
        nn.init.zeros_(self.output.weight)  # each step starts as the same contraction for every z
        nn.init.zeros_(self.output.bias)

    def forward(self, z, context):
        h = F.elu(self.input(z) + self.context(context))
        return self.output(h).chunk(2, dim=-1)


class IAF(Flow):
    """Inverse autoregressive flow (Kingma et al. 2016): `steps` MADE steps, the order reversed between them.

    Each step: (m, s) = MADE(z, h), g = sigmoid(s + forget_bias), z <- g * z + (1 - g) * m,
    log|det| = sum log g: the Jacobian is triangular in the step's order, so the
    determinant is the product of its diagonal.
    """

    def __init__(self, latent_dim: int, context_dim: int, steps: int = 2, hidden: int = 320, forget_bias: float = 1.0):
        super().__init__(latent_dim, context_dim)
        _check_steps(steps, hidden)
        self.forget_bias = float(forget_bias)
        orders = [torch.arange(latent_dim) if i % 2 == 0 else torch.arange(latent_dim).flip(0) for i in range(steps)]
        self.steps = nn.ModuleList(MADE(latent_dim, context_dim, hidden, order) for order in orders)

    @property
    def identity(self):
        return len(self.steps) == 0

    def forward(self, z, context):
        log_det = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
        for made in self.steps:
            m, s = made(z, context)
            gate = torch.sigmoid(s + self.forget_bias)
            z = gate * z + (1 - gate) * m
            log_det = log_det + F.logsigmoid(s + self.forget_bias).sum(-1)
        return z, log_det


class Planar(Flow):
    """Planar flows (Rezende & Mohamed 2015), amortised: each step's (u, w, b) come from the context.

    z <- z + u' tanh(w.z + b), log|det| = log|1 + u'.(1 - tanh^2) w|, with u' = u + (m(w.u) - w.u) w / |w|^2,
    m(a) = softplus(a) - 1, so that every step is invertible.
    """

    def __init__(self, latent_dim: int, context_dim: int, steps: int = 8):
        super().__init__(latent_dim, context_dim)
        _check_steps(steps)
        self.count = int(steps)
        if steps:
            self.parameters_of = nn.Linear(context_dim, steps * (2 * latent_dim + 1))
            nn.init.normal_(self.parameters_of.weight, std=1e-3)
            nn.init.normal_(self.parameters_of.bias, std=1e-2)

    @property
    def identity(self):
        return self.count == 0

    def forward(self, z, context):
        log_det = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
        if self.identity:
            return z, log_det
        d = self.latent_dim
        params = self.parameters_of(context).unflatten(-1, (self.count, 2 * d + 1))  # (B, steps, 2D + 1)
        for step in range(self.count):
            u, w, b = params[:, step, :d], params[:, step, d:2 * d], params[:, step, 2 * d:]
            wu = (w * u).sum(-1, keepdim=True)
            u = u + (F.softplus(wu) - 1 - wu) * w / (w.pow(2).sum(-1, keepdim=True) + 1e-8)
            h = torch.tanh((w * z).sum(-1, keepdim=True) + b)
            z = z + u * h
            log_det = log_det + torch.log((1 + ((1 - h.pow(2)) * w * u).sum(-1)).abs() + 1e-8)
        return z, log_det
