"""LoRA students (perflow_jax.lora): the recipe keys, peft's adapters on the Flax UNet, LoRA files, the LoRA step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from perflow_jax import lora, recipe, weights
from perflow_jax.models.unet import UNet2DConditionModel, UNetConfig
from tests.helpers.networks import QUICK_UNET, TINY_UNETS
from tests.helpers.parity import (
    FLOAT32_NETWORK_RTOL,
    converted,
    flax_args,
    nhwc_to_nchw,
    random_inputs,
    random_torch_unet,
    relative_error,
)
from tests.helpers.pipelines import tiny_pipeline
from tests.helpers.recipes import load


def random_adapters(params, rank=4, seed=1):
    """Adapters of the authors' modules with A and B both random (B is zero at init), for parity checks."""
    rng = np.random.default_rng(seed)
    fresh = lora.init_adapters(jax.random.key(0), params, lora.LoraSpec(rank, 8.0))
    return jax.tree.map(lambda x: 0.1 * rng.standard_normal(x.shape).astype(np.float32), fresh)


# --- the recipe's keys ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl", "tiny", "demo"])
def test_the_recipes_train_the_whole_unet_and_name_the_authors_lora_settings(name):
    model = load(name).model
    assert model.lora_rank == 0 and lora.spec(model) is None
    assert (model.lora_alpha, tuple(model.lora_targets), model.lora_dropout) == (8.0, lora.DEFAULT_TARGETS, 0.0)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lora_dropout", 0.1, "config.model.lora_dropout is 0.1: only 0 is supported"),
        ("lora_rank", -1, "config.model.lora_rank is -1: use 0 (train the whole UNet) or a rank"),
        ("lora_alpha", 0.0, "config.model.lora_alpha is 0.0: use a positive"),
        ("lora_targets", (), "config.model.lora_targets is (): name UNet modules"),
        ("student_init", "/models/other", "a LoRA student adapts the teacher itself"),
    ],
)
def test_lora_settings_that_cannot_run_are_refused(key, value, message):
    config = load("tiny")
    config.model.path, config.data.path = "/models/teacher", "/data/prepared"
    config.model.lora_rank = 8
    config.model[key] = value
    with pytest.raises(recipe.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        recipe.validate(config)


def test_a_workdir_saved_before_lora_existed_resumes_as_a_full_run_only():
    saved = {"model": {"path": "/m", "remat": "none"}}
    now = load("tiny").to_dict()
    now_model = {k: v for k, v in now["model"].items() if k.startswith("lora_")}
    recipe.check_resumable(saved, {"model": {"path": "/m", "remat": "none", **now_model}})
    with pytest.raises(recipe.ResumeError, match="model.lora_rank: 0 saved, 8 now"):
        recipe.check_resumable(saved, {"model": {"path": "/m", "remat": "none", **now_model, "lora_rank": 8}})


# --- adapters on the Flax UNet ----------------------------------------------------------------


def test_new_adapters_sit_where_peft_puts_them_with_kaiming_uniform_a_and_zero_b():
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = random_torch_unet(TINY_UNETS["sd1"])
    _, params = converted(unet)
    unet.add_adapter(LoraConfig(r=4, target_modules=list(lora.DEFAULT_TARGETS)))
    peft_shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(unet).items()}
    state = weights.params_to_state_dict(lora.init_adapters(jax.random.key(0), params, lora.LoraSpec(4, 8.0)))
    assert {k: v.shape for k, v in state.items()} == peft_shapes  # the same modules, names and layouts
    a = state["down_blocks.0.resnets.0.conv1.lora_A.weight"]  # Conv2d(32, 4, 3): [r, in, kh, kw]
    bound = 1 / np.sqrt(32 * 9)  # kaiming_uniform_(a=sqrt(5)): U(-1 / sqrt(fan_in), 1 / sqrt(fan_in))
    assert bound * 0.95 < np.abs(a).max() <= bound and abs(a.mean()) < 0.1 * bound
    assert all(not v.any() for k, v in state.items() if "lora_B" in k)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_at_init_the_lora_student_is_its_base_bit_for_bit(dtype):
    unet = UNet2DConditionModel(UNetConfig.from_dict(QUICK_UNET))
    inputs = unet.dummy_inputs(text_len=8)
    base = weights.cast_params(unet.init(jax.random.key(0), *inputs)["params"], dtype)
    adapters = lora.init_adapters(jax.random.key(1), base, lora.LoraSpec(4, 8.0))
    x = jax.random.normal(jax.random.key(2), inputs[0].shape)
    apply = jax.jit(lambda p: unet.apply({"params": p}, x, jnp.array([500.0]), inputs[2]))
    merged = jax.jit(lambda b, a: lora.merge(b, a, 2.0))(base, adapters)
    np.testing.assert_array_equal(apply(merged), apply(base))


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_the_lora_unet_computes_what_diffusers_computes_with_the_same_peft_lora(arch, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = random_torch_unet(TINY_UNETS[arch])
    model, base = converted(unet)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=6, target_modules=list(lora.DEFAULT_TARGETS)))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn_like(p))  # B nonzero too, so that every adapter shows
    inputs = random_inputs(unet, batch=2, size=16)
    with torch.no_grad():
        expected = unet(**inputs).sample.numpy()
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    adapters, scales = lora.read(tmp_path / lora.LORA_FILE, base)
    assert set(scales.values()) == {6 / 4}
    merged = lora.merge(base, adapters, scales)  # on the host, numpy
    actual = jax.jit(model.apply)({"params": merged}, *flax_args(inputs))
    assert relative_error(nhwc_to_nchw(actual), expected) < FLOAT32_NETWORK_RTOL
    # The merge under jit (the training step's) is the host's, up to float32 rounding.
    traced = jax.jit(lambda b, a: lora.merge(b, a, 1.5))(base, adapters)
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(traced), strict=True):
        np.testing.assert_allclose(np.asarray(y), x, rtol=0, atol=1e-6)
    # diffusers' merged (fused) form equals its unmerged one.
    unet.fuse_lora()
    with torch.no_grad():
        assert relative_error(unet(**inputs).sample.numpy(), expected) < FLOAT32_NETWORK_RTOL


@pytest.mark.parametrize("fmt", lora.FORMATS)
def test_a_saved_lora_loads_in_diffusers_as_the_jax_lora_unet_and_reads_back_exactly(fmt, tmp_path):
    pipe = tiny_pipeline(tmp_path / "sources")
    model, base = converted(pipe.unet)
    spec = lora.LoraSpec(4, 8.0)
    adapters = random_adapters(base)
    lora.save(adapters, spec, tmp_path / lora.LORA_FILE, fmt)
    inputs = random_inputs(pipe.unet, batch=2, size=16)
    pipe.load_lora_weights(tmp_path)
    pipe.fuse_lora()
    with torch.no_grad():
        expected = pipe.unet(**inputs).sample.numpy()
    actual = jax.jit(model.apply)({"params": lora.merge(base, adapters, spec.scale)}, *flax_args(inputs))
    assert relative_error(nhwc_to_nchw(actual), expected) < FLOAT32_NETWORK_RTOL
    read, scales = lora.read(tmp_path / lora.LORA_FILE, base)
    assert set(scales.values()) == {2.0}
    for x, y in zip(jax.tree.leaves(adapters), jax.tree.leaves(read), strict=True):
        np.testing.assert_array_equal(x, y)


def test_a_lora_of_another_unet_is_refused_naming_its_keys(tmp_path):
    small = UNet2DConditionModel(UNetConfig.from_dict(QUICK_UNET)).abstract_params()
    big = UNet2DConditionModel(UNetConfig.from_dict(TINY_UNETS["sd1"])).abstract_params()
    lora.save(random_adapters(big), lora.LoraSpec(4, 8.0), tmp_path / "big.safetensors")
    with pytest.raises(weights.WeightsMismatchError, match=r"keys match no module of this UNet \(e.g. unet.down_bl"):
        lora.read(tmp_path / "big.safetensors", small)
    with pytest.raises(weights.WeightsMismatchError, match=r"adapters do not fit this UNet's kernels"):
        lora.read(tmp_path / "big.safetensors", jax.tree.map(lambda x: np.zeros(x.shape[:-1] + (2,)), big))
    weights.save_safetensors({"text_encoder.x.lora_A.weight": np.zeros((4, 4), np.float32)}, tmp_path / "te.sft")
    with pytest.raises(weights.WeightsMismatchError, match="1 of its keys match no module.*text_encoder.x.lora_A"):
        lora.read(tmp_path / "te.sft", small)


def test_a_lora_flag_is_a_file_and_an_optional_scale(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"")
    assert lora.parse_file_arg(f"{tmp_path}/a.safetensors:0.5") == (tmp_path / "a.safetensors", 0.5)
    assert lora.parse_file_arg(f"{tmp_path}/a.safetensors") == (tmp_path / "a.safetensors", 1.0)
    with pytest.raises(weights.WeightsFileError, match=f"--lora {tmp_path}/b.safetensors does not exist"):
        lora.parse_file_arg(f"{tmp_path}/b.safetensors:2")


# --- the training step ------------------------------------------------------------------------
