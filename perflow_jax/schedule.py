"""Noise schedule, time windows and the three PeRFlow parameterizations (PERFLOW_SPEC.md).

Time runs from t = 1 (noise) to t = 0 (data); networks see the timestep t * 1000. ``ab`` is the
teacher's ``alphas_cumprod`` table ([1000] float32). K equal windows: window k spans
t_s = 1 - k/K down to t_e = 1 - (k+1)/K, holding its start but not its end.

Everything here is arrays in, arrays out and jittable; arithmetic is float32 unless the inputs
are float64 (the identity tests run in float64).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
PARAMETERIZATIONS = ("velocity", "ddim_eps", "diff_eps")


def alphas_cumprod_from_config(config: Mapping[str, Any]) -> np.ndarray:
    """The teacher's alphas_cumprod [num_train_timesteps] float32, from a diffusers scheduler config dict.

    Supports ``trained_betas`` and the beta schedules ``scaled_linear`` (SD), ``linear`` and
    ``squaredcos_cap_v2``, with diffusers' defaults for absent keys.
    """
    n = config.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS)
    if n != NUM_TRAIN_TIMESTEPS:
        raise ValueError(
            f"scheduler config has num_train_timesteps={n}; PeRFlow's timestep tables assume "
            f"{NUM_TRAIN_TIMESTEPS} (all Stable Diffusion models use it)"
        )
    if config.get("rescale_betas_zero_snr", False):
        raise ValueError("scheduler config has rescale_betas_zero_snr=True, which this project does not implement")
    beta_start, beta_end = config.get("beta_start", 0.0001), config.get("beta_end", 0.02)
    schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], np.float32)
    elif schedule == "scaled_linear":
        betas = _torch_linspace_float32(beta_start**0.5, beta_end**0.5, n) ** 2
    elif schedule == "linear":
        betas = _torch_linspace_float32(beta_start, beta_end, n)
    elif schedule == "squaredcos_cap_v2":
        # Nichol & Dhariwal's cosine schedule, as diffusers' betas_for_alpha_bar computes it.
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], np.float32)
    else:
        raise ValueError(
            f"scheduler config has beta_schedule={schedule!r}: supported are scaled_linear, linear, "
            "squaredcos_cap_v2, or trained_betas"
        )
    # As diffusers (PyTorch) computes it: 1 - beta in float32, the product accumulated in float64.
    alphas = (np.float32(1) - betas).astype(np.float32)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def final_alpha_from_config(config: Mapping[str, Any]) -> float:
    """The alpha of a DDIM step whose previous timestep is below 0 (the last step to t = 0): DDIM's final alpha.

    The authors load the teacher's scheduler as ``DDIMScheduler.from_pretrained`` and step to its
    ``final_alpha_cumprod``: 1.0 where the config says ``set_alpha_to_one: true`` or lacks the key
    (DDIM's default, e.g. a DDPMScheduler config), ``alphas_cumprod[0]`` where it says false (the
    SD1.5, SD2.1 and SDXL configs as released).
    """
    if config.get("set_alpha_to_one", True):
        return 1.0
    return float(alphas_cumprod_from_config(config)[0])


def _torch_linspace_float32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=torch.float32), bit for bit: a float32 step, values
    start + i step from the front and end - (n - 1 - i) step from the back, each rounded once."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float32((end32 - start32) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    front = np.float64(start32) + np.float64(step) * i
    back = np.float64(end32) - np.float64(step) * (n - 1 - i)
    return np.where(i < n // 2, front, back).astype(np.float32)


def _float(x: jax.Array) -> jax.Array:
    """x as float32, or float64 where it already is."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def alpha_at(ab: jax.Array, t: jax.Array) -> jax.Array:
    """alpha at time t: ab[int(t * 1000) - 1], ab[0] where that index is negative ("final alpha").

    int() truncates, as in the reference; t * 1000 is computed in float32 like there.
    """
    index = jnp.floor(_float(t).astype(jnp.float32) * NUM_TRAIN_TIMESTEPS).astype(jnp.int32) - 1
    return jnp.asarray(ab)[jnp.maximum(index, 0)]


def window_index(t: jax.Array, num_windows: int) -> jax.Array:
    """The window k holding t (closed form of the reference's lookup): int32 of t's shape.

    k = clip(floor(K (1 - t + 1e-4)), 0, K - 1): a window holds its start, not its end, and
    the 1e-4 absorbs float32 error at boundaries (0.75 belongs to window 1 of K = 4).
    """
    t = _float(t).astype(jnp.float32)
    k = jnp.floor(num_windows * (1.0 - t + 1e-4)).astype(jnp.int32)
    return jnp.clip(k, 0, num_windows - 1)


def window_bounds(k: jax.Array, num_windows: int, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """(t_s, t_e) of window k: ((K - k) / K, (K - k - 1) / K).

    Looked up in a constant table of i / K rounded once, as the reference's float64 i / K stored
    in float32 tensors (dividing inside jit could become a multiplication by 1 / K, one ulp off).
    """
    bounds = jnp.asarray(np.arange(num_windows, -1, -1) / num_windows, dtype)
    k = jnp.asarray(k)
    return bounds[k], bounds[k + 1]


def sample_times(key: jax.Array, batch: int, num_discrete: int = NUM_TRAIN_TIMESTEPS) -> jax.Array:
    """Training times t = 1 - floor(u M) / M with u ~ U[0, 1): [batch] float32 in (0, 1]."""
    u = jax.random.uniform(key, (batch,), jnp.float32)
    return 1.0 - jnp.floor(u * num_discrete) / num_discrete


def window_coefficients(parameterization: str, a_s: jax.Array, a_e: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(lambda_s, eta_s) of an eps parameterization: the student's eps maps z_s to z_e = lambda_s z_s + eta_s eps.

    ddim_eps: one DDIM step from a_s to a_e. diff_eps: gamma = sqrt(a_s / a_e),
    lambda_s = 1 / gamma, eta_s = -sqrt(1 - gamma^2) / gamma.
    """
    if parameterization == "ddim_eps":
        lambda_s = jnp.sqrt(a_e / a_s)
        eta_s = jnp.sqrt(1 - a_e) - jnp.sqrt(a_e * (1 - a_s) / a_s)
    elif parameterization == "diff_eps":
        gamma = jnp.sqrt(a_s / a_e)
        lambda_s = 1 / gamma
        eta_s = -jnp.sqrt(1 - gamma**2) / gamma
    else:
        raise ValueError(f"no eps coefficients for parameterization {parameterization!r}: use ddim_eps or diff_eps")
    return lambda_s, eta_s


def check_parameterization(parameterization: str) -> str:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {parameterization!r}: choose one of {', '.join(PARAMETERIZATIONS)}")
    return parameterization


def _per_example(x: jax.Array, like: jax.Array) -> jax.Array:
    """[B] -> [B, 1, ..., 1] broadcastable against ``like``."""
    return jnp.reshape(x, x.shape + (1,) * (like.ndim - x.ndim))


def target(
    parameterization: str,
    z_s: jax.Array,
    z_e: jax.Array,
    t_s: jax.Array,
    t_e: jax.Array,
    a_s: jax.Array,
    a_e: jax.Array,
) -> jax.Array:
    """What the student should output for the segment z_s -> z_e of window (t_s, t_e).

    velocity: v = (z_e - z_s) / (t_e - t_s); eps types: eps = (z_e - lambda_s z_s) / eta_s.
    z_s, z_e: [B, ...]; t_s, t_e, a_s, a_e: [B].
    """
    check_parameterization(parameterization)
    if parameterization == "velocity":
        return (z_e - z_s) / _per_example(t_e - t_s, z_s)
    lambda_s, eta_s = window_coefficients(parameterization, a_s, a_e)
    return (z_e - _per_example(lambda_s, z_s) * z_s) / _per_example(eta_s, z_s)


def eps_to_velocity(
    parameterization: str,
    eps: jax.Array,
    z_t: jax.Array,
    t: jax.Array,
    t_s: jax.Array,
    t_e: jax.Array,
    a_s: jax.Array,
    a_e: jax.Array,
) -> jax.Array:
    """The velocity an eps prediction at (z_t, t) implies inside window (t_s, t_e).

    D = lambda_s (t - t_s) + (t_e - t); lambda_t = lambda_s (t_e - t_s) / D; eta_t = eta_s (t_e - t) / D;
    z_e_hat = lambda_t z_t + eta_t eps; v = (z_e_hat - z_t) / (t_e - t). Inverts the straight line
    through z_s and z_e exactly. eps, z_t: [B, ...]; the rest [B].
    """
    lambda_s, eta_s = window_coefficients(parameterization, a_s, a_e)
    d = lambda_s * (t - t_s) + (t_e - t)
    lambda_t = lambda_s * (t_e - t_s) / d
    eta_t = eta_s * (t_e - t) / d
    z_e_hat = _per_example(lambda_t, z_t) * z_t + _per_example(eta_t, z_t) * eps
    return (z_e_hat - z_t) / _per_example(t_e - t, z_t)
