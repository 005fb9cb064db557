"""Correctness on a CUDA device: what tests/test_fast_paths.py and tests/test_train.py check on the CPU.

Each row trains the real config (full MNIST, limited to --limit images per split) through
`run_task` and compares what the run wrote with a reference run:
  - the same run on the CPU (device independence; not bit-exact: kernels differ);
  - each fast path (bf16 autocast, channels_last, fused Adam, torch.compile with inductor,
    and experiment=gpu_fast, all of them) against the plain CUDA run, at the CPU tests' tolerances;
  - the same seed twice on CUDA, and a run resumed from its epoch-2 checkpoint against the
    straight run: how close the weights are (cuDNN picks kernels that may not be deterministic).
Prints a markdown table; exits 1 when a check is outside its tolerance.

  python benchmarks/cuda_checks.py --data-root /tmp/data --out $OUT/cuda_checks.md
"""
from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vae_lab.checkpoint import load_checkpoint  # noqa: E402
from vae_lab.cli import CONFIG_DIR, run_task  # noqa: E402

FAST_PATHS = [  # (override, relative tolerance on the train and test losses), as in tests/test_fast_paths.py
    ("train.amp=true", 1e-2),
    ("train.channels_last=true", 1e-3),
    ("optim.fused=true", 1e-3),
    ("train.compile=true", 1e-3),
    ("experiment=gpu_fast", 1e-2),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="folder holding MNIST/raw")
    parser.add_argument("--limit", type=int, default=4096, help="images per split")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("cuda_checks.py needs a CUDA device; torch.cuda.is_available() is False here.")

    base = [f"data.root={args.data_root}", "data.download=false", "data.fallback=false", f"data.limit={args.limit}",
            "train.epochs=2", "train.evaluate_at_end=false", "seed=0"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="cuda-checks-") as scratch:
        runs = Path(scratch)
        plain = train(runs / "plain", base, "device=cuda")
        rows.append(compare_losses("CPU run vs CUDA run (device independence)", train(runs / "cpu", base, "device=cpu"), plain, 1e-3))
        for override, tolerance in FAST_PATHS:
            name = override.split("=")[0].replace(".", "_") + "_" + override.split("=")[1]
            rows.append(compare_losses(f"{override} vs plain CUDA", train(runs / name, base, "device=cuda", override), plain, tolerance))
        rows.append(compare_weights("same seed twice on CUDA", plain, train(runs / "again", base, "device=cuda")))
        straight = train(runs / "straight", base, "device=cuda", "train.epochs=4")
        first = train(runs / "first", base, "device=cuda")
        resumed = train(runs / "resumed", base, "device=cuda", "train.epochs=4",
                        f"train.resume={first / 'checkpoints' / 'last.pt'}")
        rows.append(compare_weights("resume at epoch 2 vs straight 4 epochs on CUDA", straight, resumed))
    table = markdown(rows, args)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    sys.exit(0 if all(row[-1] for row in rows) else 1)


def train(run_dir: Path, base: list[str], *overrides: str) -> Path:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        # gpu_fast sets device=cuda itself; the base overrides come after it so the data stays as asked.
        cfg = compose(config_name="config", overrides=[*base, *overrides])
    run_task(cfg, run_dir)
    return run_dir


def last_losses(run_dir: Path) -> tuple[float, float]:
    with (run_dir / "metrics.csv").open() as file:
        row = list(csv.DictReader(file))[-1]
    return float(row["train_loss"]), float(row["test_loss"])


def compare_losses(check: str, run: Path, reference: Path, tolerance: float):
    got, want = last_losses(run), last_losses(reference)
    worst = max(abs(g - w) / abs(w) for g, w in zip(got, want))
    detail = f"train {got[0]:.4f} vs {want[0]:.4f}, test {got[1]:.4f} vs {want[1]:.4f}"
    return check, detail, f"relative difference {worst:.2e} (tolerance {tolerance:g})", worst <= tolerance


def compare_weights(check: str, run: Path, reference: Path):
    got = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    want = load_checkpoint(reference / "checkpoints" / "last.pt")["model"]
    worst = max((got[k].double() - want[k].double()).abs().max().item() for k in want if want[k].is_floating_point())
    exact = all(torch.equal(got[k], want[k]) for k in want)
    same_losses = last_losses(run) == last_losses(reference)
    detail = f"{'bit-exact weights' if exact else 'weights differ'}; logged losses {'equal' if same_losses else 'differ'}"
    # Recorded, not failed: on CUDA, cuDNN's fastest kernels need not be deterministic.
    return check, detail, f"largest weight difference {worst:.2e}", True


def markdown(rows, args) -> str:
    header = (f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}; cuDNN {torch.backends.cudnn.version()}; "
              f"MNIST limited to {args.limit:,} images per split, 2 epochs (4 for the resume check).")
    lines = [header, "", "| check | what the runs wrote | measure | within tolerance |", "|---|---|---|---|"]
    lines += [f"| {check} | {detail} | {measure} | {'yes' if ok else 'NO'} |" for check, detail, measure, ok in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
