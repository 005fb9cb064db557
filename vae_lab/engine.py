"""One pass over a split: training (with an optimizer) or evaluation (without), one code path.

The loop knows nothing of files, plots or configs. Loss sums stay on the device and
are read back only every `sync_every` steps (every step on the CPU, where reading is
free), which is also when the progress bar is refreshed and non-finite losses are caught.
"""
from __future__ import annotations

import logging
import math
import time

import torch
from tqdm.auto import tqdm

from vae_lab.data import as_float, index_batches
from vae_lab.errors import VaeLabError

log = logging.getLogger(__name__)

EVAL_NOISE_SEED = 0  # evaluation draws the same z for every image, every epoch, every device


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""

    def __init__(self, step: int, value: float):
        super().__init__(f"the loss is {value} at step {step}")
        self.step = step
        self.value = value


def run_epoch(
    model,
    objective,
    images: torch.Tensor,
    batch_size: int,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
    dynamic_binarization: bool = False,
    description: str = "",
    sync_every: int | None = None,
    shard: tuple[int, int] | None = None,
) -> dict[str, float]:
    """Train (optimizer given) or evaluate (no optimizer) on all `images` (N, C, H, W), uint8 or float (as_float).

    `objective(model, x, noise) -> LossTerms` (vae_lab.objectives, possibly under
    autocast or compiled: train.accelerated) owns the forward pass; this loop only
    backpropagates its total. Training shuffles with `generator` and draws z from the
    global RNG; evaluation goes in order with fixed noise, so its result is a
    deterministic function of the weights. Returns the per-image means of loss, recon, kl.

    shard=(rank, world) (torchrun, training only): every process walks the same batches and
    trains on its share of each, images rank, rank + world, ...; the objective is then the
    DistributedDataParallel step, which averages the gradients. A batch with fewer images
    than processes is left out, and the means are over all processes' images.
    """
    training = optimizer is not None
    device = images.device
    n = images.shape[0]
    if sync_every is None:
        sync_every = 1 if device.type == "cpu" else 50
    model.train(training)
    objective.start_pass(n, training)
    noise = None
    if not training:
        # Drawn on the CPU so CPU and GPU evaluations see the same z.
        cpu_generator = torch.Generator().manual_seed(EVAL_NOISE_SEED)
        noise = torch.randn(n, *objective.noise_shape(model.latent_dim), generator=cpu_generator).to(device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, recon, kl, summed over images
    batches = list(index_batches(n, batch_size, generator=generator if training else None, device=device))
    if training and len(batches) > 1 and len(batches[-1]) == 1 and _has_batch_norm(model):
        # BatchNorm may not train on one image (where a layer's features are 1 x 1): that image sits this
        # epoch out, and the shuffle puts another one last in the next
        batches = batches[:-1]
    rank, world = shard if shard is not None and training else (0, 1)
    if world > 1:
        batches = [index[rank::world] for index in batches if len(index) >= world]
    bar = tqdm(batches, desc=description, leave=False, disable=None, dynamic_ncols=True, unit="batch")
    seen = 0
    with torch.set_grad_enabled(training), bar:  # the bar is closed (its line cleared) before any error is printed
        for step, index in enumerate(bar, start=1):
            x = as_float(images[index])
            if dynamic_binarization and training:
                x = torch.bernoulli(x)
            try:
                terms = objective(model, x, None if noise is None else noise[index])
            except ValueError as error:  # a split of one training image, and a BatchNorm layer that needs two
                if training and len(x) == 1 and "more than 1 value per channel" in str(error):
                    raise VaeLabError(f"one training image cannot train {type(model).__name__}, whose BatchNorm layers need "
                                      "two or more per batch here: use more training images (data.limit, the data set) "
                                      "or a model without BatchNorm") from None
                raise
            if training:
                optimizer.zero_grad(set_to_none=True)
                terms.total.backward()
                optimizer.step()
                objective.after_step()  # an objective's own network (FactorVAE's discriminator) trains here
            sums += torch.stack([t.detach().double() for t in terms]) * len(index)
            seen += len(index)
            if step % sync_every == 0 or step == len(batches):
                if world == 1:
                    mean_loss = sums[0].item() / seen
                else:  # every process sees the same mean, so all stop together on a non-finite loss
                    total = _over_processes(torch.stack([sums[0], sums.new_tensor(float(seen))]), world)
                    mean_loss = total[0].item() / total[1].item()
                if not math.isfinite(mean_loss):
                    raise NonFiniteLossError(step, mean_loss)
                bar.set_postfix(loss=f"{mean_loss:.2f}", refresh=False)
    if world > 1:  # one exchange: the three sums and the images they are over
        *totals, seen_all = _over_processes(torch.cat([sums, sums.new_tensor([float(seen)])]), world).tolist()
        loss, recon, kl = (total / seen_all for total in totals)
    else:
        loss, recon, kl = (sums / seen).tolist()
    return {"loss": loss, "recon": recon, "kl": kl}


# Off a terminal (run.log, a SLURM job's output) a long step logs a line about this often instead of a bar.
LOG_EVERY_SECONDS = 30.0


def progress(iterable, description: str, *, total: int | None = None, unit: str = "batch"):
    """Iterate with a tqdm bar on a terminal; elsewhere with a log line about every LOG_EVERY_SECONDS, so a
    step that takes minutes (the IW bound, the feature classifier, the sample metrics) shows it is alive."""
    total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    bar = tqdm(iterable, desc=description, total=total, leave=False, disable=None, dynamic_ncols=True, unit=unit)
    started = last = time.perf_counter()
    with bar:
        for done, item in enumerate(bar, start=1):
            yield item
            now = time.perf_counter()
            if bar.disable and now - last >= LOG_EVERY_SECONDS:
                log.info("%s: %d%s %s after %.0f s", description, done, f" of {total}" if total else "",
                         {"batch": "batches"}.get(unit, unit + "s"), now - started)
                last = now


def _has_batch_norm(model) -> bool:
    return any(isinstance(module, torch.nn.modules.batchnorm._BatchNorm) for module in model.modules())


def _over_processes(values: torch.Tensor, world: int) -> torch.Tensor:
    """The sum over all processes of `values` (itself with one process)."""
    if world == 1:
        return values
    import torch.distributed as dist

    values = values.clone()
    dist.all_reduce(values)
    return values
