"""One pass over a split: training (with an optimizer) or evaluation (without), one code path.

The loop knows nothing of files, plots or configs. Loss sums stay on the device and
are read back only every `sync_every` steps (every step on the CPU, where reading is
free), which is also when the progress bar is refreshed and non-finite losses are caught.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from vae_lab.loss import LossTerms
from vae_lab.model import reparameterize
from vae_lab.data import index_batches

EVAL_NOISE_SEED = 0  # evaluation draws the same z for every image, every epoch, every device


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""

    def __init__(self, step: int, value: float):
        super().__init__(f"the loss is {value} at step {step}")
        self.step = step
        self.value = value


def elbo_terms(model, loss_fn, x: torch.Tensor, noise: torch.Tensor | None = None) -> LossTerms:
    """The loss terms of one batch x (B, 1, 28, 28) with one sample z ~ q(z|x)."""
    mu, logvar = model.encode(x)
    z = reparameterize(mu, logvar, noise)
    return loss_fn(x, model.decode_logits(z), mu, logvar)


def run_epoch(
    model,
    loss_fn,
    images: torch.Tensor,
    batch_size: int,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
    dynamic_binarization: bool = False,
    amp: bool = False,
    terms_fn=elbo_terms,
    description: str = "",
    sync_every: int | None = None,
) -> dict[str, float]:
    """Train (optimizer given) or evaluate (no optimizer) on all `images` (N, 1, 28, 28).

    Training shuffles with `generator` and draws z from the global RNG; evaluation
    goes in order with fixed noise, so its result is a deterministic function of
    the weights. `amp` runs the step under bfloat16 autocast; `terms_fn` may be a
    compiled `elbo_terms`. Returns the per-image means of loss, recon and kl.
    """
    training = optimizer is not None
    device = images.device
    n = images.shape[0]
    if sync_every is None:
        sync_every = 1 if device.type == "cpu" else 50
    model.train(training)
    noise = None
    if not training:
        # Drawn on the CPU so CPU and GPU evaluations see the same z.
        cpu_generator = torch.Generator().manual_seed(EVAL_NOISE_SEED)
        noise = torch.randn(n, model.latent_dim, generator=cpu_generator).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, recon, kl, summed over images
    batches = list(index_batches(n, batch_size, generator=generator if training else None, device=device))
    bar = tqdm(batches, desc=description, leave=False, disable=None, dynamic_ncols=True, unit="batch")
    seen = 0
    with torch.set_grad_enabled(training):
        for step, index in enumerate(bar, start=1):
            x = images[index]
            if dynamic_binarization and training:
                x = torch.bernoulli(x)
            with autocast:
                terms = terms_fn(model, loss_fn, x, None if noise is None else noise[index])
            if training:
                optimizer.zero_grad(set_to_none=True)
                terms.total.backward()
                optimizer.step()
            sums += torch.stack([t.detach().double() for t in terms]) * len(index)
            seen += len(index)
            if step % sync_every == 0 or step == len(batches):
                mean_loss = sums[0].item() / seen
                if not math.isfinite(mean_loss):
                    raise NonFiniteLossError(step, mean_loss)
                bar.set_postfix(loss=f"{mean_loss:.2f}", refresh=False)
    loss, recon, kl = (sums / n).tolist()
    return {"loss": loss, "recon": recon, "kl": kl}
