"""prepare_data's throughput on this machine's CPU at several --decode-workers.

Generates ``--images`` photo-like JPEGs (smooth random colour fields with fine noise, ``--size``
px wide, 4:3, quality 90) with .txt captions, and a model: the digits teacher's folder with a small
random VAE (diffusers' AutoencoderKL: two blocks of 8 channels, no attention), cheap next to the
image decoding, as the VAE on a TPU host is. For each worker count:
- decode: `perflow_jax.prepare_data.decoder` alone (read, decode, resize, crop), timed once its
  workers have started;
- prepare: `prepare()` end to end at ``--resolution``, once on all the images and once on the first
  VAE batch: the difference is the steady rate, without the model load, the VAE's compilation and
  the workers' start.

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
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image

from bench.common import now, out_dir, print_table, write_json
from perflow_jax.prepare_data import MAX_PIXELS, decoder, open_source, prepare

DIGITS = Path(__file__).resolve().parents[1] / "perflow_jax/demo/digits_teacher"
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


def write_small_model(folder: Path) -> None:
    """The digits teacher's diffusers folder with a random 2-block, 8-channel AutoencoderKL as its VAE."""
    import torch
    from diffusers import AutoencoderKL

    shutil.copytree(DIGITS, folder, ignore=shutil.ignore_patterns("vae"), dirs_exist_ok=True)
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        mid_block_add_attention=False,
    )
    vae.save_pretrained(folder / "vae")


def decode_rate(source: Path, resolution: int, workers: int) -> float:
    """Images per second through `decoder`, once its workers have started (one batch before the clock)."""
    _, items = open_source(str(source))
    items = list(items)
    with decoder(workers, resolution, resolution // 2, MAX_PIXELS) as decode:
        list(decode(items[:BATCH]))
        start = time.perf_counter()
        list(decode(items))
        return len(items) / (time.perf_counter() - start)


def timed_prepare(model: Path, source: Path, out: Path, resolution: int, workers: int) -> float:
    start = time.perf_counter()
    prepare(model, str(source), out, resolution=resolution, batch_size=BATCH, decode_workers=workers, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=640, help="width of the generated JPEGs")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, os.cpu_count()])
    args = parser.parse_args()
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for folder in ("model", "all", "first"):
            (tmp / folder).mkdir()
        write_small_model(tmp / "model")
        write_images(tmp / "all", args.images, args.size)
        write_images(tmp / "first", BATCH, args.size)
        for workers in args.workers:
            decoded = decode_rate(tmp / "all", args.resolution, workers)
            whole = timed_prepare(tmp / "model", tmp / "all", tmp / f"out-all-{workers}", args.resolution, workers)
            first = timed_prepare(tmp / "model", tmp / "first", tmp / f"out-first-{workers}", args.resolution, workers)
            steady = (args.images - BATCH) / (whole - first)
            results.append(
                dict(workers=workers, decode_per_s=decoded, whole_s=whole, first_batch_s=first, prepare_per_s=steady)
            )
            rows.append([str(workers), f"{decoded:.1f}", f"{whole:.1f}", f"{args.images / whole:.1f}", f"{steady:.1f}"])
            print(f"workers {workers}: decode {decoded:.1f}/s; prepare {whole:.1f} s, first batch {first:.1f} s")
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
    columns = ["decode workers", "decode images/s", "prepare wall s", "prepare images/s (wall)", "(steady)"]
    print_table(columns, rows)


if __name__ == "__main__":
    main()
