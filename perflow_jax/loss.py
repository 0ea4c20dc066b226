"""The reflow loss of one batch (PERFLOW_SPEC.md, "One training example").

``reflow_targets`` builds, without gradient, what the student is trained on: the window start
z_s (real latents forward-diffused to t_s), the teacher's window end z_e, the point z_t on the
straight segment between them and the target of the parameterization. ``reflow_loss`` compares
the student's prediction with the target in float32 and reports the loss per window.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from perflow_jax import schedule, solver

WEIGHTINGS = ("none", "reciprocal", "rcp_win")
DISTANCES = ("l2", "huber")
HUBER_C = 1e-3  # the authors' default --huber_c


class Reflow(NamedTuple):
    """One batch's reflow problem; arrays [B, ...] (latents) or [B] (times), float32."""

    z_s: jax.Array
    z_e: jax.Array
    z_t: jax.Array
    target: jax.Array
    t: jax.Array  # the student's time; it sees the timestep t * 1000
    window: jax.Array  # int32 window index
    t_s: jax.Array
    t_e: jax.Array
    cond: Any  # the condition the student sees (text dropped to the empty prompt where masked)


def drop_condition(cond: Any, null_cond: Any, drop: jax.Array) -> Any:
    """Each leaf's example b replaced by the empty prompt's where ``drop[b]`` (bool [B])."""
    return jax.tree.map(lambda c, n: jnp.where(drop.reshape((-1,) + (1,) * (c.ndim - 1)), n, c), cond, null_cond)


def reflow_targets(
    teacher: solver.Apply,
    x0: jax.Array,
    eps: jax.Array,
    t: jax.Array,
    cond: Any,
    null_cond: Any,
    drop: jax.Array,
    ab: jax.Array,
    *,
    parameterization: str,
    num_windows: int,
    num_steps: int,
    guidance: float = 1.0,
    prediction_type: str = "epsilon",
    zero_snr: bool = False,
    final_alpha: float | None = None,
) -> Reflow:
    """The batch's reflow problem.

    Args:
      teacher: the frozen teacher, ``apply(z, timesteps, cond)``.
      x0: [B, ...] latents times the VAE's scaling factor; eps: [B, ...] standard normal noise.
      t: [B] times in (0, 1] (``schedule.sample_times``).
      cond, null_cond: pytrees of batch-first condition arrays; the empty prompt's for null_cond.
      drop: [B] bool, where the text is dropped to the empty prompt (probability 0.1 in the recipes).
      ab: [1000] the teacher's alphas_cumprod.
      parameterization: "velocity", "ddim_eps" or "diff_eps" (what the student outputs).
      num_windows, num_steps: K and the teacher's S steps per window.
      guidance: the teacher's CFG scale. 1 is the SD1.5 recipe's cfg_sync: the teacher sees the
        same dropped-out text as the student. Above 1 (SDXL: 7.5) the teacher guides the full
        prompt against the empty one.
      prediction_type: the teacher's output, "epsilon" or "v_prediction".
      zero_snr: start windows at t_s = 1 from pure noise (z_s = eps).
      final_alpha: the alpha the teacher's last DDIM step lands on (``solver.solve_window``); None
        for ab[0]. The targets' a_e stays ab[0] whatever it is, as in the authors' code.
    """
    schedule.check_parameterization(parameterization)
    x0, eps = x0.astype(jnp.float32), eps.astype(jnp.float32)
    window = schedule.window_index(t, num_windows)
    t_s, t_e = schedule.window_bounds(window, num_windows)
    a_s, a_e = schedule.alpha_at(ab, t_s), schedule.alpha_at(ab, t_e)
    per_example = (-1,) + (1,) * (x0.ndim - 1)
    z_s = jnp.sqrt(a_s).reshape(per_example) * x0 + jnp.sqrt(1 - a_s).reshape(per_example) * eps
    if zero_snr:
        z_s = jnp.where((t_s == 1.0).reshape(per_example), eps, z_s)
    student_cond = drop_condition(cond, null_cond, drop)
    z_e = solver.solve_window(
        teacher, z_s, window, student_cond if guidance == 1.0 else cond, null_cond, ab,
        num_windows=num_windows, num_steps=num_steps, guidance=guidance, prediction_type=prediction_type,
        final_alpha=final_alpha,
    )  # fmt: skip
    z_t = z_s + (z_e - z_s) * ((t - t_s) / (t_e - t_s)).reshape(per_example)
    return Reflow(
        z_s=z_s,
        z_e=z_e,
        z_t=z_t,
        target=schedule.target(parameterization, z_s, z_e, t_s, t_e, a_s, a_e),
        t=t,
        window=window,
        t_s=t_s,
        t_e=t_e,
        cond=student_cond,
    )


def loss_weights(weighting: str, t: jax.Array, t_s: jax.Array, num_windows: int) -> jax.Array:
    """Per-example weights [B] of examples at times ``t`` [B] in windows starting at ``t_s`` [B].

    none: 1. reciprocal: 1 / max(1 - t, 0.1) / 2.3 (more weight near the noise end; 2.3 is the
    integral of 1 / (1 - t) over [0, 0.9]). rcp_win, as the authors' SDXL script: the window's
    start t_s over its mean over the K windows, t_s / ((1 + K) / (2 K)) (noisier windows weigh more).
    """
    if weighting == "none":
        return jnp.ones_like(t)
    if weighting == "reciprocal":
        return 1.0 / jnp.maximum(1.0 - t, 0.1) / 2.3
    if weighting == "rcp_win":
        return t_s / ((1.0 + num_windows) / (2.0 * num_windows))
    raise ValueError(f"unknown loss weighting {weighting!r}: choose one of {', '.join(WEIGHTINGS)}")


def reflow_loss(
    prediction: jax.Array,
    reflow: Reflow,
    *,
    num_windows: int,
    distance: str = "l2",
    weighting: str = "none",
    huber_c: float = HUBER_C,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(scalar loss, metrics) for the student's ``prediction`` [B, ...] of ``reflow.target``.

    l2: mean squared error; huber: mean of sqrt(d^2 + c^2) - c with c = ``huber_c`` (> 0); per
    example weighted, then averaged, all in float32. (The authors' SDXL script offers huber with
    no weighting only, their SD1.5 script l2 only; here any distance goes with any weighting.)
    Metrics: ``loss`` and, per window k, the sum of the unweighted per-example losses
    ``window_loss_sum[k]`` and the count ``window_count[k]`` (sums, so that they add up over steps
    and devices; their ratio is the loss per window).
    """
    d = prediction.astype(jnp.float32) - reflow.target.astype(jnp.float32)
    if distance == "l2":
        elementwise = d**2
    elif distance == "huber":
        elementwise = jnp.sqrt(d**2 + huber_c**2) - huber_c
    else:
        raise ValueError(f"unknown loss distance {distance!r}: choose one of {', '.join(DISTANCES)}")
    per_example = jnp.mean(elementwise.reshape(elementwise.shape[0], -1), axis=1)
    loss = jnp.mean(loss_weights(weighting, reflow.t, reflow.t_s, num_windows) * per_example)
    one_hot = jax.nn.one_hot(reflow.window, num_windows, dtype=jnp.float32)  # [B, K]
    metrics = {
        "loss": loss,
        "window_loss_sum": one_hot.T @ per_example,
        "window_count": one_hot.sum(axis=0),
    }
    return loss, metrics
