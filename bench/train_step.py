"""The PeRFlow training step on one device: this project's compiled JAX step against the authors' PyTorch step.

Random weights of the true size (nothing is downloaded), one run, one card, four parts, each in
its own process (JAX and PyTorch each take the card's memory for themselves) with its own time
limit, run one after the other and merged into one report:

- ``jax-sd15``: ``perflow_jax.step.train_step`` for SD1.5 at 512 px (64x64 latents): CLIP text
  encoding, the teacher's window solve (K=4 windows, S=8 DDIM steps, cfg_sync: one teacher pass
  per step), the diff_eps reflow loss, the student's forward and backward (bfloat16 compute,
  float32 master weights), global-norm clipping, AdamW (lr 8e-5) and the EMA; teacher and text
  encoder stored and computed in bfloat16; attention ``auto`` (``--teacher-attention`` sets the
  frozen networks' apart); the state donated. Per-device batch 32 and 16, and at batch 32 the
  two halves alone: the teacher solve (draws, text encoding, ``loss.reflow_targets``) and the
  student update (prediction, loss, gradients, AdamW, EMA).
- ``torch-sd15``: ``bench/torch_reference.py``, the authors' step (diffusers UNets, SDPA attention,
  ``torch.autocast(bfloat16)``, teacher and text encoder stored in bfloat16, float32 AdamW,
  diffusers' EMAModel, ``cudnn.benchmark`` on): eager at batch 32 and 16, its two halves alone at
  batch 32, then at batch 32 with teacher and student under ``torch.compile`` (the first call,
  compilation included, is reported as the compile time), step and halves.
- ``jax-sdxl`` / ``torch-sdxl``: the SDXL recipe at 1024 px (128x128 latents): two text encoders,
  size ids, K=4, S=10, teacher CFG 7.5 (two teacher passes per step, in one batched call),
  ddim_eps, M=200 discrete times, AdamW lr 1e-4; per-device batch 8 (``--sdxl-batch``), the
  student rematerialised (``--sdxl-remat``; PyTorch: gradient checkpointing, as the authors'
  SDXL script), the JAX step optionally in microbatches (``--sdxl-accumulation``), inside
  ``--sdxl-memory-gb`` (80) of the card: XLA's memory pool and PyTorch's
  allocator are capped at that share of a larger card.

JAX side: random weights are drawn on the host with numpy (threads) and ``device_put``, so no
initialiser is compiled. The step is lowered ahead of time from abstract arguments and compiled
in a background thread while the weights are placed and the other functions are traced; each
compiled function is timed only once no compilation runs (XLA autotunes on the card). Every
stage (init, lower, compile, warm-up, steps) is timed and printed as it ends, and the part's JSON
is rewritten at the start and end of each stage, so a part stopped by its time limit still says
where its time went.

Timing: ``--warmup`` untimed calls, then ``--iters`` calls each waited for (JAX:
``block_until_ready``; PyTorch: ``cuda.synchronize``); the median is reported, with min, max and
every time. Sanity on every step: finite loss, window counts summing to the batch (exit status 1
otherwise). An out-of-memory stage is recorded and the part goes on.

FLOPs per sample, for MFU (against the dense bfloat16 peak of the card, 989 TFLOP/s for an
H100 SXM or H200): the analytic count, (S x teacher passes per step + 3) UNet forwards (the
student's forward and backward ~ 3 forwards) x 803 GFLOP (SD1.5 at 512 px) or 6.76 TFLOP (SDXL
at 1024 px): 11 x 803 GFLOP and 23 x 6.76 TFLOP. Cross-checks in the JSON: XLA's cost analysis of
the compiled step (on a GPU it leaves out the convolutions and matrix products that become cuDNN /
cuBLAS custom calls, so it counts far too little: 13 of 803 GFLOP for the SD1.5 forward on an
H200), of the lowered step (before XLA's optimisations, it counts the solver loop's body once: the
other S - 1 teacher passes are added from the lowered cost of one UNet forward). MFU uses the
compiled count when it is within 15 % of the analytic one, else the analytic one.

Memory: JAX, the allocator's running peak (``peak_bytes_in_use`` cannot be reset: the first stage,
at the largest batch, sets it) and XLA's memory analysis of each compiled function (arguments +
outputs - aliased + temporaries); PyTorch, ``max_memory_allocated`` reset before each stage.

Everything goes to ``$OUT/train_step.json`` (the current folder when OUT is unset; each part also
writes ``$OUT/train_step.PART.json``), and a markdown table to stdout.

    python3 bench/train_step.py                        # all four parts, on a GPU
    python3 bench/train_step.py --parts jax-sd15,torch-sd15 --timeouts jax-sd15=200,torch-sd15=230
    python3 bench/train_step.py --tiny                 # tiny networks, all parts, on a CPU in minutes
"""

# The imports below must follow the sys.path line before them.
# ruff: noqa: E402
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

# Run as `python3 bench/train_step.py` from the repository root, perflow_jax not installed:
# the repository root goes first on the import path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

from bench.common import error_string
from perflow_jax import loss, sharding, step
from perflow_jax.flops import cost_flops
from perflow_jax.models import reference_configs
from perflow_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from perflow_jax.models.unet import UNet2DConditionModel, UNetConfig
from perflow_jax.schedule import alphas_cumprod_from_config

PARTS = ("jax-sd15", "torch-sd15", "jax-sdxl", "torch-sdxl")
# Dense bfloat16 datasheet peaks, by device kind (jax's device_kind, torch's get_device_name).
PEAK_BF16_FLOPS = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H200": 989e12}
# XLA's pool when nothing caps it: 90% of the card (the default is 75%), leaving room for the CUDA
# context and library handles outside it.
JAX_MEMORY_FRACTION = 0.90
# The student's forward and backward, in UNet forwards.
STUDENT_PASSES = 3


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model: its networks (diffusers / transformers config dicts) and recipe."""

    name: str
    unet: dict
    text_encoders: tuple[dict, ...]  # SDXL: (CLIP ViT-L, OpenCLIP bigG with projection)
    scheduler: dict
    scaling_factor: float
    latent_size: int
    settings: dict  # perflow_jax.step.PeRFlowSettings fields
    learning_rate: float
    flops_per_forward: float | None  # analytic, one UNet forward of one sample at latent_size
    text_len: int = 77

    @property
    def sdxl(self) -> bool:
        return len(self.text_encoders) == 2

    @property
    def teacher_passes(self) -> int:
        """Teacher UNet passes per example and step: S, twice with CFG."""
        return self.settings["solver_steps"] * (1 if self.settings["teacher_guidance"] == 1.0 else 2)


SD15_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
SD15 = ModelSpec(
    name="SD1.5",
    unet=reference_configs.SD15_UNET,
    text_encoders=(reference_configs.SD15_TEXT_ENCODER,),
    scheduler=SD15_SCHEDULER,
    scaling_factor=0.18215,
    latent_size=64,
    settings=dict(parameterization="diff_eps", num_windows=4, solver_steps=8, teacher_guidance=1.0),
    learning_rate=8e-5,
    flops_per_forward=803e9,  # SD1.5's UNet at 64x64 latents and 77 tokens, 2 FLOPs per multiply-add
)
SDXL = ModelSpec(
    name="SDXL",
    unet=reference_configs.SDXL_UNET,
    text_encoders=(reference_configs.SD15_TEXT_ENCODER, reference_configs.SDXL_TEXT_ENCODER_2),
    scheduler=SD15_SCHEDULER,  # SDXL base's scheduler has the same scaled_linear betas
    scaling_factor=0.13025,
    latent_size=128,
    settings=dict(
        parameterization="ddim_eps", num_windows=4, solver_steps=10, teacher_guidance=7.5, discrete_timesteps=200
    ),
    learning_rate=1e-4,
    flops_per_forward=6.76e12,  # measured on an H200 (design notes): SDXL's UNet at 1024 px
)
# Tiny stand-ins (tests/test_step.py's one-level UNet; a two-level text_time UNet for SDXL), for
# a CPU run that checks the script, not speed.
_TINY_TEXT = dict(
    vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
    max_position_embeddings=8, projection_dim=16, bos_token_id=0, eos_token_id=2, pad_token_id=1,
)  # fmt: skip
TINY = {
    "sd15": dataclasses.replace(
        SD15,
        name="tiny SD1.x",
        unet=dict(
            block_out_channels=(16,),
            layers_per_block=1,
            cross_attention_dim=16,
            attention_head_dim=2,
            norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D",),
            up_block_types=("CrossAttnUpBlock2D",),
        ),  # fmt: skip
        text_encoders=(_TINY_TEXT,),
        latent_size=8,
        flops_per_forward=None,
        text_len=8,
    ),
    "sdxl": dataclasses.replace(
        SDXL,
        name="tiny SDXL",
        unet=dict(
            block_out_channels=(16, 32),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=2,
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 16,
        ),  # fmt: skip
        text_encoders=(_TINY_TEXT, {**_TINY_TEXT, "hidden_act": "gelu"}),
        latent_size=8,
        flops_per_forward=None,
        text_len=8,
    ),
}


# ---------------------------------------------------------------------------------------------
# Command line and the driver that runs the parts.


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
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak per device for MFU, if not an H100/H200")
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


def out_dir() -> Path:
    return Path(os.environ.get("OUT", "."))


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
    (out_dir() / "train_step.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
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
        text = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
        return float(text.split()[0]) * 2**20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# What a part records: stages, each timed and saved as it starts and ends.


class Recorder:
    """A part's results, saved to $OUT/train_step.PART.json at every stage boundary."""

    def __init__(self, part: str, args: argparse.Namespace, spec: ModelSpec):
        self.path = out_dir() / f"train_step.{part}.json"
        self.clock = time.perf_counter()
        self.results = {
            "part": part,
            "framework": part.split("-")[0],
            "model": spec.name,
            "latent_size": spec.latent_size,
            "settings": spec.settings,
            "learning_rate": spec.learning_rate,
            "iters": args.iters,
            "warmup": args.warmup,
            "date": now(),
            "stages": {},
            "failures": [],
            "running": None,
        }

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.clock:6.1f}s] {message}", flush=True)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.results, indent=1, default=str) + "\n")

    @contextlib.contextmanager
    def stage(self, name: str, **info):
        """Record a stage's wall time (and anything the body adds to the yielded dict); errors are kept.

        An out-of-memory error marks the stage ``oom`` and the part goes on; any other error is a failure.
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
        row = self.results["stages"].get(name, {})
        return bool(row) and "error" not in row


def is_oom(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def timed_calls(call: Callable[[int], Callable[[], None]], warmup: int, iters: int) -> dict:
    """``call(i)`` runs call i and returns a function that waits for it; warm-up, then ``iters`` timed calls."""
    for i in range(warmup):
        call(i)()
    times = []
    for i in range(warmup, warmup + iters):
        start = time.perf_counter()
        call(i)()
        times.append(time.perf_counter() - start)
    return {
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "max_ms": 1e3 * max(times),
        "times_ms": [round(1e3 * t, 3) for t in times],
    }


def check_metrics(metrics: list[dict], batch_size: int) -> tuple[dict, list[str]]:
    """Loss finite and window counts summing to the batch at every step: (summary, failures)."""
    losses = [float(m["loss"]) for m in metrics]
    counts = [float(np.sum(m["window_count"])) for m in metrics]
    failures = []
    bad = [i for i, value in enumerate(losses) if not math.isfinite(value)]
    if bad:
        failures.append(f"loss not finite at steps {bad} ({[losses[i] for i in bad]})")
    off = [i for i, c in enumerate(counts) if c != batch_size]
    if off:
        failures.append(f"window counts sum to {[counts[i] for i in off]}, not {batch_size}")
    summary = {
        "losses": losses,
        "grad_norms": [float(m["grad_norm"]) for m in metrics],
        "window_counts_last": np.asarray(metrics[-1]["window_count"]).tolist(),
        "loss_finite": not bad,
        "window_counts_sum_to_batch": not off,
    }
    return summary, failures


def host_batch(spec: ModelSpec, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    """A random data.py batch on the host: mean, logvar [B, s, s, 4] float16, input_ids [B, T] int32
    (+ SDXL's input_ids_2, original_size and crop_top_left [B, 2] int32)."""
    rng = np.random.default_rng(seed)
    size, text_len = spec.latent_size, spec.text_len
    shape = (batch_size, size, size, spec.unet.get("in_channels", 4))
    # VAE latent moments of about unit variance once scaled by the scaling factor.
    batch = {
        "mean": (rng.standard_normal(shape, np.float32) / spec.scaling_factor).astype(np.float16),
        "logvar": rng.uniform(-8.0, -2.0, shape).astype(np.float16),
    }
    for i, name in enumerate(("input_ids", "input_ids_2")[: len(spec.text_encoders)]):
        vocab = spec.text_encoders[i]["vocab_size"]
        bos, eos = vocab - 2, vocab - 1  # CLIP's start / end of text: the vocabulary's last two ids
        words = rng.integers(0, bos, (batch_size, text_len))
        end = rng.integers(1, text_len, (batch_size, 1))  # first end-of-text position
        pos = np.arange(text_len)[None]
        batch[name] = np.where(pos == 0, bos, np.where(pos >= end, eos, words)).astype(np.int32)
    if spec.sdxl:
        batch["original_size"] = np.full((batch_size, 2), 8 * size, np.int32)
        batch["crop_top_left"] = np.zeros((batch_size, 2), np.int32)
    return batch


def null_batch(spec: ModelSpec, batch_size: int) -> dict[str, np.ndarray]:
    """The empty prompt's ids [bos, eos, eos, ...] for each text encoder (+ SDXL's size ids)."""
    out = {}
    for i, name in enumerate(("input_ids", "input_ids_2")[: len(spec.text_encoders)]):
        vocab = spec.text_encoders[i]["vocab_size"]
        ids = np.full((batch_size, spec.text_len), vocab - 1, np.int32)
        ids[:, 0] = vocab - 2
        out[name] = ids
    if spec.sdxl:
        out["original_size"] = np.full((batch_size, 2), 8 * spec.latent_size, np.int32)
        out["crop_top_left"] = np.zeros((batch_size, 2), np.int32)
    return out


def spec_for(part: str, args: argparse.Namespace) -> ModelSpec:
    name = part.split("-")[1]
    return TINY[name] if args.tiny else {"sd15": SD15, "sdxl": SDXL}[name]


def part_plan(part: str, args: argparse.Namespace) -> tuple[list[int], int]:
    """(step batch sizes, largest first; batch of the halves timed alone)."""
    if part.endswith("sdxl"):
        return [args.sdxl_batch], args.sdxl_batch
    return sorted(args.batches, reverse=True), args.alone_batch


# ---------------------------------------------------------------------------------------------
# The JAX part.


class JaxStep:
    """This project's step for one model, ready to lower: networks, settings, placements, abstract arguments.

    ``lower(name, batch)`` lowers the whole step (``step_*``, state donated), its teacher half
    (``teacher_*``: draws, text encoding, dropout, window solve) or its student half (``student_*``:
    prediction, loss, gradients, clipped AdamW, EMA) at a per-device batch, from abstract
    arguments: nothing needs the weights. ``teacher_attention`` is the attention backend of the
    frozen teacher and text encoders (default ``attention``), to compare backends: ``auto`` already
    runs them on cuDNN wherever its forward takes the shapes (they are never differentiated).
    """

    def __init__(
        self, spec: ModelSpec, *, attention: str = "auto", teacher_attention: str | None = None, remat: str = "none",
        accumulation: int = 1, mesh=None,
    ):  # fmt: skip
        self.spec = spec
        self.accumulation = accumulation
        self.mesh = mesh if mesh is not None else sharding.make_mesh((-1, 1))  # data parallel; one GPU: (1, 1)
        self.n_devices = self.mesh.devices.size
        unet_cfg = UNetConfig.from_dict(spec.unet)
        frozen_attention = teacher_attention or attention
        texts = [
            cls(CLIPTextConfig.from_dict(c), dtype=jnp.bfloat16, attention_backend=frozen_attention)
            for cls, c in zip((CLIPTextModel, CLIPTextModelWithProjection), spec.text_encoders, strict=False)
        ]
        self.networks = step.Networks(
            student=UNet2DConditionModel(unet_cfg, dtype=jnp.bfloat16, attention_backend=attention, remat=remat),
            teacher=UNet2DConditionModel(unet_cfg, dtype=jnp.bfloat16, attention_backend=frozen_attention),
            text_encoder=texts[0],
            text_encoder_2=texts[1] if spec.sdxl else None,
            alphas_cumprod=alphas_cumprod_from_config(spec.scheduler),
            scaling_factor=spec.scaling_factor,
            resolution=8 * spec.latent_size,
        )
        self.settings = step.PeRFlowSettings(**spec.settings)
        self.optimizer = step.make_optimizer(spec.learning_rate)
        self.text_names = ["text_encoder", "text_encoder_2"][: len(texts)]

        self.replicated, self.batch_sharding = sharding.replicated(self.mesh), sharding.batch_sharding(self.mesh)
        self.unet_shapes = self.networks.student.abstract_params()
        self.text_shapes = {n: m.abstract_params() for n, m in zip(self.text_names, texts, strict=True)}
        state_shapes = jax.eval_shape(lambda p: step.create_train_state(p, self.optimizer), self.unet_shapes)
        self.state_shardings = sharding.parameter_shardings(state_shapes, self.mesh)
        bf16 = functools.partial(jax.tree.map, lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16))
        frozen_shapes = {"teacher": bf16(self.unet_shapes), **{n: bf16(t) for n, t in self.text_shapes.items()}}
        frozen_shapes["null_cond"] = jax.eval_shape(self.encode_text, frozen_shapes, null_batch(spec, 1))
        self.frozen_shardings = sharding.parameter_shardings(
            {k: v for k, v in frozen_shapes.items() if k != "null_cond"}, self.mesh
        )
        self.frozen_shardings["null_cond"] = jax.tree.map(lambda _: self.replicated, frozen_shapes["null_cond"])
        self.state_abstract = with_shardings(state_shapes, self.state_shardings)
        self.frozen_abstract = with_shardings(frozen_shapes, self.frozen_shardings)
        self.rng_abstract = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=self.replicated)
        self._reflow_shapes = {}

    def encode_text(self, frozen, ids):
        return step.encode_text(self.networks, frozen, ids)

    def batch_abstract(self, batch_size: int) -> dict:
        """A batch of ``batch_size`` per device as abstract arrays split over the devices."""
        host = host_batch(self.spec, batch_size * self.n_devices, 0)
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding) for k, v in host.items()}

    def teacher_part(self, batch, rng, frozen):
        """The first half of step.train_step: draws, text encoding, dropout and the window solve."""
        examples = step.draw_examples(rng, batch, networks=self.networks, settings=self.settings)
        return step.reflow_problem(examples, frozen, networks=self.networks, settings=self.settings)

    def student_part(self, state, reflow):
        """The second half of step.train_step: prediction, loss, gradients, clipped AdamW, EMA."""
        networks, settings = self.networks, self.settings

        def loss_fn(params):
            prediction = step.unet_apply(networks.student, params)(reflow.z_t, reflow.t * 1000.0, reflow.cond)
            return loss.reflow_loss(prediction, reflow, num_windows=settings.num_windows)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return step.apply_gradients(state, grads, optimizer=self.optimizer, settings=settings), metrics

    def reflow_abstract(self, batch_size: int):
        """The teacher half's output (a loss.Reflow) as abstract arrays, traced once per batch size."""
        if batch_size not in self._reflow_shapes:
            self._reflow_shapes[batch_size] = jax.eval_shape(
                self.teacher_part, self.batch_abstract(batch_size), self.rng_abstract, self.frozen_abstract
            )
        return self._reflow_shapes[batch_size]

    def lower(self, name: str, batch_size: int):
        """jax.jit(...).lower(...) of ``step``, ``teacher`` or ``student`` (the name's prefix) at ``batch_size``."""
        batch = self.batch_abstract(batch_size)
        if name.startswith("step"):
            full = functools.partial(
                step.train_step, networks=self.networks, settings=self.settings, optimizer=self.optimizer,
                accumulation_steps=self.accumulation,
            )  # fmt: skip
            jitted = jax.jit(
                full,
                in_shardings=(self.state_shardings, self.batch_sharding, self.replicated, self.frozen_shardings),
                out_shardings=(self.state_shardings, self.replicated),
                donate_argnums=0,
            )
            return jitted.lower(self.state_abstract, batch, self.rng_abstract, self.frozen_abstract)
        reflow = self.reflow_abstract(batch_size)
        reflow_shardings = jax.tree.map(lambda _: self.batch_sharding, reflow)
        if name.startswith("teacher"):
            jitted = jax.jit(
                self.teacher_part,
                in_shardings=(self.batch_sharding, self.replicated, self.frozen_shardings),
                out_shardings=reflow_shardings,
            )
            return jitted.lower(batch, self.rng_abstract, self.frozen_abstract)
        jitted = jax.jit(
            self.student_part,
            in_shardings=(self.state_shardings, reflow_shardings),
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=0,
        )
        return jitted.lower(self.state_abstract, with_shardings(reflow, reflow_shardings))

    def unet_forward_flops(self) -> float | None:
        """Lowered (pre-optimisation) cost of one bfloat16 UNet forward of one sample, XLA attention (counted)."""
        unet = UNet2DConditionModel(self.networks.student.config, dtype=jnp.bfloat16, attention_backend="xla")
        inputs = unet.dummy_inputs(batch=1, size=self.spec.latent_size, text_len=self.spec.text_len)
        args = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs]
        params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), self.unet_shapes)
        return cost_flops(jax.jit(lambda p, *a: unet.apply({"params": p}, *a)).lower(params, *args))


def with_shardings(tree, shardings):
    """Abstract arrays (ShapeDtypeStruct) of ``tree``'s shapes and dtypes, placed by ``shardings``."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def run_jax(part: str, args: argparse.Namespace, rec: Recorder) -> None:
    spec = spec_for(part, args)
    remat = args.sdxl_remat if spec.sdxl else "none"
    accumulation = args.sdxl_accumulation if spec.sdxl else 1
    device = jax.devices()[0]
    rec.results.update(
        device_kind=device.device_kind,
        platform=jax.default_backend(),
        device_count=jax.device_count(),
        versions={
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
            "numpy": np.__version__,
        },
        env={k: os.environ.get(k) for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION")},
        attention=args.attention,
        teacher_attention=args.teacher_attention or args.attention,
        remat=remat,
        accumulation=accumulation,
        dtypes="student float32 master weights, bfloat16 compute; teacher and text encoders bfloat16",
    )
    bench = JaxStep(
        spec, attention=args.attention, teacher_attention=args.teacher_attention, remat=remat, accumulation=accumulation
    )
    n_devices = bench.n_devices
    step_batches, alone_batch = part_plan(part, args)
    plan = [f"step_b{step_batches[0]}", f"teacher_b{alone_batch}", f"student_b{alone_batch}"]
    plan += [f"step_b{b}" for b in step_batches[1:]]
    batch_of = {name: int(name.split("_b")[1]) for name in plan}
    compiler = concurrent.futures.ThreadPoolExecutor(1)
    lowered, compiling = {}, {}

    def lower_stage(name):
        with rec.stage(f"lower {name}", batch=batch_of[name]) as row:
            start = time.perf_counter()
            lowered[name] = bench.lower(name, batch_of[name])
            row["lower_s"] = time.perf_counter() - start
            row["flops_lowered"] = cost_flops(lowered[name])
        if name in lowered:
            rec.log(f"{name}: lowered in {rec.results['stages'][f'lower {name}']['lower_s']:.1f} s")

    def compile_in_background(name):
        def work():
            start = time.perf_counter()
            compiled = lowered[name].compile()
            return compiled, time.perf_counter() - start

        compiling[name] = compiler.submit(work)
        rec.results["stages"].setdefault(f"compile {name}", {})["submitted_at_s"] = time.perf_counter() - rec.clock

    # 1. The first function is lowered, and compiled in the background while the weights are placed.
    lower_stage(plan[0])
    if plan[0] in lowered:
        compile_in_background(plan[0])
    host = {}
    with rec.stage("init") as row:
        start = time.perf_counter()
        host["unet"] = host_random_params(bench.unet_shapes, seed=0)
        host.update({n: host_random_params(t, seed=1 + i) for i, (n, t) in enumerate(bench.text_shapes.items())})
        row["host_random_s"] = time.perf_counter() - start
        rec.log(f"init: random weights drawn on the host in {row['host_random_s']:.1f} s")
        start = time.perf_counter()
        state = make_state(host["unet"], bench.optimizer, bench.state_shardings)
        frozen = make_frozen(host, bench.text_names, bench.frozen_shardings)
        frozen["null_cond"] = jax.jit(bench.encode_text, out_shardings=bench.replicated)(frozen, null_batch(spec, 1))
        jax.block_until_ready((state, frozen))
        row["device_s"] = time.perf_counter() - start
        row["parameters"] = {
            "student": int(sum(x.size for x in jax.tree.leaves(state.params))),
            **{n: int(sum(x.size for x in jax.tree.leaves(frozen[n]))) for n in bench.text_names},
        }
        row["memory_after_init"] = device_memory(device)
        rec.log(
            f"init: state and frozen weights on the device in {row['device_s']:.1f} s; student "
            f"{row['parameters']['student'] / 1e6:.1f} M parameters"
        )
    if not rec.ok("init"):
        return
    # 2. The other functions are traced meanwhile; then each is compiled and timed in turn.
    for name in plan[1:]:
        lower_stage(name)
    with rec.stage("lower unet forward (FLOP count)") as row:
        row["flops_per_sample"] = bench.unet_forward_flops()
    live = {"state": state, "reflow": None}
    del state
    keys = [jax.device_put(k, bench.replicated) for k in jax.random.split(jax.random.key(1), args.warmup + args.iters)]
    for name in plan:
        if name not in lowered:
            continue
        batch_size = batch_of[name] * n_devices
        if name not in compiling:
            compile_in_background(name)
        with rec.stage(f"compile {name}", batch=batch_of[name]) as row:
            compiled, row["compile_s"] = compiling[name].result()
            row["flops_compiled"] = cost_flops(compiled)
            row["memory_analysis"] = memory_analysis(compiled)
            rec.log(f"{name}: compiled in {row['compile_s']:.1f} s")
        if not rec.ok(f"compile {name}"):
            continue
        with rec.stage(f"run {name}", batch=batch_of[name], global_batch=batch_size) as row:
            if any(x.is_deleted() for x in jax.tree.leaves(live["state"])):
                rec.log("re-creating the state (a failed call consumed the donated one)")
                live["state"] = make_state(host["unet"], bench.optimizer, bench.state_shardings)
            if name.startswith("student") and live["reflow"] is None:
                raise RuntimeError("the student half needs the teacher half's output, which failed")
            batch = jax.device_put(host_batch(spec, batch_size, seed=batch_size), bench.batch_sharding)
            metrics = []
            row.update(
                timed_calls(jax_call(name, compiled, batch, frozen, keys, live, metrics), args.warmup, args.iters)
            )
            row["samples_per_s"] = batch_size / (row["median_ms"] / 1e3)
            row["memory"] = device_memory(device)
            if metrics:
                summary, failures = check_metrics([jax.tree.map(np.asarray, m) for m in metrics], batch_size)
                row.update(summary)
                rec.results["failures"].extend(f"{name}: {f}" for f in failures)
            peak = (row["memory"] or {}).get("peak_bytes_in_use")
            rec.log(
                f"{name}: median {row['median_ms']:.1f} ms, {row['samples_per_s']:.1f} samples/s"
                + (f", running peak {peak / 1e9:.1f} GB" if peak else "")
            )
        if name.startswith("student"):
            live["reflow"] = None  # the teacher half's output is not needed any more
    compiler.shutdown()


def jax_call(name: str, compiled, batch, frozen, keys, live: dict, metrics: list) -> Callable:
    """``call(i)`` for ``timed_calls``: call i of a compiled step or half; ``live`` holds the (donated) state
    and the teacher half's last output, which the student half takes."""

    def call(i):
        if name.startswith("teacher"):
            live["reflow"] = out = compiled(batch, keys[i], frozen)
        else:
            args = (live["reflow"],) if name.startswith("student") else (batch, keys[i], frozen)
            live["state"], m = out = compiled(live["state"], *args)
            metrics.append(m)
        return lambda: jax.block_until_ready(out)

    return call


def host_random_params(shapes, seed: int, workers: int = 16) -> dict:
    """Random float32 numpy parameters of the given shapes: scales 1, biases 0, other leaves normal(0, 0.02).

    Drawn in threads (numpy's generators release the GIL), one generator per leaf.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    seeds = np.random.SeedSequence(seed).spawn(len(leaves))

    def make(i):
        path, leaf = leaves[i]
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return np.ones(leaf.shape, np.float32)
        if name == "bias":
            return np.zeros(leaf.shape, np.float32)
        values = np.random.default_rng(seeds[i]).standard_normal(leaf.shape, np.float32)
        values *= 0.02
        return values

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        values = list(pool.map(make, range(len(leaves))))
    return jax.tree_util.tree_unflatten(treedef, values)


def make_state(params, optimizer, shardings) -> step.TrainState:
    """A train state on the device from host parameters: student and EMA transferred separately (no
    shared buffer, the state is donated), the optimizer state initialised on the device."""
    student = jax.device_put(params, shardings.params)
    ema = jax.device_put(params, shardings.ema_params)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(student)
    zero = jax.device_put(np.zeros((), np.int32), shardings.step)
    return step.TrainState(step=zero, params=student, opt_state=opt_state, ema_params=ema)


def make_frozen(host, text_names, shardings) -> dict:
    """Teacher (a copy of the student's initial weights) and text encoders, cast to bfloat16 on the device."""
    to_bf16 = functools.partial(jax.tree.map, lambda x: x.astype(jnp.bfloat16))
    frozen = {}
    for name, source in [("teacher", "unet"), *((n, n) for n in text_names)]:
        frozen[name] = jax.jit(to_bf16, out_shardings=shardings[name])(jax.device_put(host[source], shardings[name]))
    return frozen


def memory_analysis(compiled) -> dict | None:
    """XLA's static buffer sizes of a compiled function, in bytes (None if the backend gives none)."""
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
    """The allocator's bytes_in_use, peak_bytes_in_use and bytes_limit (None on the CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # a backend without memory statistics
        return None
    if not stats:
        return None
    return {key: int(stats[key]) for key in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if key in stats}


# ---------------------------------------------------------------------------------------------
# The PyTorch part.


def run_torch(part: str, args: argparse.Namespace, rec: Recorder) -> None:
    import diffusers
    import torch
    import transformers

    from bench.torch_reference import ReferenceStep
    from perflow_jax.step import PeRFlowSettings

    spec = spec_for(part, args)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    rec.results.update(
        device_kind=torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        platform=device.type,
        device_count=1,
        versions={
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
        },
        dtypes="student float32, autocast bfloat16; teacher and text encoders bfloat16" if cuda else "float32 (CPU)",
        gradient_checkpointing=spec.sdxl,
    )
    torch.backends.cudnn.benchmark = True
    if cuda and spec.sdxl:
        total = torch.cuda.get_device_properties(0).total_memory
        fraction = min(1.0, args.sdxl_memory_gb * 1e9 / total)
        torch.cuda.set_per_process_memory_fraction(fraction)
        rec.results["memory_fraction"] = fraction

    with rec.stage("init") as row:
        start = time.perf_counter()
        torch.manual_seed(0)
        with torch.device(device):  # parameters made and initialised on the card
            student = diffusers.UNet2DConditionModel(**spec.unet)
            configs = [transformers.CLIPTextConfig(**c) for c in spec.text_encoders]
            encoders = [transformers.CLIPTextModel(configs[0])]
            if spec.sdxl:
                encoders.append(transformers.CLIPTextModelWithProjection(configs[1]))
        ref = ReferenceStep(
            student, encoders[0], encoders[1] if spec.sdxl else None, spec.scheduler,
            PeRFlowSettings(**spec.settings), scaling_factor=spec.scaling_factor, resolution=8 * spec.latent_size,
            learning_rate=spec.learning_rate, weight_dtype=torch.bfloat16 if cuda else torch.float32,
            autocast_dtype=torch.bfloat16 if cuda else None, gradient_checkpointing=spec.sdxl,
        )  # fmt: skip
        synchronize(torch)
        row["init_s"] = time.perf_counter() - start
        row["parameters"] = {"student": sum(p.numel() for p in student.parameters())}
        rec.log(
            f"init: networks on the device in {row['init_s']:.1f} s, student {row['parameters']['student'] / 1e6:.1f} M"
        )
    if not rec.ok("init"):
        return

    def to_device(host):
        out = {}
        for key, value in host.items():
            tensor = torch.from_numpy(np.ascontiguousarray(value.transpose(0, 3, 1, 2) if value.ndim == 4 else value))
            out[key] = tensor.to(device, dtype=torch.long if key.startswith("input_ids") else None)
        return out

    def measure(name, batch_size, kind):
        batch = to_device(host_batch(spec, batch_size, seed=batch_size))
        null = to_device(null_batch(spec, batch_size))
        metrics = []
        with rec.stage(f"run {name}", batch=batch_size, global_batch=batch_size) as row:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            if kind == "teacher":

                def call(i):
                    ref.teacher_part(batch, null)
                    return lambda: synchronize(torch)

            elif kind == "student":
                fixed = ref.teacher_part(batch, null)

                def call(i):
                    metrics.append(ref.student_update(fixed))
                    return lambda: synchronize(torch)

            else:

                def call(i):
                    metrics.append(ref(batch, null))
                    return lambda: synchronize(torch)

            if kind.startswith("compile"):
                start = time.perf_counter()
                call(-1)()
                row["first_call_s"] = time.perf_counter() - start
                rec.log(f"{name}: first call (torch.compile compiles) {row['first_call_s']:.1f} s")
            row.update(timed_calls(call, args.warmup, args.iters))
            row["samples_per_s"] = batch_size / (row["median_ms"] / 1e3)
            if "first_call_s" in row:
                row["compile_s"] = row["first_call_s"] - row["median_ms"] / 1e3
            if cuda:
                row["memory"] = {
                    "peak_bytes_in_use": torch.cuda.max_memory_allocated(),
                    "peak_bytes_reserved": torch.cuda.max_memory_reserved(),
                }
            if metrics:
                host_metrics = [{k: v.detach().float().cpu().numpy() for k, v in m.items()} for m in metrics]
                summary, failures = check_metrics(host_metrics, batch_size)
                row.update(summary)
                rec.results["failures"].extend(f"{name}: {f}" for f in failures)
            peak = (row.get("memory") or {}).get("peak_bytes_in_use")
            rec.log(
                f"{name}: median {row['median_ms']:.1f} ms, {row['samples_per_s']:.1f} samples/s"
                + (f", peak {peak / 1e9:.1f} GB" if peak else "")
            )
        if cuda:
            torch.cuda.empty_cache()

    step_batches, alone_batch = part_plan(part, args)
    measure(f"step_b{step_batches[0]}", step_batches[0], "step")
    measure(f"teacher_b{alone_batch}", alone_batch, "teacher")
    measure(f"student_b{alone_batch}", alone_batch, "student")
    for batch_size in step_batches[1:]:
        measure(f"step_b{batch_size}", batch_size, "step")
    if args.compile_batch and not spec.sdxl:
        ref.compile()
        measure(f"compiled_step_b{args.compile_batch}", args.compile_batch, "compile_step")
        measure(f"compiled_teacher_b{args.compile_batch}", args.compile_batch, "teacher")
        measure(f"compiled_student_b{args.compile_batch}", args.compile_batch, "student")


def synchronize(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# Summary and report.


def summarise(results: dict, args: argparse.Namespace) -> dict:
    """Rows for the tables: samples/s, MFU and speed-ups per model; FLOPs per sample and their source."""
    summary = {}
    for model in ("sd15", "sdxl"):
        parts = {fw: results["parts"].get(f"{fw}-{model}") for fw in ("jax", "torch")}
        if not any(parts.values()):
            continue
        spec = spec_for(f"jax-{model}", args)
        forward = spec.flops_per_forward
        jax_part = parts["jax"] or {}
        lowered_forward = (jax_part.get("stages", {}).get("lower unet forward (FLOP count)") or {}).get(
            "flops_per_sample"
        )
        passes = {"step": spec.teacher_passes + STUDENT_PASSES, "teacher": spec.teacher_passes}
        passes["student"] = STUDENT_PASSES
        flops = {
            "analytic_per_sample": passes["step"] * forward if forward else None,
            "lowered_unet_forward_per_sample": lowered_forward,
            "lowered_forward_x_passes": passes["step"] * lowered_forward if lowered_forward else None,
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
        scale = flops.get("mfu_per_sample") / passes["step"] if flops.get("mfu_per_sample") else None
        rows = []
        for framework, part in parts.items():
            if not part:
                continue
            device_kind = part.get("device_kind")
            peak = args.peak_tflops * 1e12 if args.peak_tflops else PEAK_BF16_FLOPS.get(device_kind)
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
                        "mfu": scale * passes[kind] * row["samples_per_s"] / peak if scale and peak else None,
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
    def fmt(x, pattern):
        return pattern.format(x) if x is not None else "-"

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
        print(f"\n{s['spec']}, {s['settings']}")
        print(
            "FLOPs per sample (TFLOP): analytic {}, passes x lowered UNet forward {}, lowered step + loop {}, "
            "compiled step {}; MFU uses {} ({})".format(
                *(
                    fmt(flops.get(k) and flops[k] / 1e12, "{:.3g}")
                    for k in (
                        "analytic_per_sample",
                        "lowered_forward_x_passes",
                        "lowered_step_plus_loop_per_sample",
                        "compiled_step_per_sample",
                        "mfu_per_sample",
                    )
                ),  # fmt: skip
                flops.get("mfu_source", "none"),
            )
        )
        columns = (
            "implementation, part, batch, compile s, median ms, samples/s, MFU, peak GB, XLA GB, vs eager, vs compile"
        )
        print("| " + " | ".join(columns.split(", ")) + " |")
        print("|---" * len(columns.split(", ")) + "|")
        for row in sorted(s["rows"], key=lambda r: (r["part"] != "step", r["part"], r["batch"], r["implementation"])):
            cells = [
                row["implementation"], row["part"], str(row["batch"]), fmt(row["compile_s"], "{:.1f}"),
                fmt(row["median_ms"], "{:.1f}"), fmt(row["samples_per_s"], "{:.1f}"), fmt(row["mfu"], "{:.1%}"),
                fmt(row["peak_gb"], "{:.1f}"), fmt(row["xla_memory_gb"], "{:.1f}"), fmt(row["vs_eager"], "{:.2f}x"),
                fmt(row["vs_compile"], "{:.2f}x"),
            ]  # fmt: skip
            print("| " + " | ".join(cells) + " |")
        devices = sorted({r["device"] for r in s["rows"] if r["device"]})
        print(f"device: {', '.join(devices) or '-'}; JAX peak GB is the process's running peak (largest batch first)")


# ---------------------------------------------------------------------------------------------


def run_part(args: argparse.Namespace) -> int:
    spec = spec_for(args.part, args)
    rec = Recorder(args.part, args, spec)
    rec.log(f"{args.part}: {spec.name}, {spec.latent_size}x{spec.latent_size} latents")
    try:
        (run_jax if args.part.startswith("jax") else run_torch)(args.part, args, rec)
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
