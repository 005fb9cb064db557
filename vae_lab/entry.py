"""The command's first lines: Ctrl-C or SIGTERM while Python is still loading Hydra and torch
ends in one line and status 128 + signal too, not in an import traceback.

`python run.py` and the `vae-lab` console script start here; vae_lab.cli.main does the rest.
"""
import sys

from vae_lab.errors import signal_number, sigterm_as_keyboard_interrupt

# Hydra's flags that only print (help, the config, the plugins) and then exit.
PRINT_ONLY_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc")


def main() -> None:
    import signal

    if any(argument in PRINT_ONLY_FLAGS for argument in sys.argv[1:]) and hasattr(signal, "SIGPIPE"):
        # `vae-lab --help | head`: end quietly when the reader stops, as Unix tools do (a task keeps
        # Python's handling, so a closed pipe never kills a training in the middle of an epoch).
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    received = []

    def record(number, _frame):
        received.append(number)
        raise KeyboardInterrupt(number)

    # While the libraries load, a signal is also recorded: an import that swallows the
    # KeyboardInterrupt (a bare `except:` somewhere) must not let the command run on.
    signal.signal(signal.SIGINT, record)
    signal.signal(signal.SIGTERM, record)
    try:
        from vae_lab.cli import main as run
    except KeyboardInterrupt as interrupt:
        received.append(signal_number(interrupt))
    if received:
        print(f"interrupted by {signal.Signals(received[0]).name} while starting; nothing was written.", file=sys.stderr)
        sys.exit(128 + received[0])
    with sigterm_as_keyboard_interrupt():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        run()
