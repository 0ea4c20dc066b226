"""Building blocks shared by the UNet and the VAE, named as in diffusers.

All modules take and return channels-last arrays: ``x: [B, H, W, C]``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from perflow_jax.models.attention import dot_product_attention


def group_norm(groups: int, eps: float, dtype, name: str) -> nn.GroupNorm:
    """torch.nn.GroupNorm(groups, C, eps) with affine parameters; statistics in float32."""
    return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


@jax.custom_vjp
def broadcast_add(y: jax.Array, b: jax.Array) -> jax.Array:
    """y + b, with b broadcast to y's shape and cast to y's dtype; b's gradient is summed in float32.

    Autodiff of a plain add sums b's gradient over the broadcast axes (batch x positions for a
    bias) in y's dtype: in bfloat16 that is about 6x the error of one rounding on XLA:CPU
    (bench/RESULTS.md, "CPU analysis"), where PyTorch's autocast accumulates in float32.
    """
    return y + b.astype(y.dtype)


def _broadcast_add_forward(y, b):
    return broadcast_add(y, b), b


def _broadcast_add_backward(b, g):
    lead = g.ndim - b.ndim
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(b.shape) if n == 1 and g.shape[lead + i] != 1)
    return g, jnp.sum(g, axis=axes, dtype=jnp.float32).reshape(b.shape).astype(b.dtype)


broadcast_add.defvjp(_broadcast_add_forward, _broadcast_add_backward)


class Dense(nn.Module):
    """torch.nn.Linear as flax's Dense (kernel [in, out], bias [out]); the bias is added by ``broadcast_add``."""

    features: int
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), jnp.float32)
        x, kernel = promote_dtype(x, kernel, dtype=self.dtype)
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        if not self.use_bias:
            return y
        return broadcast_add(y, self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32))


class Conv(nn.Module):
    """torch.nn.Conv2d on NHWC inputs as flax's Conv (kernel [k, k, in, out], bias [out]).

    The bias is added by ``broadcast_add``.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features), jnp.float32)
        x, kernel = promote_dtype(x, kernel, dtype=self.dtype)
        pad = ((self.padding, self.padding), (self.padding, self.padding))
        y = jax.lax.conv_general_dilated(
            x, kernel, (self.stride, self.stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return broadcast_add(y, self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32))


def conv(features: int, kernel: int, dtype, name: str, stride: int = 1, padding: int | None = None) -> Conv:
    """torch.nn.Conv2d(_, features, kernel, stride, padding) on NHWC inputs; padding defaults to 'same'."""
    pad = (kernel - 1) // 2 if padding is None else padding
    return Conv(features, kernel, stride=stride, padding=pad, dtype=dtype, name=name)


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
            t = Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = broadcast_add(h, t[:, None, None, :])
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
            y = Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name=name)(y)
            return y.reshape(y.shape[0], y.shape[1], self.heads, self.dim_head)

        q, k, v = project("to_q", x), project("to_k", context), project("to_v", context)
        h = dot_product_attention(q, k, v, backend=self.attention_backend)
        h = h.reshape(h.shape[0], h.shape[1], inner)
        h = Dense(self.out_dim, dtype=self.dtype, name="to_out.0")(h)
        if self.groups is not None:
            h = h.reshape(residual.shape) + residual
        return h
