"""Helpers for comparing a Flax twin with its PyTorch original, and random PyTorch originals to compare."""

from __future__ import annotations

import numpy as np

# Whole networks in float32 agree with their PyTorch originals to about 1e-6 relative error
# (sums in another order); 1e-5 leaves room for deep stacks while still catching any real
# difference (a wrong epsilon, activation or layout shows at 1e-3 or more).
FLOAT32_NETWORK_RTOL = 1e-5


def random_module(build, seed: int = 0):
    """``build()`` under ``torch.manual_seed(seed)``, in eval mode, with its 1-D parameters (norm
    scales and biases) moved off their initial ones and zeros, so that a swapped or missing one shows."""
    import torch

    torch.manual_seed(seed)
    module = build().eval()
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return module


def random_torch_unet(config: dict, seed: int = 0):
    """A diffusers UNet2DConditionModel of ``config`` (its keyword arguments), made by ``random_module``."""
    import diffusers

    return random_module(lambda: diffusers.UNet2DConditionModel(**config), seed)


def torch_state_dict(module) -> dict[str, np.ndarray]:
    """A PyTorch module's state dict as numpy arrays (copies)."""
    return {key: value.detach().cpu().numpy().copy() for key, value in module.state_dict().items()}


def relative_error(actual, expected) -> float:
    """||actual - expected|| / ||expected|| over all elements, in float64."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def nchw_to_nhwc(array) -> np.ndarray:
    return np.transpose(np.asarray(array), (0, 2, 3, 1))


def nhwc_to_nchw(array) -> np.ndarray:
    return np.transpose(np.asarray(array), (0, 3, 1, 2))


class DrainingStateDict:
    """A PyTorch module's parameters as a read-once mapping of numpy copies.

    Each tensor's memory is released as soon as it has been handed out, so converting a network
    needs its size once, not twice (SDXL's UNet is 10 GB in float32; CI machines have 24 GB).
    """

    def __init__(self, module):
        self._tensors = dict(module.state_dict(keep_vars=True))  # the parameters themselves

    def items(self):
        for key in list(self._tensors):
            tensor = self._tensors.pop(key)
            array = tensor.detach().cpu().numpy().copy()
            tensor.data = tensor.data.new_empty(0)
            yield key, array


# UNet parity: random inputs for a diffusers UNet, the same as the Flax twin's arguments, the twin of a UNet.


def random_inputs(unet, batch: int, size: int, seed: int = 1) -> dict:
    """Random inputs of a diffusers UNet2DConditionModel ``unet`` (keyword arguments; SDXL's added conditions too)."""
    import torch

    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "sample": torch.randn(batch, cfg.in_channels, size, size, generator=g),
        "timestep": torch.tensor([999.0, 250.0, 1.0, 500.0][:batch]),
        "encoder_hidden_states": torch.randn(batch, 7, cfg.cross_attention_dim, generator=g),
    }
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [512, 768, 16, 32, 1024, 1024]][:batch]),
        }
    return inputs


def flax_args(inputs: dict) -> tuple:
    """``random_inputs``' inputs as the Flax UNet's positional arguments (channels-last)."""
    args = (
        nchw_to_nhwc(inputs["sample"].numpy()),
        inputs["timestep"].numpy(),
        inputs["encoder_hidden_states"].numpy(),
    )
    if "added_cond_kwargs" in inputs:
        args += (inputs["added_cond_kwargs"]["text_embeds"].numpy(), inputs["added_cond_kwargs"]["time_ids"].numpy())
    return args


def converted(unet_torch, **module_kwargs):
    """(the Flax twin of a diffusers UNet, its parameters converted from the UNet's)."""
    from perflow_jax import weights
    from perflow_jax.models.unet import UNet2DConditionModel, UNetConfig

    model = UNet2DConditionModel(UNetConfig.from_dict(dict(unet_torch.config)), **module_kwargs)
    params = weights.state_dict_to_params(torch_state_dict(unet_torch), model.abstract_params(), name="unet")
    return model, params


# ControlNet parity: a random diffusers ControlNet of a tiny UNet's architecture, its zero convolutions made non-zero.

# The control image's embedding downsamples by 4, as the tiny VAE (tests/helpers/networks.py) does.
TINY_CONTROLNET_EMBEDDING = (8, 8, 16)


def controlnet_config(unet_config: dict) -> dict:
    """diffusers ControlNetModel keyword arguments of the ControlNet of a UNet of ``unet_config``."""
    config = {k: v for k, v in unet_config.items() if k not in ("up_block_types", "out_channels")}
    return {**config, "conditioning_embedding_out_channels": TINY_CONTROLNET_EMBEDDING}


def random_torch_controlnet(unet_config: dict, seed: int = 0):
    """A diffusers ControlNetModel for a UNet of ``unet_config`` (its keyword arguments), made by ``random_module``,
    with random zero convolutions (diffusers starts them at zero, so that a missing ControlNet would not show)."""
    import diffusers
    import torch

    module = random_module(lambda: diffusers.ControlNetModel(**controlnet_config(unet_config)), seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith(
                ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
            ):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return module
