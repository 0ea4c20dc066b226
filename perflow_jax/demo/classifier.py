"""The judge of the demo's quality table: a digit classifier and the Frechet distance of its features.

The classifier is scikit-learn's ``MLPClassifier`` (two ReLU layers, 128 and 64 wide, Adam, fixed
seed, one BLAS thread: deterministic, 2 s on a CPU) trained on the "heldout" split of
``perflow_jax.demo.digits``, the digits that neither the teacher nor the student saw. Its input is
the grey value of the 32x32 image in [0, 1]; its features are the 64 activations of its last
hidden layer. On generated images it gives
- accuracy: the fraction classified as the digit their prompt asked for;
- Frechet distance: FID's formula (``perflow_jax.fid``) on the classifier's features instead of
  Inception's, against the features of real digits.
"""

from __future__ import annotations

import functools

import numpy as np
from sklearn.neural_network import MLPClassifier
from threadpoolctl import threadpool_limits

from perflow_jax import fid
from perflow_jax.demo import digits

HIDDEN = (128, 64)


class DigitClassifier:
    """An MLP over grey pixels; images are [N, 32, 32, 3] (or [N, 32, 32]) uint8 in 0..255."""

    def __init__(self, seed: int = 0):
        images, labels = digits.load("heldout")
        self.mlp = MLPClassifier(HIDDEN, alpha=1e-3, max_iter=300, random_state=seed)
        with threadpool_limits(1):  # the same sums on every machine; 5x faster than 2 threads on 2 busy cores
            self.mlp.fit(grey(images), labels)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Digits [N] int64."""
        return np.asarray(self.mlp.predict(grey(images)), np.int64)

    def features(self, images: np.ndarray) -> np.ndarray:
        """The last hidden layer's activations, [N, 64] float64."""
        h = grey(images)
        for W, b in zip(self.mlp.coefs_[:-1], self.mlp.intercepts_[:-1], strict=True):
            h = np.maximum(h @ W + b, 0.0)
        return h


def grey(images: np.ndarray) -> np.ndarray:
    """[N, 32, 32, 3] or [N, 32, 32] uint8 -> [N, 1024] float64 in [0, 1] (the channels' mean)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:3] != (digits.RESOLUTION,) * 2 or images.ndim not in (3, 4):
        raise ValueError(
            f"the digit classifier takes [N, 32, 32, 3] or [N, 32, 32] uint8 images, got {images.shape} "
            f"{images.dtype}: convert generated images with (x * 127.5 + 127.5).round().clip(0, 255).astype(uint8)"
        )
    pixels = images.astype(np.float64) / 255.0
    return (pixels.mean(axis=-1) if images.ndim == 4 else pixels).reshape(len(images), -1)


@functools.cache
def trained(seed: int = 0) -> DigitClassifier:
    """The classifier for ``seed``, trained once per process."""
    return DigitClassifier(seed)


def predict(images: np.ndarray) -> np.ndarray:
    """Digits [N] int64 of [N, 32, 32, 3] uint8 images, by the seed-0 classifier."""
    return trained().predict(images)


def features(images: np.ndarray) -> np.ndarray:
    """[N, 64] float64 features of [N, 32, 32, 3] uint8 images, by the seed-0 classifier."""
    return trained().features(images)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID's formula (``perflow_jax.fid.frechet_distance``) between the Gaussians fitted to two feature
    sets [N, F] and [M, F] (sample covariances, ddof 1), in float64."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance takes two [N, F] feature sets with N >= 2, got {a.shape} and {b.shape}")
    return fid.frechet_distance(a.mean(axis=0), np.cov(a, rowvar=False), b.mean(axis=0), np.cov(b, rowvar=False))
