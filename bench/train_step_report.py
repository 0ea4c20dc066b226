"""The train-step benchmark's summary and report: FLOPs per sample and their source, and per model a
table of samples/s, MFU, memory and speed-ups over PyTorch, from the merged results."""

from __future__ import annotations

import argparse

from bench.common import fmt, mfu, peak_flops, print_table
from bench.train_step_spec import STUDENT_PASSES, spec_for

# The summary's FLOP counts per sample, in the order the report prints them.
FLOP_KEYS = (
    "analytic_per_sample",
    "lowered_forward_x_passes",
    "lowered_step_plus_loop_per_sample",
    "compiled_step_per_sample",
    "mfu_per_sample",
)
COLUMNS = "implementation, part, batch, compile s, median ms, samples/s, MFU, peak GB, XLA GB, vs eager, vs compile"


def flops_per_sample(spec, jax_part: dict) -> dict:
    """The FLOPs of one sample's step: analytic, from XLA's cost analyses, and which one MFU uses."""
    forward = spec.flops_per_forward
    step_passes = spec.teacher_passes + STUDENT_PASSES
    lowered_forward = (jax_part.get("stages", {}).get("lower unet forward (FLOP count)") or {}).get("flops_per_sample")
    flops = {
        "analytic_per_sample": step_passes * forward if forward else None,
        "lowered_unet_forward_per_sample": lowered_forward,
        "lowered_forward_x_passes": step_passes * lowered_forward if lowered_forward else None,
    }
    # The compiled step's own count, per sample (on a GPU without cuDNN / cuBLAS custom calls).
    compiled = None
    for name, row in jax_part.get("stages", {}).items():
        if name.startswith("compile step") and row.get("flops_compiled"):
            compiled = row["flops_compiled"] / (row["batch"] * jax_part.get("device_count", 1))
            lowered = (jax_part["stages"].get(name.replace("compile", "lower")) or {}).get("flops_lowered")
            flops["compiled_step_per_sample"] = compiled
            if lowered and lowered_forward:
                # Each loop body is counted once: one microbatch (with gradient accumulation) and in
                # it one solver step (one teacher pass, two with CFG).
                microbatch = row["batch"] // jax_part.get("accumulation", 1)
                per_sample = lowered / (microbatch * jax_part.get("device_count", 1))
                loop_rest = spec.teacher_passes - spec.teacher_passes // spec.settings["solver_steps"]
                flops["lowered_step_plus_loop_per_sample"] = per_sample + loop_rest * lowered_forward
            break
    reference = flops["analytic_per_sample"] or flops["lowered_forward_x_passes"]
    if compiled and reference and abs(compiled / reference - 1) < 0.15:
        flops["mfu_per_sample"], flops["mfu_source"] = compiled, "cost analysis of the compiled step"
    elif reference:
        flops["mfu_per_sample"] = reference
        flops["mfu_source"] = "analytic" if forward else "passes x lowered cost analysis of one UNet forward"
        flops["mfu_source"] += " (the compiled cost analysis is off by more than 15 %)" if compiled else ""
    return flops


def summarise(results: dict, args: argparse.Namespace) -> dict:
    """Rows for the tables: samples/s, MFU and speed-ups per model; FLOPs per sample and their source."""
    summary = {}
    for model in ("sd15", "sdxl"):
        parts = {fw: results["parts"].get(f"{fw}-{model}") for fw in ("jax", "torch")}
        if not any(parts.values()):
            continue
        spec = spec_for(f"jax-{model}", args)
        flops = flops_per_sample(spec, parts["jax"] or {})
        passes = {"step": spec.teacher_passes + STUDENT_PASSES, "teacher": spec.teacher_passes}
        passes["student"] = STUDENT_PASSES
        per_pass = flops["mfu_per_sample"] / passes["step"] if flops.get("mfu_per_sample") else None
        rows = []
        for framework, part in parts.items():
            if not part:
                continue
            device_kind = part.get("device_kind")
            peak = peak_flops(device_kind, args.peak_tflops)
            for name, row in part.get("stages", {}).items():
                if not name.startswith("run ") or "samples_per_s" not in row:
                    continue
                what = name[4:].split("_b")[0]
                kind = what.removeprefix("compiled_")
                label = {"jax": "perflow_jax", "torch": "PyTorch torch.compile" if what != kind else "PyTorch eager"}
                if kind == "step" and part.get("accumulation", 1) > 1:
                    label["jax"] += f" ({part['accumulation']} microbatches)"
                compile_stage = part["stages"].get(f"compile {name[4:]}", {})
                rows.append(
                    {
                        "implementation": label[framework],
                        "part": kind,
                        "batch": row["batch"],
                        "compile_s": compile_stage.get("compile_s", row.get("compile_s")),
                        "median_ms": row["median_ms"],
                        "samples_per_s": row["samples_per_s"],
                        "mfu": mfu(per_pass * passes[kind] if per_pass else None, row["samples_per_s"], peak),
                        "peak_gb": ((row.get("memory") or {}).get("peak_bytes_in_use") or 0) / 1e9 or None,
                        "xla_memory_gb": ((compile_stage.get("memory_analysis") or {}).get("total_bytes") or 0) / 1e9
                        or None,
                        "device": device_kind,
                    }
                )
        for row in rows:  # speed-ups against PyTorch at the same batch and part
            for base, key in (("PyTorch eager", "vs_eager"), ("PyTorch torch.compile", "vs_compile")):
                match = [
                    r
                    for r in rows
                    if r["implementation"] == base and (r["part"], r["batch"]) == (row["part"], row["batch"])
                ]
                row[key] = row["samples_per_s"] / match[0]["samples_per_s"] if match else None
        summary[model] = {"flops": flops, "rows": rows, "spec": spec.name, "settings": spec.settings}
    results["summary"] = summary
    return summary


def print_report(results: dict, summary: dict) -> None:
    """Each part's status, errors and failures; then per model the FLOP counts and the table."""
    for part, r in results["parts"].items():
        status = r["status"]
        line = f"{part}: " + (
            status.get("skipped")
            or ("stopped by its time limit in " + str(status.get("timed_out_in")) if status.get("timed_out") else "")
            or f"exit status {status.get('returncode')}, {status.get('wall_s', 0):.0f} s"
        )
        print(line)
        for name, row in r.get("stages", {}).items():
            if "error" in row:
                print(f"  {name}: {'OOM' if row.get('oom') else 'error'}: {row['error'].splitlines()[0][:200]}")
        for failure in r.get("failures", []):
            print(f"  FAILED: {failure}")
    for s in summary.values():
        flops = s["flops"]
        counts = (fmt(flops.get(k) and flops[k] / 1e12, "{:.3g}") for k in FLOP_KEYS)
        print(f"\n{s['spec']}, {s['settings']}")
        print(
            "FLOPs per sample (TFLOP): analytic {}, passes x lowered UNet forward {}, lowered step + loop {}, "
            "compiled step {}; MFU uses {} ({})".format(*counts, flops.get("mfu_source", "none"))
        )
        rows = sorted(s["rows"], key=lambda r: (r["part"] != "step", r["part"], r["batch"], r["implementation"]))
        print_table(COLUMNS.split(", "), [table_cells(row) for row in rows])
        devices = sorted({r["device"] for r in s["rows"] if r["device"]})
        print(f"device: {', '.join(devices) or '-'}; JAX peak GB is the process's running peak (largest batch first)")


def table_cells(row: dict) -> list[str]:
    """One summary row as the table's cells, in COLUMNS' order."""
    return [
        row["implementation"],
        row["part"],
        str(row["batch"]),
        fmt(row["compile_s"], "{:.1f}"),
        fmt(row["median_ms"], "{:.1f}"),
        fmt(row["samples_per_s"], "{:.1f}"),
        fmt(row["mfu"], "{:.1%}"),
        fmt(row["peak_gb"], "{:.1f}"),
        fmt(row["xla_memory_gb"], "{:.1f}"),
        fmt(row["vs_eager"], "{:.2f}x"),
        fmt(row["vs_compile"], "{:.2f}x"),
    ]
