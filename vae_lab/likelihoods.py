"""Likelihoods p(x | decoder output): one class per choice of `loss.reconstruction`.

The decoder emits one logit per pixel, (..., C, H, W). A likelihood scores images
against it, `log_prob(x, output)` -> (...,) summed over the pixels, and turns it into
a picture, `mean(output)` -> intensities in [0, 1]. x (B, C, H, W) broadcasts against
outputs with leading sample dimensions (k, B, C, H, W), so importance samples are
scored without copying x.

Which of them give "nats" that are a true log-likelihood of the data:
  bce (Bernoulli)            binary data only; on intensities it is a surrogate
  continuous_bernoulli       yes, a normalised density on [0, 1] (Loaiza-Ganem & Cunningham 2019)
  gaussian                   yes, a density with a learned variance, one shared over all pixels
  gaussian_per_pixel         yes, a density whose variance the decoder gives for every pixel and channel
  mse                        no: squared error, a Gaussian of variance 1/2 less its constant
  discretized_logistic       yes on 8-bit data: a probability for each of the 256 levels, from a
                             mixture of logistics per pixel (Salimans et al. 2017); reported in bits per dimension

A likelihood says how many decoder outputs it needs per image channel (`outputs_per_channel`);
the models size their last layer from it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import ContinuousBernoulli as _TorchContinuousBernoulli

PIXEL_DIMS = (-3, -2, -1)


class Likelihood(nn.Module):
    """p(x | output). Subclasses define log_prob and may override mean."""

    name = ""
    implicit = False  # left out of print(model): the reference printout lists only the networks
    outputs_per_channel = 1  # decoder outputs per pixel and channel
    discrete = False  # a probability of each of the 256 levels of 8-bit data (bits per dimension are then exact)

    def log_prob(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mean(self, output: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(output)

    def is_true_log_likelihood(self, binary_data: bool, values: str = "8bit") -> bool:
        """Whether its nats are a true log-likelihood of data of this kind (binary or not; vae_lab.data.VALUE_KINDS)."""
        raise NotImplementedError


class Bernoulli(Likelihood):
    """log p(x|l) = x l - softplus(l): stable for any logit; exact for binary x."""

    name = "bce"
    implicit = True

    def log_prob(self, x, output):
        return (x * output - F.softplus(output)).sum(PIXEL_DIMS)

    def is_true_log_likelihood(self, binary_data, values="8bit"):
        return binary_data


class SquaredError(Likelihood):
    """-(sigmoid(l) - x)^2 summed: the reference's mse loss, not a normalised density."""

    name = "mse"

    def log_prob(self, x, output):
        return -(torch.sigmoid(output) - x).pow(2).sum(PIXEL_DIMS)

    def is_true_log_likelihood(self, binary_data, values="8bit"):
        return False


class ContinuousBernoulli(Likelihood):
    """The continuous Bernoulli: a Bernoulli with its normaliser over [0, 1], via torch.distributions."""

    name = "continuous_bernoulli"

    def log_prob(self, x, output):
        distribution = _TorchContinuousBernoulli(logits=output, validate_args=False)
        return distribution.log_prob(x.expand_as(output) if x.dim() < output.dim() else x).sum(PIXEL_DIMS)

    def mean(self, output):
        return _TorchContinuousBernoulli(logits=output, validate_args=False).mean

    def is_true_log_likelihood(self, binary_data, values="8bit"):
        return True


class Gaussian(Likelihood):
    """N(x; sigmoid(l), sigma^2) with one learned sigma shared by all pixels (initially 0.1)."""

    name = "gaussian"

    def __init__(self, initial_scale: float = 0.1):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(initial_scale)))

    def log_prob(self, x, output):
        scale = self.log_scale.exp()
        squared = ((x - torch.sigmoid(output)) / scale).pow(2)
        return -(0.5 * squared + self.log_scale + 0.5 * math.log(2 * math.pi)).sum(PIXEL_DIMS)

    def is_true_log_likelihood(self, binary_data, values="8bit"):
        return True


class PixelGaussian(Likelihood):
    """N(x; sigmoid(m), sigma^2) with a mean and a scale for every pixel and channel, both from the decoder:
    output (..., 2 * C, H, W) = C mean logits, then C log-scales (kept in LOG_SCALE_RANGE, so a pixel that
    never varies cannot drive its density to infinity)."""

    name = "gaussian_per_pixel"
    outputs_per_channel = 2
    LOG_SCALE_RANGE = (-7.0, 2.0)

    def _split(self, output: torch.Tensor):
        logits, log_scales = output.unflatten(-3, (2, -1)).unbind(-4)
        return logits, log_scales.clamp(*self.LOG_SCALE_RANGE)

    def log_prob(self, x, output):
        logits, log_scales = self._split(output)
        squared = ((x - torch.sigmoid(logits)) * torch.exp(-log_scales)).pow(2)
        return -(0.5 * squared + log_scales + 0.5 * math.log(2 * math.pi)).sum(PIXEL_DIMS)

    def mean(self, output):
        return torch.sigmoid(self._split(output)[0])

    def is_true_log_likelihood(self, binary_data, values="8bit"):
        return True


class DiscretizedLogistic(Likelihood):
    """A mixture of `components` logistics per pixel and channel, integrated over each of the 256
    bins of 8-bit data (Salimans et al. 2017, without the coupling between colour channels).

    The decoder gives, per channel, `components` mixture logits, means and log-scales:
    output (..., 3 * components * C, H, W). Pixels x in [0, 1] are the levels k / 255; level 0
    takes the whole lower tail and level 255 the upper one, so the 256 probabilities sum to 1.
    """

    name = "discretized_logistic"
    discrete = True
    BINS = 255  # 256 levels: 255 steps of width 1/255 between 0 and 1 (in [-1, 1]: width 2/255)
    MIN_LOG_SCALE = -7.0

    def __init__(self, components: int = 5):
        super().__init__()
        if components < 1:
            raise ValueError(f"components must be >= 1, got {components}")
        self.components = components
        self.outputs_per_channel = 3 * components

    def _split(self, output: torch.Tensor):
        """(logits, means in [-1, 1]-space, log-scales), each (..., K, C, H, W)."""
        *lead, _, height, width = output.shape
        parts = output.reshape(*lead, 3, self.components, -1, height, width)
        logits, means, log_scales = parts.unbind(-5)
        return logits, means, log_scales.clamp(min=self.MIN_LOG_SCALE)

    def log_prob(self, x, output):
        logits, means, log_scales = self._split(output)
        centre = (x * 2 - 1).unsqueeze(-4)  # (..., 1, C, H, W), broadcast over the components
        inverse_scale = torch.exp(-log_scales)
        upper = inverse_scale * (centre - means + 1 / self.BINS)
        lower = inverse_scale * (centre - means - 1 / self.BINS)
        log_cdf_upper = F.logsigmoid(upper)  # log P(X <= upper edge): level 0 takes all of it
        log_survival_lower = F.logsigmoid(lower) - lower  # log (1 - sigmoid(lower)): level 255 takes all of it
        # log(sigmoid(upper) - sigmoid(lower)), computed as log sigmoid(upper) + log(1 - exp(logsigmoid(lower) - logsigmoid(upper)))
        log_bin = log_cdf_upper + torch.log1p(-torch.exp(F.logsigmoid(lower) - log_cdf_upper).clamp(max=1 - 1e-12))
        # Where the bin is far narrower than the scale, the difference underflows: use the density times the width.
        mid = inverse_scale * (centre - means)
        log_density = mid - log_scales - 2 * F.softplus(mid) + math.log(2 / self.BINS)
        log_bin = torch.where(torch.exp(log_bin) > 1e-5, log_bin, log_density)
        level = torch.round(x * self.BINS).unsqueeze(-4)
        log_p = torch.where(level <= 0, log_cdf_upper, torch.where(level >= self.BINS, log_survival_lower, log_bin))
        mixture = torch.logsumexp(log_p + F.log_softmax(logits, dim=-4), dim=-4)  # (..., C, H, W)
        return mixture.sum(PIXEL_DIMS)

    def mean(self, output):
        logits, means, _ = self._split(output)
        return ((logits.softmax(-4) * means).sum(-4).clamp(-1, 1) + 1) / 2

    def is_true_log_likelihood(self, binary_data, values="8bit"):
        return values == "8bit" and not binary_data


def bits_per_dim(nats: float, image_shape) -> float:
    """Nats per image as bits per dimension (nats / (C * H * W * ln 2)), the unit of discrete 8-bit likelihoods."""
    return nats / (math.prod(image_shape) * math.log(2))


LIKELIHOODS = {cls.name: cls for cls in (Bernoulli, SquaredError, ContinuousBernoulli, Gaussian, PixelGaussian, DiscretizedLogistic)}


def make_likelihood(name: str | Likelihood) -> Likelihood:
    """A likelihood by name (loss.reconstruction=discretized_logistic), or the one a config node built
    (loss.reconstruction={_target_: ..., components: 10}, which Hydra instantiates first)."""
    if isinstance(name, Likelihood):
        return name
    if name not in LIKELIHOODS:
        raise ValueError(f"unknown reconstruction {name!r}; choose one of {tuple(LIKELIHOODS)}")
    return LIKELIHOODS[name]()
