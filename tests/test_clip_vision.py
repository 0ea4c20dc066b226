"""The Flax CLIP image tower against transformers' CLIPVisionModelWithProjection, CLIP's image
preprocessing against transformers' CLIPImageProcessor, and CLIP score against torchmetrics."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from torchmetrics.multimodal.clip_score import CLIPScore

from perflow_jax import clip_score as cs
from perflow_jax.models import reference_configs
from perflow_jax.models.clip import CLIPVisionConfig, CLIPVisionModelWithProjection
from perflow_jax.weights import WeightsFileError, state_dict_to_params
from tests.helpers.clip import DEMO_TEACHER, images, save_tiny_clip
from tests.helpers.networks import TINY_VISION
from tests.helpers.parity import FLOAT32_NETWORK_RTOL, random_module, relative_error, torch_state_dict


def run_both(config: dict, batch: int):
    """A random transformers CLIPVisionModelWithProjection and its Flax twin on the same normalized
    pixels: (torch outputs, Flax outputs)."""
    torch_config = transformers.CLIPVisionConfig(**config)
    torch_model = random_module(lambda: transformers.CLIPVisionModelWithProjection(torch_config).float())
    flax_model = CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(torch_config.to_dict()))
    params = state_dict_to_params(torch_state_dict(torch_model), flax_model.abstract_params(), name="image tower")
    s = config["image_size"]
    pixels = np.random.default_rng(1).normal(size=(batch, s, s, 3)).astype(np.float32)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
    del torch_model
    return expected, jax.jit(flax_model.apply)({"params": params}, jnp.asarray(pixels))


def assert_parity(expected, actual, label: str) -> None:
    errors = {
        name: relative_error(getattr(actual, name), getattr(expected, name).numpy())
        for name in ("last_hidden_state", "image_embeds")
    }
    print(f"{label}: " + ", ".join(f"{name} {error:.2e}" for name, error in errors.items()))
    assert max(errors.values()) < FLOAT32_NETWORK_RTOL, errors


def test_image_tower_matches_transformers_in_float32():
    """quick_gelu, OpenAI's activation; tests/test_clip.py runs the shared layers with gelu too."""
    expected, actual = run_both(TINY_VISION, batch=2)
    assert_parity(expected, actual, "tiny image tower")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["CLIP_VIT_B32_VISION", "CLIP_VIT_L14_VISION"])
def test_openai_image_towers_match_transformers(name):
    expected, actual = run_both(getattr(reference_configs, name), batch=1)
    assert_parity(expected, actual, name)


def test_config_takes_a_vision_config_and_ignores_the_rest():
    d = transformers.CLIPConfig(vision_config=reference_configs.CLIP_VIT_L14_VISION).to_dict()["vision_config"]
    assert CLIPVisionConfig.from_dict(d) == CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        projection_dim=768,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
    )
    assert CLIPVisionConfig.from_dict({}) == CLIPVisionConfig.from_dict(transformers.CLIPVisionConfig().to_dict())


def test_config_rejects_a_whole_clip_config():
    with pytest.raises(ValueError, match=r"CLIPConfig .*vision_config"):
        CLIPVisionConfig.from_dict(transformers.CLIPConfig().to_dict())


@pytest.mark.parametrize("size", [(512, 512), (301, 451)])
def test_preprocess_matches_clip_image_processor(size):
    """transformers resizes with PIL, which computes in fixed point and stores uint8 after each of its
    two passes; the JAX resize rounds after each pass too, and a few values land one level (1/255)
    apart. Without that rounding a fifth of the values would differ."""
    image = images(size)
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 224}, crop_size=224)
    expected = processor(images=[image], return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    actual = np.asarray(jax.jit(cs.preprocess, static_argnums=1)(jnp.asarray(image[None]), 224))
    levels = np.abs(actual - expected) * np.asarray(cs.CLIP_STD) * 255  # in steps of the 8-bit pixel values
    print(f"{size}: {np.mean(levels > 0.5):.1e} of the values differ, at most {levels.max():.2f} levels")
    assert actual.shape == expected.shape == (1, 224, 224, 3)
    assert levels.max() < 1 + 1e-3
    assert np.mean(levels > 0.5) < 1e-3


class FeatureModel(torch.nn.Module):
    """What torchmetrics' CLIPScore reads of a CLIP model, returning given embeddings."""

    def __init__(self, image_embeds, text_embeds, config=None):
        super().__init__()
        self.image_embeds, self.text_embeds = torch.from_numpy(image_embeds), torch.from_numpy(text_embeds)
        self.config = config

    def get_image_features(self, pixel_values):
        return self.image_embeds

    def get_text_features(self, input_ids, attention_mask):
        return self.text_embeds


def fake_processor(text=None, images=None, **kwargs):
    """CLIPScore's processor, whose output FeatureModel ignores."""
    if images is not None:
        return {"pixel_values": torch.zeros(len(images))}
    return {"input_ids": torch.zeros(len(text), 1), "attention_mask": torch.ones(len(text), 1)}


@pytest.mark.parametrize("mean_sign", [1, -1])
def test_clip_score_is_torchmetrics_clip_score(mean_sign):
    """Pairs with positive and negative cosines: torchmetrics clips the mean at 0, not each pair, so
    the first case's score is below the mean of the clipped scores, and the second's is 0."""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(6, 8)).astype(np.float32)
    text = (mean_sign * np.array([1, 1, 1, 1, -1, -1], np.float32)[:, None] * image + rng.normal(size=(6, 8))).astype(
        np.float32
    )
    metric = CLIPScore(model_name_or_path=lambda: (FeatureModel(image, text), fake_processor))
    metric.update(torch.zeros(6, 3, 4, 4, dtype=torch.uint8), ["a caption"] * 6)
    expected = float(metric.compute())
    actual = float(cs.clip_score(jnp.asarray(image), jnp.asarray(text)))
    print(f"torchmetrics {expected:.6f}, ours {actual:.6f}")
    assert (expected > 0) == (mean_sign > 0)
    assert actual == pytest.approx(expected, rel=1e-6, abs=1e-6)


class ProjectedFeatures(torch.nn.Module):
    """A CLIPModel whose get_*_features return the embeddings, as torchmetrics expects: transformers 5
    returns them as the pooler_output of a model output."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, pixel_values):
        return self.model.get_image_features(pixel_values).pooler_output

    def get_text_features(self, input_ids, attention_mask):
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def test_clip_folder_scores_as_torchmetrics(tmp_path):
    """load_clip's towers give transformers' embeddings, and preprocess, the towers and clip_score
    together give torchmetrics' CLIPScore of the same model to within the preprocessing's difference."""
    model, processor = save_tiny_clip(tmp_path)
    clip = cs.load_clip(tmp_path)
    pictures = images((4, 48, 48))
    captions = ["a 3", "the digit 7", "zero", "a handwritten 5"]
    ids = clip.tokenize(captions)
    pixels = jax.jit(cs.preprocess, static_argnums=1)(jnp.asarray(pictures), 32)
    image_embeds = jax.jit(clip.vision.apply)({"params": clip.vision_params}, pixels).image_embeds
    text_embeds = jax.jit(clip.text.apply)({"params": clip.text_params}, jnp.asarray(ids)).text_embeds
    with torch.no_grad():
        expected_image = model.get_image_features(
            torch.from_numpy(np.array(pixels).transpose(0, 3, 1, 2))
        ).pooler_output
        expected_text = model.get_text_features(input_ids=torch.from_numpy(ids).long()).pooler_output
    assert relative_error(image_embeds, expected_image.numpy()) < FLOAT32_NETWORK_RTOL
    assert relative_error(text_embeds, expected_text.numpy()) < FLOAT32_NETWORK_RTOL

    metric = CLIPScore(model_name_or_path=lambda: (ProjectedFeatures(model), processor))
    metric.update(list(torch.from_numpy(pictures).permute(0, 3, 1, 2)), captions)
    expected = float(metric.compute())
    actual = float(cs.clip_score(image_embeds, text_embeds))
    print(f"tiny CLIP score: torchmetrics {expected:.5f}, ours {actual:.5f}")
    assert actual == pytest.approx(expected, rel=1e-3)


def test_missing_clip_folder_says_where_to_get_the_weights(tmp_path):
    with pytest.raises(
        WeightsFileError, match=rf"{tmp_path / 'clip'} does not exist: download .*openai/clip-vit-large-patch14"
    ):
        cs.load_clip(tmp_path / "clip")


def write_clip_folder(folder: Path, model_type: str = "clip", tokenizer: bool = True) -> None:
    """A CLIP folder without weights: config.json (TINY_VISION's tower) and, if asked, the demo's tokenizer."""
    config = transformers.CLIPConfig(vision_config=TINY_VISION).to_dict()
    (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    if tokenizer:
        transformers.CLIPTokenizer.from_pretrained(str(DEMO_TEACHER / "tokenizer")).save_pretrained(folder)


def test_clip_folder_without_weights_says_where_to_get_them(tmp_path):
    write_clip_folder(tmp_path)
    with pytest.raises(WeightsFileError, match=r"holds no weight file .*; download .*openai/clip-vit-large-patch14"):
        cs.load_clip(tmp_path)


def test_clip_folder_without_tokenizer_says_where_to_get_it(tmp_path):
    write_clip_folder(tmp_path, tokenizer=False)
    with pytest.raises(WeightsFileError, match=r"no tokenizer files .*: download .*openai/clip-vit-large-patch14"):
        cs.load_clip(tmp_path)


def test_a_single_tower_folder_is_refused(tmp_path):
    write_clip_folder(tmp_path, model_type="clip_vision_model")
    with pytest.raises(WeightsFileError, match=r"model_type 'clip_vision_model', not 'clip': CLIP score needs"):
        cs.load_clip(tmp_path)
