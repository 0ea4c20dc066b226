"""Flax twin of diffusers' ``AutoencoderKL`` (the SD1.x / SD2.x / SDXL VAE).

Images ``[B, H, W, 3]`` in [-1, 1] <-> latents ``[B, H/f, W/f, latent_channels]`` with
f = ``downsampling_factor(config)``. ``encode`` returns the posterior's moments (mean and
log-variance, clamped to [-30, 20] as diffusers does); training latents are
``(mean + exp(logvar / 2) * eps) * scaling_factor``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from perflow_jax.models.attention import check_backend
from perflow_jax.models.blocks import Attention, Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm

_EPS = 1e-6  # diffusers builds every VAE norm with eps 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The parts of a diffusers AutoencoderKL config this twin uses."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def downsampling_factor(self) -> int:
        """f: an H x W image has (H / f) x (W / f) latents (8 for Stable Diffusion's VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> VAEConfig:
        """From a diffusers ``vae/config.json`` dict (diffusers' defaults fill absent keys)."""
        cfg = {k: v for k, v in config.items() if not k.startswith("_")}
        if cfg.get("act_fn", "silu") != "silu":
            raise ValueError(f"VAE config has act_fn={cfg['act_fn']!r}; this Flax VAE supports only 'silu'")
        for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            for value in cfg.get(key, (block,)):
                if value != block:
                    raise ValueError(
                        f"VAE config has {key} containing {value!r}; this Flax VAE supports only {block!r}"
                    )
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in cfg.items() if k in fields}
        if "block_out_channels" in values:
            values["block_out_channels"] = tuple(values["block_out_channels"])
        return cls(**values)


class UNetMidBlock2D(nn.Module):
    """ResNet, single-head self-attention over all pixels (optional), ResNet; no time embedding."""

    channels: int
    groups: int
    add_attention: bool
    attention_backend: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ResnetBlock2D(self.channels, self.groups, _EPS, dtype=self.dtype, name="resnets.0")(x)
        if self.add_attention:
            x = Attention(
                1,
                self.channels,
                self.channels,
                qkv_bias=True,
                groups=self.groups,
                eps=_EPS,
                attention_backend=self.attention_backend,
                dtype=self.dtype,
                name="attentions.0",
            )(x)
        return ResnetBlock2D(self.channels, self.groups, _EPS, dtype=self.dtype, name="resnets.1")(x)


class _Half(nn.Module):
    """What Encoder and Decoder share: their fields, ResNets, mid block and output head."""

    config: VAEConfig
    attention_backend: str = "auto"
    dtype: jnp.dtype = jnp.float32

    def resnet(self, c: int, name: str) -> ResnetBlock2D:
        return ResnetBlock2D(c, self.config.norm_num_groups, _EPS, dtype=self.dtype, name=name)

    def mid_block(self, c: int) -> UNetMidBlock2D:
        cfg = self.config
        return UNetMidBlock2D(
            c, cfg.norm_num_groups, cfg.mid_block_add_attention, self.attention_backend, self.dtype, name="mid_block"
        )

    def head(self, x: jax.Array, features: int) -> jax.Array:
        """conv_norm_out, SiLU, conv_out."""
        x = nn.silu(group_norm(self.config.norm_num_groups, _EPS, self.dtype, "conv_norm_out")(x))
        return conv(features, 3, self.dtype, "conv_out")(x)


class Encoder(_Half):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = self.config.block_out_channels
        x = conv(channels[0], 3, self.dtype, "conv_in")(x)
        for i, c in enumerate(channels):
            for j in range(self.config.layers_per_block):
                x = self.resnet(c, f"down_blocks.{i}.resnets.{j}")(x)
            if i < len(channels) - 1:
                x = Downsample2D(c, padding=0, dtype=self.dtype, name=f"down_blocks.{i}.downsamplers.0")(x)
        x = self.mid_block(channels[-1])(x)
        return self.head(x, 2 * self.config.latent_channels)


class Decoder(_Half):
    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        channels = tuple(reversed(self.config.block_out_channels))
        x = conv(channels[0], 3, self.dtype, "conv_in")(z)
        x = self.mid_block(channels[0])(x)
        for i, c in enumerate(channels):
            for j in range(self.config.layers_per_block + 1):
                x = self.resnet(c, f"up_blocks.{i}.resnets.{j}")(x)
            if i < len(channels) - 1:
                x = Upsample2D(c, self.dtype, name=f"up_blocks.{i}.upsamplers.0")(x)
        return self.head(x, self.config.out_channels)


class AutoencoderKL(nn.Module):
    """diffusers AutoencoderKL. ``apply(..., method="encode")`` / ``method="decode"``.

    Attributes:
      config: ``VAEConfig.from_dict(vae_config_json)``.
      dtype: computation dtype (parameters stay float32); moments are returned in float32.
      attention_backend: see ``perflow_jax.models.attention``.
    """

    config: VAEConfig
    dtype: jnp.dtype = jnp.float32
    attention_backend: str = "auto"

    def setup(self):
        check_backend(self.attention_backend)
        lc = self.config.latent_channels
        self.encoder = Encoder(self.config, self.attention_backend, self.dtype)
        self.decoder = Decoder(self.config, self.attention_backend, self.dtype)
        if self.config.use_quant_conv:
            self.quant_conv = conv(2 * lc, 1, self.dtype, "quant_conv")
        if self.config.use_post_quant_conv:
            self.post_quant_conv = conv(lc, 1, self.dtype, "post_quant_conv")

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B, H, W, 3] in [-1, 1] -> (mean, logvar), each [B, H/f, W/f, latent_channels] float32."""
        moments = self.encoder(images.astype(self.dtype))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents [B, h, w, latent_channels] -> images [B, f h, f w, 3] (about [-1, 1])."""
        z = latents.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Encode to the posterior mean and decode it again (used to create every parameter)."""
        mean, _ = self.encode(images)
        return self.decode(mean)

    def abstract_params(self) -> dict:
        """The parameter tree as jax.ShapeDtypeStruct leaves (no memory, no compute)."""
        factor = self.config.downsampling_factor
        images = jnp.zeros((1, 8 * factor, 8 * factor, self.config.in_channels))
        return jax.eval_shape(lambda: self.init(jax.random.key(0), images))["params"]
