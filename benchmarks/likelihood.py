"""A likelihood table: configurations trained on dynamically binarized MNIST at one budget.

Each row is a real `python run.py` training run (through vae_lab.cli.run_task, in one
process), evaluated at the end with the IW bound; the table reports the test -ELBO,
-log p(x) (IW bound, k samples), active units, training time and epochs, and goes to
benchmarks/results/ as markdown.

  python benchmarks/likelihood.py --data-root ../shared/data --epochs 5 --k 1000
  python benchmarks/likelihood.py --data-root ../shared/data --rows mlp_elbo mlp_iwae5 --epochs 20
  python benchmarks/likelihood.py --data-root ../shared/data --rows mlp_iwae5 mlp_iwae5_iaf hvae2_iwae5 --epochs 5
  python benchmarks/likelihood.py --data-root ../shared/data --add-run best_nll=outputs/<date>/<time>

--add-run puts a finished run (its results/metrics.json and metrics.csv) into the table,
e.g. the long `experiment=best_nll` run, which does not fit the short budget. Rows whose
decoder is convolutional are the expensive ones for the IW bound on a CPU: --conv-iw-images
bounds their test images (the table says how many each row used).
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vae_lab.cli import CONFIG_DIR, run_task  # noqa: E402

IWAE_MLP = ["model=mlp_vae", "model.hidden_layers=2", "model.hidden_dim=200", "model.activation=tanh", "model.latent_dim=50"]
ROWS = {  # name -> (what it is, overrides)
    "reference_conv": ("the reference ConvVAE, ELBO (alpha 1)", ["model=conv_vae", "loss=elbo"]),
    "mlp_elbo": ("Burda et al.'s one-layer MLP (2x200 tanh, 50 latent), ELBO", [*IWAE_MLP, "loss=elbo"]),
    "mlp_iwae5": ("the same MLP, IWAE k = 5", [*IWAE_MLP, "loss=iwae", "loss.k=5"]),
    "mlp_iwae50": ("the same MLP, IWAE k = 50", [*IWAE_MLP, "loss=iwae", "loss.k=50"]),
    "mlp_elbo_vamp": ("the same MLP, ELBO, VampPrior (500 pseudo-inputs)", [*IWAE_MLP, "loss=elbo", "prior=vamp"]),
    # at equal epochs: the posterior (diagonal against an IAF), and 1 against 2 stochastic layers (Burda et al.'s 2-layer sizes)
    "mlp_iwae5_iaf": ("mlp_iwae5 with an IAF posterior (2 steps, 320 hidden)", [*IWAE_MLP, "loss=iwae", "loss.k=5", "posterior=iaf"]),
    "hvae2_iwae5": ("model=hvae, 2 layers (100 then 50 latents), 2x200 tanh blocks, IWAE k = 5",
                    ["model=hvae", "model.layers=2", "model.lower_dims=[100]", "model.latent_dim=50", "model.hidden_dim=200",
                     "model.hidden_layers=2", "model.activation=tanh", "loss=iwae", "loss.k=5"]),
}
COMMON = ["data=mnist", "data.binarize=dynamic", "train.alpha=1.0", "scheduler=none", "train.checkpoint_every=1000",
          "train.plot_every=1000", "train.evaluate_at_end=true"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--k", type=int, default=1000, help="importance samples of the IW bound (5000 on a GPU)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto: where every row trains and evaluates")
    parser.add_argument("--conv-iw-images", type=int, default=1000, help="test images for the IW bound of convolutional rows")
    parser.add_argument("--runs", type=Path, default=REPO / "outputs" / "likelihood", help="where the row runs go")
    parser.add_argument("--add-run", action="append", default=[], metavar="NAME=RUN_DIR")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "likelihood-cpu.md")
    args = parser.parse_args()

    started = time.strftime("%Y-%m-%d %H:%M")
    rows = []
    for name in args.rows:
        description, overrides = ROWS[name]
        run_dir = args.runs / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
        limit = [f"evaluate.iw_limit={args.conv_iw_images}"] if "model=conv_vae" in overrides else []
        cfg = _compose([*COMMON, *overrides, f"device={args.device}", f"data.root={args.data_root}", f"train.epochs={args.epochs}",
                        f"evaluate.iw_samples={args.k}", *limit])
        print(f"== {name}: {description} -> {run_dir}", flush=True)
        run_task(cfg, run_dir)
        rows.append(_row(name, description, run_dir))
        _write(args.out, rows, args, started)  # after every row: a long table survives an interruption
    for spec in args.add_run:
        name, _, run_dir = spec.partition("=")
        rows.append(_row(name, f"`{_overrides(Path(run_dir))}`", Path(run_dir)))
    _write(args.out, rows, args, started)
    print(args.out.read_text())


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _device_name(device: str) -> str:
    if device != "cpu" and torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}"
    return "CPU only"


def _row(name: str, description: str, run_dir: Path) -> dict:
    report = json.loads((run_dir / "results" / "metrics.json").read_text())
    with (run_dir / "metrics.csv").open() as file:
        history = list(csv.DictReader(file))
    return {
        "name": name, "what": description, "epochs": len(history),
        "train_minutes": sum(float(r["seconds"]) for r in history) / 60,
        "seconds_per_epoch": sum(float(r["train_seconds"]) for r in history) / len(history),
        **report,
    }


def _overrides(run_dir: Path) -> str:
    path = run_dir / ".hydra" / "overrides.yaml"
    return " ".join(line.removeprefix("- ").strip() for line in path.read_text().splitlines()) if path.is_file() else str(run_dir)


def _write(path: Path, rows: list[dict], args, started: str) -> None:
    lines = [
        f"# Likelihoods on dynamically binarized MNIST ({started})", "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, {_device_name(args.device)}. "
        f"Command: `python benchmarks/likelihood.py --data-root {args.data_root} --epochs {args.epochs} --k {args.k} --device {args.device}`"
        + "".join(f" `--add-run {spec}`" for spec in args.add_run) + ".", "",
        "Test set, nats per image; -log p(x) is the importance-weighted bound with k samples on the test images named.", "",
        "| row | configuration | epochs | s / epoch | train min | -ELBO | -log p(x) (IW) | k | test images | active units |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['what']} | {r['epochs']} | {r['seconds_per_epoch']:.1f} | {r['train_minutes']:.1f} | "
            f"{r['neg_elbo']:.2f} | {r['iw_nll']:.2f} | {r['iw_samples']} | {r.get('iw_images', r['test_images']):,} | "
            f"{r['active_units']} / {r['latent_dim']} |"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
