"""Images from prompts in a few steps, as one jittable function: text encoding, sampling, VAE decode.

Two ways to sample: ``"perflow"``, the student's Euler steps along its piecewise-linear flow
(``sampler.sample``, PERFLOW_SPEC.md "Sampler"), and ``"ddim"``, the teacher's own DDIM as
diffusers' ``DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False)``
runs it: the baseline that the training loop draws once, at step 0. ``grid`` and ``save_png``
turn the images into one picture on disk.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from perflow_jax import sampler, schedule, solver, step

METHODS = ("perflow", "ddim")


@dataclasses.dataclass(frozen=True)
class GenerateSettings:
    """How images are drawn (static under jit).

    method: "perflow" (the student, ``sampler.sample``) or "ddim" (the teacher's DDIM).
    num_steps: N, UNet evaluations per image (each on twice the batch when guidance != 1).
    guidance: the CFG scale w against the empty prompt; 1 runs the UNet on the prompts only.
    parameterization: the student's output, "velocity", "ddim_eps" or "diff_eps" (method "perflow").
    num_windows: K, the student's time windows (method "perflow"); N >= K.
    prediction_type: the teacher's output, "epsilon" or "v_prediction" (method "ddim").
    """

    method: str = "perflow"
    num_steps: int = 4
    guidance: float = 4.5
    parameterization: str = "diff_eps"
    num_windows: int = 4
    prediction_type: str = "epsilon"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown sampling method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.method == "perflow":
            schedule.check_parameterization(self.parameterization)
            sampler.sampler_timesteps(self.num_steps, self.num_windows)  # raises if N < K
        else:
            if self.prediction_type not in solver.PREDICTION_TYPES:
                raise ValueError(
                    f"unknown teacher prediction_type {self.prediction_type!r}: use one of "
                    f"{', '.join(solver.PREDICTION_TYPES)} (the teacher's scheduler_config.json says which)"
                )
            if not 1 <= self.num_steps <= schedule.NUM_TRAIN_TIMESTEPS:
                raise ValueError(
                    f"{self.num_steps} DDIM steps: use 1 to {schedule.NUM_TRAIN_TIMESTEPS} (one per training timestep)"
                )


def ddim_timesteps(num_steps: int) -> np.ndarray:
    """[N] int32 timesteps, noisiest first, spaced as diffusers' "trailing": round(arange(1000, 0, -1000/N)) - 1.

    N = 4: [999, 749, 499, 249]; N = 3: [999, 666, 332].
    """
    step_ratio = schedule.NUM_TRAIN_TIMESTEPS / num_steps
    return (np.round(np.arange(schedule.NUM_TRAIN_TIMESTEPS, 0, -step_ratio)) - 1).astype(np.int32)


def ddim_sample(
    apply: solver.Apply,
    noise: jax.Array,
    cond: Any,
    null_cond: Any,
    ab: jax.Array,
    *,
    num_steps: int,
    prediction_type: str,
    guidance: float = 1.0,
) -> jax.Array:
    """The teacher's DDIM (eta = 0) from ``noise`` [B, ...] in ``num_steps`` steps (``lax.scan``).

    As diffusers' DDIMScheduler with trailing spacing and set_alpha_to_one=False: step i goes
    from alpha ab[tau_i] to ab[tau_i - 1000 // N], or ab[0] when that is negative (the last step).
    When 1000 / N is not a whole number this previous timestep is not always the next tau
    (N = 3: 666 steps to ab[333], then the model runs at 332), as in diffusers.

    Args:
      apply: the teacher, ``apply(z [B, ...], timesteps [B] float32, cond) -> eps or v [B, ...]``.
      noise: [B, ...] the initial latents z ~ N(0, I) (DDIM's initial sigma is 1).
      cond, null_cond: pytrees with batch-first leaves; ``null_cond`` is used only if guidance != 1.
      ab: [1000] float32 the teacher's alphas_cumprod.
      num_steps: N (static). prediction_type: "epsilon" or "v_prediction". guidance: CFG scale (static).
    Returns:
      [B, ...] the final latents, in noise's float dtype (at least float32).
    """
    timesteps = ddim_timesteps(num_steps)
    previous = timesteps - schedule.NUM_TRAIN_TIMESTEPS // num_steps
    ab = jnp.asarray(ab)
    a = ab[timesteps]
    a_prev = jnp.where(previous >= 0, ab[np.maximum(previous, 0)], ab[0])
    z = noise.astype(jnp.promote_types(noise.dtype, jnp.float32))

    def body(z, tau_a_aprev):
        tau, a, a_prev = (jnp.broadcast_to(x, (z.shape[0],)) for x in tau_a_aprev)
        output = solver.guided(apply, z, tau.astype(jnp.float32), cond, null_cond, guidance).astype(z.dtype)
        return solver.ddim_step(z, output, a.astype(z.dtype), a_prev.astype(z.dtype), prediction_type), None

    z, _ = jax.lax.scan(body, z, (jnp.asarray(timesteps), a, a_prev))
    return z


def vae_factor(vae: nn.Module) -> int:
    """f, the VAE's downsampling factor: an H x W image has (H / f) x (W / f) latents (8 for SD's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_shape(vae: nn.Module, resolution: int) -> tuple[int, int, int]:
    """(h, w, c) of the latents of ``resolution``-pixel square images: the noise is [N, h, w, c]."""
    factor = vae_factor(vae)
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE's downsampling factor {factor}")
    return (resolution // factor, resolution // factor, vae.config.latent_channels)


def make_generate(
    networks: step.Networks, vae: nn.Module, settings: GenerateSettings, *, latents: bool = False
) -> Callable[..., Any]:
    """``generate(unet_params, text_params, vae_params, ids, null_cond, noise) -> images``, jittable as a whole.

    ``latents``: return ``(images, z)`` instead, with z [N, h, w, c] float32 the final latents before
    the VAE decode (scaled by the VAE's scaling_factor, as the UNet sees them).

    ``generate``'s arguments:
      unet_params: the student's parameters (method "perflow"; e.g. the EMA) or the teacher's ("ddim").
      text_params: {"text_encoder": ..., and for SDXL "text_encoder_2": ...}; a dict with more
        entries (the training step's ``frozen``) is fine.
      vae_params: the VAE's parameters.
      ids: ``Model.tokenize(prompts)``: "input_ids" [N, 77] int32 (and for SDXL "input_ids_2");
        for SDXL, "original_size" and "crop_top_left" [N, 2] default to (resolution, resolution)
        and (0, 0), the size ids of the training images.
      null_cond: the empty prompt's UNet condition for one example (``step.encode_text`` of
        ``tokenize([""])``, leaves [1, ...], as the training step's ``frozen["null_cond"]``);
        broadcast to the N prompts. Unused (may be None) when guidance is 1.
      noise: [N, h, w, c] the initial latents, N(0, I) (see ``latent_shape``); the same noise
        gives the same images.
    Returns:
      images: [N, f h, f w, 3] float32 in [0, 1] (f the VAE's downsampling factor).
    """
    unet = networks.student if settings.method == "perflow" else networks.teacher
    ab = networks.alphas_cumprod

    def generate(unet_params, text_params, vae_params, ids, null_cond, noise):
        n = noise.shape[0]
        if ids["input_ids"].shape[0] != n:
            raise ValueError(f"{ids['input_ids'].shape[0]} prompts but noise for {n} images: give one noise per prompt")
        if networks.text_encoder_2 is not None and "input_ids_2" not in ids:
            raise ValueError("this is an SDXL model: ids need input_ids_2 as well; pass Model.tokenize(prompts)")
        batch = {
            "original_size": jnp.full((n, 2), networks.resolution, jnp.int32),
            "crop_top_left": jnp.zeros((n, 2), jnp.int32),
            **ids,
        }
        cond = step.encode_text(networks, text_params, batch)
        null_cond = jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape[1:]), null_cond)
        apply = step.unet_apply(unet, unet_params)
        if settings.method == "perflow":
            z = sampler.sample(
                apply, noise, cond, null_cond, ab, num_steps=settings.num_steps, num_windows=settings.num_windows,
                parameterization=settings.parameterization, guidance=settings.guidance,
            )  # fmt: skip
        else:
            z = ddim_sample(
                apply, noise, cond, null_cond, ab, num_steps=settings.num_steps,
                prediction_type=settings.prediction_type, guidance=settings.guidance,
            )  # fmt: skip
        decoded = vae.apply({"params": vae_params}, z / networks.scaling_factor, method="decode")
        images = jnp.clip((decoded.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)
        return (images, z) if latents else images

    return generate


def grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """[N, H, W, 3] floats in [0, 1] -> one uint8 picture [rows H, columns W, 3], row by row.

    ``columns`` defaults to ceil(sqrt(N)); cells after the last image stay black.
    """
    images = np.asarray(images)
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    cells = np.zeros((rows * columns, h, w, c), np.uint8)
    cells[:n] = np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
    return cells.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, columns * w, c)


def save_png(array: np.ndarray, path: str | Path) -> None:
    """Write a uint8 [H, W, 3] picture as a PNG, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path, format="PNG")
