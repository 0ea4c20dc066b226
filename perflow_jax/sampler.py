"""The PeRFlow sampler: N Euler steps along the student's piecewise-linear flow (PERFLOW_SPEC.md, "Sampler").

The student is any ``apply(z, timesteps, cond) -> output`` whose output is a velocity or an eps
of the ``ddim_eps`` / ``diff_eps`` parameterizations; eps outputs are turned into velocities
inside the window of the current timestep. Initial noise is z ~ N(0, I), unscaled.

img2img (diffusers' StableDiffusionImg2ImgPipeline with the PeRFlowScheduler): of the N-step
table, the last min(int(N strength), N) steps run (``img2img_first_step``), from the image's
latents forward-diffused to the first of them (``add_noise``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax import schedule
from perflow_jax.solver import Apply, guided


def sampler_timesteps(num_steps: int, num_windows: int) -> np.ndarray:
    """[N] int32 timesteps, noisiest first: window k gets N // K steps, plus one for the first N % K.

    Inside a window: linspace(t_s, t_e, n, endpoint=False) * 1000, truncated. N = 6, K = 4:
    [1000, 875, 750, 625, 500, 250]. N < K is refused (the reference silently runs K steps).
    """
    if num_steps < num_windows:
        raise ValueError(
            f"{num_steps} sampling steps for a model trained with {num_windows} windows: every window needs "
            f"at least one step, so use {num_windows} or more (the authors' code silently runs {num_windows})"
        )
    timesteps = []
    for k in range(num_windows):
        n = num_steps // num_windows + (1 if k < num_steps % num_windows else 0)
        t_s, t_e = 1.0 * (num_windows - k) / num_windows, 1.0 * (num_windows - k - 1) / num_windows
        timesteps.append(np.linspace(t_s, t_e, num=n, endpoint=False))
    return (np.concatenate(timesteps) * schedule.NUM_TRAIN_TIMESTEPS).astype(np.int64).astype(np.int32)


def img2img_first_step(num_steps: int, strength: float) -> int:
    """The index of img2img's first step in the N-step table: N - min(int(N strength), N), as diffusers'
    ``get_timesteps``. int truncates: N = 4, strength 0.6 runs 2 steps, from timestep 500; N = 6,
    strength 0.5 runs [625, 500, 250], starting inside a window. Refuses a strength outside (0, 1]
    or one that runs no step.
    """
    if not 0 < strength <= 1:
        raise ValueError(f"strength {strength}: give a value in (0, 1] (1 starts from timestep 1000)")
    runs = min(int(num_steps * strength), num_steps)
    if runs == 0:
        raise ValueError(
            f"strength {strength} of {num_steps} steps runs int({num_steps} x {strength}) = 0 steps: give a "
            f"strength of at least {1 / num_steps:g}, or more steps"
        )
    return num_steps - runs


def add_noise(x0: jax.Array, eps: jax.Array, ab: jax.Array, timestep: int) -> jax.Array:
    """x0's forward diffusion to integer ``timestep``: sqrt(a) x0 + sqrt(1 - a) eps, a = ab[timestep - 1]
    (ab[0] for 0), as PeRFlowScheduler.add_noise. x0, eps: [B, ...] float32."""
    a = jnp.asarray(ab)[max(timestep - 1, 0)]
    return jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * eps


def velocity(
    output: jax.Array, z: jax.Array, t: jax.Array, ab: jax.Array, *, parameterization: str, num_windows: int
) -> jax.Array:
    """The velocity dz/dt that the model ``output`` [B, ...] at time ``t`` (scalar, timestep / 1000) implies."""
    if parameterization == "velocity":
        return output
    t_s, t_e = schedule.window_bounds(schedule.window_index(t, num_windows), num_windows)
    a_s, a_e = schedule.alpha_at(ab, t_s), schedule.alpha_at(ab, t_e)
    batch = (z.shape[0],)
    t, t_s, t_e, a_s, a_e = (jnp.broadcast_to(x, batch).astype(z.dtype) for x in (t, t_s, t_e, a_s, a_e))
    return schedule.eps_to_velocity(parameterization, output, z, t, t_s, t_e, a_s, a_e)


def step(
    output: jax.Array,
    z: jax.Array,
    t: jax.Array,
    dt: jax.Array,
    ab: jax.Array,
    *,
    parameterization: str,
    num_windows: int,
) -> jax.Array:
    """One Euler step z + dt v, v from the model ``output`` at time ``t``; dt = (next timestep - timestep) / 1000."""
    v = velocity(output, z, t, ab, parameterization=parameterization, num_windows=num_windows)
    return z + jnp.asarray(dt).astype(z.dtype) * v


def sample(
    apply: Apply,
    noise: jax.Array,
    cond: Any,
    null_cond: Any,
    ab: jax.Array,
    *,
    num_steps: int,
    num_windows: int,
    parameterization: str,
    guidance: float = 1.0,
    first_step: int = 0,
) -> jax.Array:
    """Few-step generation: z_0 from z_1 = ``noise`` [B, ...] in ``num_steps`` Euler steps (``lax.scan``).

    Step i: v from the (guided) model output at timestep tau_i, dt = (tau_{i+1} - tau_i) / 1000 with
    tau_N = 0, z <- z + dt v. ``guidance`` (static) combines the outputs of ``cond`` and
    ``null_cond``; velocity is affine in eps, so guiding either is the same. ``first_step`` (static,
    img2img): run steps first_step .. N - 1 only, ``noise`` being z at tau_{first_step}.
    """
    schedule.check_parameterization(parameterization)
    timesteps = sampler_timesteps(num_steps, num_windows)
    if not 0 <= first_step < num_steps:
        raise ValueError(f"first_step {first_step}: give one of the {num_steps} steps' indices, 0 to {num_steps - 1}")
    # Times and steps as the reference computes them (int / 1000 in float32), outside the
    # compiled loop, where a division by a constant may become a multiplication by its inverse.
    times = timesteps.astype(np.float32) / np.float32(schedule.NUM_TRAIN_TIMESTEPS)
    dts = (np.append(timesteps[1:], 0) - timesteps) / schedule.NUM_TRAIN_TIMESTEPS
    timesteps, times, dts = timesteps[first_step:], times[first_step:], dts[first_step:]
    ab = jnp.asarray(ab)
    z = noise.astype(jnp.promote_types(noise.dtype, jnp.float32))

    def body(z, tau_t_dt):
        tau, t, dt = tau_t_dt
        taus = jnp.broadcast_to(tau.astype(jnp.float32), (z.shape[0],))
        output = guided(apply, z, taus, cond, null_cond, guidance).astype(z.dtype)
        return step(output, z, t, dt, ab, parameterization=parameterization, num_windows=num_windows), None

    z, _ = jax.lax.scan(body, z, (jnp.asarray(timesteps), jnp.asarray(times), jnp.asarray(dts)))
    return z
