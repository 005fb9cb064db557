"""The command line: Hydra composes the config, `run_task` picks the task and runs it.

`python run.py ...`, `python -m vae_lab ...` and the `vae-lab ...` console script are
this same `main`.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from vae_lab.errors import USER_ERROR_EXIT, ConfigError, VaeLabError, first_line, signal_number, sigterm_as_keyboard_interrupt
from vae_lab.files import sqlite_problem, write_atomic
from vae_lab.layout import RunLayout, SweepLayout
from vae_lab.options import usable_cores
from vae_lab.outcome import TaskOutcome, closing_block
from vae_lab.distributed import finish as finish_distributed
from vae_lab.distributed import prepare_arguments, writer
from vae_lab.slurm import being_requeued, is_restart, requeued_by_submitit
from vae_lab.validate import validate

# Nothing here imports torch: a config error or `--help` answers in a fraction of a second.

log = logging.getLogger(__name__)


def find_config_dir() -> Path:
    """The configs: vae_lab/conf inside an installed wheel, else conf/ of the checkout.

    A wheel or `pip install .` ships the repository's conf/ as the vae_lab.conf package
    (setup.cfg's package_dir); a checkout, and an editable install of one, read conf/
    beside the package, so an edit there takes effect at once.
    """
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    return package.parent / "conf"  # absent: main() says so


CONFIG_DIR = find_config_dir()  # the one answer: the CLI, the tests and the benchmarks all use it
# The pid of the process that runs the command: a sweep job in that same process stops the sweep on a signal.
SWEEP_PROCESS = "VAE_LAB_COMMAND_PID"
# Hydra plugins behind the optional extras: the override that needs one -> (module, extra).
PLUGINS = {
    "hydra/launcher=joblib": ("hydra_plugins.hydra_joblib_launcher", "sweep"),
    "hydra/sweeper=optuna": ("hydra_plugins.hydra_optuna_sweeper", "sweep"),
    "experiment=optuna_search": ("hydra_plugins.hydra_optuna_sweeper", "sweep"),
    "hydra/launcher=submitit_local": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "hydra/launcher=submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "hydra/launcher=slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "hydra/launcher=ray": ("hydra_plugins.hydra_ray_launcher", "ray"),
    "hydra/launcher=ray_cluster": ("hydra_plugins.hydra_ray_launcher", "ray"),
}


def _train(cfg, run_dir):
    from vae_lab.train import train

    return train(cfg, run_dir)


def _evaluate(cfg, run_dir):
    from vae_lab.evaluate import evaluate

    return evaluate(cfg, run_dir)


def _summarize(cfg, run_dir):
    from vae_lab.sweep import summarize

    return summarize(cfg, run_dir)


TASK_FUNCTIONS = {"train": _train, "evaluate": _evaluate, "summarize": _summarize}
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def run_task(cfg: DictConfig, run_dir: Path) -> TaskOutcome:
    """Check the config, set torch's threads, run the task it names in `run_dir`, say where it went
    (under torchrun, rank 0 alone writes run.log and the closing block)."""
    _refuse_ignored_group_files()
    validate(cfg)
    with log_file(run_dir / "run.log") if writer() else contextlib.nullcontext():
        set_threads(cfg.get("threads"))
        outcome = TASK_FUNCTIONS[cfg.task](cfg, run_dir)
        if writer():
            log.info("%s", closing_block(outcome))
    return outcome


def _refuse_ignored_group_files() -> None:
    """A chosen group file that is not a mapping of settings (a YAML list, a bare value): Hydra composes
    it as nothing, so the run would silently be another experiment. Refuse it, naming the file."""
    import yaml

    if not HydraConfig.initialized():
        return  # a task called directly: no files were chosen
    hydra_cfg = HydraConfig.get()
    for source in hydra_cfg.runtime.config_sources:
        if source.get("schema") != "file":
            continue
        for group, choice in hydra_cfg.runtime.choices.items():
            if group.startswith("hydra") or not isinstance(choice, str):
                continue
            path = Path(source.path) / group / f"{choice}.yaml"
            try:
                content = yaml.safe_load(path.read_text()) if path.is_file() else None
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                continue  # Hydra read it already and reports what it cannot read
            if content is not None and not isinstance(content, dict):
                raise ConfigError(f"{group}={choice}: {path} holds a {type(content).__name__}, not a mapping of settings, "
                                  "and Hydra would compose it as nothing. Write it as `key: value` lines (a recipe "
                                  "starts with `# @package _global_`).")


def set_threads(threads: int | str | None) -> None:
    """torch.set_num_threads before any work: `threads`, the free cores (auto), or a share of the cores in a parallel sweep.

    The same count caps the BLAS and OpenMP pools that numpy and scikit-learn use (the gmm
    sampler, t-SNE, the latent probe): on a busy machine their default threads collapse as
    torch's do (the Gaussian mixture fit ran 2x slower with 2 threads than with 1 here).
    """
    launcher = _parallel_launcher()
    cores = usable_cores()
    share = threads_per_job(None, launcher, cores)  # what a launcher running jobs side by side gives each job
    free = free_cores(cores) if threads == "auto" and share is None else None  # measured only where it decides
    count = threads_per_job(threads, launcher, cores, free)
    if count is None:
        return
    import torch  # only here: `--help` and config errors should not wait for torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(count)
    threadpool_limits(limits=count)  # for the rest of the process
    if threads not in (None, "auto"):
        reason = f"threads={threads}"
    elif share is not None:
        reason = f"{launcher.get('_target_', '').rpartition('.')[2]} runs jobs side by side"
    else:
        reason = f"threads=auto: {free} of {cores} cores free"
    log.info("torch threads: %d (%s)", count, reason)


def threads_per_job(threads: int | str | None, launcher: dict | None, cores: int, free: int | None = None) -> int | None:
    """The thread count for this process, or None for torch's default.

    A number of the user's wins. `auto` (the default) and null let a launcher that runs jobs
    side by side share the cores; otherwise `auto` takes the `free` cores (measured by
    free_cores: on a machine shared with other work, threads beyond the free cores wait on
    each other), and null leaves torch's default. A launcher that runs jobs at once on this machine gives
    each job cores // (jobs at once): joblib runs hydra.launcher.n_jobs at once
    (negative counts back from the cores, as joblib does); submitit_local starts every
    job of the sweep at once and a job cannot tell how many there are, so it gets
    hydra.launcher.cpus_per_task threads if set, else 1.
    """
    if threads is not None and threads != "auto":
        return threads
    target = (launcher or {}).get("_target_", "")
    if target.endswith("JoblibLauncher"):
        n_jobs = launcher.get("n_jobs") or 1
        at_once = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)
        return max(1, cores // at_once)
    if target.endswith("submitit_launcher.LocalLauncher"):
        return launcher.get("cpus_per_task") or 1
    return free if threads == "auto" else None


def free_cores(cores: int, interval: float = 0.2) -> int | None:
    """The cores idle now, from /proc/stat over `interval` seconds (Linux); None where it cannot tell."""
    def sample():
        with open("/proc/stat") as file:
            fields = [int(v) for v in file.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields[:8])  # idle + iowait, total (user..steal)

    try:
        idle_before, total_before = sample()
        time.sleep(interval)
        idle_after, total_after = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total_after <= total_before:
        return None
    idle_share = (idle_after - idle_before) / (total_after - total_before)
    return max(1, min(cores, round(idle_share * (os.cpu_count() or cores))))


def _parallel_launcher() -> dict | None:
    """The launcher's settings when this process is a job of a multirun, else None."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return OmegaConf.to_container(hydra_cfg.launcher, resolve=True)


@contextmanager
def log_file(path: Path):
    """Send vae_lab's INFO log to `path` for the duration, unless Hydra already does.

    Under `python run.py` Hydra's job logging writes run.log; when a task is called
    directly (tests, notebooks) this gives it the same file.
    """
    target = str(path.resolve())
    if any(isinstance(h, logging.FileHandler) and h.baseFilename == target for h in logging.getLogger().handlers):
        yield
        return
    package = logging.getLogger("vae_lab")
    old_level = package.level
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(target)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.INFO)
    package.addHandler(handler)
    if package.getEffectiveLevel() > logging.INFO:
        package.setLevel(logging.INFO)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(old_level)
        handler.close()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def hydra_main(cfg: DictConfig):
    _TASK_STARTED.append(True)  # from here on an exception is the task's, not Hydra's composition
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return _sweep_job(cfg, run_dir, Path(hydra_cfg.sweep.dir))
    try:
        return run_task(cfg, run_dir).value
    except VaeLabError as error:
        log.error("%s", error)
        code = getattr(error, "exit_code", USER_ERROR_EXIT)
        if code == USER_ERROR_EXIT:
            _restore_record()  # a refused resume=true leaves the run's record as it was, for the corrected command
        sys.exit(code)
    except KeyboardInterrupt as interrupt:
        number = signal_number(interrupt)
        log.error("%s", _interrupted_message(number, cfg.task, run_dir))
        sys.exit(128 + number)


def _sweep_job(cfg: DictConfig, run_dir: Path, sweep_dir: Path) -> float:
    """One job of a sweep: a failure is logged and recorded in job.json, and the sweep goes on.

    Returning (NaN) instead of raising keeps every launcher and sweeper running the
    other jobs; the summary callback reports the failure and sets the exit status.
    Ctrl-C or SIGTERM to the sweep's own process (the basic launcher runs its jobs there)
    stops the whole sweep: this job is recorded as interrupted, the summary of what
    finished is written, and the process exits with 128 + the signal. A job in a process
    of its own (SLURM, submitit, joblib, Ray) that gets a signal, e.g. `scancel` of that
    one job, is recorded as interrupted and returns: the other jobs go on.
    """
    kept = _kept_on_resume(cfg, run_dir)  # read only: every task of a job decides alike
    if kept is not None:
        return kept
    if not writer():  # another task of a multi-task SLURM job: it trains its shards, task 0 keeps the books
        logging.getLogger("vae_lab").setLevel(logging.WARNING)
        return run_task(cfg, run_dir).value
    started = time.perf_counter()
    status = {"status": "completed", "error": ""}
    value, interrupted = math.nan, None
    requeued = False
    try:
        value = run_task(cfg, run_dir).value
        status["value"] = value
    except KeyboardInterrupt as interrupt:
        interrupted = signal_number(interrupt)
        status = {"status": "interrupted", "error": _interrupted_message(interrupted, cfg.task, run_dir)}
        requeued = being_requeued()
    except VaeLabError as error:
        log.error("%s", error)
        status = {"status": "failed", "error": str(error)}
        if getattr(error, "exit_code", 0) > 128:  # training stopped by a signal, its checkpoint saved
            interrupted, status["status"] = error.exit_code - 128, "interrupted"
            requeued = being_requeued()
    except SystemExit as stop:  # submitit's handler of the preemption / time-limit signal, once it has requeued the job
        requeued = requeued_by_submitit(stop) or being_requeued()  # the `finally` below records a requeue
        status = {"status": "interrupted", "error": "stopped by the SLURM job's own signal handler"}
        raise
    except Exception as error:  # a bug: keep its traceback in run.log, and the sweep going
        log.exception("job failed")
        status = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
    finally:
        if requeued:
            status = {"status": "requeued", "error": "SLURM requeued the job; when it restarts it continues from "
                                                     f"{RunLayout(run_dir).last_checkpoint} in this folder"}
            log.warning("job %s is being requeued by SLURM: it stops here and continues from its last epoch when it "
                        "restarts", run_dir.name)
        status["seconds"] = round(time.perf_counter() - started, 3)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(RunLayout(run_dir).job_file, json.dumps(status, indent=2) + "\n")
    if requeued:  # no result: submitit waits for the restarted job, which continues in place
        raise SystemExit(128 + (interrupted or signal.SIGTERM))
    if interrupted is not None and os.environ.get(SWEEP_PROCESS) == str(os.getpid()):
        _stop_sweep(sweep_dir, interrupted, f" in job {run_dir.name}")  # exits
    elif interrupted is not None:
        log.error("job %s interrupted by %s in its own process: recorded as interrupted; the sweep's other jobs go on.",
                  run_dir.name, signal.Signals(interrupted).name)
    return value


def _kept_on_resume(cfg: DictConfig, run_dir: Path) -> float | None:
    """resume=true in a sweep: a completed job (or, without resume_failed=true, a failed one) is kept as it
    is, files untouched, and its recorded value returned; None for a job to run (unfinished, interrupted)."""
    if (cfg.get("resume") is not True and not is_restart()) or not RunLayout(run_dir).job_file.is_file():
        return None
    try:
        status = json.loads(RunLayout(run_dir).job_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None  # a damaged record: the job's checkpoint decides
    if not isinstance(status, dict):
        return None
    state = status.get("status")
    if state == "completed" or (state == "failed" and not cfg.get("resume_failed")):
        log.info("resume=true: job %s %s before; kept as it is%s", run_dir.name, state,
                 " (resume_failed=true runs it again)" if state == "failed" else "")
        value = status.get("value")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    return None


def _missing_config_dir() -> str | None:
    if (CONFIG_DIR / "config.yaml").is_file():
        return None
    return (f"error: no configs at {CONFIG_DIR}: this vae_lab install is incomplete. "
            "Reinstall it (pip install .) or run from a checkout that has conf/.")


def _stop_sweep(sweep_dir: Path, number: int, where: str = "") -> None:
    """Write the summary of the jobs so far and exit; the launcher starts no further job."""
    from vae_lab.sweep import write_summary

    rows, _ = write_summary(sweep_dir)
    done = sum(row["status"] == "completed" for row in rows)
    log.error(
        "sweep interrupted by %s%s: %d job(s) completed; the summary of what finished is in %s. "
        "Later jobs were not started.", signal.Signals(number).name, where, done, SweepLayout(sweep_dir).summary_md,
    )
    sys.exit(128 + number)


def _interrupted_message(number: int, task: str, run_dir: Path) -> str:
    message = (f"interrupted by {signal.Signals(number).name} before task={task} finished. Every file written is "
               "complete: checkpoints are renamed into place, results/ is complete or absent.")
    layout = RunLayout(run_dir)
    if task == "train" and layout.last_checkpoint.is_file() and not layout.results.exists():
        message += f" Training had finished; evaluate it with: python run.py task=evaluate evaluate.checkpoint={run_dir}"
    return message


def _missing_plugin(arguments: list[str]) -> str | None:
    """The install command for a plugin that an override asks for and this install lacks."""
    for argument in arguments:
        key = argument.lstrip("+~")
        if key.startswith("hydra/launcher=") or key.startswith("hydra/sweeper=") or key.startswith("experiment="):
            needed = PLUGINS.get(key)
            if needed and importlib.util.find_spec(needed[0]) is None:
                return f"error: {key} needs the optional extra '{needed[1]}': pip install -e '.[{needed[1]}]'"
    return None


def _optuna_storage_problem(arguments: list[str]) -> str | None:
    """A persistent Optuna study that this install's optuna cannot open.

    hydra-optuna-sweeper 1.3 allows only optuna 2, whose database storage fails on
    SQLAlchemy 2 with a bare AssertionError deep in a traceback.
    """
    from importlib.metadata import PackageNotFoundError, version

    storage = [a.split("=", 1)[1] for a in arguments if a.startswith("hydra.sweeper.storage=")]
    if not storage or storage[-1] in ("", "null"):
        return None
    problem = sqlite_problem(storage[-1], "hydra.sweeper.storage")
    if problem:
        return f"error: {problem}"
    try:
        optuna_major, sqlalchemy_major = (int(version(name).split(".")[0]) for name in ("optuna", "sqlalchemy"))
    except PackageNotFoundError:
        return None  # no Optuna at all: _missing_plugin names the extra
    if optuna_major < 3 and sqlalchemy_major >= 2:
        return ("error: hydra.sweeper.storage needs SQLAlchemy < 2 with optuna 2 (the Optuna that hydra-optuna-sweeper "
                "allows); install the pinned extra: pip install -e '.[sweep]'")
    return None


def main() -> None:
    """`python run.py` / `vae-lab` / `python -m vae_lab`: refuse early what Hydra would report badly, then run Hydra.

    Run and sweep directories are checked by vae_lab.rundir's callback, on the directory Hydra resolves.
    """
    sys.argv[1:] = flags_first(sys.argv[1:])
    # The modules a user lists in trusted_modules are found in the folder the command runs from, as README says, also
    # under `vae-lab` and `python path/to/run.py`, whose sys.path starts elsewhere; appended, so it shadows nothing installed.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    message = _missing_config_dir() or _missing_plugin(sys.argv[1:]) or _optuna_storage_problem(sys.argv[1:])
    if message:
        print(message, file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
    try:
        sys.argv[1:] = prepare_arguments(resumed_arguments(sys.argv[1:]))  # torchrun: one run directory for all ranks
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
    # Run and sweep directories are checked where Hydra resolves them: vae_lab.rundir.RunDirectoryGuard.
    os.environ[SWEEP_PROCESS] = str(os.getpid())  # inherited by launchers' job processes, which do not run main()
    with sigterm_as_keyboard_interrupt():
        try:
            _composed_or_refused(hydra_main)
            finish_distributed()
        except KeyboardInterrupt as interrupt:  # while Hydra starts or composes, or a launcher waits for its jobs
            number = signal_number(interrupt)
            sweep_dir = _sweep_in_progress()
            if sweep_dir is not None:  # joblib, submitit, Ray: the jobs ran elsewhere; summarise what finished
                _stop_sweep(sweep_dir, number)
            print(f"interrupted by {signal.Signals(number).name}; nothing was written over.", file=sys.stderr)
            sys.exit(128 + number)


def flags_first(arguments: list[str]) -> list[str]:
    """Hydra's flags (with their values) moved before the overrides, order kept within each: its parser
    reads no flag after an override (`run.py x=1 --config-dir d y=2` is "unrecognized arguments")."""
    from hydra._internal.utils import get_args_parser

    actions = {option: action for action in get_args_parser()._actions for option in action.option_strings}
    flags, overrides, rest = [], [], list(arguments)
    while rest:
        argument = rest.pop(0)
        action = actions.get(argument.split("=", 1)[0]) if argument.startswith("-") else None
        if action is None:
            overrides.append(argument)
            continue
        flags.append(argument)
        takes_value = "=" not in argument and action.nargs != 0
        if takes_value and rest and (action.nargs is None or rest[0] in (action.choices or ())):  # nargs "?": a choice only
            flags.append(rest.pop(0))
    return [*flags, *overrides]


_TASK_STARTED: list[bool] = []
# Lines of Hydra's composition errors that describe its internals, not the user's mistake.
HYDRA_NOISE = ("full_key:", "object_type=", "reference_type=", "Config search path:", "provider=", "See https://hydra.cc",
               "Set the environment variable HYDRA_FULL_ERROR")


def _composed_or_refused(run) -> None:
    """Run Hydra; a mistake Hydra finds while composing (an override it cannot parse, an unknown option or
    key, a config file it cannot read) ends in one line and exit 2, as vae_lab's own refusals do,
    instead of Hydra's banner or a YAML traceback. Errors from a task that started propagate as before."""
    user_asked = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises what it finds instead of printing it and exiting 1
    try:
        run()
    except Exception as error:  # Hydra's own, OmegaConf's, YAML's, or a ValueError of Hydra's parser (model=3)
        if _TASK_STARTED or user_asked == "1":
            raise
        print(f"error: {composition_error_line(error)}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
    finally:
        if user_asked is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)


def composition_error_line(error: Exception) -> str:
    """One line of a Hydra, OmegaConf or YAML error: the file and place for YAML, the options for an unknown one."""
    import yaml

    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        return (f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}: not valid YAML ({error.problem}). "
                "Fix the file, or leave it out of the command.")
    if isinstance(error, UnicodeDecodeError):  # Hydra read a config file that is not UTF-8 text: find it
        folders = [CONFIG_DIR, *(Path(a.split("=", 1)[1] if "=" in a else b) for a, b in zip(sys.argv[1:], [*sys.argv[2:], ""])
                                 if a.split("=", 1)[0] in ("--config-dir", "-cd"))]
        for path in (p for folder in folders for p in sorted(folder.rglob("*.yaml"))):
            try:
                path.read_text(encoding="utf-8")
            except UnicodeDecodeError as bad:
                return f"{path} is not UTF-8 text (byte {bad.start}: {bad.reason}); save it as UTF-8, or leave it out of the command"
            except OSError:
                continue
    if "Config group override must be a string" in str(error):  # model=3, loss=null: say which, and what it takes
        groups = {path.name: sorted(p.stem for p in path.glob("*.yaml")) for path in CONFIG_DIR.iterdir() if path.is_dir()}
        given = next((a for a in sys.argv[1:] if "=" in a and override_key(a) in groups
                      and a.split("=", 1)[1] not in groups[override_key(a)]), None)
        if given is not None:
            return f"{given}: {override_key(given)}= takes the name of one of its options: {', '.join(groups[override_key(given)])}"
    parts: list[str] = [f"cannot parse the override {error.override!r}:"] if getattr(error, "override", None) else []
    text = str(error) + (f"\n{error.__cause__}" if error.__cause__ is not None else "")  # Hydra prints the cause too
    for line in (line.strip() for line in text.splitlines()):
        if line.startswith("Error parsing override") and parts:
            continue
        if not line or line.startswith(HYDRA_NOISE) or line in parts:
            continue
        options = parts and parts[-1].startswith("Available options in")
        parts.append(f"{parts.pop()} {line}" if options and parts[-1].endswith(":") else
                     f"{parts.pop()}, {line}" if options else line)
    text = " ".join(p if p.endswith((".", ":")) else p + ";" for p in parts).rstrip(";")
    return f"{text} (python run.py --help lists the groups and options; --cfg job prints every setting)"


RESUME_FLAGS = ("resume=true", "resume=True")
MULTIRUN_FLAGS = ("-m", "--multirun")
# Recorded Hydra overrides that this command gives anew: the folder, and the mode (-m).
NOT_REPEATED = ("hydra.run.dir", "hydra.sweep.dir", "hydra.mode")


def override_key(argument: str) -> str:
    return argument.lstrip("+~").split("=", 1)[0]


def resumed_arguments(arguments: list[str]) -> list[str]:
    """resume=true: the command line recorded in the run (or sweep) folder, then this one's additions.

    `python run.py hydra.run.dir=D resume=true train.epochs=20` runs what D's .hydra/overrides.yaml
    (and the Hydra overrides of .hydra/hydra.yaml) recorded, with train.epochs=20 replacing the
    recorded value; `-m hydra.sweep.dir=D resume=true` reruns D/multirun.yaml's sweep, whose
    overrides may be repeated only with the values recorded. Anything else is returned unchanged.
    """
    if not any(argument in RESUME_FLAGS for argument in arguments):
        return arguments
    sweep = any(argument in MULTIRUN_FLAGS for argument in arguments)
    setting = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    given = [a.split("=", 1)[1] for a in arguments if override_key(a) == setting and "=" in a]
    if not given or not given[-1]:
        raise ConfigError(f"resume=true continues a {'sweep' if sweep else 'run'} where it stands: name its folder with "
                          f"{setting}=<folder> (the {'multirun' if sweep else 'outputs'}/<date>/<time> it was written to)")
    folder = Path(given[-1]).expanduser()
    task, hydra = _recorded_overrides(folder, sweep, setting)
    if not sweep:  # Hydra rewrites the record before the task runs; a refused resume puts it back
        _RECORD_BEFORE_RESUME.update({path: path.read_bytes() for path in (folder / ".hydra").glob("*.yaml")})
    ours = {override_key(a): a for a in arguments if "=" in a and not a.startswith("-")}
    if sweep:
        disagree = [a for a in task if override_key(a) in ours and ours[override_key(a)] != a]
        if disagree:
            key = override_key(disagree[0])
            raise ConfigError(f"resume=true: {folder} is the sweep {' '.join(task)}; {ours[key]} disagrees with its {disagree[0]}. "
                              "Leave the sweep's overrides out (they are read from the folder) or repeat them as recorded.")
    hydra = [a for a in hydra if override_key(a) not in NOT_REPEATED]
    untrusted = next((a for a in (*task, *hydra) if _grants_trust(override_key(a), a in hydra) and override_key(a) not in ours), None)
    if untrusted is not None:
        key = override_key(untrusted)
        raise ConfigError(
            f"resume=true: {folder}'s record holds {untrusted}, which decides what code runs; vae_lab takes that only from "
            f"the command line, never from a folder (anyone who can write there could have put it). Repeat {key}=... "
            "on this command line if it is yours."
        )
    kept = [a for a in hydra if override_key(a) not in ours]
    # After this command's own (so its flags come first, as Hydra's parser wants); none of them repeats a key given here.
    return [*arguments, *kept, *(a for a in task if override_key(a) not in ours)]


_RECORD_BEFORE_RESUME: dict[Path, bytes] = {}  # a resumed run's Hydra record as it was before this command


def _restore_record() -> None:
    for path, content in _RECORD_BEFORE_RESUME.items():
        write_atomic(path, content)
    _RECORD_BEFORE_RESUME.clear()


# Recorded overrides that decide what code runs: which modules are trusted, which classes are built, which
# Hydra callbacks and logging handlers are instantiated. A resume takes these from its own command line only.
TRUST_KEYS = ("trusted_modules", "hydra.callbacks", "hydra/callbacks", "hydra.job_logging", "hydra/job_logging",
              "hydra.hydra_logging", "hydra/hydra_logging", "hydra.searchpath")
BUILD_KEYWORDS = ("_target_", "_args_", "_partial_", "_recursive_", "_convert_")


# The Hydra settings a record may carry into a resume: the launcher and sweeper chosen, and the resources a
# job asks for. The others (a launcher's setup commands, its python, srun arguments, ...) can run code.
RECORDED_HYDRA_KEYS = ("hydra/launcher", "hydra/sweeper", *(f"hydra.launcher.{key}" for key in (
    "partition", "account", "qos", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "nodes",
    "tasks_per_node", "array_parallelism", "n_jobs", "signal_delay_s", "max_num_timeout")))


def _grants_trust(key: str, hydra: bool = False) -> bool:
    """Whether a recorded override decides what code runs (so only this command line may set it)."""
    if hydra and key not in RECORDED_HYDRA_KEYS:
        return True
    parts = key.replace("/", ".").split(".")
    return any(key == k or key.startswith(k + ".") or key.startswith(k + "/") for k in TRUST_KEYS) or any(
        part in BUILD_KEYWORDS for part in parts)


def _recorded_overrides(folder: Path, sweep: bool, setting: str) -> tuple[list[str], list[str]]:
    """(task overrides, Hydra overrides) as Hydra recorded them in the folder."""
    import yaml

    record = folder / ("multirun.yaml" if sweep else ".hydra/hydra.yaml")
    if not record.is_file():
        what = "sweep (no multirun.yaml)" if sweep else "run (no .hydra/hydra.yaml)"
        raise ConfigError(f"resume=true: {setting}={folder} holds no vae_lab {what} to continue. "
                          + ("Start the sweep without resume=true." if sweep else
                             "Start the run without resume=true, or continue a checkpoint into a new folder with "
                             "train.resume=<checkpoint>."))
    try:
        recorded = yaml.safe_load(record.read_text())
        overrides = recorded["hydra"]["overrides"]
        task, hydra = list(overrides["task"] or []), list(overrides["hydra"] or [])
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError) as error:
        raise ConfigError(f"resume=true: {record} cannot be read as Hydra's record ({first_line(error)}); "
                          "it was altered or written by another program.") from None
    if not all(isinstance(a, str) for a in task + hydra):
        raise ConfigError(f"resume=true: {record} holds overrides that are not strings; it was altered or written by another program.")
    return task, hydra


def _sweep_in_progress() -> Path | None:
    """The sweep folder of the multirun this process is launching, once Hydra has made it; else None."""
    try:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            folder = Path(str(HydraConfig.get().sweep.dir))
            return folder if (folder / "multirun.yaml").is_file() else None
    except Exception:  # Hydra had not got that far
        return None
    return None
