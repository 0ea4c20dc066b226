"""load_model: converted and diffusers folders give the same model."""

import jax
import numpy as np
import pytest

from perflow_jax import weights
from perflow_jax.convert import convert
from perflow_jax.pipeline import load_model
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
