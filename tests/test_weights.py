"""The weight rule table, the diffusers UNet folder writer and the commands' output folders and JSON files."""

import json
import os
import socket
import stat

import diffusers
import ml_dtypes
import numpy as np
import pytest
import torch

from perflow_jax import weights
from perflow_jax.models.unet import UNet2DConditionModel, UNetConfig
from tests.helpers.networks import TINY_UNETS
from tests.helpers.parity import random_torch_unet, torch_state_dict


def test_leaf_rules_transpose_convolutions_and_dense_kernels():
    rng = np.random.default_rng(0)
    params = {
        "conv": {"kernel": rng.standard_normal((3, 3, 4, 8)), "bias": rng.standard_normal(8)},
        "to_out.0": {"kernel": rng.standard_normal((8, 5))},
        "norm": {"scale": rng.standard_normal(8)},
        "token_embedding": {"embedding": rng.standard_normal((10, 8))},
    }
    state = weights.params_to_state_dict(params)
    np.testing.assert_array_equal(state["conv.weight"], params["conv"]["kernel"].transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(state["to_out.0.weight"], params["to_out.0"]["kernel"].T)
    np.testing.assert_array_equal(state["norm.weight"], params["norm"]["scale"])
    np.testing.assert_array_equal(state["token_embedding.weight"], params["token_embedding"]["embedding"])
    back = weights.state_dict_to_params(state, params)
    for path in weights.flatten(params):
        np.testing.assert_array_equal(weights.flatten(back)[path], weights.flatten(params)[path])


def test_text_model_prefix_is_optional_when_reading():
    template = {"text_model": {"final_layer_norm": {"scale": np.zeros(4), "bias": np.zeros(4)}}}
    state = {"final_layer_norm.weight": np.ones(4), "final_layer_norm.bias": np.full(4, 2.0)}
    params = weights.state_dict_to_params(state, template)
    np.testing.assert_array_equal(params["text_model"]["final_layer_norm"]["bias"], np.full(4, 2.0))


def test_position_ids_buffer_is_ignored():
    template = {"a": {"bias": np.zeros(2)}}
    params = weights.state_dict_to_params({"a.bias": np.ones(2), "embeddings.position_ids": np.arange(77)}, template)
    np.testing.assert_array_equal(params["a"]["bias"], np.ones(2))


def architecture(config) -> dict:
    """A diffusers config without its bookkeeping keys, lists and tuples alike."""
    return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))


@pytest.mark.parametrize("dtype, torch_dtype", [("float32", torch.float32), ("float16", torch.float16)])
def test_written_unet_folder_loads_in_diffusers_with_equal_tensors(tmp_path, dtype, torch_dtype):
    unet = random_torch_unet(TINY_UNETS["sdxl"])
    model = UNet2DConditionModel(UNetConfig.from_dict(dict(unet.config)))
    params = weights.state_dict_to_params(torch_state_dict(unet), model.abstract_params())
    weights.write_diffusers_unet(params, dict(unet.config), tmp_path / "unet", dtype=dtype)
    loaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet", torch_dtype=torch_dtype)
    assert architecture(loaded.config) == architecture(unet.config)
    expected = torch_state_dict(unet)
    actual = torch_state_dict(loaded)
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        # float32: bit for bit; float16: exactly the cast of the float32 weights.
        np.testing.assert_array_equal(actual[key], value.astype(weights.DTYPES[dtype]), err_msg=key)


def test_bfloat16_unet_folder_holds_the_rounded_weights(tmp_path):
    unet = random_torch_unet(TINY_UNETS["sd1"])
    state = torch_state_dict(unet)
    model = UNet2DConditionModel(UNetConfig.from_dict(dict(unet.config)))
    weights.write_diffusers_unet(
        weights.state_dict_to_params(state, model.abstract_params()), dict(unet.config), tmp_path, dtype="bfloat16"
    )
    loaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    for key, value in loaded.state_dict().items():
        assert value.dtype == torch.bfloat16
        np.testing.assert_array_equal(value.float().numpy(), state[key].astype(ml_dtypes.bfloat16).astype(np.float32))


# ---- output folders: never over an input, never into a folder that takes no file ----------


@pytest.mark.parametrize(
    "out, relation",
    [
        ("model", "is"),
        (".", "contains"),
        ("model/export", "lies inside"),
        ("link", "is"),
        ("link/export", "lies inside"),
    ],
)
def test_an_out_that_is_contains_or_lies_inside_an_input_is_refused_naming_both(tmp_path, out, relation):
    (tmp_path / "model").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "model")
    with pytest.raises(ValueError) as info:
        weights.check_out(tmp_path / out, {"--model": tmp_path / "model", "--base": None}, ValueError)
    assert str(info.value) == (
        f"--out {tmp_path / out} {relation} --model {tmp_path / 'model'}, which this command reads: "
        "write the output elsewhere"
    )


def test_an_out_beside_its_inputs_or_naming_a_missing_input_passes(tmp_path):
    (tmp_path / "model").mkdir()
    inputs = {"--model": tmp_path / "model", "--input": "tfds:mnist", "--from": tmp_path / "gone"}
    weights.check_out(tmp_path / "model-export", inputs, ValueError)
    weights.check_out(tmp_path / "gone/out", inputs, ValueError)  # lies inside an input that does not exist


def test_an_out_below_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=f"--save-noise {tmp_path}/file/a/n.npy cannot be written: {tmp_path}/file: "):
        weights.check_out(tmp_path / "file/a/n.npy", {}, ValueError, "--save-noise")


def test_an_out_in_a_read_only_folder_is_refused(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    if os.access(tmp_path / "ro", os.W_OK):
        pytest.skip("this user (root) may write into a read-only folder")
    with pytest.raises(
        ValueError, match=f"--out {tmp_path}/ro/out cannot be written: {tmp_path}/ro: Permission denied"
    ):
        weights.check_out(tmp_path / "ro/out", {}, ValueError)


def test_staging_folders_left_by_dead_processes_of_this_host_are_removed_and_others_kept(tmp_path):
    host, dead, alive = socket.gethostname(), 2**31 - 1, os.getppid()  # no pid reaches 2**31 - 1
    names = [f".out.writing-{host}-{dead}", f".out.replaced-{host}-{dead}", f".out.writing-{host}-{alive}",
             f".out.writing-otherhost-{dead}", f".output.writing-{host}-{dead}", ".out.txt"]  # fmt: skip
    for name in names:
        (tmp_path / name).mkdir()
    logged = []
    staging = weights.staging_folder(tmp_path / "out", logged.append)
    assert staging == tmp_path / f".out.writing-{host}-{os.getpid()}" and staging.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([staging.name, *names[2:]])
    why = f"left by a run that stopped while writing {tmp_path / 'out'} (process {dead} is gone)"
    assert sorted(logged) == [f"removed {tmp_path / name}, {why}" for name in sorted(names[:2])]


def test_invalid_json_is_named_with_its_line_and_column(tmp_path):
    (tmp_path / "config.json").write_text('{\n  "a": 1,\n  "b": \n}\n')
    with pytest.raises(weights.WeightsFileError) as info:
        weights.read_json(tmp_path / "config.json")
    assert str(info.value) == (
        f"{tmp_path / 'config.json'} is not valid JSON: Expecting value at line 4, column 1: "
        "repair the file or copy it again"
    )


@pytest.mark.parametrize(
    "content, message", [(b"[1, 2]", "holds a JSON list, not an object"), (b'{"a": "\xff"}', "is not UTF-8 text")]
)
def test_json_that_is_no_object_or_no_utf8_is_named(tmp_path, content, message):
    (tmp_path / "x.json").write_bytes(content)
    with pytest.raises(weights.WeightsFileError, match=message):
        weights.read_json(tmp_path / "x.json")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_safetensors_files_get_the_mode_of_a_plain_open_under_the_umask(tmp_path, umask):
    before = os.umask(umask)
    try:
        weights.save_safetensors({"a": np.arange(3, dtype=np.float32)}, tmp_path / "a.safetensors")
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "a.safetensors").stat().st_mode) == 0o666 & ~umask
