"""Flax twins of the diffusers / transformers networks that Stable Diffusion is made of.

Every module here keeps the PyTorch original's submodule names (dots included, e.g.
``down_blocks.0``), so a parameter tree flattened with "." gives the PyTorch state-dict key up
to the leaf name; ``perflow_jax.weights`` holds the few leaf rules that finish the mapping.
Parameters are float32; ``dtype`` sets the computation dtype. Images and latents are NHWC
inside and at the public interface: ``sample: [B, H, W, C]``.
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from perflow_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from perflow_jax.models.controlnet import ControlNetConfig, ControlNetModel
from perflow_jax.models.unet import UNet2DConditionModel, UNetConfig
from perflow_jax.models.vae import AutoencoderKL, VAEConfig

# PyTorch class name (as model_index.json names it) -> (config class, Flax module class).
NETWORKS = {
    "UNet2DConditionModel": (UNetConfig, UNet2DConditionModel),
    "AutoencoderKL": (VAEConfig, AutoencoderKL),
    "CLIPTextModel": (CLIPTextConfig, CLIPTextModel),
    "CLIPTextModelWithProjection": (CLIPTextConfig, CLIPTextModelWithProjection),
    "ControlNetModel": (ControlNetConfig, ControlNetModel),
}


def from_config(class_name: str, config: Mapping[str, Any], **module_kwargs) -> nn.Module:
    """The Flax twin of PyTorch class ``class_name`` built from its config.json dict.

    ``module_kwargs``: dtype, attention_backend (and remat for the UNet and the ControlNet).
    """
    if class_name not in NETWORKS:
        raise ValueError(f"no Flax twin of {class_name!r}: supported networks are {', '.join(NETWORKS)}")
    config_class, module_class = NETWORKS[class_name]
    return module_class(config_class.from_dict(config), **module_kwargs)
