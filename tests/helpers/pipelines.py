"""Tiny random Stable Diffusion pipeline folders, written with diffusers' save_pretrained."""

from __future__ import annotations

from pathlib import Path

import diffusers
import torch
import transformers

from perflow_jax.demo.tokenizer import write_tiny_clip_tokenizer
from tests.helpers.data import image
from tests.helpers.networks import TINY_TEXT, TINY_UNETS, TINY_VAE
from tests.helpers.recipes import load
from tests.helpers.schedules import SD_SCHEDULER


def quiet(_):
    """A ``log`` that prints nothing."""


def tiny_pipeline(folder: Path, *, xl: bool = False, seed: int = 0) -> diffusers.DiffusionPipeline:
    """Random tiny SD (or SDXL) pipeline components, tokenizer files written under ``folder``."""
    torch.manual_seed(seed)
    unet_config = dict(TINY_UNETS["sdxl" if xl else "sd1"])
    vocab = write_tiny_clip_tokenizer(folder / "_tokenizer_source")
    text_config = transformers.CLIPTextConfig(**{**TINY_TEXT, "vocab_size": len(vocab)})
    text_encoder = transformers.CLIPTextModel(text_config).eval()
    scheduler = diffusers.DDPMScheduler(**SD_SCHEDULER, clip_sample=False, steps_offset=1)
    vae = diffusers.AutoencoderKL(**TINY_VAE).eval()
    if not xl:
        unet = diffusers.UNet2DConditionModel(**{**unet_config, "cross_attention_dim": TINY_TEXT["hidden_size"]})
        return diffusers.StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=vocab,
            unet=unet.eval(),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    text_config_2 = transformers.CLIPTextConfig(
        **{**TINY_TEXT, "vocab_size": len(vocab), "hidden_size": 16, "hidden_act": "gelu"}
    )
    text_encoder_2 = transformers.CLIPTextModelWithProjection(text_config_2).eval()
    unet_config.update(
        cross_attention_dim=TINY_TEXT["hidden_size"] + 16,
        projection_class_embeddings_input_dim=6 * unet_config["addition_time_embed_dim"] + TINY_TEXT["projection_dim"],
    )
    unet = diffusers.UNet2DConditionModel(**unet_config).eval()
    return diffusers.StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=vocab,
        tokenizer_2=vocab,
        unet=unet,
        scheduler=scheduler,
    )


def tiny_model_and_data(root: Path, *, count: int = 8, size: tuple[int, int] = (40, 40), captions: int = 3):
    """A tiny SD pipeline (diffusers folder), its conversion and ``count`` prepared 32 px images.

    Returns (diffusers folder, converted folder, prepared data folder), all under ``root``.
    Captions are "a photo number i" with i < ``captions``.
    """
    from perflow_jax.convert import convert
    from perflow_jax.prepare_data import prepare

    tiny_pipeline(root / "sources").save_pretrained(root / "diffusers")
    convert(root / "diffusers", root / "model", log=quiet)
    images = root / "images"
    images.mkdir()
    for i in range(count):
        image(i, *size).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a photo number {i % captions}")
    prepare(root / "model", str(images), root / "data", resolution=32, progress=False)
    return root / "diffusers", root / "model", root / "data"


def tiny_workdir(workdir: Path, model: Path, data_dir: Path, *, steps: tuple[int, ...] = (2,)) -> Path:
    """A WORKDIR with checkpoints at ``steps`` as the training loop writes them, without training.

    At step n the student is the teacher plus n/2 times a fixed random delta (5% of each
    parameter's spread) and its EMA is at two thirds of that distance; the config is configs/tiny.py's.
    Compiling the training step would take longer than the tests that need a WORKDIR.
    """
    import jax
    import numpy as np

    from perflow_jax import checkpoint, data, pipeline, recipe, step

    config = load("tiny")
    config.model.path, config.data.path = str(model), str(data_dir)
    teacher = pipeline.load_model(model, networks=("unet",)).params["unet"]
    rng = np.random.default_rng(0)
    delta = jax.tree.map(lambda x: 0.05 * np.std(x) * rng.standard_normal(x.shape).astype(np.float32), teacher)
    saver = checkpoint.Checkpoints(workdir)
    for n in steps:
        student = jax.tree.map(lambda x, d, n=n: x + n / 2 * d, teacher, delta)
        state = step.create_train_state(student, recipe.optimizer(config))
        ema = jax.tree.map(lambda x, d, n=n: np.asarray(x + n / 3 * d), teacher, delta)
        state = state.replace(step=np.int32(n), ema_params=ema)
        saver.save(n, state, data.create_iterator(data_dir, batch_size=8, seed=0), config.to_dict())
        saver.wait()
    saver.close()
    return workdir
