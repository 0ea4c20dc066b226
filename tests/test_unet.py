"""The Flax UNet computes what diffusers' UNet2DConditionModel computes, for SD1.x, SD2.x and SDXL."""

import gc

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from perflow_jax import weights
from perflow_jax.models import reference_configs
from perflow_jax.models.unet import UNet2DConditionModel, UNetConfig
from tests.helpers.networks import TINY_UNETS
from tests.helpers.parity import (
    FLOAT32_NETWORK_RTOL,
    DrainingStateDict,
    converted,
    flax_args,
    nhwc_to_nchw,
    random_inputs,
    random_torch_unet,
    relative_error,
    torch_state_dict,
)


@pytest.mark.parametrize("arch", sorted(TINY_UNETS))
@pytest.mark.parametrize("size", [16, 14])  # 14: odd sizes deeper down, where upsampling is not 2x
def test_tiny_unet_matches_diffusers_in_float32(arch, size):
    unet = random_torch_unet(TINY_UNETS[arch])
    inputs = random_inputs(unet, batch=2, size=size)
    with torch.no_grad():
        expected = unet(**inputs).sample.numpy()
    model, params = converted(unet)
    actual = jax.jit(model.apply)({"params": params}, *flax_args(inputs))
    err = relative_error(nhwc_to_nchw(actual), expected)
    print(f"{arch} tiny UNet {size}x{size}: relative error {err:.2e}")
    assert err < FLOAT32_NETWORK_RTOL


@pytest.mark.parametrize("arch", sorted(TINY_UNETS))
def test_unet_state_dict_round_trips_exactly(arch):
    unet = random_torch_unet(TINY_UNETS[arch])
    state = torch_state_dict(unet)
    _, params = converted(unet)
    back = weights.params_to_state_dict(params)
    assert back.keys() == state.keys()
    for key, value in state.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


REMAT_CONFIG = dict(  # small, but with both rematerialised block kinds: ResNets and transformer layers
    block_out_channels=(16, 32),
    layers_per_block=1,
    cross_attention_dim=16,
    attention_head_dim=2,
    norm_num_groups=8,
    transformer_layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)


def test_remat_changes_neither_parameters_nor_outputs_nor_gradients():
    unet = random_torch_unet(REMAT_CONFIG)
    inputs = flax_args(random_inputs(unet, batch=2, size=8))
    plain, params = converted(unet)

    def value_and_grads(model):
        assert jax.tree.structure(model.abstract_params()) == jax.tree.structure(plain.abstract_params())
        loss = lambda p: jnp.mean(model.apply({"params": p}, *inputs) ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    value, grads = value_and_grads(plain)
    for policy in ("full", "dots"):
        remat_value, remat_grads = value_and_grads(UNet2DConditionModel(plain.config, remat=policy))
        np.testing.assert_allclose(remat_value, value, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads), strict=True):
            # Recomputation may reorder float32 sums: agree to float32 rounding of each leaf's scale.
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * float(np.abs(a).max()) + 1e-12)


def test_bfloat16_compute_stays_close_to_float32():
    unet = random_torch_unet(TINY_UNETS["sd1"])
    inputs = flax_args(random_inputs(unet, batch=2, size=16))
    model32, params = converted(unet)
    model16 = UNet2DConditionModel(model32.config, dtype=jnp.bfloat16)
    out32 = jax.jit(model32.apply)({"params": params}, *inputs)
    out16 = jax.jit(model16.apply)({"params": params}, *inputs)
    assert out16.dtype == jnp.bfloat16
    err = relative_error(out16, out32)
    print(f"bfloat16 vs float32 UNet: relative error {err:.2e}")
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 2e-3 per operation); a few
    # dozen layers accumulate to about 1e-2. A wrong cast or a lost residual shows as O(1).
    assert err < 3e-2


def test_sdxl_unet_requires_text_embeds_and_time_ids():
    model = UNet2DConditionModel(UNetConfig.from_dict(TINY_UNETS["sdxl"]))
    sample, t, context, _, _ = model.dummy_inputs()
    with pytest.raises(ValueError, match="needs text_embeds and time_ids"):
        model.init(jax.random.key(0), sample, t, context)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"class_embed_type": "timestep"}, "supports only class_embed_type=None"),
        ({"time_cond_proj_dim": 256}, "supports only time_cond_proj_dim=None"),
        ({"down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4}, "supported block types"),
        ({"addition_embed_type": "image"}, "addition_embed_type='image'"),
        ({"attention_head_dim": [8, 8]}, "attention_head_dim=.* with 2 entries; expected 4"),
    ],
)
def test_unsupported_unet_configs_are_rejected_by_name(change, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig.from_dict({**reference_configs.SD15_UNET, **change})


def test_sdxl_weights_with_sd15_config_list_the_mismatches():
    sdxl_like = random_torch_unet(TINY_UNETS["sdxl"])
    sd15_like = UNet2DConditionModel(UNetConfig.from_dict(TINY_UNETS["sd2"]))
    with pytest.raises(weights.WeightsMismatchError) as info:
        weights.state_dict_to_params(torch_state_dict(sdxl_like), sd15_like.abstract_params(), name="unet")
    message = str(info.value)
    assert "missing keys" in message and "unexpected keys" in message and "mis-shaped keys" in message
    assert "add_embedding.linear_1.weight" in message  # SDXL-only key, first of the unexpected ones
    assert "(first 10 of" in message
    assert message.count("\n    ") <= 30  # at most ten of each kind are listed


# Full-size architectures at small spatial sizes (the network's depth and widths are what matter).
FULL = {
    "sd15": (reference_configs.SD15_UNET, 16),
    "sd21": (reference_configs.SD21_UNET, 16),
    "sdxl": (reference_configs.SDXL_UNET, 16),
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(FULL))
def test_full_size_unet_matches_diffusers_in_float32(arch):
    config, size = FULL[arch]
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel.from_config(config).eval()
    inputs = random_inputs(unet, batch=1, size=size)
    with torch.no_grad():
        expected = unet(**inputs).sample.numpy()
    model = UNet2DConditionModel(UNetConfig.from_dict(dict(unet.config)))
    # One copy of the weights at a time: SDXL's UNet is 10 GB in float32.
    params = weights.state_dict_to_params(DrainingStateDict(unet), model.abstract_params(), name="unet")
    del unet
    gc.collect()
    actual = model.apply({"params": params}, *flax_args(inputs))
    err = relative_error(nhwc_to_nchw(actual), expected)
    print(f"{arch} UNet ({size}x{size} latents): relative error {err:.2e}")
    assert err < FLOAT32_NETWORK_RTOL
