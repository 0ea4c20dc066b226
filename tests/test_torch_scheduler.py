"""The diffusers PeRFlowScheduler: the reference's timesteps and config, the JAX sampler's numbers, stock pipelines."""

import subprocess
import sys

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from perflow_jax import sampler, schedule
from perflow_jax.torch import PeRFlowScheduler
from tests.helpers.parity import relative_error
from tests.helpers.pipelines import tiny_pipeline
from tests.helpers.schedules import SD_SCHEDULER, SPEC_TIMESTEPS


@pytest.mark.parametrize("steps, expected", SPEC_TIMESTEPS)
def test_timesteps_are_the_references(steps, expected):
    scheduler = PeRFlowScheduler()
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.dtype == torch.int64
    assert scheduler.timesteps.tolist() == expected


@pytest.mark.parametrize("windows", [1, 3, 4, 5])
def test_timesteps_are_the_jax_samplers_for_any_step_count(windows):
    scheduler = PeRFlowScheduler(num_time_windows=windows)
    for steps in range(windows, 80):
        scheduler.set_timesteps(steps)
        np.testing.assert_array_equal(scheduler.timesteps.numpy(), sampler.sampler_timesteps(steps, windows))


def test_fewer_steps_than_windows_is_an_error_that_says_why():
    with pytest.raises(ValueError, match="2 sampling steps for a model trained with 4 windows.*use 4 or more"):
        PeRFlowScheduler().set_timesteps(2)


@pytest.mark.parametrize(
    "config",
    [
        SD_SCHEDULER,
        {"beta_schedule": "linear"},
        {"beta_schedule": "squaredcos_cap_v2"},
    ],
)
def test_alphas_cumprod_are_bit_for_bit_the_jax_schedules(config):
    scheduler = PeRFlowScheduler(**config)
    assert scheduler.alphas_cumprod.dtype == torch.float32
    expected = schedule.alphas_cumprod_from_config(dict(scheduler.config))
    np.testing.assert_array_equal(scheduler.alphas_cumprod.numpy(), expected)


def public(config) -> dict:
    """A diffusers config without its bookkeeping entries (``_use_default_values``, ``_class_name``, ...)."""
    return {key: value for key, value in config.items() if not key.startswith("_")}


def test_save_and_load_round_trip_the_config_and_the_timesteps(tmp_path):
    scheduler = PeRFlowScheduler(prediction_type="diff_eps", beta_schedule="linear")
    scheduler.save_pretrained(tmp_path)
    loaded = PeRFlowScheduler.from_pretrained(tmp_path)
    assert public(loaded.config) == public(scheduler.config)
    scheduler.set_timesteps(6)
    loaded.set_timesteps(6)
    assert torch.equal(loaded.timesteps, scheduler.timesteps)


def test_from_a_teacher_config_takes_its_betas_and_the_named_parameterization():
    teacher = diffusers.DDIMScheduler(beta_schedule="linear", beta_start=0.0002, beta_end=0.03)
    scheduler = PeRFlowScheduler.from_config(teacher.config, prediction_type="diff_eps")
    assert scheduler.config.prediction_type == "diff_eps"
    assert torch.equal(scheduler.alphas_cumprod, teacher.alphas_cumprod)


def test_a_teacher_config_without_a_perflow_parameterization_is_an_error_that_says_what_to_pass():
    sd15 = diffusers.DDIMScheduler(**SD_SCHEDULER, prediction_type="epsilon")
    with pytest.raises(ValueError, match="prediction_type='epsilon' is not a PeRFlow parameterization.*from_config"):
        PeRFlowScheduler.from_config(sd15.config)


def test_from_a_default_ddim_config_gives_the_perflow_defaults():
    """diffusers carries over only the values a config set explicitly, not another class's defaults."""
    scheduler = PeRFlowScheduler.from_config(diffusers.DDIMScheduler().config)
    assert public(scheduler.config) == public(PeRFlowScheduler().config)


def toy_model_weights(channels=4, seed=0):
    """A fixed channel-mixing matrix A [C, C] and bias b [C], float32."""
    rng = np.random.default_rng(seed)
    a = (np.eye(channels) * 0.8 + 0.1 * rng.standard_normal((channels, channels))).astype(np.float32)
    return a, rng.standard_normal(channels).astype(np.float32)


def toy_output_torch(z, timestep, a, b):
    """output = A z (over channels) + (t / 1000) b: z [B, C, H, W] float32, timestep a scalar."""
    t = torch.as_tensor(timestep).to(torch.float32) / 1000
    return torch.einsum("oc,bchw->bohw", torch.from_numpy(a), z) + t * torch.from_numpy(b)[:, None, None]


def toy_output_jax(z, timesteps, a, b):
    """The same function for perflow_jax.sampler: timesteps [B] float32."""
    t = timesteps[:, None, None, None] / 1000
    return jnp.einsum("oc,bchw->bohw", a, z) + t * b[:, None, None]


@pytest.mark.parametrize("parameterization", ["velocity", "ddim_eps", "diff_eps"])
@pytest.mark.parametrize("steps", [4, 6])
def test_sampling_loop_gives_the_jax_samplers_result(parameterization, steps):
    """Same noise, same toy model: torch loop vs perflow_jax.sampler.sample. Measured relative error
    5e-8 to 2.1e-7: float32 rounding (the two compute the same float32 operations; the toy model's
    sums over channels may run in another order)."""
    a, b = toy_model_weights()
    noise = np.random.default_rng(1).standard_normal((2, 4, 5, 5)).astype(np.float32)
    scheduler = PeRFlowScheduler(prediction_type=parameterization)
    scheduler.set_timesteps(steps)
    z = torch.from_numpy(noise)
    for t in scheduler.timesteps:
        z = scheduler.step(toy_output_torch(z, t, a, b), t, z, return_dict=False)[0]
    expected = sampler.sample(
        lambda z, t, cond: toy_output_jax(z, t, a, b),
        jnp.asarray(noise),
        None,
        None,
        scheduler.alphas_cumprod.numpy(),
        num_steps=steps,
        num_windows=4,
        parameterization=parameterization,
    )
    err = relative_error(z.numpy(), expected)
    print(f"{parameterization}, {steps} steps: relative error torch vs JAX {err:.2e}")
    assert err < 1e-5


def test_half_precision_samples_are_stepped_in_float32_and_returned_in_their_dtype():
    scheduler = PeRFlowScheduler(prediction_type="diff_eps")
    scheduler.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    z, eps = (torch.randn(2, 4, 3, 3, generator=g).half() for _ in range(2))
    prev = scheduler.step(eps, 750, z).prev_sample
    assert prev.dtype == torch.float16
    scheduler.set_timesteps(4)
    assert torch.equal(prev, scheduler.step(eps.float(), 750, z.float()).prev_sample.half())


def test_stepping_from_a_timestep_outside_the_schedule_is_an_error():
    scheduler = PeRFlowScheduler()
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="timestep 999 is not one of this scheduler's timesteps"):
        scheduler.step(torch.zeros(1, 4, 2, 2), 999, torch.zeros(1, 4, 2, 2))


def test_add_noise_is_the_forward_diffusion_at_the_timesteps_alpha():
    scheduler = PeRFlowScheduler()
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    timesteps = torch.tensor([1000, 750, 1, 0])
    ab = scheduler.alphas_cumprod.numpy()[[999, 749, 0, 0]].astype(np.float64)[:, None, None, None]
    expected = np.sqrt(ab) * x.numpy() + np.sqrt(1 - ab) * eps.numpy()
    np.testing.assert_allclose(scheduler.add_noise(x, eps, timesteps).numpy(), expected, rtol=1e-6, atol=1e-6)


def test_the_package_imports_where_jax_cannot_be_imported():
    code = (
        "import sys; sys.modules['jax'] = None; sys.modules['flax'] = None\n"
        "from perflow_jax.torch import PeRFlowScheduler, merge_delta_weights\n"
        "PeRFlowScheduler().set_timesteps(4)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_stock_stable_diffusion_pipeline_samples_with_it(tmp_path):
    """The pipeline's loop (set_timesteps with a device, scale_model_input, step with its arguments)
    gives exactly what a hand-written loop over the same UNet gives."""
    pipe = tiny_pipeline(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = PeRFlowScheduler.from_config(pipe.scheduler.config, prediction_type="diff_eps")
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    text = torch.randn(1, 7, pipe.text_encoder.config.hidden_size, generator=g)
    with torch.no_grad():
        latents = pipe(
            prompt_embeds=text,
            latents=noise,
            height=32,
            width=32,
            num_inference_steps=4,
            guidance_scale=1.0,
            output_type="latent",
        ).images
        scheduler = PeRFlowScheduler.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(4)
        z = noise
        for t in scheduler.timesteps:
            z = scheduler.step(pipe.unet(z, t, encoder_hidden_states=text).sample, t, z).prev_sample
    assert torch.equal(latents, z)


def test_a_stock_sdxl_pipeline_feeds_the_unet_the_perflow_timesteps(tmp_path):
    pipe = tiny_pipeline(tmp_path, xl=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = PeRFlowScheduler.from_config(pipe.scheduler.config, prediction_type="ddim_eps")
    seen = []
    pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(int(args[1])))
    with torch.no_grad():
        latents = pipe("a photo", height=32, width=32, num_inference_steps=6, guidance_scale=2.0, output_type="latent")
    assert seen == [1000, 875, 750, 625, 500, 250]
    assert torch.isfinite(latents.images).all()
