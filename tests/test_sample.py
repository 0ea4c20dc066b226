"""python -m perflow_jax.sample on a tiny PeRFlow run's WORKDIR and its teacher, on the CPU."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import diffusers
import jax
import numpy as np
import pytest
import torch
from PIL import Image

from perflow_jax import compile_cache, image_io, pipeline
from perflow_jax import sample as sample_module
from perflow_jax.image_io import to_nchw, to_nhwc
from perflow_jax.pipeline import seed_noise
from perflow_jax.sample import Options, SampleError, main, make_plan, sample
from tests.helpers.pipelines import quiet, tiny_model_and_data, tiny_workdir
from tests.helpers.processes import library_logs

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo number 1", "a photo number 2"]
NUM_IMAGES = 2
HEIGHT, WIDTH = 32, 48  # the tiny VAE's factor is 4: 8 x 12 latents
# Two compilations of the same float32 program (here: another jit boundary, another device count)
# may fuse and order sums differently; through a few tiny networks that moves values by ~1e-6 of their scale.
FLOAT32_RECOMPILED_ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Each sample() call compiles its program anew; JAX's persistent cache makes the repeats cheap."""
    with compile_cache.cache_in(tmp_path_factory.mktemp("jax_cache"), min_compile_secs=0):
        yield


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(WORKDIR of a tiny PeRFlow run at step 2, its converted teacher, the teacher's diffusers folder).

    The checkpoint is written as the training loop writes it, without training (tests.helpers.pipelines.tiny_workdir).
    """
    root = tmp_path_factory.mktemp("sample")
    diffusers_dir, model, data_dir = tiny_model_and_data(root)
    return tiny_workdir(root / "run", model, data_dir), model, diffusers_dir


def run(folders, tmp_path, name, **options):
    """sample() on the WORKDIR with the module's prompts and size; ``options`` override."""
    arguments = {"num_images": NUM_IMAGES, "height": HEIGHT, "width": WIDTH, **options}
    return sample(Options(folders[0], PROMPTS, tmp_path / name / "grid.png", **arguments), log=quiet)


def plan(model, **options):
    """make_plan of ``model`` with ``options``."""
    return make_plan(Options(model, **options))


@pytest.fixture(scope="module")
def seeded(folders, tmp_path_factory):
    """(output, folder) of seed 0 with --save-noise, --save-latents and --singles."""
    folder = tmp_path_factory.mktemp("seeded")
    result = run(folders, folder, "a", seed=0, save_noise=folder / "noise.npy", save_latents=folder / "latents.npy",
                 singles=True)  # fmt: skip
    return result, folder / "a"


def test_the_same_seed_gives_the_same_images_bit_for_bit(folders, seeded, tmp_path):
    again = run(folders, tmp_path, "b", seed=0)
    np.testing.assert_array_equal(again.images, seeded[0].images)


def test_another_seed_gives_other_images(folders, seeded, tmp_path):
    other = run(folders, tmp_path, "c", seed=1)
    assert np.abs(other.images - seeded[0].images).mean() > 1e-3


def test_batches_of_three_give_the_images_of_one_batch_in_order(folders, seeded, tmp_path):
    """Four images, --batch-size 3: a full batch and a short one padded to 3 (one compilation for both)."""
    batched = run(folders, tmp_path, "batched", seed=0, batch_size=3)
    assert batched.images.shape == seeded[0].images.shape
    expected = seeded[0].latents
    np.testing.assert_allclose(batched.latents, expected, atol=FLOAT32_RECOMPILED_ATOL * np.abs(expected).max())
    assert np.abs(batched.images[3] - batched.images[2]).mean() > 1e-3  # the last batch is not the padding


def test_seed_noise_from_an_offset_continues_the_sequence():
    np.testing.assert_array_equal(seed_noise(3, 2, (2, 2, 1), start=3), seed_noise(3, 5, (2, 2, 1))[3:])


def test_each_image_has_its_own_noise_drawn_from_the_seed_as_documented(seeded):
    noise = np.load(seeded[1].parent / "noise.npy")
    expected = np.stack([jax.random.normal(jax.random.fold_in(jax.random.key(0), j), (8, 12, 4)) for j in range(4)])
    np.testing.assert_array_equal(to_nhwc(noise), expected)
    assert noise.shape == (4, 4, 8, 12) and noise.dtype == np.float32  # diffusers' [images, c, h, w]
    assert min(np.abs(noise[i] - noise[j]).mean() for i in range(4) for j in range(i)) > 0.5


def test_saved_noise_fed_back_as_init_noise_gives_the_same_images(folders, seeded, tmp_path):
    fed = run(folders, tmp_path, "d", seed=123, init_noise=seeded[1].parent / "noise.npy")
    np.testing.assert_array_equal(fed.images, seeded[0].images)


def test_init_noise_images_equal_generate_called_directly_with_that_noise(folders, tmp_path):
    noise = np.random.default_rng(5).standard_normal((4, 4, 8, 12)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    from_file = run(folders, tmp_path, "e", init_noise=tmp_path / "noise.npy")
    trained = pipeline.load_trained(folders[0])
    model = trained.model
    text = pipeline.TextEncoders(model.module("text_encoder"), resolution=32)
    pipe = pipeline.Pipeline(model.module("unet"), text, model.module("vae"), model.alphas_cumprod())
    parameterization, num_windows = trained.description.perflow
    settings = pipeline.GenerateSettings(
        num_steps=4, guidance=4.5, parameterization=parameterization, num_windows=num_windows
    )
    params = {
        "unet": model.params["unet"],
        "text": {"text_encoder": model.params["text_encoder"]},
        "vae": model.params["vae"],
    }
    ids = model.tokenize([p for p in PROMPTS for _ in range(NUM_IMAGES)])
    direct, _ = jax.jit(pipeline.make_generate(pipe, settings))(
        params, ids, model.tokenize([""]), np.transpose(noise, (0, 2, 3, 1))
    )
    np.testing.assert_allclose(from_file.images, np.asarray(direct), atol=FLOAT32_RECOMPILED_ATOL)


def test_saved_latents_are_the_final_latents_that_decode_to_the_images(folders, seeded):
    latents = np.load(seeded[1].parent / "latents.npy")
    assert latents.shape == (4, 4, 8, 12) and latents.dtype == np.float32
    np.testing.assert_array_equal(to_nhwc(latents), seeded[0].latents)
    model = pipeline.load_model(folders[1], networks=("vae",))
    vae = model.module("vae")
    decoded = jax.jit(lambda p, z: vae.apply({"params": p}, z / vae.config.scaling_factor, method="decode"))(
        model.params["vae"], to_nhwc(latents)
    )
    np.testing.assert_allclose(seeded[0].images, np.clip((decoded + 1) / 2, 0, 1), atol=FLOAT32_RECOMPILED_ATOL)


def test_the_grid_holds_every_image_in_generate_grids_layout_at_the_asked_size(seeded):
    picture = np.asarray(Image.open(seeded[1] / "grid.png"))
    assert picture.shape == (2 * HEIGHT, 2 * WIDTH, 3)  # 4 images: ceil(sqrt(4)) = 2 columns, 2 rows
    np.testing.assert_array_equal(picture, image_io.grid(seeded[0].images))


def test_singles_writes_one_png_per_image(seeded):
    singles = sorted(p.name for p in seeded[1].glob("grid_*.png"))
    assert singles == [f"grid_{j:03d}.png" for j in range(4)]
    np.testing.assert_array_equal(
        np.asarray(Image.open(seeded[1] / "grid_003.png")), np.round(seeded[0].images[3] * 255).astype(np.uint8)
    )


def test_the_negative_prompt_takes_the_empty_prompts_place_in_the_unconditional_branch(folders, seeded, tmp_path):
    empty = run(folders, tmp_path, "n1", seed=0, negative_prompt="")
    np.testing.assert_array_equal(empty.images, seeded[0].images)
    other = run(folders, tmp_path, "n2", seed=0, negative_prompt="a photo number 0")
    assert np.abs(other.images - seeded[0].images).mean() > 1e-3


def test_ema_and_student_weights_give_different_images(folders, seeded, tmp_path):
    student = run(folders, tmp_path, "f", seed=0, weights="student")
    assert np.abs(student.images - seeded[0].images).max() > 1e-4


@pytest.fixture(scope="module")
def teacher(folders, seeded, tmp_path_factory):
    """(output, folder) of the run's teacher, 2 DDIM steps from the seeded run's saved noise."""
    folder = tmp_path_factory.mktemp("teacher")
    result = run(folders, folder, "t", teacher_ddim=2, init_noise=seeded[1].parent / "noise.npy",
                 save_latents=folder / "latents.npy")  # fmt: skip
    return result, folder


def test_teacher_ddim_samples_the_runs_teacher_instead_of_the_student(seeded, teacher):
    assert teacher[0].images.shape == (4, HEIGHT, WIDTH, 3) and np.isfinite(teacher[0].images).all()
    assert np.abs(teacher[0].images - seeded[0].images).mean() > 1e-3
    assert (teacher[1] / "t/grid.png").is_file()


def test_noise_and_latents_files_are_what_a_diffusers_pipeline_takes_and_returns(folders, seeded, teacher):
    """The noise file as diffusers' latents= gives, through the same teacher's DDIM, the saved final latents."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folders[2], safety_checker=None)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False
    )
    noise = torch.from_numpy(np.load(seeded[1].parent / "noise.npy"))
    with torch.no_grad():
        expected = pipe(PROMPTS, num_images_per_prompt=NUM_IMAGES, height=HEIGHT, width=WIDTH, num_inference_steps=2,
                        guidance_scale=7.5, latents=noise, output_type="latent").images.numpy()  # fmt: skip
    saved = np.load(teacher[1] / "latents.npy")
    assert saved.shape == expected.shape == (4, 4, 8, 12)
    error = np.abs(saved - expected).max() / np.abs(expected).max()
    print(f"JAX teacher DDIM vs diffusers from the same noise file: relative error {error:.1e}")
    # float32 networks match their PyTorch originals to ~1e-6 relative; four UNet passes stay below 1e-4.
    assert error < 1e-4


def test_cli_on_two_devices_pads_the_batch_and_gives_the_same_images(folders, seeded, tmp_path):
    """Three images on two devices (one padding row); the seed's noise makes them the seeded run's first three."""
    (tmp_path / "prompts.txt").write_text(f"{PROMPTS[0]}\n\n  {PROMPTS[0]}  \n{PROMPTS[1]}\n")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    command = [
        sys.executable, "-m", "perflow_jax.sample", "--model", str(folders[0]), "--prompts",
        str(tmp_path / "prompts.txt"), "--height", str(HEIGHT), "--width", str(WIDTH),
        "--out", str(tmp_path / "cli.png"), "--save-latents", str(tmp_path / "cli.npy"),
        "--compilation-cache", str(tmp_path / "jax_cache"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "jax_cache").iterdir())  # the compiled generator, for the next command
    assert "3 images of 32 x 48" in result.stdout and "ms per image) on 2 cpu device(s)" in result.stdout
    assert library_logs(result.stderr) == []  # Orbax's read-only and metadata warnings: only with --verbose
    expected = to_nchw(seeded[0].latents[:3])
    np.testing.assert_allclose(
        np.load(tmp_path / "cli.npy"), expected, atol=FLOAT32_RECOMPILED_ATOL * np.abs(expected).max()
    )


# Bad arguments: each is refused with its reason before any weights are read.


def write_perflow_folder(folders, tmp_path) -> Path:
    """The diffusers teacher folder with a PeRFlowScheduler config: a PeRFlow student folder to the loader."""
    folder = tmp_path / "perflow"
    shutil.copytree(folders[2], folder)
    config = json.loads((folder / "scheduler/scheduler_config.json").read_text())
    config.update(_class_name="PeRFlowScheduler", prediction_type="diff_eps", num_time_windows=4)
    (folder / "scheduler/scheduler_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(steps=2), "2 sampling steps for a model trained with 4 windows.*the authors' code silently runs 4"),
        (dict(guidance=0.5), "--guidance 0.5: .*use 1 \\(no guidance\\) or more"),
        (dict(guidance=float("nan")), "--guidance nan: give a finite classifier-free guidance scale, 1 or more"),
        (dict(guidance=float("inf")), "--guidance inf: give a finite classifier-free guidance scale, 1 or more"),
        (dict(guidance=1.0, negative_prompt="blurry"), "--negative-prompt has no effect with --guidance 1"),
        (dict(height=30), "--height 30 is not a multiple of the VAE's downsampling factor 4: use 28 or 32"),
        (dict(width=50), "--width 50 is not a multiple of the VAE's downsampling factor 4: use 48 or 52"),
        (dict(teacher_ddim=4, weights="student"), "--weights chooses the student's checkpoint, but --teacher-ddim"),
        (dict(teacher_ddim=4, steps=4), "give the teacher's DDIM steps as --teacher-ddim STEPS"),
        (dict(step=7), "has no checkpoint of step 7; it has steps 2"),
    ],
)
def test_bad_options_for_a_workdir_are_refused_with_the_reason(folders, options, message):
    with pytest.raises(ValueError, match=message):
        plan(folders[0], **options)


def test_weights_with_a_model_folder_is_refused(folders):
    with pytest.raises(
        SampleError, match="--weights ema chooses a training run's EMA or student weights, but .* is a model folder"
    ):
        plan(folders[1], weights="ema")


def test_step_with_a_model_folder_is_refused(folders):
    with pytest.raises(SampleError, match="--step 2 names a training checkpoint, but .* is a model folder"):
        plan(folders[1], step=2)


def test_a_stable_diffusion_folder_without_teacher_ddim_names_the_fix(folders):
    with pytest.raises(
        SampleError, match="scheduler is DDPMScheduler, not a PeRFlow student: sample it with --teacher-ddim"
    ):
        plan(folders[1])


def test_teacher_ddim_of_a_perflow_folder_is_refused(folders, tmp_path):
    folder = write_perflow_folder(folders, tmp_path)
    assert plan(folder).settings.parameterization == "diff_eps"
    with pytest.raises(SampleError, match="holds a PeRFlow student .* --teacher-ddim needs the teacher's folder"):
        plan(folder, teacher_ddim=4)


def no_loading(options, plan):
    raise AssertionError("the model was loaded before the arguments were checked")


def test_init_noise_of_the_wrong_shape_names_the_expected_one(folders, tmp_path, monkeypatch):
    monkeypatch.setattr(sample_module, "load", no_loading)
    np.save(tmp_path / "noise.npy", np.zeros((4, 8, 12, 4), np.float32))  # channels-last by mistake
    with pytest.raises(SampleError, match=r"holds float32 \(4, 8, 12, 4\); expected float32 \(4, 4, 8, 12\)"):
        run(folders, tmp_path, "x", init_noise=tmp_path / "noise.npy")


def test_init_noise_with_a_nan_is_refused_before_loading(folders, tmp_path, monkeypatch):
    monkeypatch.setattr(sample_module, "load", no_loading)
    noise = np.zeros((4, 4, 8, 12), np.float32)
    noise[1, 2, 3, 4] = np.nan
    np.save(tmp_path / "noise.npy", noise)
    with pytest.raises(SampleError, match=r"noise.npy holds 1 NaN or infinite values: give finite noise"):
        run(folders, tmp_path, "x", init_noise=tmp_path / "noise.npy")


@pytest.mark.parametrize("flag", ["out", "save_noise"])
def test_an_out_inside_the_model_is_refused_before_anything_is_read(folders, tmp_path, monkeypatch, flag):
    monkeypatch.setattr(sample_module, "make_plan", no_loading)
    inside = folders[0] / "checkpoints/grid.png"
    options = {"out": inside} if flag == "out" else {"out": tmp_path / "grid.png", flag: inside}
    with pytest.raises(SampleError, match=f"--{flag.replace('_', '-')} {inside} lies inside --model {folders[0]}, "):
        sample(Options(folders[0], PROMPTS, **options), log=quiet)
    assert not inside.exists()


def test_an_out_that_cannot_be_written_is_refused_before_anything_is_read(folders, tmp_path, monkeypatch):
    monkeypatch.setattr(sample_module, "make_plan", no_loading)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SampleError, match=f"--out {tmp_path}/file/grid.png cannot be written: {tmp_path}/file: "):
        sample(Options(folders[0], PROMPTS, tmp_path / "file/grid.png"), log=quiet)


def test_an_empty_prompt_file_is_refused(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("\n  \n")
    assert main(["--model", str(tmp_path), "--prompts", str(tmp_path / "prompts.txt"), "--out", "x.png"]) == 2
    assert "holds no prompts: write one prompt per line" in capsys.readouterr().err


def test_prompt_and_prompts_together_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path), "--prompt", "a", "--prompts", "p.txt", "--out", "x.png"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_neither_prompt_nor_prompts_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path), "--out", "x.png"])
    assert "one of the arguments --prompt --prompts is required" in capsys.readouterr().err


def test_num_images_below_one_is_refused(folders, tmp_path, monkeypatch):
    monkeypatch.setattr(sample_module, "load", no_loading)
    with pytest.raises(SampleError, match="--num-images 0: give at least 1"):
        run(folders, tmp_path, "x", num_images=0)
    with pytest.raises(SampleError, match="--batch-size 0: give at least 1"):
        run(folders, tmp_path, "x", batch_size=0)


def test_seed_noise_of_an_image_does_not_depend_on_the_batch_size():
    np.testing.assert_array_equal(seed_noise(3, 2, (2, 2, 1)), seed_noise(3, 5, (2, 2, 1))[:2])
