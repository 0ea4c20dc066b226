"""Helpers shared by the bench scripts."""

from __future__ import annotations


def error_string(error: BaseException) -> str:
    """An exception as one JSON-friendly string, cut to 2000 characters."""
    return f"{type(error).__name__}: {error}"[:2000]


def cost_flops(stage) -> float | None:
    """FLOPs of one call from XLA's cost analysis of a Lowered or Compiled function (None if absent).

    cost_analysis() gives a dict, or a list of dicts in older jax. Custom calls (cuDNN attention,
    and on GPUs cuBLAS / cuDNN matrix products and convolutions) may count as zero.
    """
    try:
        cost = stage.cost_analysis()
    except Exception:  # a backend without cost analysis
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return float(cost["flops"]) if cost and "flops" in cost else None
