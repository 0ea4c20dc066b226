"""The demo ControlNet's control signal and how well a sample follows it.

The control image of a digit is its coarse silhouette: the 32x32 grey image averaged over 4x4
blocks (back to the 8x8 grid of the source digits), a cell being ink where that mean is above half
white, shown as a 32x32 white-on-black RGB image of 4x4 squares. It fixes where the strokes go, not
how they look, so a sample must draw a digit inside it; it is computed from any image alike, the
samples included. An edge map was not chosen: the 32 px digits are 8x8 images upsampled, so their
edges are little more than the strokes themselves, which would leave the sampler nothing to draw.

Control following: the intersection over union of the sample's silhouette with the control's
(1 where they agree cell for cell, 0 where they share no ink cell), per image.

A control image (and the digit it is made from) for ``sample --control``, from the first held-out digit D:

    python -m perflow_jax.demo.control --digit D --out CONTROL.png [--image-out DIGIT.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from perflow_jax import image_io
from perflow_jax.demo import digits

CELL = 4  # pixels per cell side: 32 px images, 8x8 silhouettes
INK = 0.5  # a cell is ink where its mean grey value is above half white


def silhouette(images: np.ndarray) -> np.ndarray:
    """[N, 32, 32, 3] (or [N, 32, 32]) uint8 -> [N, 8, 8] bool: 4x4 blocks whose mean grey is above half white."""
    grey = np.asarray(images, np.float32) / 255.0
    if grey.ndim == 4:
        grey = grey.mean(axis=-1)
    n, h, w = grey.shape
    cells = grey.reshape(n, h // CELL, CELL, w // CELL, CELL).mean(axis=(2, 4))
    return cells > INK


def control_images(images: np.ndarray) -> np.ndarray:
    """The control images of digit ``images`` [N, 32, 32, 3] uint8: their silhouettes as [N, 32, 32, 3] uint8,
    each cell a 4x4 square of 255 (ink) or 0."""
    cells = silhouette(images).astype(np.uint8) * 255
    pixels = np.repeat(np.repeat(cells, CELL, axis=1), CELL, axis=2)
    return np.repeat(pixels[..., None], 3, axis=-1)


def silhouette_iou(samples: np.ndarray, controls: np.ndarray) -> np.ndarray:
    """[N] float64: the IoU of each sample's silhouette with its control image's (both [N, 32, 32, 3] uint8).

    An image pair with no ink in either counts as 1 (they agree).
    """
    a, b = silhouette(samples), silhouette(controls)
    intersection = (a & b).sum(axis=(1, 2))
    union = (a | b).sum(axis=(1, 2))
    return np.where(union == 0, 1.0, intersection / np.maximum(union, 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The control image of the first held-out digit D (32 x 32 RGB PNG).")
    parser.add_argument("--digit", type=int, required=True, choices=range(10), metavar="D", help="0 to 9")
    parser.add_argument("--out", type=Path, required=True, help="the control image (PNG) to write")
    parser.add_argument("--image-out", type=Path, help="also write the digit itself (PNG), e.g. for --init-image")
    args = parser.parse_args(argv)
    images, labels = digits.load("heldout")
    image = images[np.flatnonzero(labels == args.digit)[0]]
    image_io.save_png(control_images(image[None])[0], args.out)
    if args.image_out is not None:
        image_io.save_png(image, args.image_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
