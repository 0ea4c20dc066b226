"""FLOP counts of jitted functions, for the MFU column of ``train`` and of bench/.

XLA's cost analysis of a lowered (not yet optimised) program counts every matrix product and
convolution, but the body of a while loop only once: the teacher's S-step window solve (a
``fori_loop``) counts as one of its S steps. ``train_step_flops`` adds the S - 1 that are left
out. The compiled program's count is not used: on GPUs the convolutions and matrix products that
become cuDNN / cuBLAS calls are missing from it (bench/RESULTS.md).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from perflow_jax import solver, step


def cost_flops(stage) -> float | None:
    """FLOPs of one call from XLA's cost analysis of a Lowered or Compiled function (None if absent).

    cost_analysis() gives a dict, or a list of dicts in older jax. Custom calls (cuDNN attention,
    and on GPUs cuBLAS / cuDNN matrix products and convolutions) may count as zero.
    """
    try:
        cost = stage.cost_analysis()
    except Exception:  # a backend without cost analysis raises; which exception is not documented
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return float(cost["flops"]) if cost and "flops" in cost else None


def train_step_flops(
    lowered_step: jax.stages.Lowered,
    networks: step.Networks,
    settings: step.PeRFlowSettings,
    frozen: dict[str, Any],
    batch: dict[str, jax.Array],
) -> float | None:
    """FLOPs of one training step over the global batch: the lowered step's count plus the solver
    steps that the count of its loop leaves out, (S - 1) x the lowered count of one solver step.

    Args:
      lowered_step: ``jax.jit(step.train_step...).lower(state, batch, rng, frozen)``.
      networks, settings: those of the step.
      frozen, batch: the step's arguments (arrays or ShapeDtypeStructs).
    Returns:
      FLOPs, or None where the backend has no cost analysis.
    """
    whole = cost_flops(lowered_step)
    if whole is None or settings.solver_steps == 1:
        return whole
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (frozen, batch))
    cond = jax.eval_shape(functools.partial(step.encode_text, networks), *shapes)
    size = batch["mean"].shape[0]
    z = jax.ShapeDtypeStruct(batch["mean"].shape, jnp.float32)
    window = jax.ShapeDtypeStruct((size,), jnp.int32)

    def one_solver_step(teacher, z, window, cond):
        return solver.solve_window(
            step.unet_apply(networks.teacher, teacher), z, window, cond, cond, networks.alphas_cumprod,
            num_windows=settings.num_windows, num_steps=1, guidance=settings.teacher_guidance,
            prediction_type=settings.teacher_prediction_type,
        )  # fmt: skip

    body = cost_flops(jax.jit(one_solver_step).lower(shapes[0]["teacher"], z, window, cond))
    return None if body is None else whole + (settings.solver_steps - 1) * body
