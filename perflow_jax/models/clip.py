"""transformers' CLIPTextModel and CLIPTextModelWithProjection (the SD / SDXL text encoders), and
CLIPVisionModelWithProjection (CLIP's image tower, for CLIP score). Both towers share the encoder
layers; the text tower attends causally, the image tower to every token.

Parameter names follow the PyTorch modules: ``text_model.embeddings.token_embedding``,
``text_model.encoder.layers.0.self_attn.q_proj``, ..., ``text_projection``;
``vision_model.embeddings.patch_embedding``, ..., ``visual_projection``. transformers >= 5
names CLIPTextModel's weights without the ``text_model.`` prefix (older files have it); the tree
keeps it for both networks and ``perflow_jax.weights`` accepts either when reading.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from perflow_jax.models.attention import dot_product_attention

# transformers' ACT2FN: "quick_gelu" is x * sigmoid(1.702 x); "gelu" is torch's exact (erf) GELU.
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of transformers' CLIPTextConfig that the forward pass reads, with its defaults."""

    is_causal: ClassVar[bool] = True  # each token attends to itself and the tokens before it
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int | None = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"text encoder config has hidden_act {self.hidden_act!r}, which is not supported: "
                f"use one of {', '.join(ACTIVATIONS)} (SD1.5 uses quick_gelu, SDXL's text_encoder_2 gelu)"
            )
        if not isinstance(self.eos_token_id, int):
            raise ValueError(
                f"text encoder config has eos_token_id {self.eos_token_id!r}: a single integer is needed to "
                "pick the pooled token; set the end-of-text id (49407 for CLIP's tokenizer, or 2 as in old configs)"
            )
        if self.layer_norm_eps is None:
            raise ValueError("text encoder config has layer_norm_eps None: set it (CLIP uses 1e-05)")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"text encoder config has hidden_size {self.hidden_size} not divisible by num_attention_heads "
                f"{self.num_attention_heads}: fix one of them"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CLIPTextConfig:
        """From ``transformers.CLIPTextConfig.to_dict()`` or a ``text_encoder/config.json`` dict.

        Keys that do not change the forward pass (metadata, token ids other than eos, dropout and
        initialisation settings) are ignored; missing fields take transformers' defaults.
        """
        if "text_config" in d:
            raise ValueError("this is a CLIPConfig (it has text_config): pass its d['text_config'] instead")
        model_type = d.get("model_type", "clip_text_model")
        if model_type != "clip_text_model":
            raise ValueError(
                f"text encoder config has model_type {model_type!r}, expected 'clip_text_model': "
                "is this the text_encoder/config.json of a Stable Diffusion folder?"
            )
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in d.items() if key in names})


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The fields of transformers' CLIPVisionConfig that the forward pass reads, with its defaults (ViT-B/32)."""

    is_causal: ClassVar[bool] = False  # every patch attends to every patch
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"image tower config has hidden_act {self.hidden_act!r}, which is not supported: "
                f"use one of {', '.join(ACTIVATIONS)} (OpenAI's CLIP uses quick_gelu)"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"image tower config has hidden_size {self.hidden_size} not divisible by num_attention_heads "
                f"{self.num_attention_heads}: fix one of them"
            )
        if not (isinstance(self.image_size, int) and isinstance(self.patch_size, int)):
            raise ValueError(
                f"image tower config has image_size {self.image_size!r} and patch_size {self.patch_size!r}: "
                "square images and patches are supported, give each as one integer"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CLIPVisionConfig:
        """From ``transformers.CLIPVisionConfig.to_dict()`` or a CLIPConfig's ``vision_config`` dict.

        Keys that do not change the forward pass are ignored; missing fields take transformers' defaults.
        """
        if "vision_config" in d:
            raise ValueError("this is a CLIPConfig (it has vision_config): pass its d['vision_config'] instead")
        model_type = d.get("model_type", "clip_vision_model")
        if model_type != "clip_vision_model":
            raise ValueError(
                f"image tower config has model_type {model_type!r}, expected 'clip_vision_model': "
                "is this the vision_config of a CLIP model?"
            )
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in d.items() if key in names})


class CLIPTextOutput(NamedTuple):
    """What the text encoders return.

    last_hidden_state: [B, T, D], after final_layer_norm.
    pooler_output: [B, D], last_hidden_state at the end-of-text token.
    hidden_states: num_hidden_layers + 1 arrays [B, T, D]: the embeddings, then each layer's output
      (before final_layer_norm); SDXL reads hidden_states[-2].
    text_embeds: [B, projection_dim] from CLIPTextModelWithProjection, else None.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...]
    text_embeds: jax.Array | None = None


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Index of the token each row is pooled at, as transformers' CLIPTextModel picks it: [B, T] -> [B].

    Configs written before transformers PR #24773 (SD1.5's, SDXL's) say eos_token_id 2; for them
    transformers takes the highest token id, which is CLIP's end-of-text 49407 when a CLIP tokenizer
    made the ids. Otherwise it takes the first token equal to eos_token_id (0 if there is none).
    """
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


def _layer_norm(config: CLIPTextConfig | CLIPVisionConfig, dtype, name: str) -> nn.LayerNorm:
    """torch.nn.LayerNorm(hidden_size, eps); statistics in float32."""
    return nn.LayerNorm(epsilon=config.layer_norm_eps, use_fast_variance=False, dtype=dtype, name=name)


class CLIPTextEmbeddings(nn.Module):
    """Token plus position embeddings: input_ids [B, T] int -> [B, T, D]."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        config = self.config
        seq_length = input_ids.shape[-1]
        if seq_length > config.max_position_embeddings:
            raise ValueError(
                f"{seq_length} tokens but the text encoder has max_position_embeddings "
                f"{config.max_position_embeddings}: truncate the prompt ids to that length"
            )
        d = config.hidden_size
        token = nn.Embed(config.vocab_size, d, dtype=self.dtype, name="token_embedding")
        position = nn.Embed(config.max_position_embeddings, d, dtype=self.dtype, name="position_embedding")
        return token(input_ids) + position(jnp.arange(seq_length))[None]


class CLIPAttention(nn.Module):
    """Multi-head self-attention, causal in the text tower: [B, T, D] -> [B, T, D]."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32
    attention_backend: str = "auto"

    @nn.compact
    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        config = self.config
        b, t, d = hidden_states.shape

        def project(name):
            y = nn.Dense(d, dtype=self.dtype, name=name)(hidden_states)
            return y.reshape(b, t, config.num_attention_heads, config.head_dim)

        q, k, v = project("q_proj"), project("k_proj"), project("v_proj")
        out = dot_product_attention(q, k, v, is_causal=config.is_causal, backend=self.attention_backend)
        return nn.Dense(d, dtype=self.dtype, name="out_proj")(out.reshape(b, t, d))


class CLIPMLP(nn.Module):
    """fc1, activation, fc2: [B, T, D] -> [B, T, D]."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        config = self.config
        hidden_states = nn.Dense(config.intermediate_size, dtype=self.dtype, name="fc1")(hidden_states)
        hidden_states = ACTIVATIONS[config.hidden_act](hidden_states)
        return nn.Dense(config.hidden_size, dtype=self.dtype, name="fc2")(hidden_states)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: [B, T, D] -> [B, T, D]."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32
    attention_backend: str = "auto"

    @nn.compact
    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        attention = CLIPAttention(self.config, self.dtype, self.attention_backend, name="self_attn")
        hidden_states = hidden_states + attention(_layer_norm(self.config, self.dtype, "layer_norm1")(hidden_states))
        mlp = CLIPMLP(self.config, self.dtype, name="mlp")
        return hidden_states + mlp(_layer_norm(self.config, self.dtype, "layer_norm2")(hidden_states))


class CLIPEncoder(nn.Module):
    """The stack of layers: [B, T, D] -> its input and every layer's output, num_hidden_layers + 1 arrays."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32
    attention_backend: str = "auto"

    @nn.compact
    def __call__(self, inputs_embeds: jax.Array) -> tuple[jax.Array, ...]:
        hidden_states = (inputs_embeds,)
        for i in range(self.config.num_hidden_layers):
            layer = CLIPEncoderLayer(self.config, self.dtype, self.attention_backend, name=f"layers.{i}")
            hidden_states += (layer(hidden_states[-1]),)
        return hidden_states


class CLIPTextTransformer(nn.Module):
    """Embeddings, encoder, final_layer_norm and end-of-text pooling (transformers 4's module of this name)."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    attention_backend: str = "auto"

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> CLIPTextOutput:
        hidden_states = CLIPTextEmbeddings(self.config, self.dtype, name="embeddings")(input_ids)
        hidden_states = CLIPEncoder(self.config, self.dtype, self.attention_backend, name="encoder")(hidden_states)
        last_hidden_state = _layer_norm(self.config, self.dtype, "final_layer_norm")(hidden_states[-1])
        positions = eos_positions(input_ids, self.config.eos_token_id)
        pooler_output = last_hidden_state[jnp.arange(last_hidden_state.shape[0]), positions]
        return CLIPTextOutput(last_hidden_state, pooler_output, hidden_states)


class CLIPTextModel(nn.Module):
    """transformers.CLIPTextModel (SD1.5's text_encoder, SDXL's text_encoder).

    ``__call__(input_ids: [B, T] int32) -> CLIPTextOutput`` with text_embeds None.
    """

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    attention_backend: str = "auto"

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> CLIPTextOutput:
        return CLIPTextTransformer(self.config, self.dtype, self.attention_backend, name="text_model")(input_ids)

    def abstract_params(self) -> dict[str, Any]:
        """The parameter tree as jax.ShapeDtypeStruct leaves (float32)."""
        return jax.eval_shape(self.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]


class CLIPTextModelWithProjection(CLIPTextModel):
    """transformers.CLIPTextModelWithProjection (SDXL's text_encoder_2).

    ``__call__(input_ids: [B, T] int32) -> CLIPTextOutput`` with text_embeds = text_projection(pooler_output).
    """

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> CLIPTextOutput:
        if self.config.projection_dim is None:
            raise ValueError("text encoder config has projection_dim None: CLIPTextModelWithProjection needs it")
        out = CLIPTextTransformer(self.config, self.dtype, self.attention_backend, name="text_model")(input_ids)
        projection = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype, name="text_projection")
        return out._replace(text_embeds=projection(out.pooler_output))


class CLIPVisionOutput(NamedTuple):
    """What the image tower returns.

    last_hidden_state: [B, 1 + num_patches, D], the last layer's output (no layer norm after it).
    pooler_output: [B, D], post_layernorm of the class token's last state.
    image_embeds: [B, projection_dim], visual_projection(pooler_output).
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    image_embeds: jax.Array


class CLIPVisionEmbeddings(nn.Module):
    """Patches, class token and positions: pixel_values [B, S, S, C] -> [B, 1 + num_patches, D]."""

    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        config = self.config
        b, h, w, _ = pixel_values.shape
        if (h, w) != (config.image_size, config.image_size):
            raise ValueError(
                f"images of {h}x{w} pixels but the image tower takes {config.image_size}x{config.image_size}: "
                "resize and crop them first (perflow_jax.clip_score.preprocess)"
            )
        d, p = config.hidden_size, config.patch_size
        class_embedding = self.param("class_embedding", nn.initializers.normal(1.0), (d,))
        patch = nn.Conv(
            d, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype, name="patch_embedding"
        )
        patches = patch(pixel_values).reshape(b, -1, d)  # row by row, as torch's flatten(2)
        tokens = jnp.concatenate([jnp.broadcast_to(class_embedding.astype(patches.dtype), (b, 1, d)), patches], axis=1)
        position = nn.Embed(1 + config.num_patches, d, dtype=self.dtype, name="position_embedding")
        return tokens + position(jnp.arange(1 + config.num_patches))[None]


class CLIPVisionTransformer(nn.Module):
    """Embeddings, pre_layrnorm (transformers' spelling), encoder, post_layernorm of the class token."""

    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32
    attention_backend: str = "auto"

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        hidden_states = CLIPVisionEmbeddings(self.config, self.dtype, name="embeddings")(pixel_values)
        hidden_states = _layer_norm(self.config, self.dtype, "pre_layrnorm")(hidden_states)
        last_hidden_state = CLIPEncoder(self.config, self.dtype, self.attention_backend, name="encoder")(hidden_states)[
            -1
        ]
        pooler_output = _layer_norm(self.config, self.dtype, "post_layernorm")(last_hidden_state[:, 0])
        return last_hidden_state, pooler_output


class CLIPVisionModelWithProjection(nn.Module):
    """transformers.CLIPVisionModelWithProjection (CLIP's image tower).

    ``__call__(pixel_values: [B, S, S, C] float32, normalized as perflow_jax.clip_score.preprocess does)
    -> CLIPVisionOutput``, S = config.image_size.
    """

    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32
    attention_backend: str = "auto"

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        tower = CLIPVisionTransformer(self.config, self.dtype, self.attention_backend, name="vision_model")
        last_hidden_state, pooler_output = tower(pixel_values)
        projection = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype, name="visual_projection")
        return CLIPVisionOutput(last_hidden_state, pooler_output, projection(pooler_output))

    def abstract_params(self) -> dict[str, Any]:
        """The parameter tree as jax.ShapeDtypeStruct leaves (float32)."""
        s = self.config.image_size
        pixels = jnp.zeros((1, s, s, self.config.num_channels), jnp.float32)
        return jax.eval_shape(self.init, jax.random.key(0), pixels)["params"]
