"""How fast does a folder of images load? data=image_folder on N generated 3 x 32 x 32 PNGs:
the first load (decode and cache) and the second (from the cache), in one process.

  python benchmarks/open_data.py                      # 60,000 PNGs in a temporary folder
  python benchmarks/open_data.py --count 5000 --out benchmarks/results/open-data.md

The PNGs are the framework's own `data=shapes` images, one folder per shape, written once
before timing; the cache goes to a temporary folder too. Decoding runs in one thread.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=60_000, help="PNG files to write and load")
    parser.add_argument("--out", type=Path, help="append the result as a markdown table row to this file")
    args = parser.parse_args()

    import torch
    from PIL import Image

    from table import print_row
    from vae_lab.data.folder import load_image_folder
    from vae_lab.data.shapes import SHAPES, make_shapes

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="vae_lab-open-data-") as scratch:
        folder, cache = Path(scratch) / "images", Path(scratch) / "cache"
        started = time.perf_counter()
        data = make_shapes(train_size=args.count, test_size=1, image_size=32, seed=0)
        pixels = data.train_images.permute(0, 2, 3, 1).numpy()  # uint8, as 8-bit data are stored
        for name in SHAPES:
            (folder / name).mkdir(parents=True)
        for index, (image, label) in enumerate(zip(pixels, data.train_labels.tolist())):
            Image.fromarray(image).save(folder / SHAPES[label] / f"{index:06d}.png")
        written = time.perf_counter() - started
        size = sum(p.stat().st_size for p in folder.rglob("*.png"))

        started = time.perf_counter()
        first = load_image_folder(folder, cache_dir=cache)
        decode = time.perf_counter() - started
        started = time.perf_counter()
        second = load_image_folder(folder, cache_dir=cache)
        cached = time.perf_counter() - started
        assert torch.equal(first.train_images, second.train_images)

    row = (f"| {args.count:,} PNG files, 3 x 32 x 32 ({size / 2**20:.0f} MiB) | {decode:.1f} s | {cached:.1f} s | "
           f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} |")
    print(f"wrote {args.count:,} PNGs in {written:.1f} s")
    print_row(["files", "first load (decode + cache)", "second load (cache)", "machine"], row, args.out, numeric=2)


if __name__ == "__main__":
    main()
