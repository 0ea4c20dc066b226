"""prepare_data's throughput on this machine's CPU at several --decode-workers.

Generates ``--images`` JPEG photos-like images (smooth random colour fields with fine noise,
``--size`` px on the longer side, 4:3) with .txt captions, then prepares them at ``--resolution``
with the embedded digits teacher's VAE and tokenizer (``perflow_jax/demo/digits_teacher``: a tiny
VAE, so the decoding dominates, as on a TPU host where the VAE is fast) for each worker count.
Each count runs twice, on all the images and on the first batch only: the difference is the
steady rate, without the model load, the VAE's compilation and the workers' start.

    python bench/prepare_throughput.py --images 400 --size 640 --resolution 256 --workers 0 1 2

Prints a markdown table last and writes ``$OUT/prepare_throughput.json``.
"""

# The imports below must follow the sys.path line before them.
# ruff: noqa: E402
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image

from bench.common import now, out_dir, print_table, write_json
from perflow_jax.prepare_data import prepare

MODEL = Path(__file__).resolve().parents[1] / "perflow_jax/demo/digits_teacher"
BATCH = 16


def write_images(folder: Path, count: int, size: int) -> None:
    """``count`` JPEGs of size x 3/4 size px, each with a caption."""
    rng = np.random.default_rng(0)
    height = size * 3 // 4
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((size, height), Image.BICUBIC)
        noise = rng.normal(0, 12, (height, size, 3))
        pixels = np.clip(np.asarray(coarse, np.float64) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
        (folder / f"{i:05d}.txt").write_text(f"a photo number {i}\n")


def timed_prepare(source: Path, out: Path, resolution: int, workers: int) -> float:
    start = time.perf_counter()
    prepare(MODEL, str(source), out, resolution=resolution, batch_size=BATCH, decode_workers=workers, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=640, help="longer side of the generated JPEGs")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, os.cpu_count()])
    args = parser.parse_args()
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "all").mkdir()
        (tmp / "first").mkdir()
        write_images(tmp / "all", args.images, args.size)
        write_images(tmp / "first", BATCH, args.size)
        for workers in args.workers:
            whole = timed_prepare(tmp / "all", tmp / f"out-all-{workers}", args.resolution, workers)
            first = timed_prepare(tmp / "first", tmp / f"out-first-{workers}", args.resolution, workers)
            steady = (args.images - BATCH) / (whole - first)
            results.append(dict(workers=workers, whole_s=whole, first_batch_s=first, images_per_s=steady))
            rows.append([str(workers), f"{whole:.1f}", f"{args.images / whole:.1f}", f"{steady:.1f}"])
            print(f"workers {workers}: {whole:.1f} s for {args.images}, {first:.1f} s for {BATCH}", flush=True)
    write_json(
        out_dir() / "prepare_throughput.json",
        dict(
            command=shlex.join(sys.argv),
            date=now(),
            cpus=os.cpu_count(),
            machine=platform.platform(),
            **{k: v for k, v in vars(args).items() if k != "workers"},
            results=results,
        ),
    )
    print_table(["decode workers", "wall s", "images/s (wall)", "images/s (steady)"], rows)


if __name__ == "__main__":
    main()
