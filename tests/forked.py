"""`python run.py ...` without paying for the interpreter's start each time.

A tiny run.py run costs about 7 s, of which 5 s are imports before its first line of work: torch
(2.5 s), torch._dynamo (about 2 s, imported by the first optimizer any process builds), Hydra,
scikit-learn, matplotlib. Tests that start many of them (the catalogue's end-to-end cases) run
them through multiprocessing's forkserver instead: one server per test process imports those
libraries once, and each command is a process forked from it that executes run.py as `python
run.py` would, with its own argv, working directory, environment, stdout and stderr, and exits
with the status Python would give (SystemExit's code, 1 and a traceback for an uncaught error).

What it does not give is a fresh interpreter: the tests about starting (imports, signals before
the libraries load, the installed console script, SIGINT ignored by nohup) keep subprocess.run,
and so does a sweep on the joblib launcher, whose loky workers never start from such a fork
(the sweep hangs), so run_py starts those as processes of their own.
"""
from __future__ import annotations

import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# What a run imports beyond vae_lab.cli, loaded once by the server (sklearn: the embedding and the
# gmm sampler; matplotlib: the figures; torch._dynamo: torch.optim's first optimizer).
PRELOAD = ["vae_lab.cli", "vae_lab.train", "vae_lab.evaluate", "torch._dynamo", "sklearn.manifold",
           "sklearn.mixture", "matplotlib.pyplot"]

_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _execute(arguments: list[str], cwd: str, env: dict, out: str, err: str) -> None:
    """In the forked process: become `python run.py ...` and run it as __main__."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", closefd=False, buffering=1)
    sys.stderr = open(2, "w", closefd=False, buffering=1)
    sys.argv = list(arguments)
    runpy.run_path(arguments[0], run_name="__main__")  # SystemExit and errors: multiprocessing exits as Python would


class ForkedRun:
    """What the tests use of subprocess.Popen(..., stdout=PIPE, stderr=PIPE, text=True) for
    `python run.py ...`: pid, poll(), kill(), communicate(timeout) and returncode; the output is
    read once the process has ended."""

    def __init__(self, arguments: list[str], cwd: Path = REPO, env: dict | None = None):
        self.args = [sys.executable, *arguments]
        self._folder = tempfile.TemporaryDirectory(prefix="forked-")
        self._out, self._err = Path(self._folder.name, "stdout"), Path(self._folder.name, "stderr")
        self._process = _forkserver().Process(target=_execute, args=(list(arguments), str(cwd), dict(os.environ if env is None else env),
                                                                     str(self._out), str(self._err)))
        self._process.start()
        self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self.returncode

    def kill(self) -> None:
        self._process.kill()
        self._process.join()

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self._process.join(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        try:  # empty if the fork failed before run.py started
            return tuple(path.read_text() if path.exists() else "" for path in (self._out, self._err))
        finally:
            self._folder.cleanup()


def run_py(arguments: list[str], cwd: Path = REPO, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """subprocess.run([sys.executable, *arguments], cwd=cwd, env=env, capture_output=True, text=True,
    timeout=timeout), by a fork of the preloaded server; arguments[0] is the script (run.py)."""
    if "hydra/launcher=joblib" in arguments:
        return subprocess.run([sys.executable, *arguments], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    process = ForkedRun(arguments, cwd, env)
    try:
        out, err = process.communicate(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)
