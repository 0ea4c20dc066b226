"""Noise schedule, windows and parameterizations: exact values and float64 identities."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perflow_jax import schedule
from tests.helpers.schedules import SD_SCHEDULER


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize(
    "config",
    [
        SD_SCHEDULER,
        {"beta_schedule": "linear"},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"trained_betas": np.linspace(1e-4, 2e-2, 1000).tolist()},
    ],
    ids=["scaled_linear", "linear", "squaredcos_cap_v2", "trained_betas"],
)
def test_alphas_cumprod_equal_diffusers_bit_for_bit(config):
    expected = diffusers.DDIMScheduler(**config).alphas_cumprod.numpy()
    np.testing.assert_array_equal(schedule.alphas_cumprod_from_config(config), expected)


def test_unsupported_scheduler_configs_are_named():
    with pytest.raises(ValueError, match="beta_schedule='sigmoid'"):
        schedule.alphas_cumprod_from_config({"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="num_train_timesteps=500"):
        schedule.alphas_cumprod_from_config({**SD_SCHEDULER, "num_train_timesteps": 500})


def test_alpha_at_truncates_and_uses_the_final_alpha_below_zero():
    ab = jnp.asarray(schedule.alphas_cumprod_from_config(SD_SCHEDULER))
    t = jnp.array([1.0, 0.75, 0.5, 0.25, 0.0, 0.0005, 0.9999])
    np.testing.assert_array_equal(schedule.alpha_at(ab, t), ab[jnp.array([999, 749, 499, 249, 0, 0, 998])])


@pytest.mark.parametrize(
    "config",
    [
        diffusers.DDPMScheduler(**SD_SCHEDULER).config,  # no set_alpha_to_one key: DDIM's default, True
        {**SD_SCHEDULER, "set_alpha_to_one": True},
        {**SD_SCHEDULER, "_class_name": "PNDMScheduler", "set_alpha_to_one": False},  # SD1.5's, as released
    ],
    ids=["key-missing", "true", "false"],
)
def test_final_alpha_is_ddim_schedulers_loaded_from_the_teachers_config(config):
    """As the authors' ``DDIMScheduler.from_pretrained(teacher, subfolder="scheduler").final_alpha_cumprod``."""
    expected = diffusers.DDIMScheduler.from_config(dict(config)).final_alpha_cumprod
    assert schedule.final_alpha_from_config(dict(config)) == float(expected)


def test_final_alpha_is_one_or_the_first_alpha():
    ab = schedule.alphas_cumprod_from_config(SD_SCHEDULER)
    assert schedule.final_alpha_from_config(SD_SCHEDULER) == 1.0
    assert schedule.final_alpha_from_config({**SD_SCHEDULER, "set_alpha_to_one": False}) == float(ab[0])


def reference_window(tp: np.float32, num_windows: int) -> int:
    """The authors' Time_Windows.get_window loop, in float32 as their tensors are."""
    ends = [np.float32(i / num_windows) for i in range(num_windows - 1, -1, -1)]
    idx = 0
    while tp - np.float32(0.1 / 1000) <= ends[idx]:
        idx += 1
    return idx


@pytest.mark.parametrize("num_windows", [1, 2, 3, 4, 8])
def test_window_lookup_matches_the_reference_on_every_training_time(num_windows):
    times = np.unique(np.concatenate([1 - np.arange(1000) / 1000, 1 - np.arange(200) / 200]).astype(np.float32))
    expected = [reference_window(tp, num_windows) for tp in times]
    np.testing.assert_array_equal(schedule.window_index(jnp.asarray(times), num_windows), expected)


def test_window_boundaries_belong_to_the_window_they_start():
    t = jnp.array([1.0, 0.75, 0.7499, 0.5, 0.25, 1e-3])
    np.testing.assert_array_equal(schedule.window_index(t, 4), [0, 1, 1, 2, 3, 3])
    t_s, t_e = schedule.window_bounds(jnp.arange(4), 4)
    np.testing.assert_array_equal(t_s, [1.0, 0.75, 0.5, 0.25])
    np.testing.assert_array_equal(t_e, [0.75, 0.5, 0.25, 0.0])


@pytest.mark.parametrize("num_discrete", [1000, 200])
def test_training_times_lie_on_the_discrete_grid_in_0_1(num_discrete):
    t = np.asarray(schedule.sample_times(jax.random.key(0), 20000, num_discrete))
    assert t.min() > 0 and t.max() == 1.0
    np.testing.assert_allclose(t * num_discrete, np.round(t * num_discrete), atol=1e-3)
    # Uniform over the M grid points: each appears about 20000 / M times.
    counts = np.bincount(np.round(t * num_discrete).astype(int), minlength=num_discrete + 1)[1:]
    assert counts.min() > 0 and len(np.unique(np.round(t * num_discrete))) == num_discrete


def random_segment(rng, parameterization, batch=6):
    """Random z_s, z_e in random windows of K = 4, float64, with the schedule's alphas."""
    ab = jnp.asarray(schedule.alphas_cumprod_from_config(SD_SCHEDULER), jnp.float64)
    window = jnp.asarray(rng.integers(0, 4, batch))
    t_s, t_e = schedule.window_bounds(window, 4, jnp.float64)
    a_s, a_e = schedule.alpha_at(ab, t_s), schedule.alpha_at(ab, t_e)
    z_s, z_e = (jnp.asarray(rng.standard_normal((batch, 3, 3, 2))) for _ in range(2))
    return z_s, z_e, t_s, t_e, a_s, a_e


@pytest.mark.parametrize("parameterization", ["ddim_eps", "diff_eps"])
@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.999])
def test_eps_target_converted_back_anywhere_in_the_window_reaches_z_e(x64, parameterization, fraction):
    z_s, z_e, t_s, t_e, a_s, a_e = random_segment(np.random.default_rng(0), parameterization)
    eps = schedule.target(parameterization, z_s, z_e, t_s, t_e, a_s, a_e)
    t = t_s + fraction * (t_e - t_s)
    z_t = z_s + (z_e - z_s) * ((t - t_s) / (t_e - t_s))[:, None, None, None]
    v = schedule.eps_to_velocity(parameterization, eps, z_t, t, t_s, t_e, a_s, a_e)
    assert v.dtype == jnp.float64
    np.testing.assert_allclose(z_t + (t_e - t)[:, None, None, None] * v, z_e, rtol=1e-9, atol=1e-9)


def test_velocity_target_is_the_segment_slope(x64):
    z_s, z_e, t_s, t_e, a_s, a_e = random_segment(np.random.default_rng(1), "velocity")
    v = schedule.target("velocity", z_s, z_e, t_s, t_e, a_s, a_e)
    np.testing.assert_allclose(z_s + (t_e - t_s)[:, None, None, None] * v, z_e, rtol=1e-12, atol=1e-12)


def test_ddim_eps_coefficients_are_one_ddim_step(x64):
    """z_e = lambda_s z_s + eta_s eps is DDIM from a_s to a_e with x0 = (z_s - sqrt(1 - a_s) eps) / sqrt(a_s)."""
    rng = np.random.default_rng(2)
    a_s, a_e = jnp.asarray([0.1, 0.5]), jnp.asarray([0.4, 0.9])
    z_s, eps = jnp.asarray(rng.standard_normal((2, 5))), jnp.asarray(rng.standard_normal((2, 5)))
    lambda_s, eta_s = schedule.window_coefficients("ddim_eps", a_s, a_e)
    x0 = (z_s - jnp.sqrt(1 - a_s)[:, None] * eps) / jnp.sqrt(a_s)[:, None]
    ddim = jnp.sqrt(a_e)[:, None] * x0 + jnp.sqrt(1 - a_e)[:, None] * eps
    np.testing.assert_allclose(lambda_s[:, None] * z_s + eta_s[:, None] * eps, ddim, rtol=1e-12)


def test_unknown_parameterization_is_named():
    with pytest.raises(ValueError, match="unknown parameterization 'x0'.*velocity, ddim_eps, diff_eps"):
        schedule.check_parameterization("x0")
