"""The teacher's window solve: the reference's timestep tables, CFG, and convergence to the exact flow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perflow_jax import schedule, solver
from tests.helpers.schedules import SD_SCHEDULER, sd_alphas


def test_teacher_table_k4_s8_is_the_references():
    np.testing.assert_array_equal(
        solver.teacher_timesteps(4, 8),
        [
            [999, 968, 936, 905, 874, 843, 812, 780],
            [749, 718, 686, 655, 624, 593, 562, 530],
            [499, 468, 436, 405, 374, 343, 312, 280],
            [249, 218, 187, 155, 124, 93, 62, 30],
        ],
    )


def test_teacher_table_k4_s10_steps_by_25():
    expected = [[start - 25 * i for i in range(10)] for start in (999, 749, 499, 249)]
    np.testing.assert_array_equal(solver.teacher_timesteps(4, 10), expected)


class Recorder:
    """A teacher that records the shapes it was called with and returns a condition-dependent eps."""

    def __init__(self):
        self.calls = []

    def __call__(self, z, timesteps, cond):
        self.calls.append((z.shape, timesteps.shape, jax.tree.map(jnp.shape, cond)))
        return 0.1 * z + cond["text_embeds"][:, :1] + timesteps[:, None] * 1e-4


def sdxl_like_cond(batch, value):
    return {
        "context": jnp.full((batch, 7, 4), value),
        "text_embeds": jnp.full((batch, 3), value),
        "time_ids": jnp.full((batch, 6), value),
    }


def test_guidance_one_runs_the_teacher_once_per_step_on_the_batch():
    teacher = Recorder()
    z = jnp.ones((3, 2))
    solver.solve_window(
        teacher, z, jnp.array([0, 1, 3]), sdxl_like_cond(3, 1.0), sdxl_like_cond(3, 0.0), sd_alphas(),
        num_windows=4, num_steps=8,
    )  # fmt: skip
    assert [shape for shape, _, _ in teacher.calls] == [(3, 2)]  # traced once inside fori_loop
    assert teacher.calls[0][2] == {"context": (3, 7, 4), "text_embeds": (3, 3), "time_ids": (3, 6)}


def test_guidance_runs_both_halves_in_one_batch_and_combines_them():
    teacher = Recorder()
    z = jnp.ones((2, 2))
    w = 7.5
    cond, null = sdxl_like_cond(2, 1.0), sdxl_like_cond(2, 0.0)
    out = solver.guided(teacher, z, jnp.array([999.0, 500.0]), cond, null, w)
    assert teacher.calls[0][0] == (4, 2) and teacher.calls[0][2]["time_ids"] == (4, 6)
    out_u = solver.guided(teacher, z, jnp.array([999.0, 500.0]), null, null, 1.0)
    out_c = solver.guided(teacher, z, jnp.array([999.0, 500.0]), cond, cond, 1.0)
    np.testing.assert_allclose(out, out_u + w * (out_c - out_u), rtol=1e-6)


def test_each_example_steps_through_its_own_windows_timesteps():
    seen = []

    def teacher(z, timesteps, cond):
        jax.debug.callback(lambda t: seen.append(np.asarray(t)), timesteps)
        return jnp.zeros_like(z)

    solver.solve_window(
        teacher, jnp.ones((2, 1)), jnp.array([0, 3]), jnp.zeros((2, 1)), jnp.zeros((2, 1)), sd_alphas(),
        num_windows=4, num_steps=8,
    )  # fmt: skip
    np.testing.assert_array_equal(np.stack(seen), solver.teacher_timesteps(4, 8)[[0, 3]].T)


@pytest.mark.parametrize("final_alpha", [None, 1.0])
def test_only_the_last_windows_last_step_lands_on_the_final_alpha(final_alpha):
    """With eps = 0 each DDIM step scales z by sqrt(ab[tau - J] / ab[tau]) (J = 31 for K = 4, S = 8);
    only the last step of window 3 (tau = 30) has no previous alpha and lands on the final alpha
    (ab[0] by default, 1 for a teacher whose scheduler sets alpha to one).

    float32: 8 steps of about four roundings each, so rtol 4e-6.
    """
    ab64 = schedule.alphas_cumprod_from_config(SD_SCHEDULER).astype(np.float64)
    z_s = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    z_e = solver.solve_window(
        lambda z, t, c: jnp.zeros_like(z), jnp.asarray(z_s), jnp.array([0, 1, 2, 3]), None, None, sd_alphas(),
        num_windows=4, num_steps=8, final_alpha=final_alpha,
    )  # fmt: skip
    tau = solver.teacher_timesteps(4, 8)  # [K, S]
    a_prev = ab64[np.maximum(tau - 31, 0)]
    a_prev[3, 7] = ab64[0] if final_alpha is None else final_alpha
    expected = z_s * np.sqrt(np.prod(a_prev / ab64[tau], axis=1))[:, None]
    np.testing.assert_allclose(z_e, expected, rtol=4e-6)


# ---- the analytic teacher: data x0 ~ N(0, s^2 I) ------------------------------------------------
# z = sqrt(a) x0 + sqrt(1 - a) eps is N(0, var(a) I) with var(a) = a s^2 + 1 - a, so
# E[eps | z] = sqrt(1 - a) z / var(a), E[x0 | z] = sqrt(a) s^2 z / var(a), and the probability-flow
# ODE maps z at alpha a_1 to z sqrt(var(a_2) / var(a_1)) at alpha a_2.
S2 = 0.25


def variance(a):
    return a * S2 + 1 - a


def analytic_teacher(ab, prediction_type):
    def apply(z, timesteps, cond):
        a = ab[timesteps.astype(jnp.int32)][:, None]
        eps = jnp.sqrt(1 - a) * z / variance(a)
        if prediction_type == "epsilon":
            return eps
        x0 = jnp.sqrt(a) * S2 * z / variance(a)
        return jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0  # v = sqrt(a) eps - sqrt(1 - a) x0

    return apply


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_window_solve_converges_to_the_exact_flow_map(prediction_type):
    with jax.enable_x64(True):
        ab = sd_alphas(jnp.float64)
        teacher = analytic_teacher(ab, prediction_type)
        z_s = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8)))
        window = jnp.array([0, 1, 2, 3])
        t_s, t_e = schedule.window_bounds(window, 4)
        exact = z_s * jnp.sqrt(variance(schedule.alpha_at(ab, t_e)) / variance(schedule.alpha_at(ab, t_s)))[:, None]
        errors = {}
        for steps in (1, 2, 5, 10, 25, 50, 125, 250):  # steps dividing 250: the grid ends exactly at t_e
            z_e = solver.solve_window(
                teacher, z_s, window, jnp.zeros((4, 1)), jnp.zeros((4, 1)), ab,
                num_windows=4, num_steps=steps, prediction_type=prediction_type,
            )  # fmt: skip
            errors[steps] = float(jnp.linalg.norm(z_e - exact) / jnp.linalg.norm(exact))
    table = ", ".join(f"S={s}: {e:.2e}" for s, e in errors.items())
    print(f"{prediction_type} teacher, window solve error vs the exact flow: {table}")
    values = list(errors.values())
    assert all(later < earlier for earlier, later in zip(values, values[1:], strict=False))
    # DDIM is first order: the error shrinks in proportion to the step size (measured: S=1 1.3e-1,
    # S=10 1.8e-2, S=250 8.3e-4, the same for eps and v teachers).
    assert errors[250] < errors[25] / 8
    assert errors[250] < 1e-3


def test_unknown_teacher_prediction_type_is_named():
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        solver.solve_window(
            lambda z, t, c: z, jnp.ones((1, 1)), jnp.array([0]), None, None, sd_alphas(),
            num_windows=4, num_steps=2, prediction_type="sample",
        )  # fmt: skip
