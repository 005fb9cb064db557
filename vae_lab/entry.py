"""The command's first lines: Ctrl-C or SIGTERM while Python is still loading Hydra and torch
ends in one line and status 128 + signal too, not in an import traceback.

`python run.py` and the `vae-lab` console script start here; vae_lab.cli.main does the rest.
"""
import signal
import sys


def main() -> None:
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        from vae_lab.cli import main as run
    except KeyboardInterrupt as interrupt:
        number = interrupt.args[0] if interrupt.args and isinstance(interrupt.args[0], int) else int(signal.SIGINT)
        print(f"interrupted by {signal.Signals(number).name} while starting; nothing was written.", file=sys.stderr)
        sys.exit(128 + number)
    run()


def _raise_keyboard_interrupt(number, _frame):
    raise KeyboardInterrupt(number)
