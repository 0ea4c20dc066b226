"""The Flax CLIP text encoders against transformers' CLIPTextModel / CLIPTextModelWithProjection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from perflow_jax.models import reference_configs
from perflow_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, eos_positions
from perflow_jax.weights import WeightsMismatchError, state_dict_to_params
from tests.helpers.networks import TINY_TEXT
from tests.helpers.parity import FLOAT32_NETWORK_RTOL, relative_error, torch_state_dict

BOS, EOT = 49406, 49407  # CLIP tokenizer's start- and end-of-text ids
ADDED_TOKEN = 49409  # a token added after the vocabulary, id above EOT

# The text_encoder/config.json files of SD1.5, SD2.1 and SDXL base (text_encoder_2), with their
# bookkeeping keys; all say eos_token_id 2, written before transformers PR #24773.
SD15_TEXT_ENCODER = {
    **reference_configs.SD15_TEXT_ENCODER,
    "_name_or_path": "openai/clip-vit-large-patch14",
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "model_type": "clip_text_model",
    "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0",
}
SD21_TEXT_ENCODER = {**SD15_TEXT_ENCODER, **reference_configs.SD21_TEXT_ENCODER, "transformers_version": "4.25.0.dev0"}
SDXL_TEXT_ENCODER_2 = {
    **SD15_TEXT_ENCODER,
    **reference_configs.SDXL_TEXT_ENCODER_2,
    "architectures": ["CLIPTextModelWithProjection"],
    "torch_dtype": "float16",
    "transformers_version": "4.32.0.dev0",
}

TORCH_MODELS = {
    CLIPTextModel: transformers.CLIPTextModel,
    CLIPTextModelWithProjection: transformers.CLIPTextModelWithProjection,
}


def tiny_config(hidden_act: str, eos_token_id: int, num_hidden_layers: int = 3) -> dict:
    """TINY_TEXT as a CLIPTextConfig dict with CLIP's token ids and vocabulary size; the vocabulary
    holds ADDED_TOKEN when eos is the real end-of-text id."""
    return transformers.CLIPTextConfig(
        **{
            **TINY_TEXT,
            "vocab_size": 49408 if eos_token_id == 2 else ADDED_TOKEN + 1,
            "num_hidden_layers": num_hidden_layers,
            "hidden_act": hidden_act,
            "eos_token_id": eos_token_id,
            "bos_token_id": BOS,
        }
    ).to_dict()


def prompt_ids(length: int, with_added_token: bool) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizer-like ids [3, length] int32 and the index of each row's first EOT, [3].

    Rows are BOS, words, EOT, then padding: EOT (SD1.5's tokenizer), 0 (SDXL's tokenizer_2), or none.
    Every row holds token 2 before its EOT, so pooling at the first 2 would differ from pooling
    at EOT; ``with_added_token`` puts ADDED_TOKEN among the words, so pooling at the highest id
    would differ too.
    """
    rng = np.random.default_rng(0)
    ids = np.zeros((3, length), np.int32)
    eot = np.array([5, 9, length - 1])
    for row, (end, pad) in enumerate(zip(eot, (EOT, 0, None), strict=True)):
        ids[row, 0] = BOS
        ids[row, 1:end] = rng.integers(3, 49000, end - 1)
        ids[row, 2] = 2
        if with_added_token:
            ids[row, 3] = ADDED_TOKEN
        ids[row, end] = EOT
        if pad is not None:
            ids[row, end + 1 :] = pad
    return ids, eot


def load_params(torch_model, flax_model) -> dict:
    """The torch model's weights as the Flax model's parameter tree."""
    return state_dict_to_params(torch_state_dict(torch_model), flax_model.abstract_params(), name="text_encoder")


def run_both(config_dict: dict, flax_cls, input_ids: np.ndarray):
    """The transformers model (seed 0) and its Flax twin on the same ids: (torch outputs, Flax outputs)."""
    torch.manual_seed(0)
    # float() because transformers 5 builds some weights in the config's torch_dtype (SDXL's says float16).
    torch_model = TORCH_MODELS[flax_cls](transformers.CLIPTextConfig.from_dict(config_dict)).float().eval()
    flax_model = flax_cls(CLIPTextConfig.from_dict(config_dict))
    params = load_params(torch_model, flax_model)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(input_ids).long(), output_hidden_states=True)
    del torch_model
    return expected, flax_model.apply({"params": params}, jnp.asarray(input_ids))


def assert_parity(expected, actual, label: str) -> None:
    """Every output of the Flax model within FLOAT32_NETWORK_RTOL of transformers'; prints the errors."""
    pairs = {"last_hidden_state": (actual.last_hidden_state, expected.last_hidden_state)}
    for i, (a, e) in enumerate(zip(actual.hidden_states, expected.hidden_states, strict=True)):
        pairs[f"hidden_states[{i}]"] = (a, e)
    if actual.text_embeds is None:
        pairs["pooler_output"] = (actual.pooler_output, expected.pooler_output)
    else:
        pairs["text_embeds"] = (actual.text_embeds, expected.text_embeds)
    errors = {name: relative_error(a, e.numpy()) for name, (a, e) in pairs.items()}
    worst_hidden = max((name for name in errors if name.startswith("hidden")), key=errors.get)
    shown = [name for name in errors if not name.startswith("hidden")] + [worst_hidden]
    print(f"{label}: " + ", ".join(f"{name} {errors[name]:.2e}" for name in shown) + " (worst hidden state)")
    assert max(errors.values()) < FLOAT32_NETWORK_RTOL, errors


def test_legacy_eos_token_id_2_pools_at_the_highest_token_id():
    ids, eot = prompt_ids(20, with_added_token=False)
    assert np.all(np.argmax(ids == 2, axis=-1) != eot)  # the first eos_token_id is elsewhere
    np.testing.assert_array_equal(eos_positions(jnp.asarray(ids), 2), eot)


def test_eos_token_id_pools_at_its_first_occurrence():
    ids, eot = prompt_ids(20, with_added_token=True)
    assert np.all(np.argmax(ids, axis=-1) != eot)  # the highest id is elsewhere
    np.testing.assert_array_equal(eos_positions(jnp.asarray(ids), EOT), eot)


@pytest.mark.parametrize("flax_cls", [CLIPTextModel, CLIPTextModelWithProjection])
@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("eos_token_id", [2, EOT])
def test_matches_transformers_in_float32(flax_cls, hidden_act, eos_token_id):
    ids, _ = prompt_ids(20, with_added_token=eos_token_id != 2)
    expected, actual = run_both(tiny_config(hidden_act, eos_token_id), flax_cls, ids)
    if flax_cls is CLIPTextModelWithProjection:  # transformers' projection output has no pooler_output
        pooled = actual.last_hidden_state[jnp.arange(3), eos_positions(jnp.asarray(ids), eos_token_id)]
        np.testing.assert_array_equal(actual.pooler_output, pooled)
    assert_parity(expected, actual, f"{flax_cls.__name__} {hidden_act} eos {eos_token_id}")


def test_bfloat16_stays_close_to_float32():
    """bfloat16 keeps 8 significant bits: each rounding is off by up to 2**-9 = 2e-3 relative. With a
    few roundings per layer the outputs drift to about 1e-2 after 5 layers (1.6e-2 after 32); a wrong
    cast or layout would give errors of order 1."""
    config_dict = tiny_config("gelu", 2, num_hidden_layers=5)
    torch.manual_seed(0)
    torch_model = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig.from_dict(config_dict))
    model32 = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(config_dict))
    model16 = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(config_dict), dtype=jnp.bfloat16)
    params = load_params(torch_model, model32)
    ids = jnp.asarray(prompt_ids(77, with_added_token=False)[0])
    expected = jax.jit(model32.apply)({"params": params}, ids)
    actual = jax.jit(model16.apply)({"params": params}, ids)
    assert actual.last_hidden_state.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(model16.abstract_params()))
    errors = {
        name: relative_error(getattr(actual, name), getattr(expected, name))
        for name in ("last_hidden_state", "pooler_output", "text_embeds")
    }
    errors["hidden_states[-2]"] = relative_error(actual.hidden_states[-2], expected.hidden_states[-2])
    print("bfloat16 vs float32: " + ", ".join(f"{name} {error:.2e}" for name, error in errors.items()))
    assert max(errors.values()) < 2e-2, errors


@pytest.mark.parametrize(
    "change, named_key",
    [
        ("missing", "text_model.encoder.layers.1.mlp.fc2.bias"),
        ("unexpected", "text_model.encoder.layers.3.mlp.fc2.bias"),
        ("mis-shaped", "text_model.embeddings.position_embedding.weight"),
    ],
)
def test_weights_that_do_not_fit_raise_naming_the_key(change, named_key):
    config_dict = tiny_config("quick_gelu", 2, num_hidden_layers=2)
    torch.manual_seed(0)
    torch_model = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig.from_dict(config_dict))
    state = torch_state_dict(torch_model)
    if change == "missing":
        del state[named_key]
    elif change == "unexpected":
        state[named_key] = np.zeros(32, np.float32)
    else:
        state[named_key] = state[named_key][:64]
    template = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(config_dict)).abstract_params()
    with pytest.raises(WeightsMismatchError, match=rf"1 {change} keys:\n\s+{named_key}"):
        state_dict_to_params(state, template, name="text_encoder")


def test_config_takes_the_fields_of_a_config_json_and_ignores_the_rest():
    config = CLIPTextConfig.from_dict(SDXL_TEXT_ENCODER_2)
    assert config == CLIPTextConfig(
        vocab_size=49408,
        hidden_size=1280,
        intermediate_size=5120,
        projection_dim=1280,
        num_hidden_layers=32,
        num_attention_heads=20,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        eos_token_id=2,
    )


def test_config_missing_fields_take_transformers_defaults():
    defaults = transformers.CLIPTextConfig().to_dict()
    assert CLIPTextConfig.from_dict({}) == CLIPTextConfig.from_dict(defaults)


def test_config_rejects_an_unsupported_activation():
    with pytest.raises(ValueError, match=r"hidden_act 'gelu_new'.*use one of quick_gelu, gelu"):
        CLIPTextConfig.from_dict({**SD15_TEXT_ENCODER, "hidden_act": "gelu_new"})


def test_config_rejects_a_whole_clip_config():
    with pytest.raises(ValueError, match=r"CLIPConfig .*text_config"):
        CLIPTextConfig.from_dict(transformers.CLIPConfig().to_dict())


@pytest.mark.slow
def test_sd15_text_encoder_matches_transformers():
    ids, _ = prompt_ids(77, with_added_token=False)
    expected, actual = run_both(SD15_TEXT_ENCODER, CLIPTextModel, ids)
    assert_parity(expected, actual, "SD1.5 text_encoder")


@pytest.mark.slow
def test_sd21_text_encoder_matches_transformers():
    ids, _ = prompt_ids(77, with_added_token=False)
    expected, actual = run_both(SD21_TEXT_ENCODER, CLIPTextModel, ids)
    assert_parity(expected, actual, "SD2.1 text_encoder")


@pytest.mark.slow
def test_sdxl_text_encoder_2_matches_transformers():
    ids, _ = prompt_ids(77, with_added_token=False)
    expected, actual = run_both(SDXL_TEXT_ENCODER_2, CLIPTextModelWithProjection, ids)
    assert_parity(expected, actual, "SDXL text_encoder_2")
