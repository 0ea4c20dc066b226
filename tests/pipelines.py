"""Tiny random Stable Diffusion pipeline folders, written with diffusers' save_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
import transformers

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


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte -> printable character table (as in its BPE tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_clip_tokenizer(folder: Path) -> transformers.CLIPTokenizer:
    """A CLIP BPE tokenizer with single characters (and a few merges) as its vocabulary."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars])}
    merges = ["a t</w>", "p h", "ph o", "o t", "ot o</w>"]
    for merge in merges:
        vocab["".join(merge.split())] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


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
