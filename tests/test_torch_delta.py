"""merge_delta_weights: W = W_base + delta in the delta's dtype, in place, with errors that name the mismatch."""

import diffusers
import pytest
import torch
from safetensors.torch import save_file

from perflow_jax.torch import merge_delta_weights
from tests.helpers.networks import TINY_UNETS
from tests.helpers.parity import random_torch_unet


def tiny_unet(seed: int = 0, **overrides) -> diffusers.UNet2DConditionModel:
    return random_torch_unet({**TINY_UNETS["sd1"], **overrides}, seed)


def fine_tuned(teacher: diffusers.UNet2DConditionModel) -> diffusers.UNet2DConditionModel:
    """A student near its teacher, as after distillation: each weight moved by at most 1 %."""
    student = tiny_unet()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for s, w in zip(student.state_dict().values(), teacher.state_dict().values(), strict=True):
            s.copy_(w * (1 + 0.01 * torch.rand(w.shape, generator=generator)))
    return student


def deltas(student, teacher) -> dict[str, torch.Tensor]:
    return {key: value - teacher.state_dict()[key] for key, value in student.state_dict().items()}


def test_teacher_plus_delta_file_is_the_student_bit_for_bit_in_float32(tmp_path):
    """Student and teacher weights within a factor 2 of each other: student - teacher is exact in
    float32 (Sterbenz), so adding it back gives the student exactly."""
    teacher = tiny_unet()
    student = fine_tuned(teacher)
    save_file(deltas(student, teacher), tmp_path / "delta_weights.safetensors")
    merged = merge_delta_weights(teacher, tmp_path / "delta_weights.safetensors")
    assert merged is teacher
    for key, value in student.state_dict().items():
        assert torch.equal(merged.state_dict()[key], value), key


def test_a_float16_base_gets_the_float32_delta_added_in_float32_and_rounded_once():
    teacher = tiny_unet()
    delta = deltas(fine_tuned(teacher), teacher)
    base = tiny_unet().half()
    merged = merge_delta_weights(base, delta)
    for key, value in teacher.state_dict().items():
        expected = (value.half().float() + delta[key]).half()
        assert merged.state_dict()[key].dtype == torch.float16
        assert torch.equal(merged.state_dict()[key], expected), key


def test_a_delta_missing_a_key_is_an_error_naming_it_and_changes_nothing():
    teacher = tiny_unet()
    delta = deltas(fine_tuned(teacher), teacher)
    del delta["conv_in.bias"]
    before = {key: value.clone() for key, value in teacher.state_dict().items()}
    with pytest.raises(ValueError, match=r"the delta lacks 1 of the UNet's keys, e\.g\. \['conv_in\.bias'\]"):
        merge_delta_weights(teacher, delta)
    assert all(torch.equal(teacher.state_dict()[key], value) for key, value in before.items())


def test_a_delta_with_an_extra_key_is_an_error_naming_it():
    teacher = tiny_unet()
    delta = deltas(fine_tuned(teacher), teacher)
    delta["add_embedding.linear_1.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"1 keys the UNet lacks, e\.g\. \['add_embedding\.linear_1\.weight'\]"):
        merge_delta_weights(teacher, delta)


def test_a_delta_for_another_architecture_is_an_error_naming_both():
    sdxl_like, sd15_like = tiny_unet(cross_attention_dim=2048), tiny_unet(cross_attention_dim=768)
    delta = {key: torch.zeros_like(value) for key, value in sdxl_like.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"attn2\.to_k\.weight'\] has shape \(32, 2048\).*for SDXL while the UNet is SD1"
    ):
        merge_delta_weights(sd15_like, delta)
