"""What every bench script shares: timing, memory readings, FLOP/s peaks and MFU, JSON and table output."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from perflow_jax.flops import PEAK_FLOPS


def error_string(error: BaseException) -> str:
    """An exception as one JSON-friendly string, cut to 2000 characters."""
    return f"{type(error).__name__}: {error}"[:2000]


def is_oom(error: BaseException) -> bool:
    """Whether ``error`` is an out-of-memory error (XLA's RESOURCE_EXHAUSTED or PyTorch's)."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def out_dir() -> Path:
    """Where results go: $OUT, or the current folder when OUT is unset."""
    return Path(os.environ.get("OUT", "."))


def write_json(path: Path, results: dict) -> None:
    """``results`` as indented JSON at ``path`` (anything not JSON-native as its str)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")


class Recorder:
    """A run's results in stages, each timed and the JSON at ``path`` rewritten as it starts and ends,
    so a run stopped by its time limit still says where its time went (``running``)."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        self.clock = time.perf_counter()
        self.results = {**header, "date": now(), "stages": {}, "failures": [], "running": None}

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.clock:6.1f}s] {message}", flush=True)

    def save(self) -> None:
        write_json(self.path, self.results)

    @contextlib.contextmanager
    def stage(self, name: str, **info):
        """Record a stage's wall time (and anything the body adds to the yielded dict); errors are kept.

        An out-of-memory error marks the stage ``oom`` and the run goes on; any other error is a failure.
        """
        row = self.results["stages"].setdefault(name, {})
        row.update(info, started_at_s=time.perf_counter() - self.clock)
        self.results["running"] = name
        self.save()
        start = time.perf_counter()
        try:
            yield row
        except Exception as error:
            row["error"] = error_string(error)
            traceback.print_exc()
            if is_oom(error):
                row["oom"] = True
                self.log(f"{name}: out of memory (recorded; going on)")
            else:
                self.results["failures"].append(f"{name}: {row['error'].splitlines()[0][:300]}")
                self.log(f"{name}: FAILED")
        finally:
            row["wall_s"] = time.perf_counter() - start
            self.results["running"] = None
            self.save()

    def ok(self, name: str) -> bool:
        """Whether stage ``name`` ran without error."""
        row = self.results["stages"].get(name, {})
        return bool(row) and "error" not in row


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
        "max_ms": 1e3 * max(times),
        "times_ms": [round(1e3 * t, 4) for t in times],
    }


def peak_flops(device_kind: str | None, tflops: float | None = None) -> float | None:
    """Dense bfloat16 peak FLOP/s of one device: ``tflops`` if given, else perflow_jax.flops.PEAK_FLOPS's."""
    return tflops * 1e12 if tflops else PEAK_FLOPS.get(device_kind)


def mfu(flops_per_sample: float | None, samples_per_s: float, peak: float | None) -> float | None:
    """Model FLOP utilisation: the FLOP/s achieved as a share of ``peak`` (None when either is unknown)."""
    return flops_per_sample * samples_per_s / peak if flops_per_sample and peak else None


def memory_analysis(compiled) -> dict | None:
    """XLA's static buffer sizes of a compiled function, in bytes (None if the backend gives none).

    total_bytes = arguments + outputs - aliased (donated) + temporaries.
    """
    try:
        stats = compiled.memory_analysis()
    except Exception:  # a backend without memory analysis
        return None
    if stats is None:
        return None
    names = ("argument", "output", "alias", "temp", "generated_code")
    sizes = {f"{n}_bytes": int(getattr(stats, f"{n}_size_in_bytes")) for n in names}
    sizes["total_bytes"] = sizes["argument_bytes"] + sizes["output_bytes"] - sizes["alias_bytes"] + sizes["temp_bytes"]
    return sizes


def device_memory(device) -> dict | None:
    """A JAX device allocator's bytes_in_use, peak_bytes_in_use and bytes_limit (None on the CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # a backend without memory statistics
        return None
    if not stats:
        return None
    return {key: int(stats[key]) for key in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if key in stats}


def fmt(value, pattern: str) -> str:
    """``pattern.format(value)``, or "-" for None."""
    return pattern.format(value) if value is not None else "-"


def print_table(columns: list[str], rows: list[list[str]]) -> None:
    """A markdown table to stdout."""
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    for cells in rows:
        print("| " + " | ".join(cells) + " |")
