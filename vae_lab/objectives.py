"""Training objectives: objective(model, x, noise) -> LossTerms. The engine only calls them.

Besides being called, an objective can take part in the loop through four hooks the
engine and the checkpoint call (all no-ops here): `bind(model)` once the model is built,
`start_pass(images, training)` before each pass over a split, `after_step()` after each
optimizer step of the model, and `state_dict()` / `load_state_dict()` for what it trains
itself. An objective with an auxiliary network (FactorVAE's discriminator) builds it in
bind, trains it in after_step and checkpoints it through its state: the next such
objective is one class, with nothing in the loop to edit.

Every term is per image, in nats, averaged over the batch. Besides the quantity that
is minimised (`total`), every objective reports the plain single-sample terms of the
ELBO at alpha = 1 (`recon` = -log p(x|z), `kl` = KL(q(z|x) || p(z))), so that runs with
different objectives, weights or tricks compare on one number, recon + kl.

The KL is the closed form where the prior has one (N(0, I)) and otherwise the
Monte-Carlo estimate log q(z|x) - log p(z) from the same z (VAE.kl decides).
"""
from __future__ import annotations

import math
from typing import Annotated, Literal, NamedTuple

import torch

from vae_lab.errors import ConfigError
from vae_lab.likelihoods import Likelihood, make_likelihood
from vae_lab.options import Count, Range, is_finite
from vae_lab.posteriors import log_diagonal_normal

Weight = Annotated[float, Range(0)]  # the weight of a term of an objective: a finite number >= 0


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
    min_batch = 1  # the fewest images per training batch the objective means anything for (the config check reads it)

    def __init__(self, reconstruction: str | Likelihood = "bce"):
        self.likelihood = make_likelihood(reconstruction)
        self.reconstruction = self.likelihood.name or type(self.likelihood).__name__  # what reports call it
        self.kl_scale = 1.0

    def noise_shape(self, latent_dim: int) -> tuple[int, ...]:
        """Shape of the standard-normal noise one image needs; evaluation passes fixed noise of it."""
        return (latent_dim,)

    def __call__(self, model, x: torch.Tensor, noise: torch.Tensor | None = None) -> LossTerms:
        raise NotImplementedError

    def bind(self, model) -> None:
        """The model is built (runtime.build_vae): build what depends on it."""

    def to(self, device: torch.device) -> Objective:
        """Move what the objective trains itself to `device`, as the model moves."""
        return self

    def start_pass(self, images: int, training: bool) -> None:
        """A pass over a split of `images` images begins."""

    def after_step(self) -> None:
        """The model's optimizer has stepped on the batch last scored in training."""

    def state_dict(self) -> dict:
        """What the objective trains itself, for the checkpoint: {} when nothing. A key whose attribute
        of the same name is an optimizer holds that optimizer's state (the checkpoint checks it so)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore state_dict()'s output (the checkpoint has checked its kinds and shapes)."""

    def _sample(self, model, x, noise):
        """(q, z, recon (B,)): the posterior, one reparameterised z per image and -log p(x|z)."""
        q = model.posterior(x)
        z = q.rsample(noise)
        return q, z, -model.likelihood.log_prob(x, model.decode(z))

    @staticmethod
    def _needs_gaussian_posterior(model, why: str) -> None:
        """For an objective whose maths reads the posterior's per-dimension Gaussian: refuse any other, in one line."""
        if not model.posterior_is_gaussian:
            raise ConfigError(f"{why} needs the diagonal Gaussian posterior of a one-layer model (it reads q(z_d|x) "
                              "dimension by dimension); use posterior=diagonal with a one-layer model, or loss=elbo|iwae|factor_vae.")

    @staticmethod
    def _check_weights(**weights) -> None:
        bad = [f"{name}={value}" for name, value in weights.items() if not (is_finite(value) and value >= 0)]
        if bad:
            raise ValueError(f"weights must be finite and >= 0, got {', '.join(bad)}")


class ELBO(Objective):
    """recon + alpha * KL with one z ~ q(z|x); `free_bits` nats of KL per latent dimension are free.

    Free bits (Kingma et al. 2016): each dimension's batch-mean KL counts as at least
    `free_bits` in the objective, so the optimiser gains nothing by collapsing it
    further. With a prior without closed-form KL the floor applies to the total KL
    (free_bits * latent_dim), since the KL does not split by dimension.
    """

    def __init__(self, reconstruction: str | Likelihood = "bce", alpha: Weight = 1.0,
                 free_bits: Annotated[float, Range(0, note="nats per latent dimension; 0 = off")] = 0.0):
        super().__init__(reconstruction)
        self._check_weights(alpha=alpha, free_bits=free_bits)
        self.alpha = float(alpha)
        self.free_bits = float(free_bits)

    def __call__(self, model, x, noise=None):
        q, z, recon = self._sample(model, x, noise)
        kl = model.kl(q, z)  # (B,)
        penalised = kl.mean()
        if self.free_bits > 0 and model.prior.closed_form_kl and q.gaussian is not None:
            penalised = model.prior.kl(*q.gaussian).mean(0).clamp(min=self.free_bits).sum()
        elif self.free_bits > 0:  # per stochastic layer: its batch-mean KL counts as at least free_bits x its size
            floors = torch.tensor(model.layer_sizes, dtype=kl.dtype, device=kl.device) * self.free_bits
            penalised = torch.maximum(model.kl_layers(q, z).mean(0), floors).sum()
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

    def __init__(self, reconstruction: str | Likelihood = "bce", k: Count = 5):
        super().__init__(reconstruction)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = int(k)
        self.samples = self.k

    def noise_shape(self, latent_dim):
        return (self.k, latent_dim)

    def __call__(self, model, x, noise=None):
        q = model.posterior(x)
        eps = q.standard_noise(self.k) if noise is None else noise.transpose(0, 1)
        z = q.rsample(eps)  # (k, B, D)
        output = model.decode(z.flatten(0, 1)).unflatten(0, (self.k, x.shape[0]))
        log_px = model.likelihood.log_prob(x, output)  # (k, B)
        log_prior_ratio = model.prior_log_prob(z) - q.log_prob(z)  # (k, B)
        log_w = log_px + self.kl_scale * log_prior_ratio
        bound = torch.logsumexp(log_w, dim=0) - math.log(self.k)  # (B,)
        kl = model.kl(q, z)  # (B,) closed form, or (k, B) Monte Carlo
        return LossTerms(-bound.mean(), -log_px.mean(), kl.mean())

    def __repr__(self) -> str:
        return f"IWAE(reconstruction={self.reconstruction!r}, k={self.k})"


class BetaTCVAE(Objective):
    """recon + alpha * MI + beta * TC + gamma * dimension-wise KL (Chen et al. 2018).

    The KL to the prior splits, per image, into the index-code mutual information
    E[log q(z|x) - log q(z)], the total correlation E[log q(z) - sum_d log q(z_d)] and the
    dimension-wise KL E[sum_d log q(z_d) - log p(z)]; the three add up to the Monte-Carlo
    KL exactly, so alpha = beta = gamma = 1 is the ELBO. q(z) and q(z_d) are the aggregate
    posterior of the split being passed (N images, told by start_pass), estimated from
    the batch (M images): `estimator=mss`, minibatch stratified sampling, weighs an
    image's own posterior 1/N, one other (N - M + 1) / (N (M - 1)) and the rest 1 / (M - 1);
    `mws`, minibatch weighted sampling, weighs its own 1/N and the others alike. Both are
    mixtures whose weights sum to 1, so the terms are estimates of the quantities
    themselves (the paper's printed MWS formula is off by a constant, log N, in each).
    The warm-up factor scales all three terms.
    """

    min_batch = 2

    def __init__(self, reconstruction: str | Likelihood = "bce", alpha: Weight = 1.0, beta: Weight = 6.0, gamma: Weight = 1.0,
                 estimator: Literal["mss", "mws"] = "mss"):
        super().__init__(reconstruction)
        self._check_weights(alpha=alpha, beta=beta, gamma=gamma)
        if estimator not in ("mss", "mws"):
            raise ValueError(f"estimator must be mss or mws, got {estimator!r}")
        self.alpha, self.beta, self.gamma, self.estimator = float(alpha), float(beta), float(gamma), estimator
        self.dataset_size = 0

    def bind(self, model):
        self._needs_gaussian_posterior(model, "loss=beta_tcvae")

    def start_pass(self, images, training):
        self.dataset_size = images

    def __call__(self, model, x, noise=None):
        q, z, recon = self._sample(model, x, noise)
        mi, tc, dwkl = kl_decomposition(z, *q.gaussian, model.prior_log_prob(z),
                                        max(self.dataset_size, len(x)), self.estimator)
        penalty = self.alpha * mi + self.beta * tc + self.gamma * dwkl
        total = recon.mean() + self.kl_scale * penalty.mean()
        return LossTerms(total, recon.mean(), model.kl(q, z).mean())

    def __repr__(self) -> str:
        return (f"BetaTCVAE(reconstruction={self.reconstruction!r}, alpha={self.alpha}, beta={self.beta}, "
                f"gamma={self.gamma}, estimator={self.estimator!r})")


def aggregate_log_weights(batch: int, dataset_size: int, estimator: str, device=None) -> torch.Tensor:
    """(M, M) log weights w_ij of q(z_i) ~ sum_j w_ij q(z_i | x_j); each row sums to 1 (see BetaTCVAE)."""
    n, m = float(dataset_size), batch
    if m == 1:
        return torch.zeros(1, 1, device=device)
    weights = torch.full((m, m), (n - 1) / (n * (m - 1)), device=device)  # mws: all others alike
    if estimator == "mss" and m > 2:
        weights.fill_(1 / (m - 1))
        rows = torch.arange(m, device=device)
        weights[rows, (rows + 1) % m] = (n - m + 1) / (n * (m - 1))  # the stratum of the images outside the batch
    weights.fill_diagonal_(1 / n)
    return weights.log()


def kl_decomposition(z, mu, logvar, log_pz, dataset_size: int, estimator: str = "mss"):
    """Per image (B,): index-code MI, total correlation and dimension-wise KL at z ~ q(z|x)."""
    # log q(z_i,d | x_j) for every pair in the batch: (B, B, D)
    pairs = -0.5 * ((z[:, None] - mu[None]).pow(2) / logvar.exp()[None] + logvar[None] + math.log(2 * math.pi))
    weights = aggregate_log_weights(len(z), dataset_size, estimator, z.device).to(z.dtype)
    log_qz = torch.logsumexp(pairs.sum(2) + weights, dim=1)
    log_qz_dims = torch.logsumexp(pairs + weights[..., None], dim=1).sum(1)
    log_qz_x = log_diagonal_normal(z, mu, logvar)
    return log_qz_x - log_qz, log_qz - log_qz_dims, log_qz_dims - log_pz


def permute_dims(z: torch.Tensor) -> torch.Tensor:
    """Each latent dimension shuffled across the batch on its own: samples of prod_d q(z_d)."""
    return torch.stack([column[torch.randperm(len(z), device=z.device)] for column in z.T], dim=1)


class FactorVAE(Objective):
    """recon + KL + gamma * TC, the total correlation estimated by a discriminator (Kim & Mnih 2018).

    The discriminator tells codes z ~ q(z) (a batch's) from codes of prod_d q(z_d) (the same
    batch with each dimension permuted on its own); its logit difference estimates
    log q(z) / prod_d q(z_d), whose batch mean is the TC penalised here. It trains in
    after_step on the batch's codes (detached), with its own Adam (the paper's lr and
    betas), and its weights and optimizer state go into the checkpoint with the objective.
    The warm-up factor scales the KL and the TC term.
    """

    min_batch = 2  # no permutation of one code

    def __init__(self, reconstruction: str | Likelihood = "bce", gamma: Weight = 10.0, discriminator_hidden: Count = 256,
                 discriminator_layers: Count = 3, discriminator_lr: float = 1e-4):
        super().__init__(reconstruction)
        self._check_weights(gamma=gamma)
        if discriminator_hidden < 1 or discriminator_layers < 1 or not 0 < discriminator_lr < math.inf:
            raise ValueError("discriminator_hidden and discriminator_layers must be >= 1 and discriminator_lr > 0, got "
                             f"{discriminator_hidden}, {discriminator_layers} and {discriminator_lr}")
        self.gamma = float(gamma)
        self.hidden, self.layers, self.lr = int(discriminator_hidden), int(discriminator_layers), float(discriminator_lr)
        self.discriminator: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._codes: torch.Tensor | None = None

    def bind(self, model):
        layers, width = [], model.latent_dim
        for _ in range(self.layers):
            layers += [torch.nn.Linear(width, self.hidden), torch.nn.LeakyReLU(0.2)]
            width = self.hidden
        self.discriminator = torch.nn.Sequential(*layers, torch.nn.Linear(width, 2))
        self.optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=self.lr, betas=(0.5, 0.9))

    def to(self, device):
        self.discriminator.to(device)
        return self

    def __call__(self, model, x, noise=None):
        q, z, recon = self._sample(model, x, noise)
        kl = model.kl(q, z)
        logits = self.discriminator(z)
        tc = (logits[:, 0] - logits[:, 1]).mean()
        if torch.is_grad_enabled():
            self._codes = z.detach()
        total = recon.mean() + self.kl_scale * (kl.mean() + self.gamma * tc)
        return LossTerms(total, recon.mean(), kl.mean())

    def after_step(self):
        codes, self._codes = self._codes, None
        if codes is None:
            return
        self.discriminator.train()
        with torch.enable_grad():
            logits = self.discriminator(torch.cat([codes, permute_dims(codes)]))
            labels = torch.cat([torch.zeros(len(codes)), torch.ones(len(codes))]).long().to(codes.device)
            loss = torch.nn.functional.cross_entropy(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()

    def state_dict(self):
        return {"discriminator": self.discriminator.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.discriminator.load_state_dict(state["discriminator"])
        self.optimizer.load_state_dict(state["optimizer"])

    def __repr__(self) -> str:
        return (f"FactorVAE(reconstruction={self.reconstruction!r}, gamma={self.gamma}, "
                f"discriminator={self.layers}x{self.hidden})")


class DIPVAE(Objective):
    """recon + KL + lambda_od * sum_{i != j} C_ij^2 + lambda_d * sum_i (C_ii - 1)^2 (Kumar et al. 2018).

    C is the batch covariance of the posterior means (dip_type=i) or of the codes under the
    aggregate posterior, Cov[mu] + E[diag sigma^2] (dip_type=ii); pushing it towards the
    identity decorrelates the dimensions. The warm-up factor scales the KL and the penalty.
    """

    min_batch = 2  # a covariance needs two codes

    def bind(self, model):
        if self.dip_type == "ii":  # type i reads the posterior means only, which every posterior has
            self._needs_gaussian_posterior(model, "loss=dip_vae with dip_type=ii")

    def __init__(self, reconstruction: str | Likelihood = "bce", lambda_od: Weight = 10.0, lambda_d: Weight = 100.0,
                 dip_type: Literal["i", "ii"] = "i"):
        super().__init__(reconstruction)
        self._check_weights(lambda_od=lambda_od, lambda_d=lambda_d)
        if dip_type not in ("i", "ii"):
            raise ValueError(f"dip_type must be i or ii, got {dip_type!r}")
        self.lambda_od, self.lambda_d, self.dip_type = float(lambda_od), float(lambda_d), dip_type

    def __call__(self, model, x, noise=None):
        q, z, recon = self._sample(model, x, noise)
        kl = model.kl(q, z)
        mu = q.mean
        centred = mu - mu.mean(0)
        covariance = centred.T @ centred / len(mu)
        if self.dip_type == "ii":
            covariance = covariance + torch.diag(q.gaussian[1].exp().mean(0))
        diagonal = torch.diagonal(covariance)
        penalty = self.lambda_od * (covariance.pow(2).sum() - diagonal.pow(2).sum()) + self.lambda_d * (diagonal - 1).pow(2).sum()
        total = recon.mean() + self.kl_scale * (kl.mean() + penalty)
        return LossTerms(total, recon.mean(), kl.mean())

    def __repr__(self) -> str:
        return (f"DIPVAE(reconstruction={self.reconstruction!r}, dip_type={self.dip_type!r}, "
                f"lambda_od={self.lambda_od}, lambda_d={self.lambda_d})")
