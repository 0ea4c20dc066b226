"""perflow_jax.fid: streaming statistics equal numpy's, the Frechet distance equals pytorch-fid's and
torchmetrics', reference files round-trip and refuse another setup."""

import warnings

import numpy as np
import pytest
import torch
from torchmetrics.image.fid import _compute_fid

from perflow_jax import fid
from tests.helpers.torchvision_models import torchvision_imported

# pytorch-fid 0.3.0 passes sqrtm's disp=, deprecated in SciPy 1.16
pytorch_fid_disp = pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")
SPEC = fid.FeatureSpec("inception-v3-pool3", 512, "center-crop")


@pytest.fixture(scope="module")
def pytorch_fid_distance():
    """pytorch-fid's calculate_frechet_distance (its module imports torchvision: see torchvision_imported)."""
    with torchvision_imported():
        from pytorch_fid.fid_score import calculate_frechet_distance
    return calculate_frechet_distance


def features(rng, n, dim, scale=1.0):
    """[n, dim] correlated float32 features around 1000 (naive sums of x x^T lose the covariance to cancellation)."""
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return (rng.normal(size=(n, dim)) @ mixing * scale + 1000.0).astype(np.float32)


def moments(x):
    x = np.asarray(x, np.float64)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def torchmetrics_distance(mu1, sigma1, mu2, sigma2):
    return float(_compute_fid(*(torch.from_numpy(np.asarray(a, np.float64)) for a in (mu1, sigma1, mu2, sigma2))))


def test_streamed_batches_give_numpys_mean_and_covariance():
    x = features(np.random.default_rng(0), 1000, 64)
    stats = fid.FeatureStats(64)
    for batch in np.array_split(x, [1, 7, 300, 301, 640]):  # uneven batches, one of a single row
        stats.add(batch)
    mu, sigma = moments(x)
    assert stats.count == 1000
    np.testing.assert_allclose(stats.mean, mu, rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, sigma, rtol=1e-10, atol=1e-12 * np.abs(sigma).max())


def test_merged_halves_with_a_save_and_reload_midway_equal_one_pass(tmp_path):
    x = features(np.random.default_rng(1), 600, 32)
    first = fid.FeatureStats(32)
    first.add(x[:150])
    first.save(tmp_path / "state.npz")
    resumed = fid.FeatureStats.load(tmp_path / "state.npz")
    assert resumed.count == 150
    np.testing.assert_array_equal(resumed.m2, first.m2)  # reloads bit for bit
    resumed.add(x[150:300])
    other_process = fid.FeatureStats(32)
    other_process.add(x[300:])
    resumed.merge(other_process)
    mu, sigma = moments(x)
    assert resumed.count == 600
    np.testing.assert_allclose(resumed.mean, mu, rtol=1e-12)
    np.testing.assert_allclose(resumed.sigma, sigma, rtol=1e-10, atol=1e-12 * np.abs(sigma).max())


def test_a_batch_of_the_wrong_width_or_with_nan_is_refused():
    stats = fid.FeatureStats(8)
    with pytest.raises(fid.FIDError, match=r"shape \(4, 6\), expected \[N, 8\]"):
        stats.add(np.zeros((4, 6)))
    batch = np.zeros((4, 8))
    batch[2, 3] = np.nan
    with pytest.raises(fid.FIDError, match="1 of 4 feature rows hold NaN"):
        stats.add(batch)
    assert stats.count == 0


@pytorch_fid_disp
@pytest.mark.parametrize("dim", [64, 128])
def test_frechet_distance_equals_pytorch_fid_and_torchmetrics(pytorch_fid_distance, dim):
    rng = np.random.default_rng(dim)
    mu1, sigma1 = moments(features(rng, 4 * dim, dim))
    mu2, sigma2 = moments(features(rng, 4 * dim, dim, scale=1.3) + 0.1)
    ours = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert ours == pytest.approx(pytorch_fid_distance(mu1, sigma1, mu2, sigma2), rel=1e-6)
    assert ours == pytest.approx(torchmetrics_distance(mu1, sigma1, mu2, sigma2), rel=1e-6)


@pytorch_fid_disp
def test_frechet_distance_of_rank_deficient_covariances_equals_the_references(pytorch_fid_distance):
    rng = np.random.default_rng(2)
    mu1, sigma1 = moments(features(rng, 20, 64))  # rank 19: S1 S2 is singular
    mu2, sigma2 = moments(features(rng, 30, 64, scale=0.7))  # rank 29
    ours = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert ours == pytest.approx(pytorch_fid_distance(mu1, sigma1, mu2, sigma2), rel=1e-6)
    assert ours == pytest.approx(torchmetrics_distance(mu1, sigma1, mu2, sigma2), rel=1e-6)


def test_frechet_distance_of_disjoint_supports_is_the_closed_form():
    # S1 and S2 project onto complementary halves: S1 S2 = 0, so d^2 = |mu1 - mu2|^2 + tr S1 + tr S2.
    half = np.r_[np.ones(8), np.zeros(8)]
    d = fid.frechet_distance(np.zeros(16), np.diag(2.0 * half), np.full(16, 0.5), np.diag(3.0 * half[::-1]))
    assert d == pytest.approx(16 * 0.25 + 16.0 + 24.0, rel=1e-12)


def test_frechet_distance_refuses_what_is_no_covariance():
    eye = np.eye(4)
    with pytest.raises(fid.FIDError, match=r"mu \(4,\) and \(3,\)"):
        fid.frechet_distance(np.zeros(4), eye, np.zeros(3), np.eye(3))
    with pytest.raises(fid.FIDError, match="sigma2 has eigenvalue -1"):
        fid.frechet_distance(np.zeros(4), eye, np.zeros(4), np.diag([1.0, 1.0, 1.0, -1.0]))
    with pytest.raises(fid.FIDError, match="sigma1 is not symmetric"):
        fid.frechet_distance(np.zeros(4), eye + np.triu(eye[::-1]), np.zeros(4), eye)
    with pytest.raises(fid.FIDError, match="mu1 holds NaN"):
        fid.frechet_distance(np.full(4, np.nan), eye, np.zeros(4), eye)


def test_reference_file_round_trips(tmp_path):
    stats = fid.FeatureStats(16)
    stats.add(features(np.random.default_rng(3), 40, 16))
    saved = fid.save_reference(tmp_path / "ref.npz", stats, SPEC)
    loaded = fid.load_reference(tmp_path / "ref.npz", SPEC)
    assert loaded.spec == SPEC and loaded.count == 40
    np.testing.assert_array_equal(loaded.mu, saved.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    with np.load(tmp_path / "ref.npz") as npz:  # pytorch-fid reads the same keys
        np.testing.assert_array_equal(npz["mu"], stats.mean)


@pytest.mark.parametrize(
    ("other", "expected"),
    [
        (fid.FeatureSpec("inception-v3-pool3", 256, "center-crop"), "image_size 512 but .* uses image_size 256"),
        (fid.FeatureSpec("inception-v3-pool3", 512, "resize"), "resize 'center-crop' but .* uses resize 'resize'"),
        (fid.FeatureSpec("clip-vit-l-14", 512, "center-crop"), "feature 'inception-v3-pool3' but .* 'clip-vit-l-14'"),
    ],
)
def test_a_reference_made_with_another_setup_is_refused_naming_both(tmp_path, other, expected):
    stats = fid.FeatureStats(4)
    stats.add(np.random.default_rng(4).normal(size=(10, 4)))
    fid.save_reference(tmp_path / "ref.npz", stats, SPEC)
    with pytest.raises(fid.FIDError, match=expected):
        fid.load_reference(tmp_path / "ref.npz", other)


def test_a_file_that_is_no_reference_is_refused_naming_it(tmp_path):
    np.savez(tmp_path / "pytorch_fid.npz", mu=np.zeros(4), sigma=np.eye(4))
    with pytest.raises(fid.FIDError, match="pytorch_fid.npz lacks version, count, feature"):
        fid.load_reference(tmp_path / "pytorch_fid.npz", SPEC)
    (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04 cut off")
    with pytest.raises(fid.FIDError, match="cannot read statistics file .*cut.npz"):
        fid.load_reference(tmp_path / "cut.npz", SPEC)


def test_fewer_reference_images_than_feature_dimensions_warns_with_the_count(tmp_path):
    stats = fid.FeatureStats(64)
    stats.add(features(np.random.default_rng(5), 50, 64))
    with pytest.warns(UserWarning, match="from 50 images, fewer than the 64 feature dimensions"):
        fid.save_reference(tmp_path / "ref.npz", stats, SPEC)
    with pytest.warns(UserWarning, match="from 50 images"):
        fid.load_reference(tmp_path / "ref.npz", SPEC)
    stats.add(features(np.random.default_rng(6), 14, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 64 images for 64 dimensions: no warning
        fid.save_reference(tmp_path / "ref.npz", stats, SPEC)
