"""Errors a user can cause and fix (the CLI prints their message alone, without a traceback), and
how a signal becomes one: SIGTERM unwinds like Ctrl-C, so every clean-up runs.
"""

import signal
import threading
from contextlib import contextmanager

USER_ERROR_EXIT = 2  # the exit status of every mistake a user can fix


def first_line(error: BaseException, skip_header: bool = False) -> str:
    """The first non-empty line of an error's message (torch appends native stacks), or its type's name."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if skip_header and len(lines) > 1:
        lines = lines[1:]
    return lines[0] if lines else type(error).__name__


class VaeLabError(Exception):
    """A mistake the user can fix; the message says what was wrong and what to do."""


class ConfigError(VaeLabError):
    """A setting with a value that is not allowed."""


class CheckpointError(VaeLabError):
    """A checkpoint that is missing, unreadable, foreign or unsafe."""


@contextmanager
def sigterm_as_keyboard_interrupt():
    """SIGTERM raises KeyboardInterrupt(15) for the duration (in the main thread; elsewhere
    Python cannot set handlers), so it unwinds like Ctrl-C: clean-ups run, checkpoints stay whole."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(number, _frame):
        raise KeyboardInterrupt(number)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def signal_number(interrupt: KeyboardInterrupt) -> int:
    """SIGTERM arrives as KeyboardInterrupt(15) (sigterm_as_keyboard_interrupt); Ctrl-C as SIGINT."""
    number = interrupt.args[0] if interrupt.args else signal.SIGINT
    return int(number) if isinstance(number, int) else int(signal.SIGINT)
