"""SD's noise schedule and the spec's sampler timesteps."""

import jax.numpy as jnp

from perflow_jax import schedule

# The scheduler config of SD1.x, SD2.x and SDXL base (their betas are the same).
SD_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}

# PERFLOW_SPEC.md "Sampler": the timesteps of N steps with K = 4 windows.
SPEC_TIMESTEPS = [
    (4, [1000, 750, 500, 250]),
    (5, [1000, 875, 750, 500, 250]),
    (6, [1000, 875, 750, 625, 500, 250]),
    (8, [1000, 875, 750, 625, 500, 375, 250, 125]),
    (12, [1000, 916, 833, 750, 666, 583, 500, 416, 333, 250, 166, 83]),
]


def sd_alphas(dtype=jnp.float32):
    """SD's alphas_cumprod, [1000] in ``dtype``."""
    return jnp.asarray(schedule.alphas_cumprod_from_config(SD_SCHEDULER), dtype)
