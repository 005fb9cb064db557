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
import functools
import logging
import os
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from vae_lab.errors import USER_ERROR_EXIT, VaeLabError
from vae_lab.files import NO_FOLLOW
from vae_lab.layout import LOCK_FILE, RunLayout
from vae_lab.distributed import writer
from vae_lab.slurm import is_restart

LAST_CHECKPOINT = RunLayout(Path()).last_checkpoint

log = logging.getLogger(__name__)

# What a start that was refused (or crashed before any work) leaves behind: not a run
# (run_record names Hydra's record folder and log file as this config sets them).
RUN_RECORD = frozenset({".hydra", "run.log", LOCK_FILE})
SWEEP_RECORD = frozenset({LOCK_FILE})


class RunDirectoryError(VaeLabError):
    """A run directory that already holds a run, is used by another process, or cannot be created."""


def claim(folder: Path, setting: str, record: frozenset | None = RUN_RECORD):
    """Create `folder` if needed and lock it for this process; return the open lock file (keep it open).

    Refused when the folder holds anything beyond `record` (None: a run continued in place,
    resume=true, whose files are its own) or another process holds its lock.
    """
    _refuse_used(folder, setting, record)
    _create(folder, setting)
    try:  # never through a link planted at the lock's name (vae_lab.files: nothing is written through one)
        lock = os.fdopen(os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | NO_FOLLOW, 0o666), "r+")
    except OSError as error:
        raise RunDirectoryError(f"{setting}={folder}: cannot open its lock file {LOCK_FILE} ({error.strerror or error}); "
                                "a link or a folder of that name is not vae_lab's. Choose a new or empty folder.") from None
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


def run_record(config: DictConfig) -> frozenset:
    """RUN_RECORD with the names this config gives Hydra's record (hydra.output_subdir) and log file."""
    names = {LOCK_FILE, "run.log"}
    subdir = OmegaConf.select(config, "hydra.output_subdir")
    if subdir:
        parts = Path(str(subdir)).parts
        if Path(str(subdir)).is_absolute() or ".." in parts:
            raise RunDirectoryError(f"hydra.output_subdir={subdir} leaves the run directory: Hydra would write its record "
                                    "there, over whatever is there. Use a folder name inside the run, e.g. .hydra.")
        names.add(parts[0])
    handler = OmegaConf.select(config, "hydra.job_logging.handlers.file", default=None)
    if isinstance(handler, DictConfig) and "filename" in handler:
        # The raw text: it interpolates the output directory, which is not known yet; the name is its last part.
        names.add(Path(str(OmegaConf.to_container(handler, resolve=False)["filename"])).name)
    return frozenset(names)


def leftovers(folder: Path, record: frozenset = RUN_RECORD) -> list[str]:
    """The entries of `folder` that are more than the record of a refused start."""
    if not folder.is_dir():
        return []
    # A link at a record's name (.hydra, run.log) is not a record: Hydra would write through it.
    return sorted(entry.name for entry in folder.iterdir() if entry.name not in record or entry.is_symlink())


def _refuse_used(folder: Path, setting: str, record: frozenset | None) -> None:
    if record is None:
        return
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


BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def shared_job_folder(config: DictConfig) -> str | None:
    """A job folder that two jobs of this sweep would both get; None when every job gets its own.

    For Hydra's basic sweeper (grid sweeps, `-m a=1,2`) the subdir is resolved for every
    job it will launch, with each job's number, id and override_dirname computed as Hydra
    computes them: a subdir built from override_dirname with exclude_keys, or repeated
    sweep values, are caught too. For other sweepers (Optuna), whose jobs are not known
    in advance, two made-up jobs that differ in number, id and overrides are resolved.
    """
    jobs = _basic_sweep_jobs(config)
    if jobs is None:
        jobs = [["probe=0"], ["probe=1"]]
    seen: dict[str, int] = {}
    previous = HydraConfig.instance().cfg
    try:
        for number, overrides in enumerate(jobs):
            folder = _job_subdir(config, number, overrides)
            if folder in seen:
                return folder
            seen[folder] = number
    except Exception:  # a subdir only a real job can resolve: the per-job check still guards it
        return None
    finally:
        HydraConfig.instance().cfg = previous
    return None


def _basic_sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """The overrides of every job Hydra's basic sweeper will launch, in order; None for another sweeper."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if OmegaConf.select(config, "hydra.sweeper._target_") != BASIC_SWEEPER:
        return None
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)
    overrides = OverridesParser.create().parse_overrides(arguments)
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def _job_subdir(config: DictConfig, number: int, overrides: list[str]) -> str:
    """hydra.sweep.subdir as it resolves for job `number` with these overrides."""
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra.core.override_parser.overrides_parser import OverridesParser

    naming = config.hydra.job.config.override_dirname
    probe = copy.deepcopy(config)
    with read_write(probe.hydra.job), open_dict(probe.hydra.job):
        probe.hydra.job.num = number
        probe.hydra.job.id = f"probe_{number}"
        probe.hydra.job.override_dirname = get_overrides_dirname(
            OverridesParser.create().parse_overrides(overrides), list(naming.exclude_keys), naming.item_sep, naming.kv_sep)
    HydraConfig.instance().set_config(probe)  # for ${hydra:...} in the subdir
    return str(OmegaConf.select(probe, "hydra.sweep.subdir"))


def _fail_closed(hook):
    """Hydra turns an exception in a callback into a warning and goes on; for this guard that would
    mean writing unguarded. Any error it did not foresee stops the command instead, with exit 2."""

    @functools.wraps(hook)
    def guarded(self, config: DictConfig, **kwargs) -> None:
        try:
            hook(self, config, **kwargs)
        except (SystemExit, KeyboardInterrupt):
            raise
        except Exception as error:
            _refuse(f"could not check the run directory ({type(error).__name__}: {str(error).splitlines()[0]}); "
                    "stopped before the run, so that nothing is written unguarded. Check hydra.run.dir / hydra.sweep.*.")

    return guarded


class RunDirectoryGuard(Callback):
    """Hydra callback: claim the run directory, the sweep directory and each job's directory."""

    def __init__(self) -> None:
        self._locks: dict[str, object] = {}

    def __getstate__(self) -> dict:
        return {"_locks": {}}  # a lock belongs to the process that took it (launchers pickle callbacks)

    @_fail_closed
    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if not writer():
            return  # torchrun: rank 0 claims the run directory all ranks share
        HydraConfig.instance().set_config(config)  # for ${hydra:...} in hydra.run.dir
        folder = Path(os.path.normpath(Path(str(config.hydra.run.dir)).expanduser().absolute()))
        if config.get("resume") is True and not (folder / LAST_CHECKPOINT).is_file():
            _refuse(f"resume=true: hydra.run.dir={folder} holds no {LAST_CHECKPOINT} to continue from. Start the run "
                    "without resume=true, or name the folder of the run to continue.")
        self._claim("run", folder, "hydra.run.dir", None if _resuming(config) else lambda: run_record(config))

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        self._release("run")

    @_fail_closed
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        HydraConfig.instance().set_config(config)
        folder = Path(os.path.normpath(Path(str(config.hydra.sweep.dir)).expanduser().absolute()))
        shared = shared_job_folder(config)
        if shared is not None:
            raw = OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir")
            _refuse(f"hydra.sweep.subdir={raw} gives two jobs of this sweep the same folder ({folder / shared}), so one "
                    "would write over the other. Keep the default ${hydra.job.num}, or include it in the subdir.")
        self._claim("sweep", folder, "hydra.sweep.dir", None if _resuming(config) else SWEEP_RECORD | {"multirun.yaml"})

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self._release("sweep")

    @_fail_closed
    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if HydraConfig.get().mode != RunMode.MULTIRUN or not writer():
            return  # the run directory was claimed in on_run_start; a SLURM job's task 0 claims the job's
        # Hydra has just written this job's .hydra/ and run.log here; anything else is another job's.
        self._claim("job", Path(config.hydra.runtime.output_dir), "job directory",
                    None if _resuming(config) else lambda: run_record(config))

    def on_job_end(self, config: DictConfig, **kwargs) -> None:
        self._release("job")

    def _claim(self, kind: str, folder: Path, setting: str, record) -> None:
        try:
            self._locks[kind] = claim(folder, setting, record() if callable(record) else record)
        except RunDirectoryError as error:
            _refuse(str(error))

    def _release(self, kind: str) -> None:
        lock = self._locks.pop(kind, None)
        if lock is not None:
            lock.close()


def _resuming(config: DictConfig) -> bool:
    """resume=true, or a SLURM job restarted after a requeue: the folder's files are the run's own,
    to continue (vae_lab.train decides how)."""
    return config.get("resume") is True or is_restart()


def _refuse(message: str) -> None:
    """Stop before Hydra writes anything: one line, exit status 2 (a callback cannot return an error)."""
    if logging.getLogger().handlers:  # a job: Hydra's logging goes to the console and run.log
        log.error("%s", message)
    else:  # before Hydra configured logging
        print(f"error: {message}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT)
