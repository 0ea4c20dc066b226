"""load_model: converted and diffusers folders give the same model; the teacher's final alpha and SDXL's size ids."""

import diffusers
import jax
import numpy as np
import pytest

from perflow_jax import weights
from perflow_jax.convert import convert
from perflow_jax.pipeline import GenerateSettings, Generator, TextEncoders, load_model
from tests.helpers.pipelines import tiny_pipeline


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tiny_pipeline(root / "sources", xl=True).save_pretrained(root / "diffusers")
    convert(root / "diffusers", root / "converted", log=lambda _: None)
    return root / "diffusers", root / "converted"


def test_converted_and_diffusers_folders_load_the_same_model(folders):
    from_diffusers, from_converted = (load_model(folder) for folder in folders)
    assert from_converted.classes == from_diffusers.classes and from_converted.sdxl
    for name in from_converted.classes:
        assert jax.tree.structure(from_converted.params[name]) == jax.tree.structure(from_diffusers.params[name])
        for a, b in zip(
            jax.tree.leaves(from_converted.params[name]), jax.tree.leaves(from_diffusers.params[name]), strict=True
        ):
            np.testing.assert_array_equal(a, b)
    assert from_converted.scheduler_config == from_diffusers.scheduler_config
    assert from_converted.prediction_type() == "epsilon" and from_converted.alphas_cumprod().shape == (1000,)


def test_only_the_networks_asked_for_are_loaded(folders):
    for folder in folders:
        model = load_model(folder, networks=("vae",))
        assert list(model.params) == ["vae"] and model.module("vae").config.latent_channels == 4


def test_tokenize_gives_each_tokenizers_padded_ids(folders):
    model = load_model(folders[1], networks=())
    ids = model.tokenize(["a photo", ""])
    assert set(ids) == {"input_ids", "input_ids_2"} and ids["input_ids"].shape == (2, 77)
    expected = model.tokenizers["input_ids"]("a photo", padding="max_length", max_length=77)["input_ids"]
    np.testing.assert_array_equal(ids["input_ids"][0], expected)


def test_a_folder_that_is_no_model_is_named(tmp_path):
    with pytest.raises(weights.WeightsFileError, match="neither a converted model folder"):
        load_model(tmp_path)


def test_final_alpha_is_the_authors_ddim_scheduler_loaded_from_the_teachers_folder(folders):
    """tests/pipelines.py saves a DDPMScheduler, whose config has no set_alpha_to_one: DDIM's default, 1."""
    expected = diffusers.DDIMScheduler.from_pretrained(folders[0], subfolder="scheduler").final_alpha_cumprod
    for folder in folders:
        assert load_model(folder, networks=()).final_alpha_cumprod() == float(expected) == 1.0


@pytest.mark.parametrize("sdxl_time_ids", ["fixed", "original"])
def test_sdxl_size_ids_are_the_resolutions_or_each_examples_own(folders, sdxl_time_ids):
    """With "fixed" every example gets the authors' ``_compute_time_ids((res, res), (0, 0), (res, res))`` (their
    SDXL script, line 415); with "original" the batch's own original size and crop. Integers, exact in float32."""
    model = load_model(folders[1])
    text = TextEncoders(
        model.module("text_encoder"), model.module("text_encoder_2"), resolution=32, sdxl_time_ids=sdxl_time_ids
    )
    batch = {
        **model.tokenize(["a photo", "a cat"]),
        "original_size": np.array([[49, 58], [300, 200]], np.int32),
        "crop_top_left": np.array([[3, 0], [0, 7]], np.int32),
    }
    cond = text.encode(model.params, batch)
    if sdxl_time_ids == "fixed":
        expected = [[32, 32, 0, 0, 32, 32], [32, 32, 0, 0, 32, 32]]
    else:
        expected = [[49, 58, 3, 0, 32, 32], [300, 200, 0, 7, 32, 32]]
    np.testing.assert_array_equal(cond["time_ids"], np.array(expected, np.float32))


def test_unknown_sdxl_size_ids_are_named(folders):
    with pytest.raises(ValueError, match="sdxl_time_ids is 'crop': use one of fixed, original"):
        TextEncoders(None, sdxl_time_ids="crop")


def test_nan_or_infinite_guidance_is_refused():
    for guidance in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"guidance {guidance}: give a finite scale"):
            GenerateSettings(guidance=guidance)


def test_initial_noise_with_a_nan_is_refused_before_anything_runs():
    noise = np.zeros((2, 4, 4, 4), np.float32)
    noise[1, 0, 0, 0], noise[0, 1, 1, 1] = np.nan, np.inf
    with pytest.raises(ValueError, match="the initial noise holds 2 NaN or infinite values"):
        Generator.inputs(None, ["a", "b"], noise)  # refused before the generator's parts are used


def test_init_images_of_another_count_than_the_prompts_are_refused_before_anything_runs():
    noise, init_images = np.zeros((3, 4, 4, 4), np.float32), np.zeros((2, 32, 32, 3), np.float32)
    with pytest.raises(ValueError, match="2 init images but 3 prompts: give one init image each"):
        Generator.inputs(None, ["a", "b", "c"], noise, init_images=init_images)
