"""The frozen teacher's probability-flow solve with DDIM (eta = 0): across one time window in S steps, and
from noise to data in N steps (the teacher's own few-step samples, the baseline a student is judged by).

Each example solves its own window k, from z_s at t_s to z_e at t_e, evaluating the teacher at
the static timestep table ``teacher_timesteps(K, S)[k]`` (PERFLOW_SPEC.md, "One training
example", step 4). The teacher is any ``apply(z, timesteps, cond) -> output`` with output eps
(``prediction_type="epsilon"``) or v (``"v_prediction"``); ``cond`` is a pytree whose leaves have
the batch as their first axis (text states, and for SDXL pooled text and time ids).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax.schedule import NUM_TRAIN_TIMESTEPS

Apply = Callable[[jax.Array, jax.Array, Any], jax.Array]
PREDICTION_TYPES = ("epsilon", "v_prediction")


def teacher_timesteps(num_windows: int, num_steps: int) -> np.ndarray:
    """[K, S] int32 table: tau_i = round(999 + (t_i - 1) / 0.001), t_i = t_s + i (t_e - t_s) / S.

    Computed in float32 and rounded half to even, as the reference does in PyTorch; float32
    error decides the half-way cases (e.g. K=4, S=8: 936, not 937).
    """
    k = np.arange(num_windows, dtype=np.float32)[:, None]
    t_s = ((num_windows - k) / np.float32(num_windows)).astype(np.float32)
    t_e = ((num_windows - k - 1) / np.float32(num_windows)).astype(np.float32)
    interval = ((t_e - t_s) / np.float32(num_steps)).astype(np.float32)
    t_i = (t_s + interval * np.arange(num_steps, dtype=np.float32)[None, :]).astype(np.float32)
    tau = np.float32(NUM_TRAIN_TIMESTEPS - 1) + ((t_i - np.float32(1)) / np.float32(0.001)).astype(np.float32)
    return np.rint(tau.astype(np.float32)).astype(np.int32)


def ddim_step(z: jax.Array, output: jax.Array, a: jax.Array, a_prev: jax.Array, prediction_type: str) -> jax.Array:
    """One DDIM (eta = 0) step from alpha a to a_prev. z, output: [B, ...]; a, a_prev: [B]."""
    shape = (-1,) + (1,) * (z.ndim - 1)
    a, a_prev = a.reshape(shape), a_prev.reshape(shape)
    if prediction_type == "epsilon":
        eps = output
        x0 = (z - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
    elif prediction_type == "v_prediction":
        x0 = jnp.sqrt(a) * z - jnp.sqrt(1 - a) * output
        eps = jnp.sqrt(a) * output + jnp.sqrt(1 - a) * z
    else:
        raise ValueError(_unknown_prediction_type(prediction_type))
    return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev) * eps


def _unknown_prediction_type(prediction_type: str) -> str:
    return f"unknown teacher prediction_type {prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}"


def guided(apply: Apply, z: jax.Array, timesteps: jax.Array, cond: Any, null_cond: Any, guidance: float) -> jax.Array:
    """Classifier-free guidance: out_u + w (out_c - out_u), the unconditional half from ``null_cond``.

    ``guidance`` is a Python float: with 1 the model runs once on ``cond``; otherwise once on the
    batch of both halves (null first, as the reference concatenates them).
    """
    if guidance == 1.0:
        return apply(z, timesteps, cond)
    both = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), null_cond, cond)
    out_u, out_c = jnp.split(apply(jnp.concatenate([z, z]), jnp.concatenate([timesteps, timesteps]), both), 2)
    return out_u + guidance * (out_c - out_u)


def solve_window(
    apply: Apply,
    z_s: jax.Array,
    window: jax.Array,
    cond: Any,
    null_cond: Any,
    ab: jax.Array,
    *,
    num_windows: int,
    num_steps: int,
    guidance: float = 1.0,
    prediction_type: str = "epsilon",
    final_alpha: float | None = None,
) -> jax.Array:
    """Teacher DDIM solve of each example's window: z_s at t_s -> z_e at t_e.

    Args:
      apply: the frozen teacher, ``apply(z [B, ...], timesteps [B] float32, cond) -> [B, ...]``.
      z_s: [B, ...] the window start points.
      window: [B] int32 window index of each example.
      cond, null_cond: pytrees with batch-first leaves; ``null_cond`` is the empty prompt's.
      ab: [1000] the teacher's alphas_cumprod.
      num_windows, num_steps: K and S (static).
      guidance: the teacher's CFG scale (static; 1 for cfg_sync).
      prediction_type: the teacher's output, "epsilon" or "v_prediction".
      final_alpha: the alpha the last window's last step lands on (its previous timestep is
        below 0): the teacher's ``schedule.final_alpha_from_config``; None for ab[0].
    Returns:
      z_e: [B, ...] in z_s's float dtype (at least float32), gradient stopped.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(_unknown_prediction_type(prediction_type))
    table = jnp.asarray(teacher_timesteps(num_windows, num_steps))[window]  # [B, S]
    jump = NUM_TRAIN_TIMESTEPS // (num_windows * num_steps)
    ab = jnp.asarray(ab)
    final = ab[0] if final_alpha is None else jnp.asarray(final_alpha, ab.dtype)
    z = z_s.astype(jnp.promote_types(z_s.dtype, jnp.float32))

    def step(i, z):
        tau = table[:, i]
        a = ab[tau].astype(z.dtype)
        prev = tau - jump
        a_prev = jnp.where(prev >= 0, ab[jnp.maximum(prev, 0)], final).astype(z.dtype)
        output = guided(apply, z, tau.astype(jnp.float32), cond, null_cond, guidance).astype(z.dtype)
        return ddim_step(z, output, a, a_prev, prediction_type)

    return jax.lax.stop_gradient(jax.lax.fori_loop(0, num_steps, step, z))


def ddim_timesteps(num_steps: int) -> np.ndarray:
    """[N] int32 timesteps, noisiest first, spaced as diffusers' "trailing": round(arange(1000, 0, -1000/N)) - 1.

    N = 4: [999, 749, 499, 249]; N = 3: [999, 666, 332].
    """
    step_ratio = NUM_TRAIN_TIMESTEPS / num_steps
    return (np.round(np.arange(NUM_TRAIN_TIMESTEPS, 0, -step_ratio)) - 1).astype(np.int32)


def ddim_sample(
    apply: Apply,
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
    previous = timesteps - NUM_TRAIN_TIMESTEPS // num_steps
    ab = jnp.asarray(ab)
    a = ab[timesteps]
    a_prev = jnp.where(previous >= 0, ab[np.maximum(previous, 0)], ab[0])
    z = noise.astype(jnp.promote_types(noise.dtype, jnp.float32))

    def body(z, tau_a_aprev):
        tau, a, a_prev = (jnp.broadcast_to(x, (z.shape[0],)) for x in tau_a_aprev)
        output = guided(apply, z, tau.astype(jnp.float32), cond, null_cond, guidance).astype(z.dtype)
        return ddim_step(z, output, a.astype(z.dtype), a_prev.astype(z.dtype), prediction_type), None

    z, _ = jax.lax.scan(body, z, (jnp.asarray(timesteps), a, a_prev))
    return z
