"""Data-parallel training under torchrun: one model, N processes, one run directory.

`torchrun --nproc_per_node=N run.py ...` starts N copies of the command with WORLD_SIZE,
RANK, LOCAL_RANK and a rendezvous address in the environment. Before Hydra composes
anything, `prepare_arguments` joins the process group (gloo on the CPU; NCCL besides it
where there are GPUs) and gives every process the same run directory (rank 0's choice,
broadcast), and the processes other than rank 0 neither write Hydra's record nor run.log.
A SLURM job of several tasks (`hydra/launcher=slurm hydra.launcher.tasks_per_node=N`) is the
same: its tasks share the job folder Hydra gives them, and join one process group when
training starts. Training then splits each global batch of train.batch_size images into N shards, one
per process, and DistributedDataParallel averages the gradients; every process holds the
same weights after every step, and rank 0 alone writes checkpoints, metrics and figures.

BatchNorm is not synchronised: each process normalises its shard with the shard's own
statistics, and DistributedDataParallel copies rank 0's running statistics to the others
at every step (its default), so the checkpoint's are rank 0's.
"""
from __future__ import annotations

import datetime
import os
import sys

BACKENDS = ("auto", "gloo", "nccl")


def _slurm_tasks() -> bool:
    """A submitit SLURM job of several tasks (hydra.launcher.tasks_per_node > 1): one process per task."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and _number("SLURM_NTASKS", 1) > 1


def _number(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name) or default)
    except ValueError:
        return default


def world_size() -> int:
    """Processes training one model: torchrun's WORLD_SIZE, or a SLURM job's tasks."""
    return _number("WORLD_SIZE", _number("SLURM_NTASKS", 1) if _slurm_tasks() else 1)


def rank() -> int:
    return _number("RANK", _number("SLURM_PROCID", 0) if _slurm_tasks() else 0)


def join() -> None:
    """Join the process group, once: torchrun's environment says where; a SLURM job's tasks get it
    from submitit (the first node's address, a port drawn from the job id)."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ and _slurm_tasks():
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))


def device_of_process(device):
    """cuda means this process's GPU under torchrun (cuda:LOCAL_RANK); anything else as it is."""
    import torch

    if launched() and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK") or 0))
        torch.cuda.set_device(device)
    return device


def launched() -> bool:
    """Started by torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return world_size() > 1


def writer() -> bool:
    """This process writes the run directory: rank 0, or the only process."""
    return rank() == 0


def prepare_arguments(arguments: list[str]) -> list[str]:
    """Join the process group and give every process the same run directory; rank > 0 writes no record."""
    if not launched():
        return arguments
    import torch.distributed as dist

    from vae_lab.errors import ConfigError

    if any(a in ("-m", "--multirun") for a in arguments):
        raise ConfigError("torchrun trains one model in several processes; it does not run sweeps. Start the sweep "
                          "without torchrun, or run torchrun once per configuration.")
    join()
    given = [a for a in arguments if a.split("=", 1)[0] == "hydra.run.dir"]
    chosen = [None if given else datetime.datetime.now().strftime("outputs/%Y-%m-%d/%H-%M-%S-%f-ddp")]
    dist.broadcast_object_list(chosen, src=0)
    added = [] if given else [f"hydra.run.dir={chosen[0]}"]
    if not writer():  # rank 0 writes Hydra's record and run.log; the others only compute
        added += ["hydra.output_subdir=null", "hydra.job_logging.root.handlers=[console]", "hydra.job_logging.root.level=WARNING"]
    return [*arguments, *added]


def finish() -> None:
    dist = sys.modules.get("torch.distributed")  # never imported: nothing joined (and --help stays fast)
    if dist is not None and dist.is_initialized():
        dist.destroy_process_group()
