"""What a training run reports: the ETA's format and metrics.jsonl across a resume."""

import json

from perflow_jax import reporting


def test_the_eta_counts_hours_past_a_day():
    assert reporting._duration(90061) == "25:01:01" and reporting._duration(59.6) == "0:01:00"


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
