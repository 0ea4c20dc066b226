"""img2img: ``sample --init-image IMAGE --strength S`` against diffusers' StableDiffusionImg2ImgPipeline.

The model is the embedded digits teacher plus its PeRFlow delta (diff_eps, 4 windows): converted for
JAX, merged with ``perflow_jax.torch.merge_delta_weights`` for diffusers, with this project's
PeRFlowScheduler. diffusers encodes the init image to a posterior sample; its ``retrieve_latents`` is
patched to ``sample_mode="argmax"`` (the posterior mean, what the JAX path uses), so both start from
the same latents and the generator's first draw is the noise of the forward diffusion.
"""

import json
import types
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img
from PIL import Image

from perflow_jax import compile_cache, image_io, pipeline, sampler
from perflow_jax.convert import convert
from perflow_jax.demo import DELTA, TEACHER, digits
from perflow_jax.sample import Options, SampleError, make_plan, read_init_image, sample
from tests.helpers.parity import relative_error
from tests.helpers.pipelines import quiet

PROMPTS = [digits.caption(3), digits.caption(8)]
SIZE = digits.RESOLUTION


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> tuple[Path, Path]:
    """(the converted PeRFlow student folder, a held-out digit as a 32 x 32 RGB PNG)."""
    root = tmp_path_factory.mktemp("img2img")
    convert(TEACHER, root / "student", perflow_delta=DELTA, log=quiet)
    images, _ = digits.load("heldout")
    Image.fromarray(images[0]).save(root / "digit.png")
    return root / "student", root / "digit.png"


@pytest.fixture(scope="module")
def diffusers_img2img(student):
    """StableDiffusionImg2ImgPipeline of the teacher + delta with the student's PeRFlowScheduler, float32."""
    from perflow_jax.torch import PeRFlowScheduler, merge_delta_weights

    pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(TEACHER, torch_dtype=torch.float32)
    merge_delta_weights(pipe.unet, DELTA)
    config = json.loads((student[0] / "scheduler/scheduler_config.json").read_text())
    pipe.scheduler = PeRFlowScheduler.from_config(config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    with compile_cache.cache_in(tmp_path_factory.mktemp("jax_cache"), min_compile_secs=0):
        yield


@pytest.mark.parametrize(
    "num_steps, strength, first_step",
    [(4, 0.5, 2), (4, 0.75, 1), (4, 1.0, 0), (4, 0.6, 2), (6, 0.5, 3), (5, 0.99, 1), (8, 0.125, 7)],
)
def test_img2img_runs_the_last_int_n_strength_steps_as_diffusers_get_timesteps(num_steps, strength, first_step):
    assert sampler.img2img_first_step(num_steps, strength) == first_step


@pytest.mark.parametrize("strength", [0.0, -0.5, 1.5, float("nan"), 0.2])
def test_img2img_refuses_a_strength_outside_0_1_or_one_that_runs_no_step(strength):
    with pytest.raises(ValueError, match="strength"):
        sampler.img2img_first_step(4, strength)


def test_generate_settings_refuse_img2img_for_the_teachers_ddim_and_zero_steps():
    with pytest.raises(ValueError, match="PeRFlow sampler, not the teacher's DDIM"):
        pipeline.GenerateSettings(method="ddim", strength=0.5)
    with pytest.raises(ValueError, match="runs int"):
        pipeline.GenerateSettings(num_steps=4, strength=0.1)


@pytest.mark.parametrize("strength", [None, 0.5])
def test_generate_wants_init_images_exactly_when_a_strength_is_set(strength):
    no_controlnets = types.SimpleNamespace(controlnets=())  # refused before any network runs
    generate = pipeline.make_generate(no_controlnets, pipeline.GenerateSettings(strength=strength))
    init_images = None if strength is not None else np.zeros((1, SIZE, SIZE, 3), np.float32)
    with pytest.raises(ValueError, match="img2img needs init_images and settings.strength together"):
        generate(
            None, {"input_ids": np.zeros((1, 77), np.int32)}, None, np.zeros((1, 8, 8, 4)), init_images=init_images
        )


@pytest.mark.parametrize("num_steps, strength", [(4, 1.0), (6, 0.5)])  # from t = 1000; from inside a window
def test_img2img_final_latents_equal_diffusers_img2img_pipeline(
    student, diffusers_img2img, monkeypatch, tmp_path, num_steps, strength
):
    """Same image, prompts, noise and guidance: the final latents agree to float32 rounding (< 1e-5).
    6 steps at 0.5 start at timestep 625, inside the window [750, 500)."""
    folder, digit = student
    generator = torch.Generator().manual_seed(7)
    noise = torch.randn((len(PROMPTS), 4, SIZE // 4, SIZE // 4), generator=torch.Generator().manual_seed(7))
    np.save(tmp_path / "noise.npy", noise.numpy())
    jax_run = sample(
        Options(
            folder,
            PROMPTS,
            tmp_path / "grid.png",
            steps=num_steps,
            init_image=digit,
            strength=strength,
            init_noise=tmp_path / "noise.npy",
            save_latents=tmp_path / "latents.npy",
        ),
        quiet,
    )

    original = pipeline_stable_diffusion_img2img.retrieve_latents
    monkeypatch.setattr(
        pipeline_stable_diffusion_img2img,
        "retrieve_latents",
        lambda output, generator=None, sample_mode="sample": original(output, generator, "argmax"),
    )
    with torch.no_grad():
        expected = diffusers_img2img(
            PROMPTS,
            image=[Image.open(digit)] * len(PROMPTS),
            strength=strength,
            num_inference_steps=num_steps,
            guidance_scale=4.5,
            generator=generator,
            output_type="latent",
        ).images.numpy()
    error = relative_error(np.load(tmp_path / "latents.npy"), expected)
    print(f"img2img N={num_steps} strength={strength}: relative error {error:.1e} against diffusers")
    assert error < 1e-5
    assert jax_run.images.shape == (len(PROMPTS), SIZE, SIZE, 3)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"strength": 0.5}, "--strength 0.5 is img2img's: give the image to start from as --init-image"),
        ({"init_image": Path("x.png"), "strength": 0.0}, r"--strength 0.0: give a value in \(0, 1\]"),
        ({"init_image": Path("x.png"), "strength": 1.5}, r"--strength 1.5: give a value in \(0, 1\]"),
        ({"init_image": Path("x.png"), "strength": 0.2}, r"runs int\(4 x 0.2\) = 0 steps: give --strength 0.25"),
        ({"init_image": Path("x.png"), "teacher_ddim": 4}, "drop --teacher-ddim"),
    ],
)
def test_bad_img2img_options_are_refused_naming_the_fix(student, options, message):
    with pytest.raises(SampleError, match=message):
        make_plan(Options(student[0], PROMPTS, **options))


def test_the_default_strength_is_diffusers_0_8(student):
    assert make_plan(Options(student[0], PROMPTS, init_image=Path("x.png"))).settings.strength == 0.8


def test_an_init_image_of_another_size_is_refused_naming_both_sizes(student, tmp_path):
    Image.fromarray(np.zeros((24, 40, 3), np.uint8)).save(tmp_path / "wide.png")
    with pytest.raises(SampleError, match=r"is 24 x 40 pixels .* images are 32 x 32: resize the image, or give"):
        read_init_image(tmp_path / "wide.png", SIZE, SIZE)


def test_an_unreadable_or_missing_init_image_is_refused(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(SampleError, match="broken.png is not a readable image"):
        read_init_image(tmp_path / "broken.png", SIZE, SIZE)
    with pytest.raises(SampleError, match="missing.png does not exist"):
        read_init_image(tmp_path / "missing.png", SIZE, SIZE)


def test_the_init_image_is_read_as_rgb_in_minus_1_1_as_diffusers_processes_it(tmp_path):
    grey = np.arange(SIZE * SIZE, dtype=np.uint8).reshape(SIZE, SIZE)
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    pixels = read_init_image(tmp_path / "grey.png", SIZE, SIZE)
    expected = diffusers.image_processor.VaeImageProcessor().preprocess(
        Image.open(tmp_path / "grey.png").convert("RGB")
    )
    np.testing.assert_array_equal(pixels, image_io.to_nhwc(expected.numpy())[0])
