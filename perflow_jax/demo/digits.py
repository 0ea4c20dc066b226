"""The demo's data: scikit-learn's 1797 handwritten digits as 32x32 RGB images with captions.

The source is ``sklearn.datasets.load_digits`` (8x8 grey images, ink 0..16, shipped inside
scikit-learn: nothing is downloaded). Each image is upsampled 4x with bicubic interpolation
(PIL, on the float values), clipped to 0..16 and scaled to 0..255: a white digit on black, the
same grey value in the three channels.

Splits are fixed: per class, the digits are shuffled with ``numpy.random.default_rng(SPLIT_SEED)``
and the first third (rounded) goes to "heldout", the rest to "train"; each split keeps the order
of the original data set. "train" (1198 digits) trains the teacher and the PeRFlow student;
"heldout" (599) trains the digit classifier of the quality table (``perflow_jax.demo.classifier``),
so the classifier never sees an image the generators were trained on.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

SPLITS = ("train", "heldout")
SPLIT_SEED = 0
HELDOUT_FRACTION = 1 / 3
RESOLUTION = 32
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def caption(label: int) -> str:
    """The prompt of a digit: 7 -> "a handwritten digit seven"."""
    return f"a handwritten digit {DIGIT_NAMES[label]}"


def upsample(grey: np.ndarray) -> np.ndarray:
    """[8, 8] ink values 0..16 -> [32, 32, 3] uint8 (bicubic, white digit on black)."""
    big = np.asarray(Image.fromarray(np.asarray(grey, np.float32), mode="F").resize((RESOLUTION,) * 2, Image.BICUBIC))
    pixels = np.round(np.clip(big, 0.0, 16.0) * (255.0 / 16.0)).astype(np.uint8)
    return np.repeat(pixels[..., None], 3, axis=-1)


@functools.cache
def _all() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images [1797, 32, 32, 3] uint8, labels [1797] int64, heldout mask [1797] bool)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = np.asarray(digits.target, np.int64)
    images = np.stack([upsample(grey) for grey in digits.images])
    rng = np.random.default_rng(SPLIT_SEED)
    heldout = np.zeros(len(labels), bool)
    for label in range(len(DIGIT_NAMES)):
        members = rng.permutation(np.flatnonzero(labels == label))
        heldout[members[: round(len(members) * HELDOUT_FRACTION)]] = True
    for array in (images, labels, heldout):
        array.flags.writeable = False
    return images, labels, heldout


def load(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 32, 32, 3] uint8, labels [N] int64) of a split: "train" (N=1198) or "heldout" (N=599)."""
    if split not in SPLITS:
        raise ValueError(f"digits split {split!r} does not exist: use one of {', '.join(SPLITS)}")
    images, labels, heldout = _all()
    keep = heldout if split == "heldout" else ~heldout
    return images[keep], labels[keep]
