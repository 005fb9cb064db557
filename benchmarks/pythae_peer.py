"""(d) in benchmarks/speed.py: pythae, the library a user might pick instead, on the same ConvVAE.

pythae comes with the optional `bench` extra (pip install -e '.[bench]'); speed.py imports
this module only when it is wanted, and says so when pythae cannot be imported.

The encoder and decoder below wrap the modules of a vae_lab ConvVAE (the same layers and
the same initial weights), so only what surrounds the network differs: pythae's BetaVAE
loss (beta = train.alpha; its VAE is the beta = 1 case), its BaseTrainer with a DataLoader
over a BaseDataset held on the host, and its `get_nll`.

What pythae's numbers mean, next to vae_lab's:
- loss: per image, BCE summed over pixels (F.binary_cross_entropy on the Sigmoid output,
  whose logs torch clamps at -100) + beta * KL summed over latent dimensions, averaged over
  the batch: the same quantity as vae_lab's loss, which works on the logits instead.
  Its epoch figure is the unweighted mean of the batch means (the short last batch counts
  as much as a full one); vae_lab divides the sum over images by the number of images.
- get_nll(data, n_samples, batch_size) returns the mean *log* p(x) (vae_lab reports
  -log p(x)); it takes one image at a time and repeats it `batch_size` times, so the number
  of importance samples is batch_size when n_samples <= batch_size, else
  batch_size * (n_samples // batch_size). `importance_weighted_nll` below asks for
  exactly k. It neither switches to eval mode nor disables autograd: the caller does.
- precision: fp32. pythae's trainer has an `amp` switch (float16 autocast) but turns it off
  for models with the bce loss, so fp32 is the fastest it trains this model.
"""
from __future__ import annotations

import copy

import torch
from pythae.data.datasets import BaseDataset
from pythae.models import BetaVAE, BetaVAEConfig
from pythae.models.base.base_utils import ModelOutput
from pythae.models.nn import BaseDecoder, BaseEncoder
from pythae.trainers import BaseTrainer, BaseTrainerConfig
from torch import nn

from vae_lab.data import as_float


class ConvEncoder(BaseEncoder):
    """A vae_lab ConvVAE's encoder as pythae wants it: embedding = mu, log_covariance = log-variance."""

    def __init__(self, conv_vae):
        super().__init__()
        self.features = conv_vae.encoder_conv
        self.mean = conv_vae.encoder_mean
        self.log_variance = conv_vae.encoder_std  # the reference's name for the log-variance head

    def forward(self, x: torch.Tensor) -> ModelOutput:
        h = self.features(x)  # (B, features)
        return ModelOutput(embedding=self.mean(h), log_covariance=self.log_variance(h))


class ConvDecoder(BaseDecoder):
    """A vae_lab ConvVAE's decoder; pythae's BCE wants intensities in [0, 1], not logits."""

    def __init__(self, conv_vae):
        super().__init__()
        self.layers = conv_vae.decoder
        # Today the decoder ends in the reference's Sigmoid; a decoder that ends in logits gets one here.
        self.to_intensities = nn.Identity() if isinstance(self.layers[-1], nn.Sigmoid) else nn.Sigmoid()

    def forward(self, z: torch.Tensor) -> ModelOutput:
        return ModelOutput(reconstruction=self.to_intensities(self.layers(z)))  # (B, 1, 28, 28)


def pythae_vae(conv_vae, alpha: float) -> BetaVAE:
    """pythae's beta-VAE around `conv_vae`'s own modules (shared, not copied)."""
    config = BetaVAEConfig(input_dim=(1, 28, 28), latent_dim=conv_vae.latent_dim, reconstruction_loss="bce", beta=alpha)
    return BetaVAE(config, encoder=ConvEncoder(conv_vae), decoder=ConvDecoder(conv_vae))


def pythae_trainer(model: BetaVAE, train_images, test_images, *, batch_size: int, eval_batch_size: int,
                   lr: float, device: torch.device, output_dir) -> BaseTrainer:
    """pythae's own trainer, ready to run epochs: data on the host, Adam at `lr`, on `device`."""
    config = BaseTrainerConfig(
        output_dir=str(output_dir), per_device_train_batch_size=batch_size, per_device_eval_batch_size=eval_batch_size,
        num_epochs=1, learning_rate=lr, optimizer_cls="Adam", no_cuda=device.type != "cuda",
    )
    initial = copy.deepcopy(model.state_dict())
    trainer = BaseTrainer(model, as_dataset(train_images), as_dataset(test_images), training_config=config)
    # Its sanity check ran one training-mode forward pass, which moved BatchNorm's running
    # statistics; put them back so that (d) starts from exactly the state (a)-(c) start from.
    model.load_state_dict(initial)
    trainer.prepare_training()  # optimizer, callbacks (its progress bar), its output folder
    return trainer


def as_dataset(images: torch.Tensor) -> BaseDataset:
    """Images (N, 1, 28, 28) as pythae's dataset, on the host as its trainer expects (labels unused)."""
    return BaseDataset(as_float(images.cpu()), torch.zeros(len(images)))


def train_epoch(trainer: BaseTrainer, epoch: int = 1) -> float:
    """One training epoch as BaseTrainer.train runs it, less its eval pass, best-model copy and saving."""
    loss = trainer.train_step(epoch)
    trainer.callback_handler.on_epoch_end(training_config=trainer.training_config)
    return loss


def evaluation_pass(trainer: BaseTrainer, epoch: int = 1) -> float:
    """pythae's evaluation pass over the test set: the mean of its batch losses."""
    loss = trainer.eval_step(epoch)
    trainer.callback_handler.on_epoch_end(training_config=trainer.training_config)
    return loss


@torch.no_grad()
def importance_weighted_nll(model: BetaVAE, images: torch.Tensor, k: int) -> float:
    """-log p(x) from pythae's get_nll with exactly k samples, in eval mode, without autograd."""
    model.eval()
    return -float(model.get_nll(images, n_samples=k, batch_size=k))
