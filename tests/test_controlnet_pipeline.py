"""ControlNets converted with the model: sampling with control in JAX gives the final latents of diffusers'
StableDiffusionControlNetPipeline (and, with an init image, StableDiffusionControlNetImg2ImgPipeline) with the
exported model, the same ControlNets and the PeRFlowScheduler."""

import json
import shutil
import types

import diffusers
import numpy as np
import pytest
import torch
from diffusers.pipelines.controlnet import pipeline_controlnet_img2img
from PIL import Image

from perflow_jax import compile_cache, pipeline, sharding
from perflow_jax.convert import ConversionError, convert
from perflow_jax.export import export_to_torch
from perflow_jax.image_io import to_nchw, to_nhwc
from perflow_jax.sample import Options, SampleError, make_plan, sample
from tests.helpers.networks import TINY_TEXT, TINY_UNETS
from tests.helpers.parity import random_torch_controlnet, relative_error
from tests.helpers.pipelines import quiet, tiny_pipeline

PROMPTS = ["a photo number 3", "a red car"]
SIZE = 32  # pixels; the tiny VAE's factor is 4: 8 x 8 latents
UNET = {**TINY_UNETS["sd1"], "cross_attention_dim": TINY_TEXT["hidden_size"]}  # tiny_pipeline's UNet


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    with compile_cache.cache_in(tmp_path_factory.mktemp("jax_cache"), min_compile_secs=0):
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny PeRFlow student (diff_eps, 4 windows) converted with two random ControlNets ("edges", "depth"), its
    export to diffusers, and a control image for each (RGB, grayscale), under one folder."""
    root = tmp_path_factory.mktemp("controlnet")
    tiny_pipeline(root / "sources").save_pretrained(root / "teacher")
    shutil.copytree(root / "teacher", root / "student")
    schedule = json.loads((root / "teacher/scheduler/scheduler_config.json").read_text())
    config = pipeline.perflow_scheduler_config(schedule, "diff_eps", 4)
    (root / "student/scheduler/scheduler_config.json").write_text(json.dumps(config))
    random_torch_controlnet(UNET, seed=3).save_pretrained(root / "edges")
    random_torch_controlnet(UNET, seed=4).save_pretrained(root / "controlnet-sd15-depth")
    controlnets = [str(root / "edges"), f"{root / 'controlnet-sd15-depth'}:depth"]
    convert(root / "student", root / "model", controlnet=controlnets, log=quiet)
    export_to_torch(root / "model", root / "export", dtype="float32", base=root / "teacher", log=quiet)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8)).save(root / "edges.png")
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), np.uint8)).save(root / "depth.png")
    return root


def diffusers_latents(root, names, noise, num_steps, guidance, scales, guess_mode=False) -> np.ndarray:
    """The final latents of StableDiffusionControlNetPipeline (one ControlNet, or a list) from the export."""
    import perflow_jax.torch  # noqa: F401  (diffusers finds PeRFlowScheduler among the imported modules)

    nets = [diffusers.ControlNetModel.from_pretrained(root / folder) for folder in names]
    images = [Image.open(root / f"{name}.png") for name in ("edges", "depth")[: len(names)]]
    pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        root / "export", controlnet=nets if len(nets) > 1 else nets[0], safety_checker=None
    )
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "PeRFlowScheduler"
    with torch.no_grad():
        return pipe(
            PROMPTS,
            image=images if len(images) > 1 else images[0],
            latents=torch.from_numpy(noise),
            height=SIZE,
            width=SIZE,
            num_inference_steps=num_steps,
            guidance_scale=guidance,
            controlnet_conditioning_scale=scales if len(scales) > 1 else scales[0],
            guess_mode=guess_mode,
            output_type="latent",
        ).images.numpy()


def noise_file(root) -> np.ndarray:
    """[2, 4, 8, 8] float32 initial noise (diffusers' layout), also written as noise.npy."""
    noise = np.random.default_rng(1).standard_normal((len(PROMPTS), 4, SIZE // 4, SIZE // 4)).astype(np.float32)
    np.save(root / "noise.npy", noise)
    return noise


@pytest.mark.parametrize(("num_steps", "guidance"), [(4, 1.0), (8, 3.0)])  # 4 and 8 steps, without and with CFG
def test_jax_generate_with_a_controlnet_reaches_diffusers_controlnet_pipelines_latents(models, num_steps, guidance):
    noise = noise_file(models)
    settings = pipeline.GenerateSettings(
        num_steps=num_steps, guidance=guidance, parameterization="diff_eps", num_windows=4, control_scales=(0.8,)
    )
    generator = pipeline.load_generator(
        pipeline.describe(models / "model"), settings, height=SIZE, controlnets=["edges"]
    )
    control = np.asarray(Image.open(models / "edges.png"), np.float32) / 255
    got = generator(PROMPTS, to_nhwc(noise), control=(control,)).latents

    expected = diffusers_latents(models, ["edges"], noise, num_steps, guidance, [0.8])
    error = relative_error(to_nchw(got), expected)
    print(f"ControlNet N={num_steps} w={guidance}: relative error {error:.2e}")
    assert error < 1e-5
    uncontrolled = diffusers_latents(models, ["edges"], noise, num_steps, guidance, [0.0])
    assert relative_error(uncontrolled, expected) > 1e-2  # the ControlNet steers


def test_sample_cli_with_two_controlnets_in_guess_mode_reaches_diffusers_multi_controlnet_latents(models, tmp_path):
    noise_file(models)
    options = Options(
        models / "model",
        PROMPTS,
        tmp_path / "grid.png",
        guidance=3.0,
        height=SIZE,
        width=SIZE,
        init_noise=models / "noise.npy",
        save_latents=tmp_path / "latents.npy",
        control=(models / "edges.png", models / "depth.png"),
        controlnet=("edges", "depth"),
        control_scale=(0.7, 1.2),
        guess_mode=True,
    )
    sample(options, log=quiet)
    got = np.load(tmp_path / "latents.npy")
    noise = np.load(models / "noise.npy")
    expected = diffusers_latents(models, ["edges", "controlnet-sd15-depth"], noise, 4, 3.0, [0.7, 1.2], True)
    error = relative_error(got, expected)
    print(f"two ControlNets, guess mode, N=4 w=3: relative error {error:.2e}")
    assert error < 1e-5
    without_guess = diffusers_latents(models, ["edges", "controlnet-sd15-depth"], noise, 4, 3.0, [0.7, 1.2])
    assert relative_error(without_guess, expected) > 1e-3


@pytest.mark.parametrize(
    ("num_steps", "guidance", "strength"), [(4, 1.0, 0.75), (8, 3.0, 0.7)]
)  # 4 and 8 steps, without and with CFG; 8 at 0.7 starts inside a window (int(5.6) = 5 of 8 steps)
def test_sample_cli_with_a_controlnet_and_an_init_image_reaches_diffusers_controlnet_img2img_latents(
    models, monkeypatch, tmp_path, num_steps, guidance, strength
):
    """diffusers encodes the init image to the posterior mean (``sample_mode="argmax"``, as the JAX path), so the
    generator's first draw is the forward diffusion's noise, the JAX run's --init-noise."""
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (SIZE, SIZE, 3), np.uint8)).save(tmp_path / "init.png")
    noise = torch.randn((len(PROMPTS), 4, SIZE // 4, SIZE // 4), generator=torch.Generator().manual_seed(7))
    np.save(tmp_path / "noise.npy", noise.numpy())
    options = Options(
        models / "model",
        PROMPTS,
        tmp_path / "grid.png",
        steps=num_steps,
        guidance=guidance,
        height=SIZE,
        width=SIZE,
        init_noise=tmp_path / "noise.npy",
        save_latents=tmp_path / "latents.npy",
        init_image=tmp_path / "init.png",
        strength=strength,
        control=(models / "edges.png",),
        controlnet=("edges",),
        control_scale=(0.8,),
    )
    sample(options, log=quiet)

    import perflow_jax.torch  # noqa: F401  (diffusers finds PeRFlowScheduler among the imported modules)

    original = pipeline_controlnet_img2img.retrieve_latents
    monkeypatch.setattr(
        pipeline_controlnet_img2img,
        "retrieve_latents",
        lambda output, generator=None, sample_mode="sample": original(output, generator, "argmax"),
    )
    pipe = diffusers.StableDiffusionControlNetImg2ImgPipeline.from_pretrained(
        models / "export", controlnet=diffusers.ControlNetModel.from_pretrained(models / "edges"), safety_checker=None
    )
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "PeRFlowScheduler"

    def latents(scale: float) -> np.ndarray:
        with torch.no_grad():
            return pipe(
                PROMPTS,
                image=[Image.open(tmp_path / "init.png")] * len(PROMPTS),
                control_image=Image.open(models / "edges.png"),
                strength=strength,
                height=SIZE,
                width=SIZE,
                num_inference_steps=num_steps,
                guidance_scale=guidance,
                controlnet_conditioning_scale=scale,
                generator=torch.Generator().manual_seed(7),
                output_type="latent",
            ).images.numpy()

    expected = latents(0.8)
    error = relative_error(np.load(tmp_path / "latents.npy"), expected)
    print(f"ControlNet img2img N={num_steps} w={guidance} strength={strength}: relative error {error:.2e}")
    assert error < 1e-5
    assert relative_error(latents(0.0), expected) > 1e-2  # the ControlNet steers from the init image too


def test_generator_takes_one_control_image_for_all_images_or_one_per_image():
    """Per ControlNet: [H, W, C] is repeated for every image, [B, H, W, C] padded as the prompts are."""
    no_networks = types.SimpleNamespace(controlnets=())  # inputs() runs no network
    tokenize = lambda prompts: {"input_ids": np.zeros((len(prompts), 77), np.int32)}  # noqa: E731
    generator = pipeline.Generator(no_networks, pipeline.GenerateSettings(), {}, tokenize, sharding.make_mesh((-1, 1)))
    per_image = np.random.default_rng(0).random((3, SIZE, SIZE, 3), np.float32)
    shared = per_image[0]
    noise = np.zeros((3, SIZE // 4, SIZE // 4, 4), np.float32)
    control = generator.inputs(["a", "b", "c"], noise, pad_to=4, control=(per_image, shared))[4]
    np.testing.assert_array_equal(np.asarray(control[0]), per_image[[0, 1, 2, 2]])
    np.testing.assert_array_equal(np.asarray(control[1]), np.broadcast_to(shared, (4, SIZE, SIZE, 3)))
    with pytest.raises(ValueError, match=r"control 0 holds 2 images for 3 prompts: give one per prompt"):
        generator.inputs(["a", "b", "c"], noise, control=(per_image[:2],))


# ---- bad input: one-line errors, before any weights are read -----------------------------------


def test_the_converted_controlnets_are_listed_by_name(models):
    assert pipeline.controlnet_names(models / "model") == ["depth", "edges"]
    manifest = json.loads((models / "model/perflow_model.json").read_text())
    assert sorted(manifest["controlnets"]) == ["depth", "edges"]


def test_a_controlnet_of_another_base_architecture_is_refused_at_convert_naming_the_dimension(models, tmp_path):
    random_torch_controlnet({**UNET, "cross_attention_dim": 24}).save_pretrained(tmp_path / "sd21_canny")
    with pytest.raises(ConversionError, match=r"sd21_canny: .*another base model: cross_attention_dim 24 vs 32"):
        convert(models / "student", tmp_path / "out", controlnet=[str(tmp_path / "sd21_canny")], log=quiet)
    assert not (tmp_path / "out").exists()


def test_a_converted_controlnet_of_another_base_architecture_is_refused_at_load(models, tmp_path):
    shutil.copytree(models / "model", tmp_path / "model")
    config_file = tmp_path / "model/controlnet/edges/config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "block_out_channels": [32, 32]}))
    with pytest.raises(ValueError, match=r"edges: .*block_out_channels \[32, 32\] vs \[32, 64\]"):
        pipeline.load_model(tmp_path / "model", controlnets=["edges"])


def test_an_unknown_controlnet_name_is_refused_listing_the_converted_ones(models, tmp_path):
    options = Options(
        models / "model", PROMPTS, tmp_path / "g.png", control=(models / "edges.png",), controlnet=("canny",)
    )
    with pytest.raises(SampleError, match=r"--controlnet canny: .* has no such ControlNet; it has depth, edges"):
        make_plan(options)
    with pytest.raises(ValueError, match=r"no ControlNet 'canny'; it has depth, edges"):
        pipeline.load_model(models / "model", controlnets=["canny"])
    with pytest.raises(ValueError, match=r"ControlNet 'edges' given more than once: give each ControlNet once"):
        pipeline.load_model(models / "model", controlnets=["edges", "depth", "edges"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"control": ("edges.png",)}, r"1 --control images for 0 --controlnet names: give them in pairs"),
        ({"controlnet": ("edges",)}, r"0 --control images for 1 --controlnet names"),
        ({"control": ("edges.png",), "controlnet": ("edges",), "control_scale": (1.0, 2.0)}, "2 --control-scale"),
        ({"guess_mode": True}, "--guess-mode is a ControlNet mode"),
    ],
)
def test_unpaired_control_options_are_refused(models, tmp_path, options, message):
    if "control" in options:
        options["control"] = tuple(models / name for name in options["control"])
    with pytest.raises(SampleError, match=message):
        make_plan(Options(models / "model", PROMPTS, tmp_path / "g.png", **options))


@pytest.mark.parametrize(
    ("size", "mode", "message"),
    [
        (
            (48, 32),
            "RGB",
            r"is 32 x 48 pixels \(height x width\) but the images are 32 x 32: resize the image, or give",
        ),
        ((32, 32), "RGBA", r"is a RGBA image; it should be RGB or L: convert it"),
    ],
)
def test_a_control_image_of_the_wrong_size_or_channels_is_refused_before_loading(
    models, tmp_path, monkeypatch, size, mode, message
):
    Image.new(mode, size).save(tmp_path / "control.png")
    monkeypatch.setattr(pipeline, "load_generator", lambda *a, **k: pytest.fail("loaded the model"))
    options = Options(
        models / "model",
        PROMPTS,
        tmp_path / "g.png",
        height=SIZE,
        width=SIZE,
        control=(tmp_path / "control.png",),
        controlnet=("edges",),
    )
    with pytest.raises(SampleError, match=message):
        sample(options, log=quiet)


def test_cli_refuses_a_control_image_without_its_controlnet_with_exit_status_2(models, tmp_path, capsys):
    from perflow_jax.sample import main

    argv = ["--model", str(models / "model"), "--prompt", "a", "--out", str(tmp_path / "g.png")]
    assert main([*argv, "--control", str(models / "edges.png")]) == 2
    assert "error: 1 --control images for 0 --controlnet names" in capsys.readouterr().err
