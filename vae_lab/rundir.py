"""Who may write into a run or sweep directory: one process at a time, and never over a run.

A Hydra callback decides from the directory Hydra actually resolved (interpolations,
quotes and `${now:}` included), before Hydra writes its `.hydra/` record there:
`on_run_start` and `on_multirun_start` run before Hydra creates the folder. The
claim is an flock on a lock file in the folder, held for the run: it dies with the
process, so a killed run's lock is reclaimed by the next one without any clean-up.
"""
from __future__ import annotations

import copy
import fcntl
import logging
import os
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from vae_lab.errors import VaeLabError

log = logging.getLogger(__name__)

LOCK_FILE = ".vae_lab.lock"
# What a start that was refused (or crashed before any work) leaves behind: not a run.
RUN_RECORD = frozenset({".hydra", "run.log", LOCK_FILE})
SWEEP_RECORD = frozenset({LOCK_FILE})
USER_ERROR_EXIT = 2


class RunDirectoryError(VaeLabError):
    """A run directory that already holds a run, is used by another process, or cannot be created."""


def claim(folder: Path, setting: str, record: frozenset = RUN_RECORD):
    """Create `folder` if needed and lock it for this process; return the open lock file (keep it open).

    Refused when the folder holds anything beyond `record` or another process holds its lock.
    """
    _refuse_used(folder, setting, record)
    _create(folder, setting)
    lock = open(folder / LOCK_FILE, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise RunDirectoryError(
            f"{setting}={folder} is in use by another vae_lab process (pid {holder}); two runs must not share a "
            "directory. Wait for it to finish (or stop it), or choose another folder."
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    try:
        _refuse_used(folder, setting, record)  # a run that finished while we waited for the lock
    except RunDirectoryError:
        lock.close()
        raise
    return lock


def leftovers(folder: Path, record: frozenset = RUN_RECORD) -> list[str]:
    """The entries of `folder` that are more than the record of a refused start."""
    if not folder.is_dir():
        return []
    return sorted(entry.name for entry in folder.iterdir() if entry.name not in record)


def _refuse_used(folder: Path, setting: str, record: frozenset) -> None:
    found = leftovers(folder, record)
    if found:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise RunDirectoryError(
            f"{setting}={folder} already holds files ({shown}); refusing to write over them. Choose a new or empty folder."
        )


def _create(folder: Path, setting: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        why = f"{existing} is a file" if existing.is_file() else (error.strerror or str(error))
        raise RunDirectoryError(f"{setting}={folder}: cannot create it ({why}). Choose a writable folder.") from None


def shared_job_folder(config: DictConfig) -> str | None:
    """The job folder two different jobs of this sweep would both get, if hydra.sweep.subdir gives them one.

    The subdir is resolved for two made-up jobs that differ in number, id and overrides;
    a value that does not change would make every job write over the previous one.
    """
    probe = copy.deepcopy(config)
    folders = []
    previous = HydraConfig.instance().cfg
    try:
        for number in (0, 1):
            with read_write(probe.hydra.job), open_dict(probe.hydra.job):
                probe.hydra.job.num = number
                probe.hydra.job.id = f"probe_{number}"
                probe.hydra.job.override_dirname = f"probe={number}"
            HydraConfig.instance().set_config(probe)  # for ${hydra:...} in the subdir
            folders.append(str(OmegaConf.select(probe, "hydra.sweep.subdir")))
    except Exception:  # a subdir only a real job can resolve: the per-job check still guards it
        return None
    finally:
        HydraConfig.instance().cfg = previous
    return folders[0] if folders[0] == folders[1] else None


class RunDirectoryGuard(Callback):
    """Hydra callback: claim the run directory, the sweep directory and each job's directory."""

    def __init__(self) -> None:
        self._locks: dict[str, object] = {}

    def __getstate__(self) -> dict:
        return {"_locks": {}}  # a lock belongs to the process that took it (launchers pickle callbacks)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        HydraConfig.instance().set_config(config)  # for ${hydra:...} in hydra.run.dir
        folder = Path(os.path.normpath(Path(str(config.hydra.run.dir)).expanduser().absolute()))
        self._claim("run", folder, "hydra.run.dir", RUN_RECORD)

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        self._release("run")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        HydraConfig.instance().set_config(config)
        folder = Path(os.path.normpath(Path(str(config.hydra.sweep.dir)).expanduser().absolute()))
        shared = shared_job_folder(config)
        if shared is not None:
            raw = OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir")
            _refuse(f"hydra.sweep.subdir={raw} gives every job the same folder ({folder / shared}), so each job would "
                    "write over the previous one. Keep the default ${hydra.job.num}, or include it in the subdir.")
        self._claim("sweep", folder, "hydra.sweep.dir", SWEEP_RECORD | {"multirun.yaml"})

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self._release("sweep")

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            return  # the run directory was claimed in on_run_start
        # Hydra has just written this job's .hydra/ and run.log here; anything else is another job's.
        self._claim("job", Path(config.hydra.runtime.output_dir), "job directory", RUN_RECORD)

    def on_job_end(self, config: DictConfig, **kwargs) -> None:
        self._release("job")

    def _claim(self, kind: str, folder: Path, setting: str, record: frozenset) -> None:
        try:
            self._locks[kind] = claim(folder, setting, record)
        except RunDirectoryError as error:
            _refuse(str(error))

    def _release(self, kind: str) -> None:
        lock = self._locks.pop(kind, None)
        if lock is not None:
            lock.close()


def _refuse(message: str) -> None:
    """Stop before Hydra writes anything: one line, exit status 2 (a callback cannot return an error)."""
    if logging.getLogger().handlers:  # a job: Hydra's logging goes to the console and run.log
        log.error("%s", message)
    else:  # before Hydra configured logging
        print(f"error: {message}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT)
