"""The Flax VAE computes what diffusers' AutoencoderKL computes."""

import gc

import diffusers
import jax
import numpy as np
import pytest
import torch

from perflow_jax import weights
from perflow_jax.models import reference_configs
from perflow_jax.models.vae import AutoencoderKL, VAEConfig
from tests.helpers.networks import TINY_VAE
from tests.helpers.parity import (
    FLOAT32_NETWORK_RTOL,
    DrainingStateDict,
    nchw_to_nhwc,
    nhwc_to_nchw,
    random_module,
    relative_error,
    torch_state_dict,
)


def random_torch_vae(config: dict, seed: int = 0) -> diffusers.AutoencoderKL:
    return random_module(lambda: diffusers.AutoencoderKL(**config), seed)


def check_parity(vae: diffusers.AutoencoderKL, state_dict, image_size: int, label: str):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, image_size, image_size, generator=g)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latents = torch.randn(2, vae.config.latent_channels, image_size // factor, image_size // factor, generator=g)
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        expected = {
            "mean": posterior.mean.numpy(),
            "logvar": posterior.logvar.numpy(),
            "decoded": vae.decode(latents).sample.numpy(),
        }
    model = AutoencoderKL(VAEConfig.from_dict(dict(vae.config)))
    params = weights.state_dict_to_params(state_dict(vae), model.abstract_params(), name="vae")
    del vae
    gc.collect()
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))
    decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"))
    mean, logvar = encode(params, nchw_to_nhwc(images.numpy()))
    decoded = decode(params, nchw_to_nhwc(latents.numpy()))
    for name, actual in (("mean", mean), ("logvar", logvar), ("decoded", decoded)):
        err = relative_error(nhwc_to_nchw(actual), expected[name])
        print(f"{label} VAE {name}: relative error {err:.2e}")
        assert err < FLOAT32_NETWORK_RTOL, name


def test_tiny_vae_matches_diffusers_in_float32():
    check_parity(random_torch_vae(TINY_VAE), torch_state_dict, image_size=32, label="tiny")


def test_vae_without_quant_convs_and_mid_attention_matches_diffusers():
    config = {**TINY_VAE, "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": False}
    check_parity(random_torch_vae(config), torch_state_dict, image_size=16, label="variant")


def test_vae_state_dict_round_trips_exactly():
    vae = random_torch_vae(TINY_VAE)
    state = torch_state_dict(vae)
    model = AutoencoderKL(VAEConfig.from_dict(dict(vae.config)))
    back = weights.params_to_state_dict(weights.state_dict_to_params(state, model.abstract_params()))
    assert back.keys() == state.keys()
    assert all(np.array_equal(back[k], state[k]) for k in state)


def test_legacy_attention_names_of_old_vae_checkpoints_are_read():
    """SD1.5's published VAE names the mid-block attention query/key/value/proj_attn."""
    vae = random_torch_vae(TINY_VAE)
    state = torch_state_dict(vae)
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in state.items():
        for new, old in renames.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[key] = value
    assert any(".proj_attn." in key for key in legacy)
    model = AutoencoderKL(VAEConfig.from_dict(dict(vae.config)))
    params = weights.state_dict_to_params(legacy, model.abstract_params(), name="vae")
    assert weights.params_to_state_dict(params).keys() == state.keys()


def test_unsupported_vae_config_is_rejected_by_name():
    with pytest.raises(ValueError, match="supports only 'DownEncoderBlock2D'"):
        VAEConfig.from_dict({**reference_configs.SD_VAE, "down_block_types": ["DownEncoderBlock2DTemporal"] * 4})


@pytest.mark.slow
def test_full_size_sd_vae_matches_diffusers_in_float32():
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL.from_config(reference_configs.SD_VAE).eval()
    check_parity(vae, DrainingStateDict, image_size=64, label="SD")
