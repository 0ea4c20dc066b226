"""Images on disk: a batch as one grid picture, PNG files, and diffusers' NCHW layout for .npy files."""

from __future__ import annotations

import math
import os

import numpy as np
from etils import epath
from PIL import Image


def grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """[N, H, W, 3] floats in [0, 1] -> one uint8 picture [rows H, columns W, 3], row by row.

    ``columns`` defaults to ceil(sqrt(N)); cells after the last image stay black.
    """
    images = np.asarray(images)
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    cells = np.zeros((rows * columns, h, w, c), np.uint8)
    cells[:n] = to_uint8(images)
    return cells.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, columns * w, c)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] -> uint8 0..255, rounded, as a PNG stores them."""
    return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
    """Write a uint8 [H, W, 3] picture as a PNG, creating its folder (``path`` may be a ``gs://`` URL)."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as file:
        Image.fromarray(np.asarray(array, np.uint8)).save(file, format="PNG")


def to_nchw(x: np.ndarray) -> np.ndarray:
    """[B, h, w, c] -> [B, c, h, w] float32 (diffusers' layout)."""
    return np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)), np.float32)


def to_nhwc(x: np.ndarray) -> np.ndarray:
    """[B, c, h, w] -> [B, h, w, c] float32 (this project's layout)."""
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)), np.float32)
