"""Tiny random Stable Diffusion pipeline folders, written with diffusers' save_pretrained."""

from __future__ import annotations

from pathlib import Path

import diffusers
import torch
import transformers

from perflow_jax.demo.tokenizer import write_tiny_clip_tokenizer
from tests.test_unet import TINY as TINY_UNETS
from tests.test_vae import TINY as TINY_VAE

TEXT = dict(
    vocab_size=600,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=16,
    eos_token_id=2,
    bos_token_id=0,
    pad_token_id=1,
)


def tiny_pipeline(folder: Path, *, xl: bool = False, seed: int = 0) -> diffusers.DiffusionPipeline:
    """Random tiny SD (or SDXL) pipeline components, tokenizer files written under ``folder``."""
    torch.manual_seed(seed)
    unet_config = dict(TINY_UNETS["sdxl" if xl else "sd1"])
    vocab = write_tiny_clip_tokenizer(folder / "_tokenizer_source")
    text_config = transformers.CLIPTextConfig(**{**TEXT, "vocab_size": len(vocab)})
    text_encoder = transformers.CLIPTextModel(text_config).eval()
    scheduler = diffusers.DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1
    )
    vae = diffusers.AutoencoderKL(**TINY_VAE).eval()
    if not xl:
        unet = diffusers.UNet2DConditionModel(**{**unet_config, "cross_attention_dim": TEXT["hidden_size"]})
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
        **{**TEXT, "vocab_size": len(vocab), "hidden_size": 16, "hidden_act": "gelu"}
    )
    text_encoder_2 = transformers.CLIPTextModelWithProjection(text_config_2).eval()
    unet_config.update(
        cross_attention_dim=TEXT["hidden_size"] + 16,
        projection_class_embeddings_input_dim=6 * unet_config["addition_time_embed_dim"] + TEXT["projection_dim"],
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
