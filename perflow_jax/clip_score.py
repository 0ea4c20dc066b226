"""CLIP score: a transformers CLIP folder's two towers as Flax twins, CLIP's image preprocessing in
JAX, and the score as torchmetrics' CLIPScore computes it.

``load_clip(folder)`` reads a folder that ``transformers.CLIPModel.save_pretrained`` wrote (or a
download of e.g. openai/clip-vit-large-patch14); ``preprocess`` turns images into the image
tower's input; ``clip_score`` scores image embeddings against caption embeddings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax import weights
from perflow_jax.models.clip import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, the normalization every OpenAI CLIP was trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

GET_WEIGHTS = (
    "download a transformers CLIP model folder, e.g. `hf download openai/clip-vit-large-patch14 "
    "--local-dir {folder}` (config.json, model.safetensors and the tokenizer files), and pass that folder"
)


def preprocess(images: jax.Array, image_size: int) -> jax.Array:
    """transformers' CLIPImageProcessor in JAX: [B, H, W, 3] uint8 -> [B, S, S, 3] float32, S = image_size.

    The shorter side is resized to S (the longer to int(S * long / short)) with antialiased bicubic
    and rounded to integers as PIL does, the centre S x S is cut out (offset (size - S) // 2), and
    the pixels are scaled to [0, 1] and normalized with CLIP_MEAN and CLIP_STD. This is the PIL
    processor (``CLIPImageProcessorPil``, transformers' choice without torchvision); downscaled, at
    most 1 value in 1000 lands one 8-bit level away from it (tests/test_clip_vision.py).
    """
    b, h, w, c = images.shape
    if h <= w:
        new_h, new_w = image_size, int(image_size * w / h)
    else:
        new_h, new_w = int(image_size * h / w), image_size
    x = images.astype(jnp.float32)
    for shape in ((b, h, new_w, c), (b, new_h, new_w, c)):  # PIL: rows, then columns, to uint8 after each
        x = jnp.clip(jnp.round(jax.image.resize(x, shape, "bicubic", antialias=True)), 0.0, 255.0)
    top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
    x = x[:, top : top + image_size, left : left + image_size] / 255.0
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def cosine_scores(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
    """100 x cos(image_embeds, text_embeds) of each of N pairs: [N, P], [N, P] -> [N] float32."""
    image = image_embeds.astype(jnp.float32)
    text = text_embeds.astype(jnp.float32)
    image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    return 100.0 * jnp.sum(image * text, axis=-1)


def clip_score(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
    """torchmetrics' CLIPScore of N pairs: [N, P], [N, P] -> scalar float32 in [0, 100].

    The mean over the pairs of ``cosine_scores``, then max(mean, 0): torchmetrics clips the mean,
    not each pair's score (its documentation's max(100 cos, 0) per pair).
    """
    return jnp.maximum(jnp.mean(cosine_scores(image_embeds, text_embeds)), 0.0)


class CLIP(NamedTuple):
    """A CLIP model's towers, their float32 parameters and its tokenizer (transformers' CLIPTokenizer)."""

    vision: CLIPVisionModelWithProjection
    vision_params: dict[str, Any]
    text: CLIPTextModelWithProjection
    text_params: dict[str, Any]
    tokenizer: Any

    def tokenize(self, captions: list[str]) -> np.ndarray:
        """Token ids [len(captions), 77] int32, padded and truncated to the tokenizer's length."""
        tok = self.tokenizer
        return np.asarray(
            tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids, np.int32
        )


# Which keys of a CLIPModel's state dict belong to which tower.
TOWER_PREFIXES = {"vision": ("vision_model.", "visual_projection."), "text": ("text_model.", "text_projection.")}


def load_clip(folder: str | Path) -> CLIP:
    """A transformers CLIPModel folder (config.json with text_config and vision_config, the weights,
    the tokenizer files) as a CLIP. Raises weights.WeightsFileError naming what is missing and where
    to get it, and weights.WeightsMismatchError for weights that do not fit the config."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    get = GET_WEIGHTS.format(folder=folder)
    if not (folder / "config.json").is_file():
        what = "has no config.json" if folder.is_dir() else "does not exist"
        raise weights.WeightsFileError(f"CLIP model folder {folder} {what}: {get}")
    config = weights.read_json(folder / "config.json")
    if config.get("model_type") != "clip":
        raise weights.WeightsFileError(
            f"{folder / 'config.json'} has model_type {config.get('model_type')!r}, not 'clip': CLIP score needs a "
            f"CLIPModel folder with both towers; {get}"
        )
    # CLIPModel sizes both projections by its own projection_dim, whatever its sub-configs say; like
    # transformers, absent sub-configs and fields take their defaults.
    projection = {"projection_dim": config.get("projection_dim", 512)}
    try:
        vision = CLIPVisionModelWithProjection(
            CLIPVisionConfig.from_dict({**config.get("vision_config", {}), **projection})
        )
        text = CLIPTextModelWithProjection(CLIPTextConfig.from_dict({**config.get("text_config", {}), **projection}))
    except ValueError as error:
        raise weights.WeightsFileError(f"{folder / 'config.json'}: {error}") from None
    if not (folder / "tokenizer_config.json").is_file():
        raise weights.WeightsFileError(
            f"CLIP model folder {folder} has no tokenizer files (tokenizer_config.json): {get}"
        )
    try:
        state = weights.read_state_dict(folder)
    except weights.WeightsFileError as error:
        raise weights.WeightsFileError(f"{error}; {get}") from None
    params = {
        name: weights.state_dict_to_params(
            {key: state[key] for key in state if key.startswith(prefixes)}, model.abstract_params(), name=f"CLIP {name}"
        )
        for (name, prefixes), model in zip(TOWER_PREFIXES.items(), (vision, text), strict=True)
    }
    return CLIP(vision, params["vision"], text, params["text"], CLIPTokenizer.from_pretrained(str(folder)))
