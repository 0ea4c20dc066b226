"""Building blocks shared by the UNet and the VAE, named as in diffusers.

All modules take and return channels-last arrays: ``x: [B, H, W, C]``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from perflow_jax.models.attention import dot_product_attention


def group_norm(groups: int, eps: float, dtype, name: str) -> nn.GroupNorm:
    """torch.nn.GroupNorm(groups, C, eps) with affine parameters; statistics in float32."""
    return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


def conv(features: int, kernel: int, dtype, name: str, stride: int = 1, padding: int | None = None) -> nn.Conv:
    """torch.nn.Conv2d(_, features, kernel, stride, padding) on NHWC inputs; padding defaults to 'same'."""
    pad = (kernel - 1) // 2 if padding is None else padding
    return nn.Conv(
        features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)), dtype=dtype, name=name
    )


class ResnetBlock2D(nn.Module):
    """diffusers.models.resnet.ResnetBlock2D (time_embedding_norm="default").

    ``temb: [B, T]`` or None (the VAE's blocks have no time embedding).
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    output_scale_factor: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
        h = conv(self.out_channels, 3, self.dtype, "conv1")(h)
        if temb is not None:
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
        h = conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """diffusers Downsample2D with a convolution: stride-2 3x3 conv.

    ``padding=0`` (the VAE encoder) pads one zero row/column at the bottom/right first.
    """

    out_channels: int
    padding: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self.out_channels, 3, self.dtype, "conv", stride=2, padding=self.padding)(x)


class Upsample2D(nn.Module):
    """diffusers Upsample2D with a convolution: nearest-neighbour upsampling, then a 3x3 conv.

    ``size``: the output's (H, W) when it is not twice the input's (odd latent sizes).
    """

    out_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        x = upsample_nearest(x, size or (2 * x.shape[1], 2 * x.shape[2]))
        return conv(self.out_channels, 3, self.dtype, "conv")(x)


def upsample_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch.nn.functional.interpolate(mode="nearest"): source index floor(i * in / out)."""
    h, w = x.shape[1], x.shape[2]
    if size == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = (jnp.arange(size[0]) * h) // size[0]
    cols = (jnp.arange(size[1]) * w) // size[1]
    return x[:, rows][:, :, cols]


class Attention(nn.Module):
    """diffusers.models.attention_processor.Attention with AttnProcessor2_0.

    On ``x: [B, N, C]`` tokens; ``context: [B, M, C']`` for cross-attention (None: self).
    The VAE's variant (``groups`` set) takes ``x: [B, H, W, C]``, normalises it first and adds
    the input back.
    """

    heads: int
    dim_head: int
    out_dim: int
    qkv_bias: bool = False
    groups: int | None = None
    eps: float = 1e-5
    attention_backend: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        residual = x
        if self.groups is not None:
            b, height, width, c = x.shape
            x = group_norm(self.groups, self.eps, self.dtype, "group_norm")(x).reshape(b, height * width, c)
        context = x if context is None else context
        inner = self.heads * self.dim_head

        def project(name, y):
            y = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name=name)(y)
            return y.reshape(y.shape[0], y.shape[1], self.heads, self.dim_head)

        q, k, v = project("to_q", x), project("to_k", context), project("to_v", context)
        h = dot_product_attention(q, k, v, backend=self.attention_backend)
        h = h.reshape(h.shape[0], h.shape[1], inner)
        h = nn.Dense(self.out_dim, dtype=self.dtype, name="to_out.0")(h)
        if self.groups is not None:
            h = h.reshape(residual.shape) + residual
        return h
