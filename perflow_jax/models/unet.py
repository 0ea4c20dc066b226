"""Flax twin of diffusers' ``UNet2DConditionModel`` for SD1.x, SD2.x and SDXL.

Built from the same ``unet/config.json`` dict as the original (``UNetConfig.from_dict``); module
names follow diffusers so the parameter tree maps onto its state dict (``perflow_jax.weights``).

Public layout: ``sample: [B, H, W, C]`` (channels last), ``timesteps: [B]`` or a scalar (the
float timestep, e.g. ``t * 1000``), ``encoder_hidden_states: [B, L, cross_attention_dim]``; for
SDXL (``addition_embed_type="text_time"``) also ``text_embeds: [B, P]`` (pooled text) and
``time_ids: [B, 6]`` (original size, crop top-left, target size).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from perflow_jax.models.attention import check_backend
from perflow_jax.models.blocks import Attention, Dense, Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn",)

# Rematerialisation of the ResNet and transformer blocks (recompute activations in the backward
# pass instead of storing them): "none", "full" (store only block inputs) or "dots" (store the
# results of matrix multiplications, recompute the cheap element-wise work).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# Config keys that must keep diffusers' default for this twin to compute what the original does.
_REQUIRED_DEFAULTS = {
    "act_fn": "silu",
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "class_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "cross_attention_norm": None,
    "attention_type": "default",
    "num_attention_heads": None,
    "dropout": 0.0,
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The parts of a diffusers UNet2DConditionModel config this twin uses, normalised to tuples."""

    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: tuple[bool, ...] = (False,) * 4
    mid_block_only_cross_attention: bool = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    resnet_out_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: tuple[int, ...] = (768,) * 4
    # Transformer layers per ResNet of each down block; up blocks: per ResNet of each up block.
    transformer_layers_per_block: tuple[tuple[int, ...], ...] = ((1, 1),) * 4
    reverse_transformer_layers_per_block: tuple[tuple[int, ...], ...] = ((1, 1, 1),) * 4
    heads: tuple[int, ...] = (8,) * 4
    use_linear_projection: bool = False
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> UNetConfig:
        """From a diffusers ``unet/config.json`` dict (diffusers' defaults fill absent keys)."""
        cfg = {k: v for k, v in config.items() if not k.startswith("_")}
        for key, default in _REQUIRED_DEFAULTS.items():
            if cfg.get(key, default) != default:
                raise ValueError(
                    f"UNet config has {key}={cfg[key]!r}; this Flax UNet supports only {key}={default!r} "
                    "(the Stable Diffusion 1.x / 2.x / XL architectures)"
                )
        _check_choice(cfg, "down_block_types", DOWN_BLOCKS)
        _check_choice(cfg, "up_block_types", UP_BLOCKS)
        if cfg.get("mid_block_type", cls.mid_block_type) not in MID_BLOCKS:
            raise ValueError(f"UNet config has mid_block_type={cfg['mid_block_type']!r}; supported: {MID_BLOCKS}")
        if cfg.get("addition_embed_type") not in (None, "text_time"):
            raise ValueError(
                f"UNet config has addition_embed_type={cfg['addition_embed_type']!r}; supported: None (SD1.x/2.x) "
                "or 'text_time' (SDXL)"
            )
        if cfg.get("norm_num_groups", 32) is None:
            raise ValueError("UNet config has norm_num_groups=None; this Flax UNet needs group norms (SD models)")

        down = tuple(cfg.get("down_block_types", cls.down_block_types))
        n = len(down)
        up = tuple(cfg.get("up_block_types", cls.up_block_types))
        if len(up) != n:
            raise ValueError(f"UNet config has {n} down blocks but {len(up)} up blocks")
        layers = _per_block(cfg.get("layers_per_block", 2), n, "layers_per_block")
        # diffusers' naming quirk: attention_head_dim holds the number of heads.
        heads = _per_block(cfg.get("attention_head_dim", 8), n, "attention_head_dim")
        transformer_layers = cfg.get("transformer_layers_per_block", 1)
        per_down = tuple(
            tuple(_per_block(t, layers[i], "transformer_layers_per_block"))
            for i, t in enumerate(_per_block(transformer_layers, n, "transformer_layers_per_block"))
        )
        reverse = cfg.get("reverse_transformer_layers_per_block")
        if reverse is None:
            per_up = tuple((per_down[n - 1 - i][0],) * (layers[n - 1 - i] + 1) for i in range(n))
        else:
            per_up = tuple(
                tuple(_per_block(t, layers[n - 1 - i] + 1, "reverse_transformer_layers_per_block"))
                for i, t in enumerate(reverse)
            )
        only_cross = cfg.get("only_cross_attention", False)
        mid_only_cross = cfg.get("mid_block_only_cross_attention")
        if mid_only_cross is None:
            mid_only_cross = only_cross if isinstance(only_cross, bool) else False
        if cfg.get("addition_embed_type") == "text_time":
            for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                if cfg.get(key) is None:
                    raise ValueError(f"UNet config has addition_embed_type='text_time' but no {key} (SDXL sets both)")
        fields = {f.name for f in dataclasses.fields(cls)}
        # Keys that keep diffusers' name and value come as they are; the rest are normalised to tuples.
        values = {k: v for k, v in cfg.items() if k in fields}
        values.update(
            down_block_types=down,
            up_block_types=up,
            only_cross_attention=tuple(_per_block(only_cross, n, "only_cross_attention")),
            mid_block_only_cross_attention=bool(mid_only_cross),
            block_out_channels=tuple(cfg.get("block_out_channels", cls.block_out_channels)),
            layers_per_block=tuple(layers),
            cross_attention_dim=tuple(_per_block(cfg.get("cross_attention_dim", 1280), n, "cross_attention_dim")),
            transformer_layers_per_block=per_down,
            reverse_transformer_layers_per_block=per_up,
            heads=tuple(heads),
        )
        return cls(**values)


def _check_choice(cfg: Mapping[str, Any], key: str, supported: Sequence[str]) -> None:
    for value in cfg.get(key, ()):
        if value not in supported:
            raise ValueError(
                f"UNet config has {key} containing {value!r}; supported block types: {', '.join(supported)}"
            )


def _per_block(value, n: int, key: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"UNet config has {key}={list(value)} with {len(value)} entries; expected {n}")
        return list(value)
    return [value] * n


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, shift: float) -> jax.Array:
    """diffusers' get_timestep_embedding, in float32: [N] -> [N, dim] sinusoids."""
    half = dim // 2
    exponent = -math.log(10000) * jnp.arange(half, dtype=jnp.float32) / (half - shift)
    angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.silu(Dense(self.features, dtype=self.dtype, name="linear_1")(x))
        return Dense(self.features, dtype=self.dtype, name="linear_2")(x)


class FeedForward(nn.Module):
    """diffusers FeedForward with GEGLU: net.0.proj -> h * gelu(gate) -> net.2 (inner = 4 dim)."""

    dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inner = 4 * self.dim
        h, gate = jnp.split(Dense(2 * inner, dtype=self.dtype, name="net.0.proj")(x), 2, axis=-1)
        return Dense(self.dim, dtype=self.dtype, name="net.2")(h * nn.gelu(gate, approximate=False))


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention and GEGLU feed-forward, each pre-LayerNorm and residual."""

    dim: int
    heads: int
    only_cross_attention: bool = False
    attention_backend: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        def norm(name):
            return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=self.dtype, name=name)

        def attention(name):
            return Attention(
                self.heads,
                self.dim // self.heads,
                self.dim,
                attention_backend=self.attention_backend,
                dtype=self.dtype,
                name=name,
            )

        x = attention("attn1")(norm("norm1")(x), context if self.only_cross_attention else None) + x
        x = attention("attn2")(norm("norm2")(x), context) + x
        return FeedForward(self.dim, dtype=self.dtype, name="ff")(norm("norm3")(x)) + x


class Transformer2DModel(nn.Module):
    """GroupNorm, proj_in (1x1 conv, or linear for SD2.x), transformer blocks, proj_out, residual."""

    channels: int
    heads: int
    layers: int
    groups: int
    use_linear_projection: bool
    only_cross_attention: bool = False
    attention_backend: str = "auto"
    remat_policy: str = "none"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        proj = (
            (lambda name: Dense(c, dtype=self.dtype, name=name))
            if self.use_linear_projection
            else (lambda name: conv(c, 1, self.dtype, name))
        )
        y = group_norm(self.groups, 1e-6, self.dtype, "norm")(x)
        y = proj("proj_in")(y).reshape(b, h * w, c)
        block = _maybe_remat(BasicTransformerBlock, self.remat_policy)
        for i in range(self.layers):
            y = block(
                c,
                self.heads,
                self.only_cross_attention,
                self.attention_backend,
                self.dtype,
                name=f"transformer_blocks.{i}",
            )(y, context)
        return proj("proj_out")(y.reshape(b, h, w, c)) + x


def check_settings(attention_backend: str, remat: str) -> None:
    """ValueError for an unknown attention backend or remat policy (the UNet's and the ControlNet's)."""
    check_backend(attention_backend)
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}: choose one of {', '.join(REMAT_POLICIES)}")


def _maybe_remat(module_class, policy: str):
    if policy == "none":
        return module_class
    return nn.remat(module_class, policy=REMAT_POLICIES[policy])


def transformer(module: nn.Module, cfg: UNetConfig, name: str, i: int, layers: int, only_cross: bool):
    """The transformer of down block i of ``module`` (the up blocks mirror the down blocks)."""
    return Transformer2DModel(
        cfg.block_out_channels[i],
        cfg.heads[i],
        layers,
        cfg.norm_num_groups,
        cfg.use_linear_projection,
        only_cross,
        module.attention_backend,
        module.remat,
        module.dtype,
        name=name,
    )


def resnet_block(module: nn.Module, cfg: UNetConfig, name: str, c: int, scale: float | None = None):
    """A ResNet block of ``module`` with ``c`` output channels (``scale``: its output scale factor)."""
    scale = cfg.resnet_out_scale_factor if scale is None else scale
    resnet = _maybe_remat(ResnetBlock2D, module.remat)
    return resnet(c, cfg.norm_num_groups, cfg.norm_eps, scale, module.dtype, name=name)


def embedding(module: nn.Module, cfg: UNetConfig, batch: int, timesteps, text_embeds, time_ids) -> jax.Array:
    """The time embedding [B, 4 block_out_channels[0]] (plus SDXL's text and size embedding) of ``module``,
    the UNet or its ControlNet, which share this code and its parameter names."""
    time_dim = cfg.block_out_channels[0] * 4
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (batch,))
    t_emb = timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    emb = TimestepEmbedding(time_dim, module.dtype, name="time_embedding")(t_emb.astype(module.dtype))
    if cfg.addition_embed_type == "text_time":
        if text_embeds is None or time_ids is None:
            raise ValueError("this UNet (addition_embed_type='text_time', SDXL) needs text_embeds and time_ids")
        time_emb = timestep_embedding(
            time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift
        ).reshape(batch, -1)
        add = jnp.concatenate([text_embeds.astype(jnp.float32), time_emb], axis=-1).astype(module.dtype)
        emb = emb + TimestepEmbedding(time_dim, module.dtype, name="add_embedding")(add)
    return emb


def down_and_mid_blocks(
    module: nn.Module, cfg: UNetConfig, x: jax.Array, emb: jax.Array, context: jax.Array
) -> tuple[jax.Array, list[jax.Array]]:
    """The down blocks and the mid block of ``module`` (the UNet or its ControlNet) from conv_in's output ``x``.

    Returns the mid block's output and the skip connections, conv_in's output first.
    """
    channels = cfg.block_out_channels
    skips = [x]
    for i, block_type in enumerate(cfg.down_block_types):
        prefix = f"down_blocks.{i}"
        for j in range(cfg.layers_per_block[i]):
            x = resnet_block(module, cfg, f"{prefix}.resnets.{j}", channels[i])(x, emb)
            if block_type == "CrossAttnDownBlock2D":
                layers = cfg.transformer_layers_per_block[i][j]
                x = transformer(module, cfg, f"{prefix}.attentions.{j}", i, layers, cfg.only_cross_attention[i])(
                    x, context
                )
            skips.append(x)
        if i < len(channels) - 1:
            x = Downsample2D(channels[i], cfg.downsample_padding, module.dtype, name=f"{prefix}.downsamplers.0")(x)
            skips.append(x)

    mid = "mid_block"
    x = resnet_block(module, cfg, f"{mid}.resnets.0", channels[-1], cfg.mid_block_scale_factor)(x, emb)
    # diffusers gives the mid block the last down block's transformer depth.
    layers = cfg.transformer_layers_per_block[-1][0]
    x = transformer(module, cfg, f"{mid}.attentions.0", -1, layers, cfg.mid_block_only_cross_attention)(x, context)
    x = resnet_block(module, cfg, f"{mid}.resnets.1", channels[-1], cfg.mid_block_scale_factor)(x, emb)
    return x, skips


class UNet2DConditionModel(nn.Module):
    """diffusers UNet2DConditionModel (SD1.x, SD2.x, SDXL).

    Attributes:
      config: the architecture, ``UNetConfig.from_dict(unet_config_json)``.
      dtype: computation dtype (parameters stay float32).
      attention_backend: see ``perflow_jax.models.attention``.
      remat: rematerialisation policy of the ResNet and transformer blocks, a key of REMAT_POLICIES.
    """

    config: UNetConfig
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
        text_embeds: jax.Array | None = None,
        time_ids: jax.Array | None = None,
        down_block_additional_residuals: Sequence[jax.Array] | None = None,
        mid_block_additional_residual: jax.Array | None = None,
    ) -> jax.Array:
        """[B, H, W, in_channels] -> [B, H, W, out_channels] in ``dtype``.

        ``down_block_additional_residuals`` (one per skip connection, conv_in's first) and
        ``mid_block_additional_residual``: a ControlNet's outputs, added to the skips and to the mid
        block's output where diffusers adds them.
        """
        cfg = self.config
        emb = embedding(self, cfg, sample.shape[0], timesteps, text_embeds, time_ids)
        context = encoder_hidden_states.astype(self.dtype)

        x = sample.astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        x = conv(cfg.block_out_channels[0], cfg.conv_in_kernel, self.dtype, "conv_in")(x)
        x, skips = down_and_mid_blocks(self, cfg, x, emb, context)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(
                    f"{len(down_block_additional_residuals)} down-block residuals for a UNet with {len(skips)} "
                    "skip connections: is the ControlNet of this UNet's architecture?"
                )
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_block_additional_residuals, strict=True)]
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual.astype(x.dtype)

        channels = cfg.block_out_channels
        n = len(channels)
        for i, block_type in enumerate(cfg.up_block_types):
            prefix = f"up_blocks.{i}"
            k = n - 1 - i  # the down block this up block mirrors
            c = channels[k]
            for j in range(cfg.layers_per_block[k] + 1):
                x = jnp.concatenate([x, skips.pop()], axis=-1)
                x = resnet_block(self, cfg, f"{prefix}.resnets.{j}", c)(x, emb)
                if block_type == "CrossAttnUpBlock2D":
                    layers = cfg.reverse_transformer_layers_per_block[i][j]
                    x = transformer(self, cfg, f"{prefix}.attentions.{j}", k, layers, cfg.only_cross_attention[k])(
                        x, context
                    )
            if i < n - 1:
                size = skips[-1].shape[1:3]
                x = Upsample2D(c, self.dtype, name=f"{prefix}.upsamplers.0")(x, size)

        x = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, self.dtype, "conv_norm_out")(x))
        return conv(cfg.out_channels, cfg.conv_out_kernel, self.dtype, "conv_out")(x)

    def dummy_inputs(self, batch: int = 1, size: int = 8, text_len: int = 77) -> tuple[jax.Array, ...]:
        """Zero inputs of the right shapes (for init / eval_shape)."""
        cfg = self.config
        inputs = (
            jnp.zeros((batch, size, size, cfg.in_channels)),
            jnp.zeros((batch,)),
            jnp.zeros((batch, text_len, cfg.cross_attention_dim[0])),
        )
        if cfg.addition_embed_type == "text_time":
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            inputs += (jnp.zeros((batch, pooled)), jnp.zeros((batch, 6)))
        return inputs

    def abstract_params(self) -> dict:
        """The parameter tree as jax.ShapeDtypeStruct leaves (no memory, no compute)."""
        return jax.eval_shape(lambda: self.init(jax.random.key(0), *self.dummy_inputs()))["params"]
