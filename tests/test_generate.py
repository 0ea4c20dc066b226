"""Few-step generation: jittable end to end, the sampled latents' values, DDIM as diffusers runs it, grids."""

import dataclasses
import functools

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from perflow_jax import image_io, pipeline, solver
from perflow_jax.models.clip import CLIPTextModel, CLIPTextModelWithProjection
from perflow_jax.models.unet import UNet2DConditionModel, UNetConfig
from perflow_jax.models.vae import AutoencoderKL, VAEConfig
from perflow_jax.pipeline import GenerateSettings, Pipeline, TextEncoders
from perflow_jax.schedule import alphas_cumprod_from_config
from tests.helpers.networks import QUICK_TEXT, QUICK_UNET, TINY_VAE
from tests.helpers.schedules import SD_SCHEDULER

NUM_PROMPTS = 3


class ZeroUNet:
    """A UNet stand-in predicting zeros (velocity or eps); it checks the timesteps are float32 [B]."""

    def apply(self, variables, z, timesteps, context, text_embeds=None, time_ids=None):
        assert timesteps.shape == z.shape[:1] and timesteps.dtype == jnp.float32
        return jnp.zeros_like(z)


class TextUNet:
    """A UNet stand-in predicting, everywhere, the prompt's first text feature averaged over tokens."""

    def apply(self, variables, z, timesteps, context, text_embeds=None, time_ids=None):
        return jnp.broadcast_to(text_feature(context)[:, None, None, None], z.shape)


class SizeIdsUNet:
    """An SDXL UNet stand-in predicting, in its first three channels, the first three size ids / 100."""

    def apply(self, variables, z, timesteps, context, text_embeds, time_ids):
        assert text_embeds.shape == (z.shape[0], 8) and time_ids.shape == (z.shape[0], 6)
        return jnp.zeros_like(z).at[..., :3].set(time_ids[:, None, None, :3] / 100)


def text_feature(context):
    return context[..., 0].astype(jnp.float32).mean(axis=1)


@dataclasses.dataclass(frozen=True)
class LinearVAE:
    """A VAE stand-in whose decode is ``gain`` times the first three latent channels."""

    gain: float
    config: VAEConfig = VAEConfig(latent_channels=4, scaling_factor=0.18215)

    def apply(self, variables, latents, method):
        assert method == "decode"
        return self.gain * latents[..., :3]


def random_params(module, seed):
    """Random numpy weights for ``module`` (quicker than compiling ``init``'s random number generation).

    Kernels N(0, 1 / fan_in), embeddings N(0, 1), biases N(0, 0.1^2), normalization scales 1 + N(0, 0.1^2).
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        x = rng.standard_normal(leaf.shape).astype(np.float32)
        name = path[-1].key
        if name == "kernel":
            return x / np.sqrt(np.prod(leaf.shape[:-1]))
        if name == "embedding":
            return x
        return 0.1 * x + (1.0 if name == "scale" else 0.0)

    return jax.tree_util.tree_map_with_path(draw, module.abstract_params())


def tiny_pipeline(**changes):
    """A tiny SD model's Pipeline: test_step's tiny UNet and text encoder, a tiny VAE, SD's noise schedule."""
    pipe = Pipeline(
        unet=UNet2DConditionModel(UNetConfig.from_dict(QUICK_UNET)),
        text=TextEncoders(CLIPTextModel(QUICK_TEXT), resolution=32),
        vae=AutoencoderKL(VAEConfig.from_dict(TINY_VAE)),
        alphas_cumprod=alphas_cumprod_from_config(SD_SCHEDULER),
    )
    return dataclasses.replace(pipe, **changes)


NULL_IDS = {"input_ids": jnp.array([[0, 2, 1, 1, 1, 1, 1, 1]])}  # the empty prompt's


@functools.cache
def tiny():
    """A tiny random SD model (its Pipeline and parameters), prompts' ids and noise."""
    pipe = tiny_pipeline()
    params = {"unet": random_params(pipe.unet, 1), "vae": random_params(pipe.vae, 2)}
    params["text"] = {"text_encoder": random_params(pipe.text.text_encoder, 3)}
    ids = {"input_ids": jnp.asarray(np.random.default_rng(4).integers(3, 100, (NUM_PROMPTS, 8))).at[:, -1].set(2)}
    noise = jax.random.normal(jax.random.key(6), (NUM_PROMPTS, *pipe.latent_shape(32, 32)))
    return pipe, params, ids, noise


def compiled(pipe, settings):
    """jax.jit(generate)'s images, called on the tiny model's parameters, prompts, empty prompt and noise."""
    _, params, ids, noise = tiny()
    fn = jax.jit(pipeline.make_generate(pipe, settings))
    return lambda: fn(params, ids, NULL_IDS, noise)[0]


@pytest.mark.parametrize(
    "settings",
    [
        GenerateSettings(method="perflow", num_steps=4, guidance=4.5, parameterization="diff_eps"),
        GenerateSettings(method="ddim", num_steps=3, guidance=7.5, prediction_type="epsilon"),
    ],
    ids=["perflow", "ddim"],
)
def test_generate_compiles_and_gives_the_same_images_for_the_same_noise(settings):
    pipe, *_ = tiny()
    run = compiled(pipe, settings)
    images = run()
    assert images.shape == (NUM_PROMPTS, 32, 32, 3) and images.dtype == jnp.float32
    assert np.isfinite(images).all() and 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert float(images.std()) > 0.01
    np.testing.assert_array_equal(images, run())


def test_a_zero_velocity_student_gives_the_decoded_noise():
    """Euler steps with v = 0 leave z_1 = noise unchanged: the images are VAE.decode(noise / scaling_factor)."""
    pipe, params, _, noise = tiny()
    settings = GenerateSettings(method="perflow", num_steps=4, guidance=4.5, parameterization="velocity")
    images = compiled(dataclasses.replace(pipe, unet=ZeroUNet()), settings)()
    decoded = jax.jit(functools.partial(pipe.vae.apply, method="decode"))(
        {"params": params["vae"]}, noise / pipe.vae.config.scaling_factor
    )
    expected = np.clip((np.asarray(decoded) + 1) / 2, 0, 1)
    assert 0.5 < np.mean((expected > 0) & (expected < 1))  # most pixels are not clipped: the check sees them
    # The same float32 decoder compiled into another program: results agree to a few ulps.
    np.testing.assert_allclose(images, expected, rtol=0, atol=1e-6)


def test_ddim_with_a_zero_eps_teacher_scales_the_noise_by_sqrt_ab0_over_ab999():
    """eps = 0 makes each DDIM step z <- sqrt(a_prev / a) z; with 4 steps a_prev is the next a, ending at ab[0]."""
    pipe, _, _, noise = tiny()
    vae = LinearVAE(gain=0.002)
    settings = GenerateSettings(method="ddim", num_steps=4, guidance=7.5, prediction_type="epsilon")
    images = compiled(dataclasses.replace(pipe, unet=ZeroUNet(), vae=vae), settings)()
    ab = pipe.alphas_cumprod.astype(np.float64)
    z = np.asarray(noise, np.float64) * np.sqrt(ab[0] / ab[999])
    expected = (vae.gain * z[..., :3] / vae.config.scaling_factor + 1) / 2
    assert 0 < expected.min() and expected.max() < 1
    np.testing.assert_allclose(images, expected, rtol=1e-6)  # float32: 4 steps of a few roundings each


def test_guidance_pushes_the_student_away_from_the_empty_prompt():
    """A velocity that is constant in time moves z by -v over t = 1 -> 0, with v = u + w (c - u)."""
    pipe, params, ids, noise = tiny()
    vae = LinearVAE(gain=0.01)
    w = 3.0
    settings = GenerateSettings(method="perflow", num_steps=4, guidance=w, parameterization="velocity")
    images = compiled(dataclasses.replace(pipe, unet=TextUNet(), vae=vae), settings)()
    encode = jax.jit(pipe.text.encode)
    c = np.asarray(text_feature(encode(params["text"], ids)["encoder_hidden_states"]))
    u = np.asarray(text_feature(encode(params["text"], NULL_IDS)["encoder_hidden_states"]))
    assert np.abs(c - u).min() > 0.01
    z = np.asarray(noise) - (u + w * (c - u))[:, None, None, None]
    expected = (vae.gain * z[..., :3] / vae.config.scaling_factor + 1) / 2
    assert 0 < expected.min() and expected.max() < 1
    np.testing.assert_allclose(images, expected, rtol=1e-5)  # float32 text encoder and four Euler steps


def test_sdxl_size_ids_default_to_the_training_resolution_without_crop():
    """SDXL: the UNet gets time_ids (original h, w, crop top, left, target h, w); here v = the first three / 100."""
    pipe, _, ids, noise = tiny()
    second = CLIPTextModelWithProjection(dataclasses.replace(QUICK_TEXT, projection_dim=8))
    vae = LinearVAE(gain=0.01)
    text = TextEncoders(pipe.text.text_encoder, second, resolution=32)
    pipe = dataclasses.replace(pipe, unet=SizeIdsUNet(), text=text, vae=vae)
    params = {
        "unet": None,
        "text": {"text_encoder": random_params(text.text_encoder, 3), "text_encoder_2": random_params(second, 4)},
        "vae": None,
    }
    fn = jax.jit(pipeline.make_generate(pipe, GenerateSettings(guidance=1.0, parameterization="velocity")))
    sdxl_ids = {"input_ids": ids["input_ids"], "input_ids_2": ids["input_ids"]}
    null_ids = {"input_ids": NULL_IDS["input_ids"], "input_ids_2": NULL_IDS["input_ids"]}

    def latents(ids):  # LinearVAE inverted: the first three channels of z_0
        images = fn(params, ids, null_ids, noise)[0]
        return (2 * np.asarray(images, np.float64) - 1) * vae.config.scaling_factor / vae.gain

    z = latents(sdxl_ids)
    np.testing.assert_allclose(z, np.asarray(noise)[..., :3] - [0.32, 0.32, 0.0], atol=1e-4)
    cropped = {
        **sdxl_ids,
        "original_size": jnp.full((NUM_PROMPTS, 2), 64),
        "crop_top_left": jnp.full((NUM_PROMPTS, 2), 8),
    }
    z = latents(cropped)
    np.testing.assert_allclose(z, np.asarray(noise)[..., :3] - [0.64, 0.64, 0.08], atol=1e-4)


@pytest.mark.parametrize("num_steps, prediction_type", [(3, "epsilon"), (4, "v_prediction"), (7, "epsilon")])
def test_ddim_sample_is_diffusers_ddim_scheduler_with_trailing_spacing(num_steps, prediction_type):
    """The same toy teacher through diffusers' DDIMScheduler.step and through ddim_sample."""
    scheduler = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        set_alpha_to_one=False, timestep_spacing="trailing", prediction_type=prediction_type,
    )  # fmt: skip
    scheduler.set_timesteps(num_steps)
    noise = np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32)

    def teacher(z, timesteps):  # a toy eps / v that depends on z and on the timestep
        return 0.5 * z + timesteps.reshape(-1, 1, 1, 1) / 1000

    z = torch.from_numpy(noise)
    for tau in scheduler.timesteps:
        z = scheduler.step(teacher(z, tau.float().expand(2)), tau, z).prev_sample
    ours = solver.ddim_sample(
        lambda z, timesteps, cond: teacher(z, timesteps), jnp.asarray(noise), None, None,
        scheduler.alphas_cumprod.numpy(), num_steps=num_steps, prediction_type=prediction_type,
    )  # fmt: skip
    np.testing.assert_allclose(ours, z.numpy(), rtol=1e-5, atol=1e-5)  # float32, a few steps


def test_ddim_timesteps_are_trailing():
    np.testing.assert_array_equal(solver.ddim_timesteps(4), [999, 749, 499, 249])
    np.testing.assert_array_equal(solver.ddim_timesteps(3), [999, 666, 332])


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(method="euler"), "unknown sampling method 'euler'"),
        (dict(num_steps=2, num_windows=4), "2 sampling steps for a model trained with 4 windows"),
        (dict(method="ddim", prediction_type="sample"), "unknown teacher prediction_type 'sample'"),
        (dict(control_scales=(float("nan"),)), r"control scales \[nan\]: give finite numbers"),
        (dict(guess_mode=True), "guess mode is a ControlNet mode: give ControlNets"),
    ],
)
def test_settings_are_checked_when_made(changes, message):
    with pytest.raises(ValueError, match=message):
        GenerateSettings(**changes)


def test_a_noise_per_prompt_is_required():
    pipe, params, ids, noise = tiny()
    fn = pipeline.make_generate(pipe, GenerateSettings())
    with pytest.raises(ValueError, match="3 prompts but noise for 2 images"):
        fn(params, ids, NULL_IDS, noise[:2])


def test_control_images_for_a_pipeline_without_controlnets_are_refused():
    pipe, params, ids, noise = tiny()
    fn = pipeline.make_generate(pipe, GenerateSettings())
    with pytest.raises(ValueError, match="1 control images for 0 ControlNets: give one each"):
        fn(params, ids, NULL_IDS, noise, control=(np.zeros((3, 32, 32, 3), np.float32),))


def test_grid_fills_rows_of_ceil_sqrt_n_columns():
    images = np.random.default_rng(0).uniform(size=(5, 4, 4, 3)).astype(np.float32)
    picture = image_io.grid(images)
    assert picture.shape == (8, 12, 3) and picture.dtype == np.uint8
    for i in range(5):
        row, column = divmod(i, 3)
        cell = picture[4 * row : 4 * row + 4, 4 * column : 4 * column + 4]
        np.testing.assert_array_equal(cell, np.round(images[i] * 255).astype(np.uint8))
    assert not picture[4:, 8:].any()  # the sixth cell is empty


def test_grid_takes_the_number_of_columns():
    assert image_io.grid(np.zeros((5, 4, 6, 3)), columns=2).shape == (12, 12, 3)


def test_save_png_writes_what_pil_reads_back(tmp_path):
    picture = np.random.default_rng(1).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    path = tmp_path / "samples" / "step_000000.png"
    image_io.save_png(picture, path)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), picture)
