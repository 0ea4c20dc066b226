"""A tiny SD model ready for the training step: components, frozen parameters, train state, batch."""

import jax
import jax.numpy as jnp

from perflow_jax import pipeline, step
from perflow_jax.models.clip import CLIPTextModel
from perflow_jax.models.unet import UNet2DConditionModel, UNetConfig
from perflow_jax.schedule import alphas_cumprod_from_config
from tests.helpers.networks import QUICK_TEXT, QUICK_UNET
from tests.helpers.schedules import SD_SCHEDULER

LR = 1e-3


def tiny_setup(batch_size=8, seed=0):
    """Components, frozen parameters, a train state and a batch of a tiny SD model (random weights)."""
    unet = UNet2DConditionModel(UNetConfig.from_dict(QUICK_UNET))
    text = CLIPTextModel(QUICK_TEXT)
    key_unet, key_text, key_data = jax.random.split(jax.random.key(seed), 3)
    unet_params = unet.init(key_unet, *unet.dummy_inputs(text_len=8))["params"]
    text_params = text.init(key_text, jnp.zeros((1, 8), jnp.int32))["params"]
    components = step.Components(
        student=unet,
        teacher=unet,
        text=pipeline.TextEncoders(text, resolution=32),
        alphas_cumprod=alphas_cumprod_from_config(SD_SCHEDULER),
        scaling_factor=0.18215,
    )
    frozen = {"teacher": unet_params, "text_encoder": text_params}
    frozen["null_cond"] = components.text.encode(frozen, {"input_ids": jnp.array([[0, 2, 1, 1, 1, 1, 1, 1]])})
    k_mean, k_ids = jax.random.split(key_data)
    batch = {
        "mean": jax.random.normal(k_mean, (batch_size, 8, 8, 4)).astype(jnp.float16),
        "logvar": jnp.full((batch_size, 8, 8, 4), -4.0, jnp.float16),
        "input_ids": jax.random.randint(k_ids, (batch_size, 8), 3, 100).at[:, -1].set(2),
    }
    optimizer = step.make_optimizer(LR)
    return components, frozen, step.create_train_state(unet_params, optimizer), batch, optimizer
