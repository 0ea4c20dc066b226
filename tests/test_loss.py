"""The reflow batch and loss: window start points, teacher ends, segment points, targets, metrics."""

import jax.numpy as jnp
import numpy as np
import pytest

from perflow_jax import loss, schedule, solver
from tests.helpers.schedules import sd_alphas


def teacher(z, timesteps, cond):
    """A nonlinear, condition-dependent eps-predictor."""
    return jnp.tanh(z) * 0.5 + cond[:, :1] * 0.1 + timesteps[:, None] * 1e-4


def batch(seed=0, size=5):
    rng = np.random.default_rng(seed)
    x0 = jnp.asarray(rng.standard_normal((size, 3)), jnp.float32)
    eps = jnp.asarray(rng.standard_normal((size, 3)), jnp.float32)
    t = jnp.array([1.0, 0.9, 0.75, 0.31, 0.001][:size])
    cond = jnp.asarray(rng.standard_normal((size, 2)), jnp.float32)
    null = jnp.zeros((size, 2))
    return x0, eps, t, cond, null


def targets(parameterization="diff_eps", drop=None, guidance=1.0, zero_snr=False):
    x0, eps, t, cond, null = batch()
    drop = jnp.zeros(5, bool) if drop is None else drop
    return loss.reflow_targets(
        teacher, x0, eps, t, cond, null, drop, sd_alphas(),
        parameterization=parameterization, num_windows=4, num_steps=8, guidance=guidance, zero_snr=zero_snr,
    )  # fmt: skip


def test_window_start_is_the_data_diffused_to_t_s():
    x0, eps, _, _, _ = batch()
    r = targets()
    np.testing.assert_array_equal(r.window, [0, 0, 1, 2, 3])
    a_s = sd_alphas()[jnp.array([999, 999, 749, 499, 249])][:, None]
    np.testing.assert_allclose(r.z_s, jnp.sqrt(a_s) * x0 + jnp.sqrt(1 - a_s) * eps, rtol=1e-6)


def test_window_end_is_the_teachers_solve_and_z_t_lies_on_the_segment():
    r = targets()
    expected_end = solver.solve_window(
        teacher, r.z_s, r.window, r.cond, r.cond, sd_alphas(), num_windows=4, num_steps=8
    )
    np.testing.assert_allclose(r.z_e, expected_end, rtol=1e-6)
    fraction = ((r.t - r.t_s) / (r.t_e - r.t_s))[:, None]
    np.testing.assert_allclose(r.z_t, r.z_s + fraction * (r.z_e - r.z_s), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(r.z_t[0], r.z_s[0])  # t = t_s = 1


@pytest.mark.parametrize("parameterization", schedule.PARAMETERIZATIONS)
def test_target_is_the_parameterizations(parameterization):
    r = targets(parameterization)
    ab = sd_alphas()
    a_s, a_e = schedule.alpha_at(ab, r.t_s), schedule.alpha_at(ab, r.t_e)
    np.testing.assert_allclose(r.target, schedule.target(parameterization, r.z_s, r.z_e, r.t_s, r.t_e, a_s, a_e))


def test_dropped_text_is_the_empty_prompt_for_student_and_cfg_sync_teacher():
    drop = jnp.array([True, False, True, False, False])
    r = targets(drop=drop)
    _, _, _, cond, null = batch()
    np.testing.assert_array_equal(r.cond, jnp.where(drop[:, None], null, cond))
    kept = targets()
    # cfg_sync: the teacher saw the dropped text too, so dropped examples end elsewhere.
    assert not np.allclose(r.z_e[0], kept.z_e[0]) and np.allclose(r.z_e[1], kept.z_e[1])


def test_guided_teacher_sees_the_full_prompt_against_the_empty_one():
    drop = jnp.array([True, False, True, False, False])
    r = targets(drop=drop, guidance=7.5)
    _, _, _, cond, null = batch()
    expected = solver.solve_window(
        teacher, r.z_s, r.window, cond, null, sd_alphas(), num_windows=4, num_steps=8, guidance=7.5
    )
    np.testing.assert_allclose(r.z_e, expected, rtol=1e-6)


def test_zero_snr_starts_the_first_window_from_pure_noise():
    _, eps, _, _, _ = batch()
    r = targets(zero_snr=True)
    np.testing.assert_array_equal(r.z_s[:2], eps[:2])
    np.testing.assert_allclose(r.z_s[2:], targets().z_s[2:])


def test_l2_loss_and_per_window_metrics():
    r = targets()
    prediction = r.target + jnp.arange(5.0)[:, None]  # example b is off by b everywhere
    value, metrics = loss.reflow_loss(prediction, r, num_windows=4)
    per_example = jnp.arange(5.0) ** 2
    np.testing.assert_allclose(value, per_example.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["window_loss_sum"], [0 + 1, 4, 9, 16], rtol=1e-6)
    np.testing.assert_array_equal(metrics["window_count"], [2, 1, 1, 1])


def test_huber_loss_is_sqrt_d2_plus_c2_minus_c():
    r = targets()
    d = jnp.asarray(np.random.default_rng(3).standard_normal(r.target.shape), jnp.float32) * 1e-3
    value, _ = loss.reflow_loss(r.target + d, r, num_windows=4, distance="huber")
    np.testing.assert_allclose(value, jnp.mean(jnp.sqrt(d**2 + 1e-6) - 1e-3), rtol=1e-5)


def test_huber_loss_uses_the_given_constant():
    r = targets()
    d = jnp.asarray(np.random.default_rng(3).standard_normal(r.target.shape), jnp.float32) * 0.1
    value, _ = loss.reflow_loss(r.target + d, r, num_windows=4, distance="huber", huber_c=0.05)
    # float32: (target + d) - target is d to a rounding of the target (~1e-7 of it), so rtol 1e-5.
    np.testing.assert_allclose(value, jnp.mean(jnp.sqrt(d**2 + 0.05**2) - 0.05), rtol=1e-5)


def test_reciprocal_weightings():
    t = jnp.array([1.0, 0.95, 0.5, 0.001])
    t_s, _ = schedule.window_bounds(schedule.window_index(t, 4), 4)
    np.testing.assert_allclose(loss.loss_weights("reciprocal", t, t_s, 4), 1 / np.array([0.1, 0.1, 0.5, 0.999]) / 2.3)
    # rcp_win: the window's start over the mean start (1 + K) / (2 K) = 0.625 of K = 4 windows.
    np.testing.assert_allclose(loss.loss_weights("rcp_win", t, t_s, 4), np.array([1.0, 1.0, 0.5, 0.25]) / 0.625)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"distance": "l1"}, "unknown loss distance 'l1'"), ({"weighting": "snr"}, "unknown loss weighting 'snr'")],
)
def test_unknown_loss_options_are_named(kwargs, message):
    r = targets()
    with pytest.raises(ValueError, match=message):
        loss.reflow_loss(r.target, r, num_windows=4, **kwargs)
