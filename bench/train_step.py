"""The SD1.5 PeRFlow training step: compile time, step time, samples/s, MFU and peak memory.

The whole jitted update of ``perflow_jax.step.train_step`` at 512 px (64x64 latents), with random
weights from Flax's own initialisation (no torch, no diffusers, nothing downloaded): text encoding
(SD1.5's CLIP text tower, bfloat16), the teacher's window solve (K=4 windows, S=8 DDIM steps,
cfg_sync: one teacher pass per step, guidance 1; teacher stored and computed in bfloat16), the
diff_eps reflow loss, the student's forward and backward (bfloat16 compute, float32 master
weights, attention backend ``auto``), global-norm clipping, AdamW and the EMA.

Everything is built on the device by jitted functions (state, frozen parameters, batch); the
state is donated to the step, which is compiled ahead of time (``jit(...).lower(...).compile()``)
once per batch size. Per batch size: 2 untimed steps, then ``--iters`` steps each waited for
(``jax.block_until_ready`` on the new state and the metrics), then ``--iters`` steps dispatched
back to back and waited for at the end. Sanity on every step run: the loss is finite and the
per-window counts sum to the batch.

FLOPs per sample, reported three ways: XLA's cost analysis of the compiled step (on GPU it leaves
out cuDNN / cuBLAS custom calls, so it counts far too little), of the lowered step before XLA's
optimisations (it counts a while loop's body once: the teacher's 8-step solve as one pass), and
the analytic 11 UNet passes x 803 GFLOP (8 teacher passes, 3 for the student's forward and
backward; DESIGN.md "Where the cost is"), cross-checked with 11 x the lowered cost analysis of
one UNet forward. MFU uses the compiled count if it is within 15% of the analytic one, else the
analytic one.

Peak memory is the device allocator's running peak (``memory_stats()["peak_bytes_in_use"]``),
which cannot be reset: batch sizes run in increasing order, and each figure is the peak up to
and including that batch size's steps.

A markdown table goes to stdout, everything to ``$OUT/train_step.json`` (the current folder when
OUT is unset), rewritten after each stage. Exit status 1 when a loss is not finite, the window
counts are off, or a stage raised anything but an out-of-memory error (an out-of-memory batch
size is recorded and the next one still runs).

    python3 bench/train_step.py                      # SD1.5, batch 16 then 32 per device, on a GPU
    python3 bench/train_step.py --batches 16 --iters 20
    python3 bench/train_step.py --tiny               # tiny UNet and CLIP, batch 2, 8x8: a CPU smoke run
"""

# The imports below must follow the sys.path and environment lines before them.
# ruff: noqa: E402
from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

# Run as `python3 bench/train_step.py` from the repository root, perflow_jax not installed:
# the repository root goes first on the import path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# JAX alone on the GPU: take 90% of its memory up front (the default is 75%), leaving room for
# the CUDA context and library handles outside XLA's pool.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

from bench.common import cost_flops, error_string
from perflow_jax import sharding, step
from perflow_jax.models import reference_configs
from perflow_jax.models.clip import CLIPTextConfig, CLIPTextModel
from perflow_jax.models.unet import UNet2DConditionModel, UNetConfig
from perflow_jax.schedule import alphas_cumprod_from_config

# SD1.5's UNet forward at 64x64 latents and 77 text tokens, 2 FLOPs per multiply-add.
SD15_FLOPS_PER_FORWARD = 803e9
# K windows, S teacher DDIM steps per window (the SD1.5 recipe).
NUM_WINDOWS, SOLVER_STEPS = 4, 8
# UNet passes per example in one step: S=8 teacher passes (cfg_sync: one per DDIM step) and the
# student's forward and backward (~3 forwards).
PASSES_PER_SAMPLE = SOLVER_STEPS + 3
# Dense bfloat16 datasheet peaks, by jax.devices()[0].device_kind.
PEAK_BF16_FLOPS = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H200": 989e12}
# SD1.5's scheduler (scheduler/scheduler_config.json) and VAE scaling factor.
SD15_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
SD15_SCALING_FACTOR = 0.18215
LEARNING_RATE = 8e-5  # the SD1.5 recipe's
# tests/test_step.py: a one-level UNet and a two-layer CLIP, so that compiling the step's
# gradient stays quick on the CPU.
TINY_UNET = dict(
    block_out_channels=(16,),
    layers_per_block=1,
    cross_attention_dim=16,
    attention_head_dim=2,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D",),
    up_block_types=("CrossAttnUpBlock2D",),
)
TINY_TEXT_ENCODER = dict(
    vocab_size=100,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=8,
    eos_token_id=2,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", help="per-device batch sizes, in increasing order (default 16,32; 2 with --tiny)")
    parser.add_argument("--size", type=int, help="latent height and width (default 64 = 512 px; 8 with --tiny)")
    parser.add_argument("--iters", type=int, default=10, help="timed steps per batch size (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing (default 2)")
    parser.add_argument(
        "--attention",
        default="auto",
        choices=("auto", "xla", "cudnn"),
        help="attention backend of the student, teacher and text encoder (default auto: cuDNN on GPU)",
    )
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak per device for MFU, if not an H100/H200")
    parser.add_argument("--tiny", action="store_true", help="tiny UNet and CLIP, batch 2, 8x8 latents (CPU smoke run)")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in (args.batches or ("2" if args.tiny else "16,32")).split(",")]
    args.size = args.size or (8 if args.tiny else 64)
    if any(b < 1 for b in args.batches) or args.batches != sorted(args.batches):
        parser.error(f"--batches {args.batches}: positive sizes in increasing order (the memory peak only grows)")
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be at least 1 and --warmup at least 0")
    return args


def random_like(shapes, key):
    """Random float32 parameters of the given shapes: scales 1, biases 0, other leaves normal(0, 0.02)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    values = []
    for i, (path, leaf) in enumerate(leaves):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            values.append(jnp.ones(leaf.shape, jnp.float32))
        elif name == "bias":
            values.append(jnp.zeros(leaf.shape, jnp.float32))
        else:
            values.append(0.02 * jax.random.normal(jax.random.fold_in(key, i), leaf.shape, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, values)


def is_oom(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def memory_analysis(compiled) -> dict | None:
    """XLA's static buffer sizes of a compiled function, in bytes (None if the backend gives none)."""
    try:
        stats = compiled.memory_analysis()
    except Exception:
        return None
    if stats is None:
        return None
    names = ("argument", "output", "alias", "temp", "generated_code")
    return {
        f"{n}_bytes": int(getattr(stats, f"{n}_size_in_bytes")) for n in names if hasattr(stats, f"{n}_size_in_bytes")
    }


def device_memory(device) -> dict | None:
    """The allocator's bytes_in_use, peak_bytes_in_use and bytes_limit (None on the CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:
        return None
    if not stats:
        return None
    return {key: int(stats[key]) for key in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if key in stats}


class Bench:
    """Networks, placement and the jitted pieces of one run; ``attention`` is the backend of all three networks."""

    def __init__(self, args, mesh, attention: str):
        self.args, self.mesh, self.attention = args, mesh, attention
        self.unet_cfg = UNetConfig.from_dict(TINY_UNET if args.tiny else reference_configs.SD15_UNET)
        self.text_cfg = CLIPTextConfig.from_dict(
            TINY_TEXT_ENCODER if args.tiny else reference_configs.SD15_TEXT_ENCODER
        )
        self.text_len = self.text_cfg.max_position_embeddings
        # CLIP's start / end-of-text ids are the vocabulary's last two (49406, 49407); SD1.5's config
        # says eos_token_id 2, so the pooled token is the highest id: the first end-of-text.
        self.bos, self.eos = self.text_cfg.vocab_size - 2, self.text_cfg.vocab_size - 1
        self.networks = step.Networks(
            student=UNet2DConditionModel(self.unet_cfg, dtype=jnp.bfloat16, attention_backend=attention),
            teacher=UNet2DConditionModel(self.unet_cfg, dtype=jnp.bfloat16, attention_backend=attention),
            text_encoder=CLIPTextModel(self.text_cfg, dtype=jnp.bfloat16, attention_backend=attention),
            text_encoder_2=None,
            alphas_cumprod=alphas_cumprod_from_config(SD15_SCHEDULER),
            scaling_factor=SD15_SCALING_FACTOR,
            resolution=8 * args.size,
        )
        self.settings = step.PeRFlowSettings(
            parameterization="diff_eps", num_windows=NUM_WINDOWS, solver_steps=SOLVER_STEPS, teacher_guidance=1.0
        )
        self.optimizer = step.make_optimizer(LEARNING_RATE)
        self.replicated = sharding.replicated(mesh)

    def init_fn(self, key):
        """(train state, frozen parameters without null_cond): random weights, teacher = the student's bf16 copy.

        The weights are drawn directly (normal(0, 0.02) kernels, unit scales, zero biases) from the
        parameter shapes: compiling Flax's own initialisers for 860 M parameters took 163 s on an H200.
        """
        k_unet, k_text = jax.random.split(key)
        unet, text = self.networks.student, self.networks.text_encoder
        unet_shapes = jax.eval_shape(
            lambda: unet.init(jax.random.key(0), *unet.dummy_inputs(batch=1, size=8, text_len=self.text_len))["params"]
        )
        text_shapes = jax.eval_shape(
            lambda: text.init(jax.random.key(0), jnp.zeros((1, self.text_len), jnp.int32))["params"]
        )
        params, text_params = random_like(unet_shapes, k_unet), random_like(text_shapes, k_text)
        state = step.create_train_state(params, self.optimizer)
        to_bf16 = functools.partial(jax.tree.map, lambda x: x.astype(jnp.bfloat16))
        return state, {"teacher": to_bf16(params), "text_encoder": to_bf16(text_params)}

    def compile_init(self):
        """The init, compiled with its outputs placed by sharding.parameter_shardings."""
        key = jax.random.key(0)
        abstract = jax.eval_shape(self.init_fn, key)
        self.state_shardings, frozen_shardings = sharding.parameter_shardings(abstract, self.mesh)
        return jax.jit(self.init_fn, out_shardings=(self.state_shardings, frozen_shardings)).lower(key).compile()

    def null_cond(self, frozen):
        """The empty prompt's condition [1, T, D]: ids [bos, eos, eos, ...]."""
        ids = jnp.full((1, self.text_len), self.eos, jnp.int32).at[0, 0].set(self.bos)
        encode = jax.jit(
            lambda f, ids: step.encode_text(self.networks, f, {"input_ids": ids}), out_shardings=self.replicated
        )
        return encode(frozen, ids)

    def make_batch(self, batch_size: int, seed: int) -> dict:
        """A random data.py batch, made on the device: mean, logvar [B, s, s, 4] float16, input_ids [B, T] int32."""
        size, text_len, bos, eos = self.args.size, self.text_len, self.bos, self.eos
        channels = self.unet_cfg.in_channels

        def make(key):
            k_mean, k_logvar, k_ids, k_end = jax.random.split(key, 4)
            shape = (batch_size, size, size, channels)
            # VAE latent moments of about unit variance once scaled by the scaling factor.
            mean = jax.random.normal(k_mean, shape) / SD15_SCALING_FACTOR
            logvar = jax.random.uniform(k_logvar, shape, minval=-8.0, maxval=-2.0)
            words = jax.random.randint(k_ids, (batch_size, text_len), 0, bos)
            end = jax.random.randint(k_end, (batch_size, 1), 1, text_len)  # first end-of-text position
            pos = jnp.arange(text_len)[None]
            ids = jnp.where(pos == 0, bos, jnp.where(pos >= end, eos, words)).astype(jnp.int32)
            return {"mean": mean.astype(jnp.float16), "logvar": logvar.astype(jnp.float16), "input_ids": ids}

        batch_sharding = sharding.batch_sharding(self.mesh)
        out = {name: batch_sharding for name in ("mean", "logvar", "input_ids")}
        return jax.jit(make, out_shardings=out)(jax.random.key(seed))

    def compile_step(self, state, batch, rng, frozen):
        """jit(train_step, donate the state).lower(...).compile(), with timings, cost and memory analysis."""
        fn = functools.partial(
            step.train_step, networks=self.networks, settings=self.settings, optimizer=self.optimizer
        )
        frozen_shardings = sharding.parameter_shardings(frozen, self.mesh)
        batch_shardings = {name: sharding.batch_sharding(self.mesh) for name in batch}
        jitted = jax.jit(
            fn,
            in_shardings=(self.state_shardings, batch_shardings, self.replicated, frozen_shardings),
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=0,
        )
        start = time.perf_counter()
        lowered = jitted.lower(state, batch, rng, frozen)
        traced = time.perf_counter()
        compiled = lowered.compile()
        done = time.perf_counter()
        return compiled, {
            "trace_s": traced - start,
            "compile_s": done - traced,
            "flops_per_step_lowered": cost_flops(lowered),
            "flops_per_step_compiled": cost_flops(compiled),
            "memory_analysis": memory_analysis(compiled),
        }

    def unet_forward_flops(self) -> float | None:
        """Lowered (pre-optimisation) cost analysis of one bf16 UNet forward at batch 1: FLOPs per sample.

        Lowered with XLA attention, so that the attention matmuls are counted (a cuDNN custom call is not).
        """
        unet = UNet2DConditionModel(self.unet_cfg, dtype=jnp.bfloat16, attention_backend="xla")
        params = jax.eval_shape(lambda: unet.init(jax.random.key(0), *unet.dummy_inputs(size=8))["params"])
        params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.bfloat16), params)
        size, text_len = self.args.size, self.text_len
        args = (
            jax.ShapeDtypeStruct((1, size, size, self.unet_cfg.in_channels), jnp.bfloat16),
            jax.ShapeDtypeStruct((1,), jnp.float32),
            jax.ShapeDtypeStruct((1, text_len, self.unet_cfg.cross_attention_dim[0]), jnp.bfloat16),
        )
        forward = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c))
        return cost_flops(forward.lower(params, *args))


def time_steps(compiled, state, batch, keys, frozen, warmup: int, iters: int):
    """Warm-up steps, ``iters`` steps each waited for, then ``iters`` back to back.

    Returns (the last state, timing dict, the metrics of every step as numpy).
    """
    outputs = []
    for i in range(warmup):
        state, metrics = compiled(state, batch, keys[i], frozen)
        jax.block_until_ready((state, metrics))
        outputs.append(metrics)
    times = []
    for i in range(warmup, warmup + iters):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, keys[i], frozen)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
        outputs.append(metrics)
    start = time.perf_counter()
    for i in range(warmup + iters, warmup + 2 * iters):
        state, metrics = compiled(state, batch, keys[i], frozen)
        outputs.append(metrics)
    jax.block_until_ready((state, metrics))
    back_to_back = (time.perf_counter() - start) / iters
    timing = {
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "max_ms": 1e3 * max(times),
        "times_ms": [round(1e3 * t, 3) for t in times],
        "back_to_back_mean_ms": 1e3 * back_to_back,
    }
    return state, timing, [jax.tree.map(np.asarray, m) for m in outputs]


def check_metrics(metrics: list[dict], batch_size: int) -> tuple[dict, list[str]]:
    """Loss finite and window counts summing to the batch at every step: (summary, failures)."""
    losses = [float(m["loss"]) for m in metrics]
    counts = [float(np.sum(m["window_count"])) for m in metrics]
    failures = []
    bad = [i for i, loss in enumerate(losses) if not math.isfinite(loss)]
    if bad:
        failures.append(f"batch {batch_size}: loss not finite at steps {bad} ({[losses[i] for i in bad]})")
    off = [i for i, c in enumerate(counts) if c != batch_size]
    if off:
        failures.append(f"batch {batch_size}: window counts sum to {[counts[i] for i in off]}, not {batch_size}")
    summary = {
        "losses": losses,
        "grad_norms": [float(m["grad_norm"]) for m in metrics],
        "window_counts_last": np.asarray(metrics[-1]["window_count"]).tolist(),
        "loss_finite": not bad,
        "window_counts_sum_to_batch": not off,
    }
    return summary, failures


def run(args, results: dict, save: Callable) -> None:
    """All stages, recording into ``results`` and calling ``save()`` after each."""
    clock = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - clock:6.1f}s] {message}", flush=True)

    devices = jax.devices()
    mesh = sharding.make_mesh((-1, 1), devices)  # data parallel over the local devices; one GPU: (1, 1)
    n_devices = len(devices)
    setup = results["setup_s"]
    bench = Bench(args, mesh, args.attention)

    log(f"compiling the on-device init ({'tiny' if args.tiny else 'SD1.5'} UNet + CLIP, Flax random init)")
    start = time.perf_counter()
    init = bench.compile_init()
    setup["init_compile"] = time.perf_counter() - start
    start = time.perf_counter()
    state, frozen = init(jax.random.key(0))
    jax.block_until_ready((state, frozen))
    setup["init_run"] = time.perf_counter() - start
    results["parameters"] = {
        "student": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "text_encoder": int(sum(x.size for x in jax.tree.leaves(frozen["text_encoder"]))),
    }
    start = time.perf_counter()
    frozen["null_cond"] = bench.null_cond(frozen)
    jax.block_until_ready(frozen)
    setup["null_cond"] = time.perf_counter() - start
    results["memory_after_init"] = device_memory(devices[0])
    log(f"state and frozen parameters on the device; student {results['parameters']['student'] / 1e6:.1f} M parameters")
    save()

    keys = list(jax.random.split(jax.random.key(1), args.warmup + 2 * args.iters))
    for per_device in args.batches:
        batch_size = per_device * n_devices
        row = results["batches"][str(per_device)] = {"per_device_batch": per_device, "global_batch": batch_size}
        try:
            if state is None:  # a failed step consumed the donated state
                log("re-creating the state")
                state, frozen_new = init(jax.random.key(0))
                frozen.update(frozen_new)
            batch = bench.make_batch(batch_size, seed=per_device)
            log(f"batch {per_device}/device: lowering and compiling the step (attention {bench.attention})")
            compiled, info = bench.compile_step(state, batch, keys[0], frozen)
            row.update(info)
            row["attention"] = bench.attention
            log(f"batch {per_device}: compiled in {info['trace_s']:.1f} s trace + {info['compile_s']:.1f} s; timing")
            save()
            state, timing, metrics = time_steps(compiled, state, batch, keys, frozen, args.warmup, args.iters)
            row.update(timing)
            row["memory"] = device_memory(devices[0])
            summary, failures = check_metrics(metrics, batch_size)
            row.update(summary)
            results["failures"].extend(failures)
            log(
                f"batch {per_device}: median {timing['median_ms']:.1f} ms/step, loss {summary['losses'][-1]:.4g}"
                + (f", peak {row['memory']['peak_bytes_in_use'] / 1e9:.1f} GB" if row["memory"] else "")
            )
            del compiled, batch
        except Exception as error:
            row["error"] = error_string(error)
            row["memory"] = device_memory(devices[0])
            traceback.print_exc()
            if is_oom(error):
                row["oom"] = True
                log(f"batch {per_device}: out of memory (recorded; going on)")
            else:
                results["failures"].append(f"batch {per_device}: {row['error'].splitlines()[0][:300]}")
            if any(x.is_deleted() for x in jax.tree.leaves(state)):
                state = None
        save()

    log("lowering one UNet forward for its pre-optimisation FLOP count")
    try:
        results["unet_forward_flops_lowered"] = bench.unet_forward_flops()
    except Exception as error:
        results["errors"]["unet_forward_flops"] = error_string(error)
    log("done")


def summarise(args, results: dict) -> None:
    """FLOPs per sample (each source), samples/s and MFU per batch size."""
    n_devices = results["device_count"]
    sd15_512 = not args.tiny and args.size == 64
    analytic = PASSES_PER_SAMPLE * SD15_FLOPS_PER_FORWARD if sd15_512 else None
    forward = results.get("unet_forward_flops_lowered")
    flops = {
        "analytic_11_x_803G": analytic,
        "11_x_lowered_unet_forward": PASSES_PER_SAMPLE * forward if forward else None,
        "lowered_unet_forward_per_sample": forward,
    }
    solver_steps = results["solver_steps"]
    for row in results["batches"].values():
        batch_size = row["global_batch"]
        for stage in ("lowered", "compiled"):
            count = row.get(f"flops_per_step_{stage}")
            row[f"flops_per_sample_{stage}"] = count / batch_size if count else None
        # The lowered step counts the teacher's fori_loop body once: add the other S - 1 passes.
        lowered = row["flops_per_sample_lowered"]
        row["flops_per_sample_lowered_plus_loop"] = (
            lowered + (solver_steps - 1) * forward if lowered and forward else None
        )
    compiled = next(
        (r["flops_per_sample_compiled"] for r in results["batches"].values() if r.get("flops_per_sample_compiled")),
        None,
    )
    reference = analytic or flops["11_x_lowered_unet_forward"]
    if compiled and reference and abs(compiled / reference - 1) < 0.15:
        flops["per_sample"], flops["source"] = compiled, "cost analysis of the compiled step"
    elif analytic:
        flops["per_sample"], flops["source"] = analytic, "analytic 11 x 803 GFLOP (compiled cost analysis far off)"
    elif reference:
        flops["per_sample"], flops["source"] = reference, "11 x lowered cost analysis of one UNet forward"
    else:
        flops["per_sample"], flops["source"] = None, "none"
    results["flops"] = flops
    peak = args.peak_tflops * 1e12 if args.peak_tflops else PEAK_BF16_FLOPS.get(results["device_kind"])
    results["peak_bf16_flops_per_device"] = peak
    for row in results["batches"].values():
        if "median_ms" in row:
            row["samples_per_s"] = row["global_batch"] / (row["median_ms"] / 1e3)
            row["samples_per_s_back_to_back"] = row["global_batch"] / (row["back_to_back_mean_ms"] / 1e3)
            per_sample = flops["per_sample"]
            row["mfu"] = per_sample * row["samples_per_s"] / (peak * n_devices) if per_sample and peak else None


def print_report(results: dict) -> None:
    for name, error in results["errors"].items():
        print(f"error {name}: {error.splitlines()[0][:300]}")
    flops = results["flops"]

    def g(x):
        return f"{x / 1e9:.4g}" if x else "n/a"

    print("\nFLOPs per sample (GFLOP):")
    print(f"  analytic 11 x 803: {g(flops['analytic_11_x_803G'])}")
    print(
        f"  11 x lowered cost analysis of one UNet forward (XLA attention): {g(flops['11_x_lowered_unet_forward'])}"
        f" (one forward: {g(flops['lowered_unet_forward_per_sample'])})"
    )
    for per_device, row in results["batches"].items():
        print(
            f"  batch {per_device}: step cost analysis, lowered {g(row.get('flops_per_sample_lowered'))} (the teacher"
            f" loop's body counted once; + {results['solver_steps'] - 1} forwards:"
            f" {g(row.get('flops_per_sample_lowered_plus_loop'))}), compiled {g(row.get('flops_per_sample_compiled'))}"
            " (on GPU without cuDNN/cuBLAS custom calls)"
        )
    print(f"  MFU uses {g(flops['per_sample'])} ({flops['source']})")
    setup = results["setup_s"]
    print(
        "setup: init compile {:.1f} s, init run {:.1f} s, null_cond {:.1f} s".format(
            setup.get("init_compile", float("nan")),
            setup.get("init_run", float("nan")),
            setup.get("null_cond", float("nan")),
        )
    )
    for per_device, row in results["batches"].items():
        if "losses" in row:
            print(
                f"batch {per_device}: loss first/last {row['losses'][0]:.4g}/{row['losses'][-1]:.4g}, "
                f"finite: {row['loss_finite']}, window counts (last step) {row['window_counts_last']} "
                f"sum to batch: {row['window_counts_sum_to_batch']}; back-to-back "
                f"{row['back_to_back_mean_ms']:.1f} ms/step ({row['samples_per_s_back_to_back']:.1f} samples/s)"
            )
    print(
        f"\n{results['device_kind']} x{results['device_count']}, {results['model']}, {results['size']}x"
        f"{results['size']} latents, K=4 S=8 cfg_sync diff_eps, bf16 compute; peak memory is the running peak "
        "(batch sizes in increasing order, no reset)"
    )
    print("| batch/device | compile s | median ms/step | samples/s | MFU | peak GB |")
    print("|---|---|---|---|---|---|")
    for per_device, row in results["batches"].items():
        compile_s = row["trace_s"] + row["compile_s"] if "compile_s" in row else None
        memory = row.get("memory") or {}
        peak = memory.get("peak_bytes_in_use")
        median = row.get("median_ms")
        cells = [
            f"{compile_s:.1f}" if compile_s is not None else "-",
            f"{median:.1f}" if median else ("OOM" if row.get("oom") else "failed"),
            f"{row['samples_per_s']:.1f}" if median else "-",
            f"{row['mfu']:.1%}" if row.get("mfu") else "-",
            f"{peak / 1e9:.1f}" if peak else "-",
        ]
        print(f"| {per_device} | " + " | ".join(cells) + " |")
    for failure in results["failures"]:
        print(f"FAILED: {failure}")


def versions() -> dict:
    out = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
    }
    try:
        from jax._src.lib import cuda_versions

        if cuda_versions is not None:
            out["cudnn"] = cuda_versions.cudnn_get_version()
    except Exception:
        pass
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = Path(os.environ.get("OUT", ".")) / "train_step.json"
    device = jax.devices()[0]
    results = {
        "benchmark": "train_step",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python3", *sys.argv]),
        "device_kind": device.device_kind,
        "platform": jax.default_backend(),
        "device_count": jax.device_count(),
        "versions": versions(),
        "env": {
            k: os.environ.get(k)
            for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE")
        },
        "model": "tiny (tests/test_step.py UNET, TEXT)" if args.tiny else "SD1.5 (random Flax init)",
        "size": args.size,
        "per_device_batches": args.batches,
        "iters": args.iters,
        "warmup": args.warmup,
        "attention": args.attention,
        "num_windows": NUM_WINDOWS,
        "solver_steps": SOLVER_STEPS,
        "settings": "K=4, S=8, teacher_guidance 1 (cfg_sync), diff_eps, text dropout 0.1, AdamW lr 8e-5, clip 1.0, EMA",
        "dtypes": "student float32 master weights, bfloat16 compute; teacher and text encoder bfloat16 storage "
        "and compute",
        "timing": "median of --iters steps, each waited for (block_until_ready on state and metrics); "
        "back_to_back: mean of --iters steps dispatched without waiting",
        "peak_memory_note": "memory_stats peak_bytes_in_use cannot be reset: each batch size's figure is the running "
        "peak of the process up to its steps (batch sizes in increasing order)",
        "setup_s": {},
        "batches": {},
        "errors": {},
        "failures": [],
    }

    def save():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1, default=str) + "\n")

    try:
        run(args, results, save)
    except Exception as error:  # write what was measured, then fail
        results["errors"]["run"] = error_string(error)
        results["failures"].append(f"run: {results['errors']['run'].splitlines()[0][:300]}")
        traceback.print_exc()
    summarise(args, results)
    save()
    print_report(results)
    print(f"\nresults: {path}")
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
