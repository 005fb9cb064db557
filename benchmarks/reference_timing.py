"""Time a whole training run as a user starts it, then read what its epochs took from metrics.csv.

  python benchmarks/reference_timing.py --run-dir /tmp/reference experiment=gpu_fast train.evaluate_at_end=false

The command's wall time includes Python's start-up, data loading and compilation; the
epochs' own time (training plus its test pass, checkpoints and figures every 10 epochs) comes
from the run's metrics.csv.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="hydra.run.dir for the run (must not exist yet)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=gpu_fast")
    args = parser.parse_args()
    command = [sys.executable, str(REPO / "run.py"), *args.overrides, f"hydra.run.dir={args.run_dir}"]
    started = time.perf_counter()
    finished = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    if finished.returncode != 0:
        sys.exit(f"the run failed (exit status {finished.returncode}): {' '.join(command)}")
    print(summary(args.run_dir / "metrics.csv", wall))


def summary(metrics: Path, wall: float) -> str:
    with metrics.open() as file:
        rows = list(csv.DictReader(file))
    epochs = [float(row["seconds"]) for row in rows]
    training = sum(float(row["train_seconds"]) for row in rows)
    return (f"{len(rows)} epochs: the whole command {wall:.1f} s (start-up, data and compilation included); "
            f"the epochs with their test passes {sum(epochs):.1f} s, of which training {training:.1f} s; "
            f"first epoch {epochs[0]:.2f} s, median epoch {statistics.median(epochs):.2f} s; "
            f"last train loss {float(rows[-1]['train_loss']):.3f}, test loss {float(rows[-1]['test_loss']):.3f}.")


if __name__ == "__main__":
    main()
