"""pytorch-fid's Inception-v3 (``pytorch_fid.inception.InceptionV3`` with ``use_fid_inception=True``),
the feature network of FID, up to its pool3 features.

``InceptionV3()(images: [B, H, W, 3] float32 in [0, 1]) -> [B, 2048]``: NHWC, where pytorch-fid
takes NCHW. As pytorch-fid with ``resize_input=True, normalize_input=True``, the images are resized
to 299 x 299 (``resize_bilinear``, torch's bilinear interpolation) and scaled to [-1, 1]; the
features are the mean over positions of Mixed_7c's output (pytorch-fid's block 3). The blocks are
torchvision's, patched as TensorFlow's FID graph computes: every average pool leaves the padding
out of its count, and Mixed_7c pools by maximum. Parameter names follow torchvision's
``Inception3`` (``Mixed_5b.branch1x1.conv``, ``.bn``), the keys of pytorch-fid's weight file.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

IMAGE_SIZE = 299  # pytorch-fid resizes every input to this square
_BN_EPS = 1e-3  # torchvision's BasicConv2d


def resize_bilinear(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch's ``F.interpolate(mode="bilinear", align_corners=False)`` on [B, H, W, C] -> [B, *size, C].

    Along each axis, output pixel i interpolates linearly between the two input pixels around
    x = max(s (i + 0.5) - 0.5, 0), s = input length / output length in float32 and x rounded once to
    float32, as torch's fused multiply-add gives it (two roundings move x by up to 1e-5); no
    antialiasing when shrinking (which ``jax.image.resize`` would add). Rows first, then columns.
    """
    x = images
    for axis, n_out in zip((1, 2), size, strict=True):
        n_in = x.shape[axis]
        s = np.float64(np.float32(n_in / n_out))
        src = np.maximum(s * (np.arange(n_out) + 0.5) - 0.5, 0).astype(np.float32)
        i0 = np.floor(src).astype(np.int32)
        i1 = np.minimum(i0 + 1, n_in - 1)
        lam = (src - i0).reshape((-1,) + (1,) * (x.ndim - axis - 1))
        x = jnp.take(x, i0, axis=axis) * (1 - lam) + jnp.take(x, i1, axis=axis) * lam
    return x


class BatchNorm(nn.Module):
    """torch.nn.BatchNorm2d in eval mode: fixed running statistics, kept with the parameters."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (c,))
        bias = self.param("bias", nn.initializers.zeros_init(), (c,))
        mean = self.param("running_mean", nn.initializers.zeros_init(), (c,))
        var = self.param("running_var", nn.initializers.ones_init(), (c,))
        return (x - mean) * (scale / jnp.sqrt(var + _BN_EPS)) + bias


class BasicConv2d(nn.Module):
    """torchvision's BasicConv2d: convolution without bias, batch norm, ReLU. ``padded``: torchvision's
    padding k // 2 on each side (the size kept at stride 1), else none."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padded: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel
        ph, pw = (kh // 2, kw // 2) if self.padded else (0, 0)
        s = self.stride
        x = nn.Conv(self.features, self.kernel, (s, s), ((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
        return nn.relu(BatchNorm(name="bn")(x))


def basic_conv(
    features: int, kernel: int | tuple[int, int], name: str, stride: int = 1, padded: bool = True
) -> BasicConv2d:
    """A BasicConv2d of a square (``kernel``: int) or rectangular (``(kh, kw)``) kernel."""
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    return BasicConv2d(features, kernel, stride, padded, name=name)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """F.avg_pool2d(kernel 3, stride 1, padding 1, count_include_pad=False): pytorch-fid's patch."""
    return nn.avg_pool(x, (3, 3), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride_2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2))


class InceptionA(nn.Module):
    """Mixed_5b-5d (FIDInceptionA)."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch1x1 = basic_conv(64, 1, "branch1x1")(x)
        branch5x5 = basic_conv(48, 1, "branch5x5_1")(x)
        branch5x5 = basic_conv(64, 5, "branch5x5_2")(branch5x5)
        branch3x3dbl = basic_conv(64, 1, "branch3x3dbl_1")(x)
        branch3x3dbl = basic_conv(96, 3, "branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = basic_conv(96, 3, "branch3x3dbl_3")(branch3x3dbl)
        branch_pool = basic_conv(self.pool_features, 1, "branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: 35 x 35 -> 17 x 17."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = basic_conv(384, 3, "branch3x3", stride=2, padded=False)(x)
        branch3x3dbl = basic_conv(64, 1, "branch3x3dbl_1")(x)
        branch3x3dbl = basic_conv(96, 3, "branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = basic_conv(96, 3, "branch3x3dbl_3", stride=2, padded=False)(branch3x3dbl)
        return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_3x3_stride_2(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b-6e (FIDInceptionC): factorized 7 x 7 convolutions."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        branch1x1 = basic_conv(192, 1, "branch1x1")(x)
        branch7x7 = basic_conv(c7, 1, "branch7x7_1")(x)
        branch7x7 = basic_conv(c7, (1, 7), "branch7x7_2")(branch7x7)
        branch7x7 = basic_conv(192, (7, 1), "branch7x7_3")(branch7x7)
        branch7x7dbl = basic_conv(c7, 1, "branch7x7dbl_1")(x)
        branch7x7dbl = basic_conv(c7, (7, 1), "branch7x7dbl_2")(branch7x7dbl)
        branch7x7dbl = basic_conv(c7, (1, 7), "branch7x7dbl_3")(branch7x7dbl)
        branch7x7dbl = basic_conv(c7, (7, 1), "branch7x7dbl_4")(branch7x7dbl)
        branch7x7dbl = basic_conv(192, (1, 7), "branch7x7dbl_5")(branch7x7dbl)
        branch_pool = basic_conv(192, 1, "branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a: 17 x 17 -> 8 x 8."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = basic_conv(192, 1, "branch3x3_1")(x)
        branch3x3 = basic_conv(320, 3, "branch3x3_2", stride=2, padded=False)(branch3x3)
        branch7x7x3 = basic_conv(192, 1, "branch7x7x3_1")(x)
        branch7x7x3 = basic_conv(192, (1, 7), "branch7x7x3_2")(branch7x7x3)
        branch7x7x3 = basic_conv(192, (7, 1), "branch7x7x3_3")(branch7x7x3)
        branch7x7x3 = basic_conv(192, 3, "branch7x7x3_4", stride=2, padded=False)(branch7x7x3)
        return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3_stride_2(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b (FIDInceptionE_1, ``max_pool=False``) and Mixed_7c (FIDInceptionE_2, ``max_pool=True``:
    TensorFlow's FID graph pools by maximum there)."""

    max_pool: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch1x1 = basic_conv(320, 1, "branch1x1")(x)
        branch3x3 = basic_conv(384, 1, "branch3x3_1")(x)
        branch3x3 = [
            basic_conv(384, (1, 3), "branch3x3_2a")(branch3x3),
            basic_conv(384, (3, 1), "branch3x3_2b")(branch3x3),
        ]
        branch3x3dbl = basic_conv(448, 1, "branch3x3dbl_1")(x)
        branch3x3dbl = basic_conv(384, 3, "branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = [
            basic_conv(384, (1, 3), "branch3x3dbl_3a")(branch3x3dbl),
            basic_conv(384, (3, 1), "branch3x3dbl_3b")(branch3x3dbl),
        ]
        pooled = nn.max_pool(x, (3, 3), padding=((1, 1), (1, 1))) if self.max_pool else _avg_pool_3x3(x)
        branch_pool = basic_conv(192, 1, "branch_pool")(pooled)
        return jnp.concatenate([branch1x1, *branch3x3, *branch3x3dbl, branch_pool], axis=-1)


class InceptionV3(nn.Module):
    """pytorch-fid's InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True).

    ``__call__(images: [B, H, W, 3] float32 in [0, 1]) -> [B, 2048]`` pool3 features (float32).
    """

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = resize_bilinear(images.astype(jnp.float32), (IMAGE_SIZE, IMAGE_SIZE))
        x = 2 * x - 1
        x = basic_conv(32, 3, "Conv2d_1a_3x3", stride=2, padded=False)(x)
        x = basic_conv(32, 3, "Conv2d_2a_3x3", padded=False)(x)
        x = basic_conv(64, 3, "Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_stride_2(x)
        x = basic_conv(80, 1, "Conv2d_3b_1x1")(x)
        x = basic_conv(192, 3, "Conv2d_4a_3x3", padded=False)(x)
        x = _max_pool_3x3_stride_2(x)
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pool_features, name=name)(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, channels_7x7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(channels_7x7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(max_pool=False, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))

    def abstract_params(self) -> dict[str, Any]:
        """The parameter tree as jax.ShapeDtypeStruct leaves (float32)."""
        images = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
        return jax.eval_shape(self.init, jax.random.key(0), images)["params"]
