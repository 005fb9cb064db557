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
  mse                        no: squared error, a Gaussian of variance 1/2 less its constant
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

    def log_prob(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mean(self, output: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(output)

    def is_true_log_likelihood(self, binary_data: bool) -> bool:
        raise NotImplementedError


class Bernoulli(Likelihood):
    """log p(x|l) = x l - softplus(l): stable for any logit; exact for binary x."""

    name = "bce"
    implicit = True

    def log_prob(self, x, output):
        return (x * output - F.softplus(output)).sum(PIXEL_DIMS)

    def is_true_log_likelihood(self, binary_data):
        return binary_data


class SquaredError(Likelihood):
    """-(sigmoid(l) - x)^2 summed: the reference's mse loss, not a normalised density."""

    name = "mse"

    def log_prob(self, x, output):
        return -(torch.sigmoid(output) - x).pow(2).sum(PIXEL_DIMS)

    def is_true_log_likelihood(self, binary_data):
        return False


class ContinuousBernoulli(Likelihood):
    """The continuous Bernoulli: a Bernoulli with its normaliser over [0, 1], via torch.distributions."""

    name = "continuous_bernoulli"

    def log_prob(self, x, output):
        distribution = _TorchContinuousBernoulli(logits=output, validate_args=False)
        return distribution.log_prob(x.expand_as(output) if x.dim() < output.dim() else x).sum(PIXEL_DIMS)

    def mean(self, output):
        return _TorchContinuousBernoulli(logits=output, validate_args=False).mean

    def is_true_log_likelihood(self, binary_data):
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

    def is_true_log_likelihood(self, binary_data):
        return True


LIKELIHOODS = {cls.name: cls for cls in (Bernoulli, SquaredError, ContinuousBernoulli, Gaussian)}


def make_likelihood(name: str) -> Likelihood:
    if name not in LIKELIHOODS:
        raise ValueError(f"unknown reconstruction {name!r}; choose one of {tuple(LIKELIHOODS)}")
    return LIKELIHOODS[name]()
