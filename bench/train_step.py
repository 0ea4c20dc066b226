"""The PeRFlow training step on one device: this project's compiled JAX step against the authors' PyTorch step.

The driver: runs each part (``jax-sd15``, ``torch-sd15``, ``jax-sdxl``, ``torch-sdxl``) in its own
process under its own time limit, merges their JSON into ``$OUT/train_step.json`` and prints the
report. What each part measures, and how FLOPs and memory are counted: bench/README.md.

    python3 bench/train_step.py                        # all four parts, on a GPU
    python3 bench/train_step.py --parts jax-sd15,torch-sd15 --timeouts jax-sd15=200,torch-sd15=230
    python3 bench/train_step.py --tiny                 # tiny networks, all parts, on a CPU in minutes
    python3 bench/train_step.py --report $OUT/train_step.json   # the report of a finished run again
"""

# The imports below must follow the sys.path line before them.
# ruff: noqa: E402
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

# Run as `python3 bench/train_step.py` from the repository root, perflow_jax not installed:
# the repository root goes first on the import path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Recorder, error_string, now, out_dir, write_json
from bench.train_step_report import print_report, summarise
from bench.train_step_spec import PARTS, spec_for

# XLA's pool when nothing caps it: 90% of the card (the default is 75%), leaving room for the CUDA
# context and library handles outside it.
JAX_MEMORY_FRACTION = 0.90


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"parts to run, in order (default {','.join(PARTS)})")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # run one part in this process
    parser.add_argument("--report", metavar="JSON", help="print the report of a finished run's train_step.json")
    parser.add_argument("--batches", help="SD1.5 per-device batch sizes (default 16,32; 2 with --tiny)")
    parser.add_argument("--alone-batch", type=int, help="batch of the halves timed alone (default: the largest)")
    parser.add_argument(
        "--compile-batch", type=int, help="SD1.5 batch for torch.compile (default 32; 0 skips it; 0 with --tiny)"
    )
    parser.add_argument("--sdxl-batch", type=int, help="SDXL per-device batch (default 8; 2 with --tiny)")
    parser.add_argument(
        "--sdxl-remat", default="full", choices=("none", "dots", "full"), help="JAX student rematerialisation (SDXL)"
    )
    parser.add_argument(
        "--sdxl-accumulation", type=int, default=1, help="JAX SDXL step in this many microbatches (default 1)"
    )
    parser.add_argument("--sdxl-memory-gb", type=float, default=80.0, help="memory cap of the SDXL parts (GB)")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per stage (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (default 2)")
    parser.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"), help="JAX attention backend")
    parser.add_argument(
        "--teacher-attention",
        choices=("auto", "xla", "cudnn"),
        help="JAX attention backend of the frozen teacher and text encoders (default: --attention)",
    )
    parser.add_argument("--timeouts", default="", help="per-part time limits in s, e.g. jax-sd15=200,torch-sd15=230")
    parser.add_argument("--deadline", type=float, help="time limit of the whole run in s (parts get what is left)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak per device for MFU, if PEAK_FLOPS lacks it")
    parser.add_argument("--tiny", action="store_true", help="tiny networks and batches (a CPU smoke run)")
    args = parser.parse_args(argv)
    args.parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts {unknown}: choose from {', '.join(PARTS)}")
    args.batches = sorted(int(b) for b in (args.batches or ("2" if args.tiny else "16,32")).split(","))
    args.alone_batch = args.alone_batch or max(args.batches)
    if args.compile_batch is None:
        args.compile_batch = 0 if args.tiny else 32
    args.sdxl_batch = args.sdxl_batch or (2 if args.tiny else 8)
    if min(args.batches) < 1 or args.alone_batch < 1 or args.sdxl_batch < 1 or args.compile_batch < 0:
        parser.error("batch sizes must be positive (--compile-batch 0 skips torch.compile)")
    if args.sdxl_accumulation < 1 or args.sdxl_batch % args.sdxl_accumulation:
        parser.error(f"--sdxl-accumulation {args.sdxl_accumulation} must divide --sdxl-batch {args.sdxl_batch}")
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be at least 1 and --warmup at least 0")
    try:
        args.timeouts = {k: float(v) for k, v in (item.split("=") for item in args.timeouts.split(",") if item)}
    except ValueError:
        parser.error(f"--timeouts {args.timeouts!r}: write PART=SECONDS,PART=SECONDS")
    if set(args.timeouts) - set(PARTS):
        parser.error(f"--timeouts names {sorted(set(args.timeouts) - set(PARTS))}: parts are {', '.join(PARTS)}")
    return args


def drive(args: argparse.Namespace, argv: list[str]) -> int:
    """Run each part in a child process with its time limit, then merge and report."""
    start = time.perf_counter()
    results = {
        "benchmark": "train_step",
        "date": now(),
        "command": shlex.join(["python3", "bench/train_step.py", *argv]),
        "parts": {},
    }
    forwarded = without_options(argv, ("--parts", "--timeouts", "--deadline"))
    for part in args.parts:
        limit = args.timeouts.get(part)
        if args.deadline is not None:
            left = args.deadline - (time.perf_counter() - start)
            limit = left if limit is None else min(limit, left)
        status = {"time_limit_s": limit}
        if limit is not None and limit < 20:
            status["skipped"] = f"only {limit:.0f} s left of --deadline {args.deadline:.0f}"
            print(f"\n=== {part}: skipped, {status['skipped']}", flush=True)
            results["parts"][part] = {"status": status}
            continue
        print(f"\n=== {part}" + (f" (time limit {limit:.0f} s)" if limit else ""), flush=True)
        (out_dir() / f"train_step.{part}.json").unlink(missing_ok=True)
        began = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, __file__, "--part", part, *forwarded], start_new_session=True, env=child_env(args, part)
        )
        try:
            status["returncode"] = process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            status["timed_out"] = True
            os.killpg(process.pid, signal.SIGKILL)  # the part and its children (torch.compile's workers)
            status["returncode"] = process.wait()
        status["wall_s"] = time.perf_counter() - began
        path = out_dir() / f"train_step.{part}.json"
        part_results = json.loads(path.read_text()) if path.exists() else {}
        if status.get("timed_out"):
            running = part_results.get("running")
            status["timed_out_in"] = running
            print(
                f"=== {part}: stopped by its time limit after {status['wall_s']:.0f} s, in stage {running}", flush=True
            )
        results["parts"][part] = {**part_results, "status": status}
    results["wall_s"] = time.perf_counter() - start
    summary = summarise(results, args)
    write_json(out_dir() / "train_step.json", results)
    print_report(results, summary)
    print(f"\nresults: {out_dir() / 'train_step.json'}")
    failed = [
        p
        for p, r in results["parts"].items()
        if r.get("failures") or r["status"].get("returncode") not in (0, None) or r["status"].get("timed_out")
    ]
    return 1 if failed else 0


def without_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """argv without the options ``names`` and their values (``--name value`` or ``--name=value``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif not arg.startswith(tuple(f"{n}=" for n in names)):
            out.append(arg)
    return out


def child_env(args: argparse.Namespace, part: str) -> dict:
    """The part's environment: unbuffered output, and XLA's pool fraction (capped for SDXL on a larger card)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if part.startswith("jax"):
        fraction = float(env.get("XLA_PYTHON_CLIENT_MEM_FRACTION", JAX_MEMORY_FRACTION))
        total = gpu_memory_bytes()
        if part.endswith("sdxl") and total:
            fraction = min(fraction, args.sdxl_memory_gb * 1e9 / total)
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{fraction:.3f}"
    return env


def gpu_memory_bytes() -> float | None:
    """The first GPU's memory from nvidia-smi (None without one), read without initialising a framework."""
    try:
        query = ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"]
        text = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True).stdout
        return float(text.split()[0]) * 2**20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def run_part(args: argparse.Namespace) -> int:
    """One part, in this (child) process: its JSON saved at every stage; exit status 1 on any failure."""
    spec = spec_for(args.part, args)
    header = {
        "part": args.part,
        "framework": args.part.split("-")[0],
        "model": spec.name,
        "latent_size": spec.latent_size,
        "settings": spec.settings,
        "learning_rate": spec.learning_rate,
        "iters": args.iters,
        "warmup": args.warmup,
    }
    rec = Recorder(out_dir() / f"train_step.{args.part}.json", header)
    rec.log(f"{args.part}: {spec.name}, {spec.latent_size}x{spec.latent_size} latents")
    try:
        if args.part.startswith("jax"):
            from bench.train_step_jax import run_jax as run
        else:  # PyTorch is imported only in its own parts
            from bench.train_step_torch import run_torch as run
        run(args.part, args, rec)
    except Exception as error:  # write what was measured, then fail
        rec.results["failures"].append(f"part: {error_string(error).splitlines()[0][:300]}")
        traceback.print_exc()
    rec.save()
    return 1 if rec.results["failures"] else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.report:
        results = json.loads(Path(args.report).read_text())
        print_report(results, results.get("summary", {}))
        return 0
    if args.part:
        return run_part(args)
    return drive(args, argv)


if __name__ == "__main__":
    sys.exit(main())
