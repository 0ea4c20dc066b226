"""The window sampler: the reference's timesteps, exact identities in float64, CFG."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perflow_jax import sampler, schedule, solver
from tests.helpers.schedules import SPEC_TIMESTEPS, sd_alphas


@pytest.mark.parametrize("steps, expected", SPEC_TIMESTEPS)
def test_timesteps_are_the_references(steps, expected):
    np.testing.assert_array_equal(sampler.sampler_timesteps(steps, 4), expected)


def test_fewer_steps_than_windows_is_an_error_that_says_why():
    with pytest.raises(ValueError, match="1 sampling steps for a model trained with 4 windows.*use 4 or more"):
        sampler.sampler_timesteps(1, 4)


def eps_model(z, timesteps, cond):
    """A nonlinear eps-predictor that depends on the timestep and the condition."""
    return jnp.sin(z) + 0.01 * timesteps[:, None] / 1000 + cond


def test_ddim_eps_with_one_step_per_window_is_ddim_between_window_boundaries():
    with jax.enable_x64(True):
        ab = sd_alphas(jnp.float64)
        noise = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)))
        cond = jnp.zeros((3, 1), jnp.float64)
        z = sampler.sample(eps_model, noise, cond, cond, ab, num_steps=4, num_windows=4, parameterization="ddim_eps")
        expected = noise
        for k, tau in enumerate([1000, 750, 500, 250]):
            t_s, t_e = schedule.window_bounds(jnp.array([k] * 3), 4, jnp.float64)
            eps = eps_model(expected, jnp.full(3, tau, jnp.float32), cond)
            expected = solver.ddim_step(
                expected, eps, schedule.alpha_at(ab, t_s), schedule.alpha_at(ab, t_e), "epsilon"
            )
        np.testing.assert_allclose(z, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("parameterization", ["ddim_eps", "diff_eps"])
def test_guiding_eps_equals_guiding_the_velocities(parameterization):
    with jax.enable_x64(True):
        ab = sd_alphas(jnp.float64)
        rng = np.random.default_rng(1)
        z = jnp.asarray(rng.standard_normal((2, 5)))
        out_u, out_c = jnp.asarray(rng.standard_normal((2, 2, 5)))
        w = 4.5
        convert = functools.partial(sampler.velocity, z=z, ab=ab, parameterization=parameterization, num_windows=4)
        for timestep in (1000, 916, 750, 333, 83):
            t = jnp.float32(timestep / 1000)
            guided_eps = convert(out_u + w * (out_c - out_u), t=t)
            v_u, v_c = convert(out_u, t=t), convert(out_c, t=t)
            np.testing.assert_allclose(guided_eps, v_u + w * (v_c - v_u), rtol=1e-10)


def test_constant_velocity_is_integrated_exactly_over_the_unit_interval():
    v = jnp.array([[1.0, -2.0]])
    z = sampler.sample(
        lambda z, t, c: jnp.broadcast_to(v, z.shape), jnp.zeros((1, 2)), None, None, sd_alphas(),
        num_steps=6, num_windows=4, parameterization="velocity",
    )  # fmt: skip
    np.testing.assert_allclose(z, -v, rtol=1e-6)  # z_0 = z_1 + (0 - 1) v


def test_sampler_with_cfg_jits_and_calls_the_model_once_per_step_on_both_halves():
    shapes = []

    def model(z, timesteps, cond):
        shapes.append(z.shape)
        return jnp.tanh(z) + cond

    run = jax.jit(
        functools.partial(sampler.sample, model, num_steps=8, num_windows=4, parameterization="diff_eps", guidance=6.0)
    )
    noise = jnp.ones((2, 3))
    z = run(noise, jnp.ones((2, 1)), jnp.zeros((2, 1)), sd_alphas())
    assert shapes == [(4, 3)] and bool(jnp.all(jnp.isfinite(z)))
