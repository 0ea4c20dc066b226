"""python -m perflow_jax.convert: diffusers folders in, exact Flax parameters out, clear errors."""

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from perflow_jax import weights
from perflow_jax.convert import ConversionError, convert, main
from perflow_jax.pipeline import load_trained
from tests.helpers.fake_gcs import fake_gcs
from tests.helpers.parity import torch_state_dict
from tests.helpers.pipelines import quiet, tiny_pipeline
from tests.helpers.processes import library_logs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(folder, pipeline) of a tiny random SD pipeline written with save_pretrained."""
    folder = tmp_path_factory.mktemp("sd")
    pipe = tiny_pipeline(folder / "sources")
    pipe.save_pretrained(folder / "pipeline")
    return folder / "pipeline", pipe


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl")
    pipe = tiny_pipeline(folder / "sources", xl=True)
    pipe.save_pretrained(folder / "pipeline")
    return folder / "pipeline", pipe


def assert_component_equals_torch(out: Path, name: str, torch_module, dtype=np.float32):
    class_name, config, params = weights.read_component(out, name)
    assert class_name == type(torch_module).__name__
    expected = torch_state_dict(torch_module)
    actual = weights.params_to_state_dict(params)
    # transformers >= 5 keeps CLIPTextModel's state dict without the text_model. prefix.
    actual = {
        k.removeprefix("text_model.") if k.removeprefix("text_model.") in expected else k: v for k, v in actual.items()
    }
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key].dtype == dtype, key
        np.testing.assert_array_equal(actual[key], value.astype(dtype), err_msg=key)


def test_sd_pipeline_converts_exactly(sd, tmp_path):
    source, pipe = sd
    manifest = convert(source, tmp_path / "out", log=quiet)
    assert manifest["components"] == {
        "unet": "UNet2DConditionModel",
        "vae": "AutoencoderKL",
        "text_encoder": "CLIPTextModel",
        "tokenizer": "CLIPTokenizer",
        "scheduler": "DDPMScheduler",
    }
    for name in ("unet", "vae", "text_encoder"):
        assert_component_equals_torch(tmp_path / "out", name, getattr(pipe, name))
    assert json.loads((tmp_path / "out/scheduler/scheduler_config.json").read_text()) == json.loads(
        (source / "scheduler/scheduler_config.json").read_text()
    )
    assert sorted(os.listdir(tmp_path / "out/tokenizer")) == sorted(os.listdir(source / "tokenizer"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_sdxl_pipeline_converts_both_text_encoders_exactly(sdxl, tmp_path):
    source, pipe = sdxl
    convert(source, tmp_path / "out", log=quiet)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert_component_equals_torch(tmp_path / "out", name, getattr(pipe, name))
    assert (tmp_path / "out/tokenizer_2").is_dir()


def test_bfloat16_storage_holds_the_rounded_weights(sd, tmp_path):
    source, pipe = sd
    convert(source, tmp_path / "out", dtype="bfloat16", log=quiet)
    assert_component_equals_torch(tmp_path / "out", "unet", pipe.unet, dtype=ml_dtypes.bfloat16)


@pytest.mark.parametrize(
    "save_kwargs",
    [
        {"variant": "fp16"},  # diffusion_pytorch_model.fp16.safetensors, picked without --variant
        {"max_shard_size": "200KB"},  # sharded, with diffusion_pytorch_model.safetensors.index.json
        {"safe_serialization": False},  # pickled .bin, read with weights_only=True
    ],
    ids=["fp16-variant", "sharded", "bin"],
)
def test_weight_file_layouts_are_read(sd, tmp_path, save_kwargs):
    _, pipe = sd
    unet = copy.deepcopy(pipe.unet).to(torch.float16) if "variant" in save_kwargs else pipe.unet
    folder = tmp_path / "unet"
    unet.save_pretrained(folder, **save_kwargs)
    names = sorted(os.listdir(folder))
    state = weights.read_state_dict(folder)
    expected = torch_state_dict(unet)
    assert set(state) == set(expected), names
    for key, value in expected.items():
        np.testing.assert_array_equal(np.asarray(state[key]), value, err_msg=key)
    if "max_shard_size" in save_kwargs:
        assert sum(name.endswith(".safetensors") for name in names) > 1


def test_perflow_delta_is_added_to_the_unet(sd, tmp_path):
    source, pipe = sd
    base = torch_state_dict(pipe.unet)
    generator = torch.Generator().manual_seed(3)
    delta = {k: (0.01 * torch.randn(v.shape, generator=generator)).to(torch.float16) for k, v in base.items()}
    save_file(delta, tmp_path / "delta_weights.safetensors")
    convert(source, tmp_path / "out", perflow_delta=tmp_path / "delta_weights.safetensors", log=quiet)
    _, _, params = weights.read_component(tmp_path / "out", "unet")
    merged = weights.params_to_state_dict(params)
    for key, w in base.items():
        # The authors' merge: (W in the delta's dtype + delta), cast back to W's dtype.
        expected = (w.astype(np.float16) + delta[key].numpy()).astype(np.float32)
        np.testing.assert_array_equal(merged[key], expected, err_msg=key)
    assert json.loads((tmp_path / "out/perflow_model.json").read_text())["perflow_delta"].endswith(
        "delta_weights.safetensors"
    )


def test_with_a_delta_the_folder_is_a_perflow_student_for_the_sampler(sd, tmp_path):
    source, pipe = sd
    delta = {k: torch.zeros(v.shape) for k, v in pipe.unet.state_dict().items()}
    save_file(delta, tmp_path / "delta_weights.safetensors")
    convert(
        source,
        tmp_path / "out",
        perflow_delta=tmp_path / "delta_weights.safetensors",
        perflow_parameterization="ddim_eps",
        perflow_windows=3,
        log=quiet,
    )
    trained = load_trained(tmp_path / "out", networks=())
    assert trained.description.perflow == ("ddim_eps", 3)
    config = json.loads((tmp_path / "out/scheduler/scheduler_config.json").read_text())
    teacher = json.loads((source / "scheduler/scheduler_config.json").read_text())
    betas = ("beta_start", "beta_end", "beta_schedule")
    assert [config[k] for k in betas] == [teacher[k] for k in betas]
    without = convert(source, tmp_path / "plain", log=quiet)
    assert without["components"]["scheduler"] == teacher["_class_name"]
    assert load_trained(tmp_path / "plain", networks=()).description.perflow is None


def test_an_out_on_gs_is_converted_locally_and_copied_up_whole(sd, tmp_path):
    source, pipe = sd
    with fake_gcs(tmp_path / "gcs") as root:
        (root / "bucket/model/old").mkdir(parents=True)
        with pytest.raises(ConversionError, match="gs://bucket/model exists and is not empty"):
            convert(source, "gs://bucket/model", log=quiet)
        manifest = convert(source, "gs://bucket/model", overwrite=True, log=quiet)
    out = root / "bucket/model"
    assert json.loads((out / weights.CONVERTED_MANIFEST).read_text()) == manifest
    assert sorted(p.name for p in out.iterdir()) == sorted([*manifest["components"], weights.CONVERTED_MANIFEST])
    assert_component_equals_torch(out, "unet", pipe.unet)


def test_converted_folder_loads_without_torch(sd, tmp_path):
    source, _ = sd
    convert(source, tmp_path / "out", log=quiet)
    script = (
        "import sys; sys.modules['torch'] = None; sys.modules['diffusers'] = None\n"
        "from perflow_jax import models, weights\n"
        f"cls, cfg, params = weights.read_component({str(tmp_path / 'out')!r}, 'unet')\n"
        "model = models.from_config(cls, cfg)\n"
        "import jax; print(jax.tree.structure(params) == jax.tree.structure(model.abstract_params()))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("True")


def test_cli_converts_and_prints_a_line_per_component_with_torch_and_diffusers_absent(sd, tmp_path):
    """A safetensors folder converts where neither torch nor diffusers imports (a TPU VM's install)."""
    source, _ = sd
    script = (
        "import sys; sys.modules['torch'] = None; sys.modules['diffusers'] = None\n"
        "from perflow_jax import convert\n"
        f"assert convert.main(['--from', {str(source)!r}, '--out', {str(tmp_path / 'out')!r}]) == 0\n"
        "assert sys.modules['torch'] is None and sys.modules['diffusers'] is None\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[:3]] == ["unet", "vae", "text_encoder"]
    assert lines[-1].startswith("converted 3 networks") and "copied tokenizer, scheduler" in lines[-1]
    assert library_logs(result.stderr) == []


# ---- errors: each names the problem and the fix, and leaves nothing behind -----------------


def copy_of(source: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "source"
    shutil.copytree(source, copy)
    return copy


def assert_fails_cleanly(source, out, message, **kwargs):
    with pytest.raises((ConversionError, weights.WeightsFileError, weights.WeightsMismatchError), match=message):
        convert(source, out, log=quiet, **kwargs)
    assert not out.exists() or out.is_dir() and any(out.iterdir())  # nothing partial created
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no staging folder left


def test_missing_subfolder_is_named(sd, tmp_path):
    source = copy_of(sd[0], tmp_path)
    shutil.rmtree(source / "vae")
    assert_fails_cleanly(source, tmp_path / "out", "lists vae but .* has no vae/ subfolder: is the download complete")
    assert not (tmp_path / "out").exists()


def test_folder_without_model_index_is_refused(sd, tmp_path):
    assert_fails_cleanly(sd[0] / "unet", tmp_path / "out", "not a diffusers pipeline folder .no model_index.json")


def test_unknown_component_class_is_named(sd, tmp_path):
    source = copy_of(sd[0], tmp_path)
    index = json.loads((source / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet2DModel"]
    (source / "model_index.json").write_text(json.dumps(index))
    assert_fails_cleanly(source, tmp_path / "out", "gives unet the class 'UNet2DModel', which has no Flax twin")


def test_sdxl_weights_with_an_sd15_config_list_the_mismatched_keys(sd, sdxl, tmp_path):
    source = copy_of(sd[0], tmp_path)
    for name in ("diffusion_pytorch_model.safetensors",):
        shutil.copy(sdxl[0] / "unet" / name, source / "unet" / name)
    with pytest.raises(weights.WeightsMismatchError) as info:
        convert(source, tmp_path / "out", log=quiet)
    message = str(info.value)
    assert "the unet weights do not fit the unet config" in message
    for kind in ("missing keys", "unexpected keys", "mis-shaped keys"):
        assert kind in message
    assert "add_embedding.linear_1.weight" in message
    assert "SDXL weights with an SD1.5 config" in message
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors_is_reported(sd, tmp_path):
    source = copy_of(sd[0], tmp_path)
    file = source / "vae/diffusion_pytorch_model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    assert_fails_cleanly(source, tmp_path / "out", "vae/diffusion_pytorch_model.safetensors is truncated or corrupt")


def test_corrupt_safetensors_is_reported(sd, tmp_path):
    source = copy_of(sd[0], tmp_path)
    (source / "text_encoder/model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    assert_fails_cleanly(source, tmp_path / "out", "text_encoder/model.safetensors is truncated or corrupt")


def test_delta_with_other_keys_is_refused(sd, tmp_path):
    source, pipe = sd
    delta = {k: torch.zeros(v.shape) for k, v in pipe.unet.state_dict().items() if "down_blocks.0" not in k}
    delta["add_embedding.linear_1.weight"] = torch.zeros(4, 4)
    save_file(delta, tmp_path / "delta.safetensors")
    with pytest.raises(weights.WeightsMismatchError, match="the delta weights do not fit the UNet") as info:
        convert(source, tmp_path / "out", perflow_delta=tmp_path / "delta.safetensors", log=quiet)
    assert "missing keys" in str(info.value) and "add_embedding.linear_1.weight" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_non_empty_out_is_refused_without_overwrite(sd, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_fails_cleanly(sd[0], out, "exists and is not empty: choose another --out or pass --overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    convert(sd[0], out, overwrite=True, log=quiet)
    assert not (out / "keep.txt").exists() and (out / "unet/params").is_dir()


@pytest.mark.parametrize("out", ["source", ".", "source/converted"])
def test_an_out_over_the_source_is_refused_and_the_source_kept(sd, tmp_path, out):
    source = copy_of(sd[0], tmp_path)
    with pytest.raises(ConversionError, match=f"--out {tmp_path / out} (is|contains|lies inside) --from {source}, "):
        convert(source, tmp_path / out, overwrite=True, log=quiet)
    assert sorted(p.name for p in source.iterdir()) == sorted(p.name for p in sd[0].iterdir())


def test_invalid_json_in_the_source_is_named_with_its_line_and_column(sd, tmp_path):
    source = copy_of(sd[0], tmp_path)
    (source / "unet/config.json").write_text('{\n  "in_channels": 4,,\n}')
    assert_fails_cleanly(source, tmp_path / "out", f"{source}/unet/config.json is not valid JSON: .* line 2, column 20")


def test_staging_folders_of_a_killed_conversion_go_with_the_next_one(sd, tmp_path):
    stale = tmp_path / f".out.writing-{socket.gethostname()}-{2**31 - 1}"
    (stale / "unet").mkdir(parents=True)
    convert(sd[0], tmp_path / "out", log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_error_exits_2_with_the_message_on_stderr(tmp_path, capsys):
    assert main(["--from", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "error: " in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_pickled_file_that_needs_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"weight": Evil()}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(weights.WeightsFileError, match="weights_only=True"):
        weights.read_state_dict(tmp_path)
