"""The demo ControlNet's control signal (digit silhouettes), its measure, and the committed ControlNet."""

import diffusers
import numpy as np
import pytest
import torch

from perflow_jax.demo import CONTROLNET, TEACHER, control, digits


def cells(*ink: tuple[int, int, int]) -> np.ndarray:
    """One [1, 32, 32, 3] uint8 image whose 4x4 cell (row, column) has grey ``value``, for each (row, column, value)."""
    image = np.zeros((1, 32, 32, 3), np.uint8)
    for row, column, value in ink:
        image[0, 4 * row : 4 * row + 4, 4 * column : 4 * column + 4] = value
    return image


def test_silhouette_marks_the_4x4_cells_whose_mean_grey_is_above_half_white():
    image = cells((0, 0, 255), (1, 2, 130), (3, 3, 120))
    image[0, 20, 20] = 255  # one white pixel: its cell's mean is 255 / 16
    expected = np.zeros((1, 8, 8), bool)
    expected[0, 0, 0] = expected[0, 1, 2] = True
    np.testing.assert_array_equal(control.silhouette(image), expected)
    np.testing.assert_array_equal(control.silhouette(image[..., 0]), expected)  # grey [N, 32, 32] alike


def test_a_control_image_is_its_silhouette_drawn_as_white_4x4_squares():
    images, _ = digits.load("heldout")
    controls = control.control_images(images[:20])
    assert controls.shape == (20, 32, 32, 3) and controls.dtype == np.uint8
    assert set(np.unique(controls)) <= {0, 255}
    np.testing.assert_array_equal(control.silhouette(controls), control.silhouette(images[:20]))
    assert control.silhouette(controls).any(axis=(1, 2)).all()  # every digit has ink cells


def test_silhouette_iou_is_the_share_of_ink_cells_the_sample_and_the_control_agree_on():
    a = cells((0, 0, 255), (0, 1, 255), (0, 2, 255))
    b = cells((0, 1, 255), (0, 2, 255), (0, 3, 255))
    far = cells((7, 7, 255))
    empty = cells()
    samples = np.concatenate([a, a, a, empty])
    controls = np.concatenate([a, b, far, empty])
    np.testing.assert_allclose(control.silhouette_iou(samples, controls), [1.0, 2 / 4, 0.0, 1.0])


@pytest.fixture(scope="module")
def controlnet_pipe():
    pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        TEACHER, controlnet=diffusers.ControlNetModel.from_pretrained(CONTROLNET), dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_committed_controlnet_is_the_teachers_twin_and_small(controlnet_pipe):
    files = [f for f in CONTROLNET.rglob("*") if f.is_file()]
    assert sorted(f.name for f in files) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert sum(f.stat().st_size for f in files) < 4 * 2**20
    unet, controlnet = controlnet_pipe.unet.config, controlnet_pipe.controlnet.config
    for key in ("block_out_channels", "down_block_types", "cross_attention_dim", "layers_per_block"):
        assert tuple(np.atleast_1d(controlnet[key])) == tuple(np.atleast_1d(unet[key])), key


def test_the_committed_controlnet_steers_the_teachers_samples_into_the_silhouette(controlnet_pipe):
    """10 held-out digits' silhouettes, the teacher's 4-step DDIM from the same noise: with the ControlNet the
    samples' silhouettes agree with the controls far better than with its scale at 0."""
    images, labels = digits.load("heldout")
    controls = control.control_images(images[:10])
    noise = torch.randn((10, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    iou = {}
    for scale in (0.0, 1.0):
        with torch.no_grad():
            samples = controlnet_pipe(
                [digits.caption(label) for label in labels[:10]],
                image=torch.from_numpy(controls).permute(0, 3, 1, 2).float() / 255.0,
                num_inference_steps=4,
                guidance_scale=1.0,
                controlnet_conditioning_scale=scale,
                latents=noise.clone(),
                output_type="np",
            ).images
        iou[scale] = control.silhouette_iou(np.round(samples * 255).astype(np.uint8), controls).mean()
    print(f"silhouette IoU with the control: {iou}")
    assert iou[1.0] > iou[0.0] + 0.1, iou


def test_control_cli_writes_the_first_heldout_digit_of_a_label_and_its_control_image(tmp_path):
    from PIL import Image

    argv = ["--digit", "3", "--out", str(tmp_path / "control.png"), "--image-out", str(tmp_path / "three.png")]
    assert control.main(argv) == 0
    images, labels = digits.load("heldout")
    three = images[list(labels).index(3)]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "three.png")), three)
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "control.png")), control.control_images(three[None])[0]
    )
