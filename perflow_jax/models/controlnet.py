"""Flax twin of diffusers' ``ControlNetModel`` (SD1.x, SD2.x and SDXL ControlNets).

A ControlNet is its UNet's time (and SDXL text/size) embedding, ``conv_in``, down blocks and mid
block (the same code and parameter names as ``perflow_jax.models.unet``), plus
``controlnet_cond_embedding``, which turns the control image into conv_in's width, and one 1x1
"zero convolution" per skip connection (``controlnet_down_blocks.*``) and for the mid block
(``controlnet_mid_block``). Its outputs are added to the UNet's skips and mid block output
(``UNet2DConditionModel``'s ``down_block_additional_residuals`` / ``mid_block_additional_residual``).

Public layout: the UNet's inputs, plus ``controlnet_cond: [B, H_img, W_img, conditioning_channels]``,
the control image in [0, 1] at the image resolution (the latents' size times 8 for SD's VAE).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax.models.blocks import conv
from perflow_jax.models.unet import UNetConfig, check_settings, down_and_mid_blocks, embedding

# A ControlNet config has its UNet's keys without the up path; the UNet config is completed with up blocks
# mirroring the down blocks (which a ControlNet does not have) so that UNetConfig checks the rest.
_MIRRORED_UP_BLOCKS = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}

# What a ControlNet must share with the UNet it steers: its residuals are added to the UNet's skips
# (block_out_channels, layers_per_block) and it reads the same latents and text conditions.
BASE_ARCHITECTURE = (
    "in_channels",
    "block_out_channels",
    "layers_per_block",
    "cross_attention_dim",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
)


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """A diffusers ControlNetModel config: the base UNet's architecture and the control image's embedding."""

    unet: UNetConfig
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    bgr: bool = False  # controlnet_conditioning_channel_order "bgr": the channels are flipped first

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> ControlNetConfig:
        """From a diffusers ControlNet ``config.json`` dict (diffusers' defaults fill absent keys)."""
        cfg = {k: v for k, v in config.items() if not k.startswith("_")}
        if cfg.get("global_pool_conditions", False):
            raise ValueError(
                "ControlNet config has global_pool_conditions=True (e.g. the shuffle ControlNet); this Flax "
                "ControlNet supports only spatial residuals (global_pool_conditions=False)"
            )
        order = cfg.get("controlnet_conditioning_channel_order", "rgb")
        if order not in ("rgb", "bgr"):
            raise ValueError(f"ControlNet config has controlnet_conditioning_channel_order={order!r}: use rgb or bgr")
        down = cfg.get("down_block_types", UNetConfig.down_block_types)
        unet_keys = {k: v for k, v in cfg.items() if k not in ("up_block_types", "out_channels")}
        try:
            unet = UNetConfig.from_dict({**unet_keys, "up_block_types": [_MIRRORED_UP_BLOCKS.get(b, b) for b in down]})
        except ValueError as error:
            raise ValueError(str(error).replace("UNet config", "ControlNet config", 1)) from error
        return cls(
            unet=unet,
            conditioning_channels=int(cfg.get("conditioning_channels", 3)),
            conditioning_embedding_out_channels=tuple(
                cfg.get("conditioning_embedding_out_channels", cls.conditioning_embedding_out_channels)
            ),
            bgr=order == "bgr",
        )


def architecture_mismatches(controlnet: ControlNetConfig, unet: UNetConfig) -> list[str]:
    """Each BASE_ARCHITECTURE dimension in which ``controlnet`` differs from ``unet``: "name A vs B"."""
    mismatches = []
    for key in BASE_ARCHITECTURE:
        a, b = getattr(controlnet.unet, key), getattr(unet, key)
        if a != b:
            mismatches.append(f"{key} {_as_written(key, a)} vs {_as_written(key, b)}")
    return mismatches


def _as_written(key: str, value):
    """A dimension as config.json usually writes it: tuples as lists, and one number for the same in every block."""
    if not isinstance(value, tuple):
        return value
    if key in ("cross_attention_dim", "layers_per_block") and len(set(value)) == 1:
        return value[0]
    return list(value)


def guess_mode_scales(count: int) -> np.ndarray:
    """[count] float32: diffusers' guess-mode weights logspace(-1, 0, count), 0.1 for conv_in's residual to 1 for
    the mid block's."""
    return np.logspace(-1, 0, count, dtype=np.float64).astype(np.float32)


class ControlNetConditioningEmbedding(nn.Module):
    """Control image -> conv_in's width: conv_in, then (3x3 conv, stride-2 3x3 conv) per level, SiLU after each,
    then conv_out. [B, H, W, C] -> [B, H / 2^(L-1), W / 2^(L-1), out_channels]."""

    out_channels: int
    block_out_channels: tuple[int, ...]
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = self.block_out_channels
        x = nn.silu(conv(channels[0], 3, self.dtype, "conv_in")(x))
        for i in range(len(channels) - 1):
            x = nn.silu(conv(channels[i], 3, self.dtype, f"blocks.{2 * i}")(x))
            x = nn.silu(conv(channels[i + 1], 3, self.dtype, f"blocks.{2 * i + 1}", stride=2)(x))
        return conv(self.out_channels, 3, self.dtype, "conv_out")(x)


class ControlNetModel(nn.Module):
    """diffusers ControlNetModel. Attributes as ``UNet2DConditionModel``'s; ``config``: ``ControlNetConfig``."""

    config: ControlNetConfig
    dtype: jnp.dtype = jnp.float32
    attention_backend: str = "auto"
    remat: str = "none"

    def __post_init__(self):
        check_settings(self.attention_backend, self.remat)
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: jax.Array,
        controlnet_cond: jax.Array,
        text_embeds: jax.Array | None = None,
        time_ids: jax.Array | None = None,
        conditioning_scale: float | jax.Array = 1.0,
        guess_mode: bool = False,
    ) -> tuple[list[jax.Array], jax.Array]:
        """(down-block residuals, one per UNet skip connection, mid-block residual), in ``dtype``.

        Each is the zero convolution's output times ``conditioning_scale``; with ``guess_mode`` also
        times ``guess_mode_scales`` (the deepest weighs most), as diffusers' ``guess_mode``.
        """
        cfg = self.config.unet
        emb = embedding(self, cfg, sample.shape[0], timesteps, text_embeds, time_ids)
        context = encoder_hidden_states.astype(self.dtype)
        x = conv(cfg.block_out_channels[0], 3, self.dtype, "conv_in")(sample.astype(self.dtype))
        image = controlnet_cond.astype(self.dtype)
        if self.config.bgr:
            image = image[..., ::-1]
        x = x + ControlNetConditioningEmbedding(
            cfg.block_out_channels[0],
            self.config.conditioning_embedding_out_channels,
            self.dtype,
            name="controlnet_cond_embedding",
        )(image)
        x, skips = down_and_mid_blocks(self, cfg, x, emb, context)
        down = [conv(s.shape[-1], 1, self.dtype, f"controlnet_down_blocks.{i}")(s) for i, s in enumerate(skips)]
        mid = conv(x.shape[-1], 1, self.dtype, "controlnet_mid_block")(x)
        scales = guess_mode_scales(len(down) + 1) if guess_mode else np.ones(len(down) + 1, np.float32)
        scale = jnp.asarray(conditioning_scale, jnp.float32)
        down = [r * (s * scale).astype(r.dtype) for r, s in zip(down, scales[:-1], strict=True)]
        return down, mid * (scales[-1] * scale).astype(mid.dtype)

    def dummy_inputs(self, batch: int = 1, size: int = 8, text_len: int = 77) -> tuple[jax.Array, ...]:
        """Zero inputs of the right shapes (for init / eval_shape): latents ``size``, control image 8 times that."""
        cfg = self.config.unet
        factor = 2 ** (len(self.config.conditioning_embedding_out_channels) - 1)
        inputs = (
            jnp.zeros((batch, size, size, cfg.in_channels)),
            jnp.zeros((batch,)),
            jnp.zeros((batch, text_len, cfg.cross_attention_dim[0])),
            jnp.zeros((batch, size * factor, size * factor, self.config.conditioning_channels)),
        )
        if cfg.addition_embed_type == "text_time":
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            inputs += (jnp.zeros((batch, pooled)), jnp.zeros((batch, 6)))
        return inputs

    def abstract_params(self) -> dict:
        """The parameter tree as jax.ShapeDtypeStruct leaves (no memory, no compute)."""
        return jax.eval_shape(lambda: self.init(jax.random.key(0), *self.dummy_inputs()))["params"]
