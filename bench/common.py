"""Helpers shared by the bench scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def error_string(error: BaseException) -> str:
    """An exception as one JSON-friendly string, cut to 2000 characters."""
    return f"{type(error).__name__}: {error}"[:2000]


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
