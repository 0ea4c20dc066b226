"""The Flax ControlNet computes what diffusers' ControlNetModel computes, and the UNet takes its residuals as
diffusers' UNet2DConditionModel does."""

import jax
import pytest
import torch

from perflow_jax import weights
from perflow_jax.models.controlnet import ControlNetConfig, ControlNetModel
from tests.helpers.networks import TINY_UNETS
from tests.helpers.parity import (
    FLOAT32_NETWORK_RTOL,
    converted,
    flax_args,
    nchw_to_nhwc,
    nhwc_to_nchw,
    random_inputs,
    random_torch_controlnet,
    random_torch_unet,
    relative_error,
    torch_state_dict,
)


@pytest.mark.parametrize(("arch", "guess_mode"), [("sd1", False), ("sdxl", True)])
def test_tiny_controlnet_and_the_unet_with_its_residuals_match_diffusers_in_float32(arch, guess_mode):
    unet = random_torch_unet(TINY_UNETS[arch])
    controlnet = random_torch_controlnet(TINY_UNETS[arch], seed=3)
    inputs = random_inputs(unet, batch=2, size=8)
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        down, mid = controlnet(
            **inputs, controlnet_cond=image, conditioning_scale=0.7, guess_mode=guess_mode, return_dict=False
        )
        expected = unet(**inputs, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        without = unet(**inputs).sample

    model = ControlNetModel(ControlNetConfig.from_dict(dict(controlnet.config)))
    params = weights.state_dict_to_params(torch_state_dict(controlnet), model.abstract_params(), name="controlnet")
    args = flax_args(inputs)
    cond = {"text_embeds": args[3], "time_ids": args[4]} if len(args) > 3 else {}
    apply = jax.jit(model.apply, static_argnames="guess_mode")
    control = nchw_to_nhwc(image.numpy())
    got_down, got_mid = apply(
        {"params": params}, *args[:3], control, **cond, conditioning_scale=0.7, guess_mode=guess_mode
    )
    errors = [
        relative_error(nhwc_to_nchw(g), e.numpy()) for g, e in zip([*got_down, got_mid], [*down, mid], strict=True)
    ]
    unet_model, unet_params = converted(unet)
    residuals = {"down_block_additional_residuals": got_down, "mid_block_additional_residual": got_mid}
    got = jax.jit(unet_model.apply)({"params": unet_params}, *args, **residuals)
    error = relative_error(nhwc_to_nchw(got), expected.numpy())
    print(f"{arch} guess_mode={guess_mode}: residuals max relative error {max(errors):.2e}, UNet {error:.2e}")
    assert len(errors) == len(down) + 1 and max(errors) < FLOAT32_NETWORK_RTOL
    assert error < FLOAT32_NETWORK_RTOL
    assert relative_error(without.numpy(), expected.numpy()) > 0.01  # the residuals changed the UNet's output
