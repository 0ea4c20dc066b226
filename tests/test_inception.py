"""The Flax FID Inception-v3 against pytorch-fid's InceptionV3 with the same random weights, its resize
against torch's F.interpolate, and load_inception's errors."""

from __future__ import annotations

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file

from perflow_jax import fid_inception, weights
from perflow_jax.models.inception import InceptionV3, resize_bilinear
from tests.helpers.parity import nchw_to_nhwc, nhwc_to_nchw, relative_error
from tests.helpers.torchvision_models import torchvision_imported

# float32 through 94 convolutions, each summing up to 2048 x 9 products in another order than torch:
# ~1e-6 relative error; the bound is 1e-4.
RTOL = 1e-4


def pictures(batch: int, size: int, seed: int) -> np.ndarray:
    """[batch, size, size, 3] float32 in [0, 1]: smooth colour waves plus noise, as photos have both."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 2 * np.pi, (batch, 1, 1, 3))
    waves = np.sin(7 * xx[..., None] + phase) * np.cos(5 * yy[..., None] - phase)
    return np.clip(0.5 + 0.35 * waves + rng.normal(0, 0.1, (batch, size, size, 3)), 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """pytorch-fid's InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)
    with random weights, and the path of its torchvision-named state dict saved as pytorch-fid's file is.

    Random convolutions shrink the signal layer by layer until the biases alone make the features, so
    the BatchNorm statistics are first measured on pictures (train mode, cumulative averages), then
    moved off them, and the norms' scales and biases drawn: every parameter and statistic matters.
    """
    torch.manual_seed(0)
    with torchvision_imported() as torchvision:
        from pytorch_fid import inception

        random = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
        built = []  # the torchvision Inception3 that pytorch-fid takes its blocks from
        build = inception.fid_inception_v3

        def build_and_keep():
            built.append(build())
            return built[-1]

        with (
            mock.patch.object(inception, "load_state_dict_from_url", lambda *args, **kwargs: random),
            mock.patch.object(inception, "fid_inception_v3", build_and_keep),
        ):
            model = inception.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average
        model.train()
        model(torch.from_numpy(nhwc_to_nchw(pictures(4, 299, seed=0))))
        model.eval()
        for norm in norms:
            c = norm.num_features
            norm.weight.copy_(1 + 0.1 * torch.randn(c))
            norm.bias.copy_(0.1 * torch.randn(c))
            norm.running_mean.add_(0.1 * norm.running_var.sqrt() * torch.randn(c))
            norm.running_var.mul_(torch.exp(0.2 * torch.randn(c)))
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(built[0].state_dict(), path)  # with fc and num_batches_tracked, as pytorch-fid's file
    return model, path


@pytest.fixture(scope="module")
def loaded(reference):
    return fid_inception.load_inception(reference[1])


@pytest.mark.parametrize(("size", "batch"), [(64, 2), (299, 2)])
def test_features_equal_pytorch_fids_in_float32(reference, loaded, size, batch):
    """64 px pictures are resized up to 299 inside both networks; 299 px ones pass unchanged."""
    model, _ = reference
    _, params = loaded
    images = pictures(batch, size, seed=size)
    with torch.no_grad():
        (expected,) = model(torch.from_numpy(nhwc_to_nchw(images)))
    expected = expected[:, :, 0, 0].numpy()
    actual = np.asarray(fid_inception.features(params, jnp.asarray(images)))
    error = relative_error(actual, expected)
    between = relative_error(actual[0] - actual[1], expected[0] - expected[1])  # what tells the pictures apart
    print(f"{size} px: relative error {error:.1e}, of the difference between pictures {between:.1e}")
    assert actual.shape == (batch, 2048)
    assert np.linalg.norm(expected[0] - expected[1]) > 0.1 * np.linalg.norm(expected[0])  # features see the input
    assert error < RTOL and between < RTOL


@pytest.mark.parametrize(("shape", "size"), [((32, 32), (299, 299)), ((512, 512), (299, 299)), ((48, 80), (64, 40))])
def test_resize_equals_torch_interpolate_bilinear(shape, size):
    """Up, down (no antialiasing, unlike jax.image.resize's default) and each axis its own way."""
    images = np.random.default_rng(0).uniform(size=(2, *shape, 3)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(nhwc_to_nchw(images)), size=size, mode="bilinear", align_corners=False)
    actual = np.asarray(jax.jit(resize_bilinear, static_argnums=1)(jnp.asarray(images), size))
    np.testing.assert_allclose(actual, nchw_to_nhwc(expected.numpy()), rtol=0, atol=1e-6)


def test_a_safetensors_copy_loads_the_same_parameters_in_float32(reference, loaded, tmp_path):
    """Even from a float16 copy: the parameters are the file's values, as float32."""
    state = torch.load(reference[1], weights_only=True)
    save_file({key: value.numpy().astype(np.float16) for key, value in state.items()}, tmp_path / "half.safetensors")
    _, params = fid_inception.load_inception(tmp_path / "half.safetensors")
    expected = weights.flatten(loaded[1])
    assert weights.flatten(params).keys() == expected.keys()
    for key, value in weights.flatten(params).items():
        assert value.dtype == np.float32, key
        np.testing.assert_array_equal(value, expected[key].astype(np.float16).astype(np.float32))


def test_a_missing_file_says_where_to_get_it(tmp_path):
    with pytest.raises(
        weights.WeightsFileError,
        match=rf"{tmp_path / 'pt.pth'} do not exist: download .* from {fid_inception.WEIGHTS_URL} and pass",
    ):
        fid_inception.load_inception(tmp_path / "pt.pth")
    with pytest.raises(weights.WeightsFileError, match="is a folder: download"):
        fid_inception.load_inception(tmp_path)


def zero_state_dict() -> dict[str, torch.Tensor]:
    """A state dict of the right keys and shapes, all zeros (no network built)."""
    abstract = InceptionV3().abstract_params()
    zeros = jax.tree.map(lambda leaf: np.zeros(leaf.shape, np.float32), abstract)
    return {key: torch.from_numpy(value) for key, value in weights.params_to_state_dict(zeros).items()}


def test_another_architecture_is_refused_in_one_line_naming_keys(tmp_path):
    state = zero_state_dict()
    del state["Mixed_7c.branch_pool.bn.running_var"]
    state["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    state["Mixed_5b.branch1x1.conv.weight"] = torch.zeros(64, 192, 3, 3)
    torch.save(state, tmp_path / "other.pth")
    with pytest.raises(weights.WeightsMismatchError) as info:
        fid_inception.load_inception(tmp_path / "other.pth")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'other.pth'} is not pytorch-fid's Inception-v3: ")
    assert "1 missing keys (Mixed_7c.branch_pool.bn.running_var)" in message
    assert "1 unexpected keys (AuxLogits.fc.weight)" in message
    assert "Mixed_5b.branch1x1.conv.weight: (64, 192, 3, 3), expected (64, 192, 1, 1)" in message
    assert fid_inception.WEIGHTS_URL in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (torch.zeros(3), "holds a Tensor, not a PyTorch state dict"),
        (b"<html>Not Found</html>", "cannot be read as a PyTorch state dict"),
    ],
)
def test_a_file_that_is_no_state_dict_is_refused(tmp_path, content, expected):
    path = tmp_path / "pt_inception.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(weights.WeightsFileError, match=rf"{path} {expected}"):
        fid_inception.load_inception(path)
