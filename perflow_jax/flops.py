"""FLOP counts of jitted functions, for the MFU column of ``train`` and of bench/.

XLA's cost analysis of a lowered (not yet optimised) program counts every matrix product and
convolution, but the body of a while loop only once: the teacher's S-step window solve (a
``fori_loop``) counts as one of its S steps, and gradient accumulation's loop over microbatches
as one microbatch. ``train_step_flops`` adds what is left out. The compiled program's count is
not used: on GPUs the convolutions and matrix products that become cuDNN / cuBLAS calls are
missing from it (bench/RESULTS.md).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from perflow_jax import pipeline, solver, step

# Dense bfloat16 peak FLOP/s per chip, by jax's device_kind, for the MFU column.
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
}


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
    components: step.Components,
    settings: step.PeRFlowSettings,
    params: Any,
    frozen: dict[str, Any],
    batch: dict[str, jax.Array],
    accumulation_steps: int = 1,
) -> float | None:
    """FLOPs of one training step over the global batch: the lowered step's count plus what the
    count of its loops leaves out.

    The solver loop: (S - 1) x the lowered count of one solver step, per microbatch. With
    gradient accumulation, the microbatch loop: (A - 1) x the lowered count of one microbatch's
    gradients (``step.reflow_gradients``).

    Args:
      lowered_step: ``jax.jit(step.train_step...).lower(state, batch, rng, frozen)``.
      components, settings: those of the step.
      params, frozen, batch: the step's student parameters and arguments (arrays or ShapeDtypeStructs).
      accumulation_steps: the step's ``accumulation_steps``.
    Returns:
      FLOPs, or None where the backend has no cost analysis.
    """
    whole = cost_flops(lowered_step)
    if whole is None:
        return None
    abstract = functools.partial(jax.tree.map, lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype))
    params, frozen, batch = abstract(params), abstract(frozen), abstract(batch)
    draw = functools.partial(step.draw_examples, components=components, settings=settings)
    examples = jax.eval_shape(lambda batch: draw(jax.random.key(0), batch), batch)
    split = jax.eval_shape(functools.partial(step.microbatches, n=accumulation_steps), examples)
    microbatch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), split)
    if accumulation_steps > 1:
        gradients = functools.partial(step.reflow_gradients, components=components, settings=settings)
        body = cost_flops(jax.jit(gradients).lower(params, microbatch, frozen))
        if body is None:
            return None
        whole += (accumulation_steps - 1) * body
    if settings.solver_steps == 1:
        return whole
    cond = jax.eval_shape(components.text.encode, frozen, microbatch)
    z = jax.ShapeDtypeStruct(microbatch["x0"].shape, jnp.float32)
    window = jax.ShapeDtypeStruct(microbatch["t"].shape, jnp.int32)

    def one_solver_step(teacher, z, window, cond):
        return solver.solve_window(
            pipeline.unet_apply(components.teacher, teacher),
            z,
            window,
            cond,
            cond,
            components.alphas_cumprod,
            num_windows=settings.num_windows,
            num_steps=1,
            guidance=settings.teacher_guidance,
            prediction_type=settings.teacher_prediction_type,
        )

    solver_step = cost_flops(jax.jit(one_solver_step).lower(frozen["teacher"], z, window, cond))
    if solver_step is None:
        return None
    return whole + accumulation_steps * (settings.solver_steps - 1) * solver_step
