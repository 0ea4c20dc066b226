"""Feature statistics and the Frechet distance of FID, in float64 (pure numpy; no model).

``FeatureStats`` accumulates mean and covariance of feature batches [N, F] and merges across
batches, processes and resumed runs; its state file reloads bit for bit. ``frechet_distance``
compares two Gaussians as pytorch-fid and torchmetrics do. Reference statistics files (``.npz``
with mu, sigma, count and the ``FeatureSpec`` they were made with) are written once and reused;
a file made with another feature network, image size or resize rule is refused.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1


class FIDError(ValueError):
    """Statistics that cannot be compared or used: wrong shapes, values, or a reference file from another setup."""


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """How features were made: the feature network, the image size and the resize rule that gave its input."""

    feature: str  # e.g. "inception-v3-pool3" (perflow_jax.fid_inception.FEATURE)
    image_size: int  # pixels of the square images fed to the feature network's own preprocessing
    resize: str  # e.g. "center-crop": how the source images were brought to image_size


class FeatureStats:
    """Running count, mean [F] and M2 [F, F] = sum of (x - mean)(x - mean)^T over all rows, float64.

    Each batch is centred on its own mean and merged by Chan et al.'s pairwise formula, so mean and
    covariance equal ``np.mean`` and ``np.cov(rowvar=False)`` of all rows to ~1e-12 relative, in any
    batch order, and states from several processes or runs merge the same way.
    """

    def __init__(self, dim: int):
        self.count = 0
        self.mean = np.zeros(dim, np.float64)
        self.m2 = np.zeros((dim, dim), np.float64)

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def add(self, features) -> None:
        """Adds a batch of features [N, F] (any float dtype, numpy or jax)."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise FIDError(f"feature batch has shape {x.shape}, expected [N, {self.dim}]")
        bad = int(np.count_nonzero(~np.isfinite(x).all(axis=1)))
        if bad:
            raise FIDError(f"{bad} of {len(x)} feature rows hold NaN or inf: check the images and the feature network")
        if len(x) == 0:
            return
        batch = FeatureStats(self.dim)
        batch.count, batch.mean = len(x), x.mean(axis=0)
        centred = x - batch.mean
        batch.m2 = centred.T @ centred
        self.merge(batch)

    def merge(self, other: FeatureStats) -> None:
        """Adds the rows counted by ``other`` (Chan et al. 1979: M2 = M2_a + M2_b + delta delta^T n_a n_b / n)."""
        if other.dim != self.dim:
            raise FIDError(f"cannot merge {other.dim}-d feature statistics into {self.dim}-d ones")
        n_a, n_b = self.count, other.count
        n = n_a + n_b
        if n_b == 0:
            return
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + other.m2 + np.outer(delta, delta) * (n_a * n_b / n)
        self.count = n

    @property
    def sigma(self) -> np.ndarray:
        """Sample covariance [F, F] (ddof 1, as np.cov and pytorch-fid)."""
        if self.count < 2:
            raise FIDError(f"a covariance needs at least 2 feature rows, got {self.count}")
        return self.m2 / (self.count - 1)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the exact state (count, mean, M2) to an ``.npz``, replacing ``path`` whole."""
        path = Path(path)
        partial = path.with_name(path.name + ".writing.npz")
        np.savez(partial, version=FORMAT_VERSION, count=self.count, mean=self.mean, m2=self.m2)
        os.replace(partial, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """The state written by ``save``, bit for bit."""
        data = _read_npz(path, ("count", "mean", "m2"))
        stats = cls(data["mean"].shape[0])
        stats.count, stats.mean, stats.m2 = int(data["count"]), data["mean"], data["m2"]
        return stats


@dataclasses.dataclass(frozen=True)
class Reference:
    """Statistics of a reference image set: mu [F], sigma [F, F] float64, from ``count`` images made per ``spec``."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    spec: FeatureSpec


def save_reference(path: str | os.PathLike, stats: FeatureStats, spec: FeatureSpec) -> Reference:
    """Writes mu, sigma, count and ``spec`` to an ``.npz`` (keys mu and sigma as pytorch-fid's files)."""
    reference = Reference(stats.mean, stats.sigma, stats.count, spec)
    _warn_if_rank_deficient(reference, path)
    path = Path(path)
    partial = path.with_name(path.name + ".writing.npz")
    np.savez(
        partial,
        version=FORMAT_VERSION,
        mu=reference.mu,
        sigma=reference.sigma,
        count=reference.count,
        **{k: np.array(v) for k, v in dataclasses.asdict(spec).items()},
    )
    os.replace(partial, path)
    return reference


def load_reference(path: str | os.PathLike, spec: FeatureSpec) -> Reference:
    """The statistics in ``path``, refused (FIDError naming both) unless they were made per ``spec``."""
    fields = [f.name for f in dataclasses.fields(FeatureSpec)]
    data = _read_npz(path, ("mu", "sigma", "count", *fields))
    found = FeatureSpec(str(data["feature"]), int(data["image_size"]), str(data["resize"]))
    if found != spec:
        differ = [f for f in fields if getattr(found, f) != getattr(spec, f)]
        was = ", ".join(f"{f} {getattr(found, f)!r}" for f in differ)
        now = ", ".join(f"{f} {getattr(spec, f)!r}" for f in differ)
        raise FIDError(
            f"reference statistics {path} were made with {was} but this evaluation uses {now}: "
            "recompute them from the reference images with these settings"
        )
    reference = Reference(data["mu"], data["sigma"], int(data["count"]), found)
    _warn_if_rank_deficient(reference, path)
    return reference


def _read_npz(path: str | os.PathLike, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of a statistics file of this FORMAT_VERSION; FIDError names what is wrong."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise FIDError(f"cannot read statistics file {path}: {e}") from e
    missing = [k for k in ("version", *keys) if k not in data]
    if missing:
        raise FIDError(f"statistics file {path} lacks {', '.join(missing)}: it was not written by perflow_jax.fid")
    if int(data["version"]) != FORMAT_VERSION:
        raise FIDError(f"statistics file {path} has format version {int(data['version'])}, expected {FORMAT_VERSION}")
    return data


def _warn_if_rank_deficient(reference: Reference, path: str | os.PathLike) -> None:
    dim = reference.mu.shape[0]
    if reference.count < dim:
        warnings.warn(
            f"reference statistics {path} come from {reference.count} images, fewer than the {dim} feature "
            f"dimensions: the covariance is rank-deficient and FID is biased; use at least {dim} images",
            stacklevel=3,
        )


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FID: d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), in float64.

    tr((S1 S2)^1/2) is the sum of the square roots of the eigenvalues of the symmetric
    S1^1/2 S2 S1^1/2, which is similar to S1 S2. Two symmetric eigendecompositions replace
    pytorch-fid's scipy.linalg.sqrtm of the non-symmetric S1 S2 (a complex Schur form): the
    arithmetic stays real, a singular product needs no eps offset (round-off eigenvalues below 0
    are clipped), and at F = 2048 it runs several times faster; it equals pytorch-fid's
    ``calculate_frechet_distance`` and torchmetrics' FID to ~1e-8 relative. Inputs that are not
    covariances (non-symmetric, or eigenvalues below -1e-6 x the largest, where pytorch-fid would
    meet an imaginary part) raise FIDError.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    S1, S2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    F = mu1.shape[0]
    if mu1.shape != (F,) or mu2.shape != (F,) or S1.shape != (F, F) or S2.shape != (F, F):
        raise FIDError(f"statistics do not match: mu {mu1.shape} and {mu2.shape}, sigma {S1.shape} and {S2.shape}")
    for name, value in (("mu1", mu1), ("sigma1", S1), ("mu2", mu2), ("sigma2", S2)):
        if not np.isfinite(value).all():
            raise FIDError(f"{name} holds NaN or inf")
    for name, S in (("sigma1", S1), ("sigma2", S2)):
        if not np.allclose(S, S.T, rtol=1e-10, atol=1e-12 * np.abs(S).max()):
            raise FIDError(f"{name} is not symmetric, so it is no covariance matrix")
    w1, V1 = np.linalg.eigh(S1)
    _check_psd("sigma1", w1)
    sqrt_S1 = (V1 * np.sqrt(np.clip(w1, 0.0, None))) @ V1.T
    M = sqrt_S1 @ S2 @ sqrt_S1
    w = np.linalg.eigvalsh((M + M.T) / 2)
    _check_psd("sigma2", w)  # S1^1/2 S2 S1^1/2 is PSD when S2 is
    trace_sqrt = np.sqrt(np.clip(w, 0.0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(S1) + np.trace(S2) - 2.0 * trace_sqrt)


def _check_psd(name: str, eigenvalues: np.ndarray) -> None:
    if eigenvalues.min() < -1e-6 * max(eigenvalues.max(), 0.0):
        raise FIDError(
            f"{name} has eigenvalue {eigenvalues.min():.3g} (largest {eigenvalues.max():.3g}): "
            "it is no covariance matrix; recompute the statistics"
        )
