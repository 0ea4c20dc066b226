"""Helpers shared by the bench scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


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


def time_calls(call: Callable, wait: Callable, iters: int, warmup: int) -> dict:
    """Per-call wall times of ``call()``, each waited for with ``wait(result)``, after warm-up."""
    for _ in range(warmup):
        wait(call())
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        wait(call())
        times.append(time.perf_counter() - start)
    return {
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "times_ms": [round(1e3 * t, 4) for t in times],
    }
