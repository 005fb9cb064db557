"""The one way vae_lab writes a file: complete or not at all, and never through a link.

`write_atomic` creates a new file beside the target (exclusively: a name planted there,
link or not, is never opened), writes, flushes and fsyncs it under an flock, and renames
it over the target. A rename replaces a symbolic link planted at the target's name
itself, never the file it points to. Ctrl-C and SIGTERM wait until the write is done: raised
inside a write, the interrupt would leave no file (a requeued job's checkpoint lost). `open_append`
is for the one file that grows (metrics.csv): opened without following a link.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl  # POSIX: a write holds a lock on its temporary file until it is renamed
except ImportError:  # Windows: an open file cannot be deleted, which protects it as well
    fcntl = None

NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)


def temporary_name(path: Path) -> Path:
    """A fresh hidden name beside `path`: ".<name>.<12 hex digits>.tmp"."""
    return path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"


def write_atomic(path: Path, content: bytes | str | Callable[[BinaryIO], None]) -> None:
    """Write `content` (bytes, text, or a function that writes to a binary file) to `path` atomically.

    Raises OSError naming `path` when the write fails; the temporary file is removed then.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(path)
    with _interrupts_deferred():
        _write_and_rename(path, temporary, content)


@contextlib.contextmanager
def _interrupts_deferred():
    """SIGINT and SIGTERM that arrive meanwhile are held, then raised again once the file is whole.

    Python runs signal handlers in the main thread whichever thread the signal reaches, so the
    handlers are swapped there (a mask would hold them off one thread only). Elsewhere, or when a
    handler was not set from Python, nothing is deferred."""
    numbers = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or None in map(signal.getsignal, numbers):
        yield
        return
    pending = []
    previous = {number: signal.signal(number, lambda number, _frame: pending.append(number)) for number in numbers}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(pending):
            signal.raise_signal(number)


def _write_and_rename(path: Path, temporary: Path, content) -> None:
    try:
        # 0o666 & ~umask, as open() gives (mkstemp's 0600 would stay on the final file).
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NO_FOLLOW, 0o666)
        with os.fdopen(descriptor, "wb") as file:
            if fcntl is not None:  # held until closed, or until the process dies
                fcntl.flock(file.fileno(), fcntl.LOCK_EX)
            if callable(content):
                content(file)
            else:
                file.write(content.encode() if isinstance(content, str) else content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise OSError(error.errno, error.strerror or str(error), str(path)) from error
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def open_append(path: Path, truncate: bool = False):
    """`path` opened for appending text (created if absent), refusing a symbolic link there."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | NO_FOLLOW | (os.O_TRUNC if truncate else 0)
    try:
        descriptor = os.open(path, flags, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise OSError(error.errno, "it is a symbolic link, and vae_lab never writes through one", str(path)) from None
        raise
    return os.fdopen(descriptor, "a", newline="")


def tensors_digest(tensors: dict) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in sorted name order.

    Stored at save and recomputed at load, so a changed bit in any weight reads as
    corruption instead of loading silently.
    """
    import torch  # only here: the command line imports this module before it needs torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # raw bytes; works for every dtype
    return digest.hexdigest()


def is_in_use(temporary: Path) -> bool:
    """Whether a live write holds `temporary` (its flock); False where locks do not exist."""
    if fcntl is None:
        return False
    try:
        with open(temporary, "rb") as file:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on close
        return False
    except OSError:  # BlockingIOError: a live write holds it; anything else: leave it alone
        return True


SQLITE_HEADER = b"SQLite format 3\x00"


def sqlite_problem(uri: str, setting: str) -> str | None:
    """What is wrong with the file of a `sqlite:///` store (MLflow's, Optuna's) before a library opens it; None if nothing.

    An absent or empty file is fine (SQLite creates it); anything else must start with SQLite's header.
    """
    if not uri.startswith("sqlite:///"):
        return None
    path = Path(uri.removeprefix("sqlite:///")).expanduser()
    fix = "name a new file (SQLite creates it) or the database the store wrote"
    if path.is_dir():
        return f"{setting}={uri}: {path} is a folder; {fix}"
    try:
        if not path.exists() or path.stat().st_size == 0:
            return None
        with path.open("rb") as file:
            header = file.read(len(SQLITE_HEADER))
    except OSError as error:
        return f"{setting}={uri}: {path} cannot be read ({error.strerror}); {fix}"
    if header != SQLITE_HEADER:
        return f"{setting}={uri}: {path} is not an SQLite database; {fix}"
    import sqlite3

    try:  # read-only: the schema is where a damaged file fails ("file is not a database")
        with contextlib.closing(sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=10)) as database:
            database.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.Error as error:
        return f"{setting}={uri}: {path} cannot be read as an SQLite database ({error}); {fix}"
    return None
