"""Running code on several simulated CPU devices, or as several processes joined like a multi-host job."""

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from perflow_jax import console, sharding

ROOT = Path(__file__).resolve().parents[2]


def run_with_devices(code: str, devices: int = 8, env: dict | None = None) -> str:
    """Run ``code`` in a fresh Python with ``devices`` simulated CPU devices; return its stdout."""
    environment = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **(env or {})}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT, env=environment,
        timeout=900,  # a guard against a hang, not a speed check: compiling on a loaded 2-core machine takes minutes
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def library_logs(stderr: str) -> list[str]:
    """Lines of a command's ``stderr`` only --verbose shows: INFO logs (absl or Python format), routine warnings."""
    return [
        line
        for line in stderr.splitlines()
        if re.match(r"I\d{4} |INFO:", line) or any(warning in line for warning in console.ROUTINE_WARNINGS)
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_joined_processes(
    command: list[str],
    count: int,
    *,
    timeout: float,
    env: dict | None = None,
    signal_at: tuple[str, int] | None = None,
    signum: int = signal.SIGTERM,
    returncode: int | list[int] = 0,
) -> list[str]:
    """Run ``command`` as ``count`` processes joined through the PERFLOW_* variables on a free local port.

    ``signal_at`` = (prefix, i): send ``signum`` to process i once process 0 prints a line starting
    with prefix. Asserts that every process exits with ``returncode`` (or the list's, process by
    process); returns their standard outputs, process 0's first.
    """
    port = free_port()
    processes = [
        subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                **(env or {}),
                sharding.COORDINATOR_ENV: f"127.0.0.1:{port}",
                sharding.NUM_PROCESSES_ENV: str(count),
                sharding.PROCESS_ID_ENV: str(i),
            },
        )  # fmt: skip
        for i in range(count)
    ]
    seen = ""
    if signal_at is not None:
        prefix, target = signal_at
        for line in processes[0].stdout:
            seen += line
            if line.startswith(prefix):
                processes[target].send_signal(signum)
                break
    outputs = [p.communicate(timeout=timeout) for p in processes]
    expected = returncode if isinstance(returncode, list) else [returncode] * count
    for process, (_, err), code in zip(processes, outputs, expected, strict=True):
        assert process.returncode == code, err[-3000:]
    return [seen + outputs[0][0]] + [out for out, _ in outputs[1:]]
