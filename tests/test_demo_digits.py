"""The embedded demo: digits data, the quality-table classifier and Frechet distance, the committed teacher."""

import subprocess
import sys

import diffusers
import jax
import numpy as np
import pytest
import scipy.linalg
import torch

from perflow_jax import data, models, pipeline
from perflow_jax.demo import TEACHER, classifier, digits
from perflow_jax.prepare_data import PrepareError, prepare
from tests.helpers.data import read_examples
from tests.helpers.parity import FLOAT32_NETWORK_RTOL, nchw_to_nhwc, nhwc_to_nchw, relative_error

# ---------------------------------------------------------------------------------------------
# Data


def test_splits_are_disjoint_class_stratified_thirds_of_the_1797_digits():
    _, labels, heldout = digits._all()
    assert len(labels) == 1797 and len(digits.load("train")[1]) == 1198 and len(digits.load("heldout")[1]) == 599
    for label in range(10):
        members = labels == label
        assert heldout[members].sum() == round(members.sum() / 3), label
    np.testing.assert_array_equal(np.sort(np.concatenate([digits.load(s)[1] for s in digits.SPLITS])), np.sort(labels))


DIGEST = """
import hashlib
from perflow_jax.demo import digits
images, labels = digits.load("heldout")
print(hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest())
"""


def test_splits_are_the_same_in_a_fresh_process():
    here = subprocess.run([sys.executable, "-c", DIGEST], capture_output=True, text=True, check=True).stdout
    fresh = subprocess.run([sys.executable, "-c", DIGEST], capture_output=True, text=True, check=True).stdout
    assert here == fresh and len(here.strip()) == 64


def test_images_are_32px_grey_rgb_uint8_white_ink_on_black():
    images, _ = digits.load("train")
    assert images.shape == (1198, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images[..., 0], images[..., 1]) and np.array_equal(images[..., 0], images[..., 2])
    assert np.all(digits.upsample(np.full((8, 8), 16.0)) == 255) and np.all(digits.upsample(np.zeros((8, 8))) == 0)
    assert np.mean(images > 127) < 0.4  # mostly dark: the ink is the bright part


def test_captions_name_the_digit():
    assert digits.caption(7) == "a handwritten digit seven" and digits.caption(0) == "a handwritten digit zero"
    assert len({digits.caption(label) for label in range(10)}) == 10 == len(digits.DIGIT_NAMES)


def test_an_unknown_split_is_named():
    with pytest.raises(ValueError, match="'test'.*train, heldout"):
        digits.load("test")


# ---------------------------------------------------------------------------------------------
# Classifier and Frechet distance


def test_classifier_recognises_the_digits_it_was_not_trained_on():
    images, labels = digits.load("train")
    accuracy = np.mean(classifier.predict(images) == labels)
    assert accuracy > 0.95, accuracy  # 0.972 with seed 0


def test_classifier_fits_its_heldout_training_digits():
    images, labels = digits.load("heldout")
    assert np.mean(classifier.predict(images) == labels) > 0.99


def test_classifier_is_the_same_for_the_same_seed():
    images, _ = digits.load("train")
    np.testing.assert_array_equal(classifier.DigitClassifier(seed=0).features(images), classifier.features(images))


def test_features_are_the_last_hidden_layer_that_predict_reads():
    images, _ = digits.load("heldout")
    mlp = classifier.trained().mlp
    features = classifier.features(images)
    assert features.shape == (599, classifier.HIDDEN[-1]) and features.dtype == np.float64
    logits = features @ mlp.coefs_[-1] + mlp.intercepts_[-1]
    np.testing.assert_array_equal(np.argmax(logits, axis=1), classifier.predict(images))


def test_classifier_names_images_of_the_wrong_kind():
    with pytest.raises(ValueError, match=r"uint8 images, got \(2, 32, 32, 3\) float32"):
        classifier.predict(np.zeros((2, 32, 32, 3), np.float32))


def with_moments(rng, n: int, mu: np.ndarray, S: np.ndarray) -> np.ndarray:
    """n points [n, F] whose sample mean is exactly mu and sample covariance (ddof 1) exactly S."""
    z = rng.standard_normal((n, len(mu)))
    z -= z.mean(axis=0)
    white = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return white @ np.linalg.cholesky(S).T + mu


def test_frechet_distance_of_a_set_to_itself_is_zero():
    f = np.random.default_rng(0).standard_normal((500, 16)) * 3.0 + 1.0
    # float64: eigenvalues of a well-conditioned 16x16 covariance carry about 1e-15 relative error.
    assert abs(classifier.frechet_distance(f, f)) < 1e-10 * np.trace(np.cov(f, rowvar=False))


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    rng = np.random.default_rng(1)
    mu_a, mu_b = rng.standard_normal(6), rng.standard_normal(6)
    s_a, s_b = rng.uniform(0.5, 3.0, 6), rng.uniform(0.5, 3.0, 6)
    a, b = with_moments(rng, 300, mu_a, np.diag(s_a)), with_moments(rng, 200, mu_b, np.diag(s_b))
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(s_a) - np.sqrt(s_b)) ** 2)  # commuting covariances
    assert classifier.frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)
    assert expected > 1.0


def test_frechet_distance_of_full_covariances_matches_scipy_sqrtm():
    rng = np.random.default_rng(2)
    A, B = rng.standard_normal((5, 5)), rng.standard_normal((5, 5))
    S_a, S_b = A @ A.T + 0.1 * np.eye(5), B @ B.T + 0.1 * np.eye(5)
    mu_a, mu_b = rng.standard_normal(5), rng.standard_normal(5)
    a, b = with_moments(rng, 100, mu_a, S_a), with_moments(rng, 100, mu_b, S_b)
    cross = np.real(scipy.linalg.sqrtm(S_a @ S_b))
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(S_a + S_b - 2.0 * cross)
    assert classifier.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# The embedded teacher


def test_embedded_teacher_is_a_few_megabytes_of_safetensors():
    files = [f for f in TEACHER.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 8 * 2**20
    assert sorted(f.relative_to(TEACHER).as_posix() for f in files if f.suffix in (".safetensors", ".bin", ".pt")) == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]


def test_embedded_teacher_has_sd_epsilon_scaled_linear_schedule():
    config = pipeline.load_model(TEACHER, networks=("vae",)).scheduler_config
    assert config["beta_schedule"] == "scaled_linear" and config["prediction_type"] == "epsilon"
    assert (config["beta_start"], config["beta_end"], config["num_train_timesteps"]) == (0.00085, 0.012, 1000)
    assert config["clip_sample"] is False


def test_embedded_teacher_unet_in_flax_matches_diffusers():
    model = pipeline.load_model(TEACHER)
    torch_pipe = diffusers.StableDiffusionPipeline.from_pretrained(TEACHER, safety_checker=None)
    ids = torch.from_numpy(model.tokenize([digits.caption(3), ""])["input_ids"]).long()
    g = torch.Generator().manual_seed(0)
    sample, timestep = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999.0, 250.0])
    with torch.no_grad():
        states = torch_pipe.text_encoder(ids)[0]
        expected = torch_pipe.unet(sample, timestep, states).sample.numpy()
    unet = model.module("unet")
    actual = jax.jit(unet.apply)(
        {"params": model.params["unet"]}, nchw_to_nhwc(sample), timestep.numpy(), states.numpy()
    )
    assert relative_error(nhwc_to_nchw(actual), expected) < FLOAT32_NETWORK_RTOL


def test_prepare_data_reads_the_digits_through_the_teachers_vae(tmp_path):
    out = tmp_path / "digits"
    manifest = prepare(TEACHER, "digits", out, resolution=32, batch_size=64, latent_dtype="float32", progress=False)
    assert manifest["count"] == manifest["input_items"] == 1198 and manifest["latent_shape"] == [8, 8, 4]
    examples = read_examples(out)
    images, labels = digits.load("train")
    example = examples["digits:train/5"]
    assert example["caption"] == digits.caption(labels[5])
    vae = pipeline.load_model(TEACHER, networks=("vae",))
    pixels = images[5:6].astype(np.float32) / 127.5 - 1.0
    mean, _ = models.from_config("AutoencoderKL", vae.configs["vae"]).apply(
        {"params": vae.params["vae"]}, pixels, method="encode"
    )
    # The same network on the same image; only the batch it ran in differs: float32 rounding.
    np.testing.assert_allclose(example["mean"], mean[0], rtol=1e-5, atol=1e-6)
    assert data.read_manifest(out)["scaling_factor"] == vae.configs["vae"]["scaling_factor"]


def test_prepare_data_names_an_unknown_digits_split(tmp_path):
    with pytest.raises(PrepareError, match="digits:test.*train, heldout"):
        prepare(TEACHER, "digits:test", tmp_path / "out", resolution=32, progress=False)
