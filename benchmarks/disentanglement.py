"""What does the disentanglement metric block cost? vae_lab.disentanglement.disentanglement_report
on N codes of D dimensions against dSprites' 5 factors (data=shapes data.preset=dsprites), in one process.

  python benchmarks/disentanglement.py                       # 10,000 codes, 10 dimensions, 1 thread
  python benchmarks/disentanglement.py --codes 10000 --threads 2 --out benchmarks/results/disentanglement.md

The codes are the standardised factors mixed by a fixed random matrix plus noise (a partly
entangled representation, as a trained model gives): the metrics' cost depends on the number
of codes, dimensions and factor levels, not on the model that produced the codes.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codes", type=int, default=10_000)
    parser.add_argument("--dims", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="threads of the random forests (DCI)")
    parser.add_argument("--out", type=Path, help="append the result as a markdown table row to this file")
    args = parser.parse_args()

    import numpy as np
    import sklearn

    from vae_lab.data.shapes import make_shapes
    from table import print_row
    from vae_lab.disentanglement import disentanglement_report

    data = make_shapes(train_size=1, test_size=args.codes, image_size=8, preset="dsprites")
    factors = data.test_factors.double().numpy()
    rng = np.random.default_rng(0)
    standard = (factors - factors.mean(0)) / factors.std(0)
    mixing = np.eye(factors.shape[1], args.dims) + 0.3 * rng.normal(size=(factors.shape[1], args.dims))
    codes = standard @ mixing + 0.3 * rng.normal(size=(args.codes, args.dims))

    started = time.perf_counter()
    report = disentanglement_report(codes, factors, data.factor_names, threads=args.threads)
    total = time.perf_counter() - started
    seconds = report["disentanglement_settings"]["seconds"]
    scores = " ".join(f"{key} {report[key]:.3f}" for key in ("mig", "dci_disentanglement", "sap", "factor_vae_score"))
    row = (f"| {args.codes:,} codes x {args.dims} | {seconds['mig']:.1f} s | {seconds['dci']:.1f} s | {seconds['sap']:.1f} s | "
           f"{seconds['factor_vae_score']:.1f} s | {total:.1f} s | {platform.machine()}, {os.cpu_count()} cores, "
           f"{args.threads} thread(s), scikit-learn {sklearn.__version__} |")
    print(scores)
    print_row(["codes", "MIG", "DCI", "SAP", "FactorVAE score", "all (with the MI matrix)", "machine"], row, args.out, numeric=5)


if __name__ == "__main__":
    main()
