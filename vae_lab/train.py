"""The train task: build everything from the config, run the epochs, write the artefacts.

Per epoch: a training pass, a test pass, the scheduler step, one metrics.csv row and
checkpoints/last.pt; every checkpoint_every epochs checkpoints/model_<epoch>.pt; every
plot_every epochs progress/ images. At the end the loss curves, and (by default) the
evaluate task on the last checkpoint.
"""
from __future__ import annotations

import copy
import logging
import signal
import time
from pathlib import Path
from typing import NamedTuple

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from vae_lab import plots
from vae_lab.checkpoint import (
    MACHINE_DATA_KEYS, check_data_fits, data_config_here, load_checkpoint, load_model_weights, load_objective_state, plain_config, restore_training_state,
    save_checkpoint, saved_config,
)
from vae_lab.data import ImageData, as_float
from vae_lab.engine import NonFiniteLossError, run_epoch
from vae_lab.errors import CheckpointError, ConfigError, VaeLabError, sigterm_as_keyboard_interrupt
from vae_lab.files import write_atomic
from vae_lab.layout import RunLayout
from vae_lab.likelihoods import bits_per_dim
from vae_lab.objectives import Objective
from vae_lab.options import EXPERIMENT_GROUPS
from vae_lab.outcome import TaskOutcome, training_outcome
from vae_lab.runtime import build, build_vae, resolve_device, seed_everything
from vae_lab.distributed import device_of_process, join, launched, rank, world_size, writer
from vae_lab.slurm import is_restart
from vae_lab.validate import attempt, declared_image_shape, dry_build

log = logging.getLogger(__name__)

# What defines the experiment, and so comes from the checkpoint when resuming.
EXPERIMENT_KEYS = (*EXPERIMENT_GROUPS, "seed")  # the groups a checkpoint builds (options.GROUP_BASES), and the seed
TRAIN_EXPERIMENT_KEYS = ("alpha", "kl_warmup_epochs")  # train: settings that shape the objective


class TrainingInterrupted(VaeLabError):
    """Ctrl-C or SIGTERM stopped training; the last completed epoch is checkpointed."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_code = 128 + signal_number


def train(cfg: DictConfig, run_dir: Path) -> TaskOutcome:
    """Train a VAE as `cfg` says, writing into `run_dir`.

    Returns what was written and, as its value for sweepers to minimise, the final test
    loss (or, with train.return_metric=test_neg_elbo, the test -ELBO at alpha = 1, which
    compares across alphas).
    """
    if launched():
        join()  # torchrun joined before Hydra started; a SLURM job's tasks join here
    device = device_of_process(resolve_device(cfg.device))
    layout = RunLayout(run_dir)
    main = writer()  # under torchrun rank 0 writes; the other processes compute their shards and read
    # resume=true, or a requeued SLURM job, continues the run in its folder from its last.pt; one that
    # never finished an epoch starts (from train.resume where it names a checkpoint, as the first start did).
    in_place = (cfg.get("resume") is True or is_restart()) and layout.last_checkpoint.is_file()
    if in_place:
        source, resumed = layout.last_checkpoint, _load_last_good(layout)
    else:
        if cfg.get("resume") is True or is_restart():
            _refuse_checkpoints_without_last(layout)
        elif main:
            _refuse_used_run_dir(run_dir)
        source = cfg.train.resume
        resumed = load_checkpoint(source) if source else None
    if resumed is not None:
        cfg = _config_for_resume(cfg, resumed, source, strict=in_place)
        if main:
            _record_what_runs(cfg, run_dir)
    finished = resumed is not None and in_place and resumed["epoch"] == cfg.train.epochs
    if finished and not (cfg.train.evaluate_at_end and not layout.report.is_file()):
        return _nothing_left(cfg, layout, resumed)
    if finished:
        log.info("resume=true: training had finished (epoch %d); what is left is the evaluation", resumed["epoch"])
    elif resumed is not None and resumed["epoch"] >= cfg.train.epochs:
        raise ConfigError(
            f"train.epochs={cfg.train.epochs}: the checkpoint {source} is already at epoch "
            f"{resumed['epoch']}. Set train.epochs above {resumed['epoch']} to continue training."
        )
    if resumed is not None and in_place and main and layout.results.exists():
        _keep_earlier_results(layout, resumed["epoch"])

    seed_everything(cfg.seed)
    data, model, objective, optimizer, scheduler, step = build_training(cfg, device)
    if cfg.train.evaluate_at_end:
        from vae_lab.evaluate import check_evaluation_fits, end_of_run_settings

        evaluation_cfg = end_of_run_settings(cfg)  # evaluate=auto: the light settings for a short run
        check_evaluation_fits(evaluation_cfg, data)  # before the epochs, not after them
    if launched():
        step = data_parallel(cfg, data, model, objective, step, device)
    shuffle = torch.Generator().manual_seed(cfg.seed)  # the same batches in every process
    history: list[dict] = []
    if resumed is not None:
        check_data_fits(resumed, data, source)
        _restore(resumed, source, model, objective, optimizer, scheduler, shuffle, device)
        history = list(resumed["history"])
        log.info("resumed from %s at epoch %d%s", source, resumed["epoch"], " (in place: resume=true)" if in_place else "")
    start_epoch = resumed["epoch"] if resumed is not None else 0

    log.info(
        "training %s (%d parameters) on %s: %s, %d train / %d test images; writing to %s",
        type(model).__name__, sum(p.numel() for p in model.parameters()), device,
        data.name, len(data.train_images), len(data.test_images), run_dir,
    )
    if len(data.train_images) < cfg.train.batch_size:
        log.warning("the training split holds %d images, fewer than train.batch_size=%d: each epoch is one batch of %d",
                    len(data.train_images), cfg.train.batch_size, len(data.train_images))
    config = plain_config(cfg)
    logger = build(cfg.logger)(run_dir) if main else NO_LOGGER
    logger.start(history, config)
    progress_images = as_float(data.test_images[: cfg.evaluate.reconstruction_rows * cfg.evaluate.images_per_row])
    saved_epoch = start_epoch
    figures = cfg.get("figures", True)

    def state(epoch: int) -> dict:
        return {
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "objective": objective.state_dict(),
            "rng": _rng_state(shuffle, device),
            "config": config,
            "history": history,
            "data": data.name,
            "image_shape": list(data.image_shape),
            "data_values": data.values,
        }

    epoch = start_epoch
    trained = False
    try:
        with sigterm_as_keyboard_interrupt():
            for epoch in range(start_epoch + 1, cfg.train.epochs + 1):
                objective.kl_scale = kl_warmup(epoch, cfg.train.kl_warmup_epochs)
                row = _run_one_epoch(epoch, cfg, model, step, optimizer, scheduler, data, shuffle)
                history.append(row)
                # The checkpoint first: after a kill between the two, metrics.csv is behind
                # last.pt (and a resumed run rewrites it from the checkpoint), never ahead.
                if main:
                    save_checkpoint(state(epoch), layout.last_checkpoint)
                saved_epoch = epoch
                logger.log_epoch(row)
                if main and (epoch % cfg.train.checkpoint_every == 0 or epoch == cfg.train.epochs):
                    save_checkpoint(state(epoch), layout.epoch_checkpoint(epoch))
                if main and figures and (epoch % cfg.train.plot_every == 0 or epoch == cfg.train.epochs):
                    _progress_images(model, progress_images, layout, epoch, cfg, logger)
            if main and figures:
                plots.loss_curves(history, layout.loss_curves)
        trained = True
    except NonFiniteLossError as error:
        raise VaeLabError(
            f"training diverged: {error} of epoch {epoch}. {_where_to_resume(layout, saved_epoch, cfg.train.epochs)} "
            "Lower optim.lr (or train.alpha) before continuing."
        ) from error
    except OSError as error:  # a full disk, a folder that became unwritable (save_checkpoint raises OSError for both)
        raise VaeLabError(
            f"cannot write to {getattr(error, 'filename', None) or run_dir} in epoch {epoch}: {error.strerror or error}. "
            f"{_where_to_resume(layout, saved_epoch, cfg.train.epochs)} Free space or fix permissions first."
        ) from error
    except KeyboardInterrupt as interrupt:
        number = interrupt.args[0] if interrupt.args else signal.SIGINT
        raise TrainingInterrupted(
            f"interrupted during epoch {epoch}. {_where_to_resume(layout, saved_epoch, cfg.train.epochs)}", int(number)
        ) from None
    finally:
        if not trained:  # the loggers record the run as failed or killed (they read the exception leaving here)
            logger.close()

    final = history[-1]
    log.info("done: test loss %.3f (recon %.3f, kl %.3f) after %d epochs", final["test_loss"], final["test_recon"], final["test_kl"], epoch)
    report = None
    try:  # the loggers stay open for the evaluation's report and figures, and close either way
        if cfg.train.evaluate_at_end and main:
            from vae_lab.evaluate import evaluate_model

            # The model in memory holds exactly the weights of last.pt (written above); a fresh
            # objective, as evaluating that file builds one (no warm-up factor, no autocast).
            objective.kl_scale = 1.0
            report = evaluate_model(evaluation_cfg, model, objective, data, epoch=epoch, checkpoint=layout.last_checkpoint,
                                    results_dir=layout.results)
            logger.log_report(report, layout.results)
    finally:
        logger.close()
    value = final["test_recon"] + final["test_kl"] if cfg.train.return_metric == "test_neg_elbo" else final["test_loss"]
    return training_outcome(run_dir, value, final, report)


class Training(NamedTuple):
    """What a training run is made of, built from the config."""

    data: ImageData
    model: torch.nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: object
    step: object  # the objective as the engine calls it: itself, or under autocast / compiled


def build_training(cfg: DictConfig, device: torch.device) -> Training:
    """Data on the device, model, objective, optimizer, scheduler and the step, as cfg says.

    The train task and benchmarks/speed.py both build through here, so the benchmark
    times exactly what `python run.py` runs.
    """
    data = attempt(cfg, "data", lambda: build(cfg.data))  # a loader's own ValueError: one line naming data
    if not isinstance(data, ImageData):
        raise ConfigError(f"data._target_={cfg.data._target_} returned {type(data).__name__}, not vae_lab.data.ImageData")
    data = data.to(device)
    if declared_image_shape(cfg) is None:  # a folder, an .npz: the config check could not probe the model before loading
        dry_build(cfg, data.image_shape)
    model, objective = build_vae(cfg.model, cfg.prior, cfg.loss, data.image_shape, cfg.get("posterior"))
    model = model.to(device)
    objective.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
        data = data.to(device, memory_format=torch.channels_last)
    optimizer = build(cfg.optim)(model.parameters())
    step = accelerated(objective, device, amp=cfg.train.amp, compile=cfg.train.compile)
    return Training(data, model, objective, optimizer, build(cfg.scheduler)(optimizer), step)


def kl_warmup(epoch: int, warmup_epochs: int) -> float:
    """The KL weight's factor in `epoch` (1-based): 0 in the first epoch, rising linearly to 1
    after `warmup_epochs` epochs (train.kl_warmup_epochs; 0 = always 1)."""
    return 1.0 if warmup_epochs <= 0 else min(1.0, (epoch - 1) / warmup_epochs)


class _Step:
    """An objective computed another way, called as the objective is; noise_shape and the loop's hooks
    are the objective's own."""

    def __init__(self, objective, call):
        self.objective, self._call = objective, call

    def __getattr__(self, name: str):
        return getattr(self.objective, name)

    def __call__(self, model, x, noise=None):
        return self._call(model, x, noise)


def _accelerated_step(objective: Objective, device: torch.device, amp: bool, compile: bool | str) -> _Step:
    """An objective under bfloat16 autocast and/or torch.compile."""
    call = objective.__call__
    if amp:
        call = torch.autocast(device.type, dtype=torch.bfloat16)(call)
    return _Step(objective, _compiled(call, compile))


def accelerated(objective: Objective, device: torch.device, *, amp: bool, compile: bool | str):
    """The objective itself, or wrapped for train.amp / train.compile."""
    return _accelerated_step(objective, device, amp, compile) if amp or compile is not False else objective


def _run_one_epoch(epoch, cfg, model, step, optimizer, scheduler, data, shuffle) -> dict:
    started = time.perf_counter()
    lr = optimizer.param_groups[0]["lr"]
    trained = run_epoch(
        model, step, data.train_images, cfg.train.batch_size, optimizer=optimizer, generator=shuffle,
        dynamic_binarization=data.dynamic_binarization, description=f"epoch {epoch}/{cfg.train.epochs}",
        shard=(rank(), world_size()) if launched() else None,
    )
    train_seconds = time.perf_counter() - started
    tested = run_epoch(model, step, data.test_images, cfg.evaluate.batch_size, description="test")
    scheduler.step()
    seconds = time.perf_counter() - started
    log.info(
        "epoch %d/%d  train %.3f  test %.3f (recon %.3f, kl %.3f)  lr %.3g  %.1fs",
        epoch, cfg.train.epochs, trained["loss"], tested["loss"], tested["recon"], tested["kl"], lr, seconds,
    )
    return {
        "epoch": epoch, "lr": lr,
        **{f"train_{k}": v for k, v in trained.items()},
        **{f"test_{k}": v for k, v in tested.items()},
        "train_seconds": round(train_seconds, 4), "seconds": round(seconds, 4), "data": data.name,
        **({"test_bits_per_dim": bits_per_dim(tested["recon"] + tested["kl"], data.image_shape)}
           if getattr(model, "module", model).likelihood.discrete else {}),
    }


def data_parallel(cfg: DictConfig, data: ImageData, model, objective: Objective, step, device):
    """The training step under torchrun: the objective inside DistributedDataParallel, so that each
    process's gradients are averaged over all; checked first against what cannot be split."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    world = world_size()
    if cfg.train.batch_size < world or len(data.train_images) < world:
        raise ConfigError(f"torchrun starts {world} processes, and train.batch_size={cfg.train.batch_size} with "
                          f"{len(data.train_images)} training images cannot give each an image of every batch: raise "
                          f"train.batch_size to at least {world}, or start fewer processes (--nproc_per_node).")
    if objective.state_dict():
        raise ConfigError(f"loss ({type(objective).__name__}) trains a network of its own, which vae_lab does not yet "
                          "average across processes: train it in one process (without torchrun).")
    if device.type == "cuda" and dist.get_backend() == "gloo":
        raise ConfigError("device=cuda under torchrun needs NCCL, and this process group is gloo only: run on the CPU "
                          "(device=cpu) or on a machine whose GPUs torch sees.")
    torch.manual_seed(cfg.seed + rank())  # the same weights everywhere (built above), other latent noise per process
    log.info("data-parallel over %d processes (%s): each trains on %d of every %d images", world, dist.get_backend(),
             cfg.train.batch_size // world, cfg.train.batch_size)

    class ObjectiveOfModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x, noise):
            return step(self.model, x, noise)

    parallel = DistributedDataParallel(ObjectiveOfModel(), device_ids=[device.index or 0] if device.type == "cuda" else None)
    return _Step(step, lambda model, x, noise: parallel(x, noise))


class _NoLogger:
    """The loggers of a process that does not write (torchrun rank > 0)."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


NO_LOGGER = _NoLogger()


def _compiled(function, setting: bool | str):
    """`function` itself (false), torch.compile'd (true), or compiled with a named backend."""
    if setting is False:
        return function
    return torch.compile(function) if setting is True else torch.compile(function, backend=setting)


def _refuse_used_run_dir(run_dir: Path) -> None:
    layout = RunLayout(run_dir)
    if layout.metrics_csv.exists() or layout.checkpoints.exists():
        raise VaeLabError(
            f"{run_dir} already holds a training run; refusing to write over it. "
            "Pick a new directory (hydra.run.dir=...) or let Hydra make one."
        )


def _config_for_resume(cfg: DictConfig, resumed: dict, path, strict: bool = False) -> DictConfig:
    """The experiment as the checkpoint recorded it, with this run's train settings and data location.

    train.resume (strict=False) takes the experiment from the file and says which given values it
    ignores; resume=true (strict) composed its config from the run's own record, so any difference
    means the folder's checkpoint is not this run's, or the command changes the experiment: refused.
    """
    saved = saved_config(resumed, path, tuple(cfg.trusted_modules))
    cfg = copy.deepcopy(cfg)
    ignored = [key for key in EXPERIMENT_KEYS if _plain(cfg[key], MACHINE_DATA_KEYS) != _plain(saved[key], MACHINE_DATA_KEYS)]
    defaults = {"kl_warmup_epochs": 0}  # checkpoints from before warm-up existed
    ignored += [f"train.{key}" for key in TRAIN_EXPERIMENT_KEYS if cfg.train[key] != saved.train.get(key, defaults.get(key))]
    if ignored and strict:
        raise ConfigError(
            f"resume=true: {path} was trained with other settings of {', '.join(ignored)} than this command composes from "
            "the run's record: the checkpoint belongs to another config, or the command changes the experiment. Continue it with "
            f"its own settings (leave {ignored[0]} out), or into a new folder with train.resume={path}."
        )
    if ignored:
        log.warning("train.resume: the settings of %s come from the checkpoint; the values given now are ignored", ", ".join(ignored))
    with open_dict(cfg):
        data = data_config_here(resumed, saved, cfg.data)
        for key in EXPERIMENT_KEYS:
            cfg[key] = saved[key]
        cfg.data = data
        if "fallback" in cfg.data:
            cfg.data.fallback = False  # resuming never switches data sets: missing data stops the run
        for key in TRAIN_EXPERIMENT_KEYS:
            cfg.train[key] = saved.train.get(key, defaults.get(key))
    return cfg


def _nothing_left(cfg: DictConfig, layout: RunLayout, resumed: dict) -> TaskOutcome:
    """resume=true on a run that is complete: nothing is run or written; its outcome as it stands."""
    import json

    log.info("resume=true: %s is complete at epoch %d of train.epochs=%d; nothing left to do (raise train.epochs to "
             "train on)", layout.root, resumed["epoch"], cfg.train.epochs)
    final = resumed["history"][-1]
    try:
        report = json.loads(layout.report.read_text())
        report = report if isinstance(report, dict) and {"neg_elbo", "iw_nll", "iw_samples", "active_units", "latent_dim"} <= set(report) else None
    except (OSError, UnicodeDecodeError, ValueError):
        report = None  # absent or unreadable: the outcome points at the training's files instead
    value = final["test_recon"] + final["test_kl"] if cfg.train.return_metric == "test_neg_elbo" else final["test_loss"]
    return training_outcome(layout.root, value, final, report)


def _refuse_checkpoints_without_last(layout: RunLayout) -> None:
    """resume=true in a folder with epoch checkpoints but no last.pt: something removed it; never start over them."""
    found = sorted(layout.checkpoints.glob("model_*.pt")) if layout.checkpoints.is_dir() else []
    if found:
        raise ConfigError(f"resume=true: {layout.checkpoints} holds {found[-1].name} but no last.pt. Continue from it into a "
                          f"new folder: python run.py task=train train.resume={found[-1]}")


def _load_last_good(layout: RunLayout) -> dict:
    """last.pt, or a message naming the newest epoch checkpoint that loads and the command that continues from it."""
    try:
        return load_checkpoint(layout.last_checkpoint)
    except CheckpointError as error:
        good = None
        for candidate in sorted(layout.checkpoints.glob("model_*.pt"), key=_epoch_of, reverse=True):
            try:
                load_checkpoint(candidate)
            except CheckpointError:
                continue
            good = candidate
            break
        hint = (f"The newest good checkpoint is {good.name}: continue from it into a new folder with "
                f"python run.py task=train train.resume={good}" if good else "No epoch checkpoint in that folder loads either.")
        raise CheckpointError(f"resume=true: {error} {hint}") from None


def _epoch_of(path: Path) -> int:
    digits = path.stem.removeprefix("model_")
    return int(digits) if digits.isdigit() else -1


def _keep_earlier_results(layout: RunLayout, epoch: int) -> None:
    """A finished run continued in place: its results/ (of `epoch`) move aside to results_epoch<N>/, never over."""
    target = layout.root / f"results_epoch{epoch}"
    if target.exists():
        raise ConfigError(f"resume=true: {layout.results} holds the results of an earlier evaluation and {target} exists too; "
                          "move one of them away first, so that nothing is written over.")
    layout.results.rename(target)
    log.info("the results of epoch %d moved to %s; the evaluation at the end writes %s anew", epoch, target, layout.results)


def _record_what_runs(cfg: DictConfig, run_dir: Path) -> None:
    """Hydra recorded the command line's config in <run>/.hydra/config.yaml; on resume the
    experiment comes from the checkpoint, so the record is rewritten to say what runs."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or not HydraConfig.get().output_subdir:
        return
    record = Path(run_dir) / str(HydraConfig.get().output_subdir) / "config.yaml"
    if record.is_file():
        write_atomic(record, OmegaConf.to_yaml(cfg))


def _plain(node, drop=()) -> object:
    value = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    return {k: v for k, v in value.items() if k not in drop} if isinstance(value, dict) else value


def _restore(resumed: dict, path, model, objective, optimizer, scheduler, shuffle: torch.Generator, device: torch.device) -> None:
    load_model_weights(model, resumed, path)
    load_objective_state(objective, resumed, path)
    restore_training_state(optimizer, scheduler, resumed, path)
    rng = resumed["rng"]
    torch.set_rng_state(rng["torch"])
    shuffle.set_state(rng["shuffle"])
    if device.type == "cuda" and rng.get("cuda"):
        torch.cuda.set_rng_state_all(rng["cuda"])


def _rng_state(shuffle: torch.Generator, device: torch.device) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "shuffle": shuffle.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
    }


def _where_to_resume(layout: RunLayout, saved_epoch: int, epochs: int) -> str:
    if saved_epoch == 0:
        return "No checkpoint was written."
    last = layout.last_checkpoint
    return f"{last} holds epoch {saved_epoch}; continue with: python run.py task=train train.resume={last} train.epochs={epochs}"


PROGRESS_SAMPLE_SEED = 0  # every progress figure decodes the same prior draw, so epochs compare


@torch.no_grad()
def _progress_images(model, images: torch.Tensor, layout: RunLayout, epoch: int, cfg: DictConfig, logger) -> None:
    model.eval()
    per_row = min(cfg.evaluate.images_per_row, len(images))  # a test split smaller than a row
    with model.prior_frozen():
        reconstruction = plots.reconstruction_grid(
            images, model.reconstruct(images), layout.progress_image("reconstruction", epoch), per_row=per_row,
            title=f"Reconstructions after epoch {epoch} (odd rows: originals, even rows: reconstructions)",
        )
        samples = model.sample(len(images), generator=torch.Generator().manual_seed(PROGRESS_SAMPLE_SEED))
    grid = plots.image_grid(samples, layout.progress_image("samples", epoch), nrow=per_row,
                            title=f"Samples from the prior after epoch {epoch}")
    logger.log_images("reconstruction", reconstruction, epoch)
    logger.log_images("samples", grid, epoch)
