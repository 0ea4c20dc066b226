"""A tiny random CLIP folder and test pictures for the CLIP score tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import transformers

from tests.helpers.networks import TINY_VISION
from tests.helpers.parity import random_module

DEMO_TEACHER = Path(__file__).parents[2] / "perflow_jax" / "demo" / "digits_teacher"


def images(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """uint8 [*shape, 3] pictures: smooth colour waves plus noise, as photos have both."""
    rng = np.random.default_rng(seed)
    *batch, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    waves = np.stack([np.sin(6 * xx + c) * np.cos(5 * yy - c) for c in range(3)], -1)
    pictures = 128 + 100 * waves + rng.normal(0, 20, (*batch, h, w, 3))
    return np.clip(pictures, 0, 255).astype(np.uint8)


def save_tiny_clip(folder: Path):
    """A random CLIPModel (the demo's text encoder and tokenizer, TINY_VISION) saved as transformers does,
    its sub-configs' projection_dim changed to 512; returns it and its CLIPProcessor."""
    text_config = json.loads((DEMO_TEACHER / "text_encoder" / "config.json").read_text())
    config = transformers.CLIPConfig(text_config=text_config, vision_config=TINY_VISION, projection_dim=16)
    model = random_module(lambda: transformers.CLIPModel(config))
    model.save_pretrained(folder)
    # CLIPModel sizes both projections by its own projection_dim; older files' sub-configs say 512.
    saved = json.loads((folder / "config.json").read_text())
    saved["vision_config"]["projection_dim"] = saved["text_config"]["projection_dim"] = 512
    (folder / "config.json").write_text(json.dumps(saved))
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(DEMO_TEACHER / "tokenizer"))
    tokenizer.save_pretrained(folder)
    processor = transformers.CLIPProcessor(
        transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32), tokenizer
    )
    return model, processor
