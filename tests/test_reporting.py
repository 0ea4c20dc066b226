"""What a training run reports: the ETA, metrics.jsonl as strict JSON and across a resume."""

import json

import numpy as np
import optax

from perflow_jax import reporting


def strict_rows(path):
    """metrics.jsonl's rows through a parser that refuses NaN and Infinity, as strict JSON readers do."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_the_eta_counts_hours_past_a_day():
    assert reporting._duration(90061) == "25:01:01" and reporting._duration(59.6) == "0:01:00"


def test_the_eta_is_the_mean_rate_since_the_start_times_the_steps_left():
    # Started at step 10 at t = 100 s; 30 steps in 60 s: 2 s a step, 60 steps left.
    assert reporting.eta_seconds((100.0, 10), 160.0, done=40, total=100) == 120.0


def step_metrics(window_loss_sum, window_count):
    """One step's metrics as the training step returns them (loss 0.5, grad norm 1)."""
    return {
        "loss": np.float32(0.5),
        "grad_norm": np.float32(1.0),
        "window_loss_sum": np.array(window_loss_sum),
        "window_count": np.array(window_count),
    }


def test_a_fast_last_interval_does_not_swing_the_eta(monkeypatch):
    """10 steps in 10 s, then 10 in 1 s: 80 steps left at 20 steps per 11 s is 44 s, not the last interval's 8 s."""
    clock = [0.0]
    monkeypatch.setattr(reporting.time, "perf_counter", lambda: clock[0])
    progress = reporting.Progress(total=100, global_batch_size=4, learning_rate=optax.constant_schedule(1e-4))
    progress.restart(0)
    clock[0] = 10.0
    progress.report([(10, step_metrics([1.0], [1]))], 10)
    clock[0] = 11.0
    _, line = progress.report([(20, step_metrics([1.0], [1]))], 20)
    assert line.endswith("| ETA 0:00:44") and "| 40.0 samples/s" in line


def test_a_window_without_examples_is_null_in_strict_json_metrics(tmp_path):
    progress = reporting.Progress(total=10, global_batch_size=2, learning_rate=optax.constant_schedule(1e-4))
    values, line = progress.report([(1, step_metrics([0.6, 0.0], [2, 0]))], 1)
    reporter = reporting.Reporter(tmp_path)
    reporter.scalars(1, {**values, "grad_norm": float("inf")}, line)
    reporter.close()
    (row,) = strict_rows(tmp_path / "metrics.jsonl")
    assert (row["loss_window_0"], row["loss_window_1"], row["grad_norm"]) == (0.3, None, None)


def test_a_resumed_run_drops_what_was_logged_after_its_checkpoint(tmp_path):
    interrupted = reporting.Reporter(tmp_path)
    for n in range(1, 6):
        interrupted.scalars(n, {"loss": float(n)}, f"step {n}")
    interrupted.close()
    with open(tmp_path / "metrics.jsonl", "a") as rows:
        rows.write('{"step": 6, "lo')  # cut off by a crash
    resumed = reporting.Reporter(tmp_path, first_step=3)
    resumed.scalars(4, {"loss": 40.0}, "step 4")
    resumed.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(row["step"], row["loss"]) for row in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
