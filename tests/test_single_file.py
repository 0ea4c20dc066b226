"""Single-file checkpoints (the original LDM / A1111 layout): converted in, exported out, refused clearly."""

import os
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from perflow_jax import compile_cache, single_file, weights
from perflow_jax.convert import ConversionError, convert
from perflow_jax.export import export_to_torch
from perflow_jax.sample import Options, sample
from tests.helpers.networks import TINY_TEXT
from tests.helpers.parity import torch_state_dict
from tests.helpers.pipelines import quiet, tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
NETWORKS = {False: ("unet", "vae", "text_encoder"), True: ("unet", "vae", "text_encoder", "text_encoder_2")}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """diffusers' from_single_file may not reach the hub: everything it reads comes from the base folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def states_and_configs(pipe, folder: Path, xl: bool):
    """({name: diffusers state dict}, {name: config}) of a pipeline saved in ``folder``."""
    names = NETWORKS[xl]
    return (
        {name: torch_state_dict(getattr(pipe, name)) for name in names},
        {name: weights.read_json(folder / name / "config.json") for name in names},
    )


def without_text_model_prefix(state):
    """transformers >= 5 saves CLIPTextModel without the text_model. prefix; compare without it."""
    return {key.removeprefix("text_model."): value for key, value in state.items()}


@pytest.fixture(scope="module", params=[False, True], ids=["sd", "sdxl"])
def original(request, tmp_path_factory):
    """(xl, diffusers folder, its pipeline, the same weights as one original-layout .safetensors)."""
    xl, root = request.param, tmp_path_factory.mktemp("original")
    pipe = tiny_pipeline(root / "sources", xl=xl)
    pipe.save_pretrained(root / "pipeline")
    states, configs = states_and_configs(pipe, root / "pipeline", xl)
    save_file(single_file.original_state_dict(states, configs), root / "model.safetensors")
    return xl, root / "pipeline", pipe, root / "model.safetensors"


@pytest.fixture(scope="module")
def fine_tune(tmp_path_factory):
    """(SD base folder, a fine-tune of its architecture with other weights as one original-layout file,
    the fine-tune's pipeline). The file holds the fine-tune's UNet as EMA weights beside its other UNet
    weights (which are the base's), as LDM training checkpoints do."""
    root = tmp_path_factory.mktemp("fine_tune")
    base = tiny_pipeline(root / "base_sources")
    base.save_pretrained(root / "base")
    tuned = tiny_pipeline(root / "tuned_sources", seed=1)
    states, configs = states_and_configs(tuned, root / "base", xl=False)
    original = single_file.original_state_dict({**states, "unet": torch_state_dict(base.unet)}, configs)
    ema = single_file.original_state_dict({"unet": states["unet"]}, configs)
    # LDM's EMA keys: the UNet key without "model." and without dots.
    original.update({"model_ema." + "".join(key.split(".")[1:]): value for key, value in ema.items()})
    save_file(original, root / "tuned.safetensors")
    return root / "base", root / "tuned.safetensors", tuned, base


def test_original_layout_reads_back_through_diffusers_conversion_exactly(original):
    xl, folder, pipe, file = original
    states, configs = states_and_configs(pipe, folder, xl)
    checkpoint = single_file.read_checkpoint(file)
    for name in NETWORKS[xl]:
        read = without_text_model_prefix(single_file.network_state(checkpoint, name, configs[name]))
        expected = without_text_model_prefix(states[name])
        assert read.keys() == expected.keys(), name
        for key, value in expected.items():
            np.testing.assert_array_equal(read[key], value, err_msg=f"{name} {key}")


def test_a_ckpt_reads_as_the_same_tensors_as_its_safetensors(original, tmp_path):
    file = original[3]
    tensors = single_file.read_checkpoint(file)
    torch.save({"state_dict": {key: tensors[key] for key in tensors}, "global_step": 7}, tmp_path / "model.ckpt")
    pickled = single_file.read_checkpoint(tmp_path / "model.ckpt")  # LDM's wrapping, unwrapped
    assert pickled.keys() == set(tensors)
    for key in tensors:
        assert torch.equal(pickled[key], tensors[key]), key


def test_sd2_openclip_text_encoder_round_trips_with_q_k_v_fused():
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(**{**TINY_TEXT, "hidden_act": "gelu"})  # gelu: OpenCLIP, SD2's
    state = torch_state_dict(transformers.CLIPTextModel(config))
    original = single_file.original_state_dict({"text_encoder": state}, {"text_encoder": config.to_dict()})
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in original
    checkpoint = {key: torch.from_numpy(value) for key, value in original.items()}
    read = without_text_model_prefix(single_file.network_state(checkpoint, "text_encoder", config.to_dict()))
    expected = without_text_model_prefix(state)
    assert read.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(read[key], value, err_msg=key)


def test_written_file_loads_in_diffusers_from_single_file_offline(original):
    xl, folder, pipe, file = original
    cls = diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline
    loaded = cls.from_single_file(str(file), config=str(folder), local_files_only=True)
    for name in NETWORKS[xl]:
        read = without_text_model_prefix(torch_state_dict(getattr(loaded, name)))
        expected = without_text_model_prefix(torch_state_dict(getattr(pipe, name)))
        assert read.keys() == expected.keys(), name
        for key, value in expected.items():
            np.testing.assert_array_equal(read[key], value, err_msg=f"{name} {key}")


def test_single_file_converts_to_the_fine_tunes_weights_with_the_bases_configs(fine_tune, tmp_path):
    base, file, tuned, _ = fine_tune
    manifest = convert(file, tmp_path / "out", base=base, log=quiet)
    assert manifest["single_file"] == {
        "file": str(file.resolve()),
        "base": str(base.resolve()),
        "ema": True,
        "from_base": [],
    }
    for name in ("unet", "vae", "text_encoder"):  # the EMA UNet is the fine-tune's, the other UNet the base's
        _, _, params = weights.read_component(tmp_path / "out", name)
        actual = without_text_model_prefix(weights.params_to_state_dict(params))
        expected = without_text_model_prefix(torch_state_dict(getattr(tuned, name)))
        assert actual.keys() == expected.keys(), name
        for key, value in expected.items():
            np.testing.assert_array_equal(actual[key], value, err_msg=f"{name} {key}")
    assert sorted(os.listdir(tmp_path / "out/tokenizer")) == sorted(os.listdir(base / "tokenizer"))


def test_no_ema_takes_the_other_unet_weights(fine_tune):
    base, file, tuned, base_pipe = fine_tune
    checkpoint, config = single_file.read_checkpoint(file), weights.read_json(base / "unet/config.json")
    for ema, pipe in ((True, tuned), (False, base_pipe)):
        state = single_file.network_state(checkpoint, "unet", config, ema=ema)
        for key, value in torch_state_dict(pipe.unet).items():
            np.testing.assert_array_equal(state[key], value, err_msg=key)


def test_a_unet_only_file_takes_the_other_networks_from_the_base(fine_tune, tmp_path):
    base, _, tuned, base_pipe = fine_tune
    configs = {"unet": weights.read_json(base / "unet/config.json")}
    save_file(
        single_file.original_state_dict({"unet": torch_state_dict(tuned.unet)}, configs), tmp_path / "u.safetensors"
    )
    manifest = convert(tmp_path / "u.safetensors", tmp_path / "out", base=base, log=quiet)
    assert manifest["single_file"]["from_base"] == ["vae", "text_encoder"]
    assert manifest["single_file"]["ema"] is False
    _, _, vae = weights.read_component(tmp_path / "out", "vae")
    for key, value in torch_state_dict(base_pipe.vae).items():
        np.testing.assert_array_equal(weights.params_to_state_dict(vae)[key], value, err_msg=key)


# ---- the plug-and-play workflow: a fine-tune + the PeRFlow delta -> sample in 4 steps -> single file out ----


@pytest.fixture(scope="module")
def plug_and_play(fine_tune, tmp_path_factory):
    """The CLI's `convert --from FINE_TUNE.safetensors --base SD_DIR --perflow-delta DELTA`: (out, delta)."""
    base, file, _, _ = fine_tune
    root = tmp_path_factory.mktemp("plug_and_play")
    rng = np.random.default_rng(0)
    unet = weights.SafetensorsStateDict([base / "unet/diffusion_pytorch_model.safetensors"])
    delta = {key: (0.01 * rng.standard_normal(unet[key].shape)).astype(np.float32) for key in unet}
    save_file(delta, root / "delta_weights.safetensors")
    command = [sys.executable, "-m", "perflow_jax.convert", "--from", str(file), "--base", str(base)]
    command += ["--perflow-delta", str(root / "delta_weights.safetensors"), "--out", str(root / "out")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "UNet from its EMA weights; it holds both: choose with --ema / --no-ema" in result.stdout
    return root / "out", delta


def test_plug_and_play_unet_is_the_fine_tune_plus_the_delta_and_samples_in_4_steps(plug_and_play, fine_tune, tmp_path):
    out, delta = plug_and_play
    _, _, tuned, _ = fine_tune
    _, _, params = weights.read_component(out, "unet")
    merged = weights.params_to_state_dict(params)
    for key, w in torch_state_dict(tuned.unet).items():
        np.testing.assert_array_equal(merged[key], w + delta[key], err_msg=key)
    with compile_cache.cache_in(tmp_path / "cache", min_compile_secs=0):
        output = sample(
            Options(out, ["a photo number 1"], tmp_path / "grid.png", steps=4, height=32, width=32), log=quiet
        )
    images = np.asarray(output.images)
    assert images.shape == (1, 32, 32, 3) and np.all(np.isfinite(images)) and np.std(images) > 0
    assert (tmp_path / "grid.png").is_file()


def test_export_single_file_loads_in_diffusers_with_the_student_and_the_bases_networks(
    plug_and_play, fine_tune, tmp_path
):
    out, _ = plug_and_play
    base, _, _, base_pipe = fine_tune
    export_to_torch(out, tmp_path / "export", base=base, dtype="float32", single_file=True, log=quiet)
    file = tmp_path / "export" / single_file.EXPORT_FILE
    loaded = diffusers.StableDiffusionPipeline.from_single_file(str(file), config=str(base), local_files_only=True)
    _, _, params = weights.read_component(out, "unet")
    for name, expected in (("unet", weights.params_to_state_dict(params)), ("vae", torch_state_dict(base_pipe.vae))):
        read = torch_state_dict(getattr(loaded, name))
        assert read.keys() == expected.keys(), name
        for key, value in expected.items():
            np.testing.assert_array_equal(read[key], value, err_msg=f"{name} {key}")


# ---- bad input: one line each, naming the problem and the fix ------------------------------------


def test_keys_of_no_known_layout_name_the_closest_and_its_missing_keys(fine_tune, tmp_path):
    base, _, tuned, _ = fine_tune
    save_file(torch_state_dict(tuned.unet), tmp_path / "diffusers_unet.safetensors")  # diffusers' names, not LDM's
    with pytest.raises(ConversionError) as info:
        convert(tmp_path / "diffusers_unet.safetensors", tmp_path / "out", base=base, log=quiet)
    message = str(info.value)
    assert "matches no known single-file layout: the closest is sd15, which lacks " in message
    assert "model.diffusion_model.input_blocks.0.0.weight, first_stage_model.encoder.conv_in.weight" in message
    assert "\n" not in message and not (tmp_path / "out").exists()


def test_an_sdxl_file_with_config_sd15_is_refused_naming_the_shape(tmp_path):
    key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    save_file({key: np.zeros((640, 2048), np.float16)}, tmp_path / "xl.safetensors")
    with pytest.raises(ConversionError) as info:
        convert(tmp_path / "xl.safetensors", tmp_path / "out", config="sd15", log=quiet)
    assert str(info.value) == (
        f"{tmp_path / 'xl.safetensors'} does not fit --config sd15: {key} is (640, 2048), cross-attention width 2048 "
        "(sdxl), but the UNet config has 768: use --config sdxl or a --base of that architecture"
    )


def test_config_without_base_names_the_missing_tokenizer_files(tmp_path):
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    save_file({key: np.zeros((320, 768), np.float16)}, tmp_path / "sd15.safetensors")
    with pytest.raises(ConversionError, match=r"tokenizer/vocab.json, tokenizer/merges.txt.*add --base DIFFUSERS_DIR"):
        convert(tmp_path / "sd15.safetensors", tmp_path / "out", config="sd15", log=quiet)


def test_a_ckpt_with_pickled_code_is_refused_in_one_line(fine_tune, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"state_dict": {"model.diffusion_model.x": Evil()}}, tmp_path / "evil.ckpt")
    with pytest.raises(weights.WeightsFileError) as info:
        convert(tmp_path / "evil.ckpt", tmp_path / "out", base=fine_tune[0], log=quiet)
    assert str(info.value) == (
        f"{tmp_path / 'evil.ckpt'} cannot be read as a PyTorch state dict with weights_only=True (it needs the code "
        "print to load); pickled files that need code to load are refused (loading could run it): use its "
        "safetensors version"
    )


def test_ema_on_a_file_without_ema_weights_is_refused(fine_tune, tmp_path):
    base, _, tuned, _ = fine_tune
    configs = {"unet": weights.read_json(base / "unet/config.json")}
    save_file(
        single_file.original_state_dict({"unet": torch_state_dict(tuned.unet)}, configs), tmp_path / "u.safetensors"
    )
    with pytest.raises(ConversionError, match=r"--ema: .*u.safetensors holds no EMA weights \(model_ema.\*\)"):
        convert(tmp_path / "u.safetensors", tmp_path / "out", base=base, ema=True, log=quiet)


def test_single_file_options_with_a_folder_are_refused(fine_tune, tmp_path):
    base = fine_tune[0]
    with pytest.raises(ConversionError, match="are for a single-file --from"):
        convert(base, tmp_path / "out", base=base, log=quiet)
    assert not (tmp_path / "out").exists()
