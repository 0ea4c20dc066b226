"""SD1.5 UNet forward pass: this project's Flax UNet, per attention backend, against diffusers in PyTorch.

The same random weights on both sides (diffusers' initialisation, converted); correctness first
(float32 parity with PyTorch, each backend's bfloat16 output against JAX float32), then compile
time and call times; bench/README.md says what is measured. A markdown table goes to stdout,
everything to ``$OUT/unet_forward.json``, rewritten after every stage; exit status 1 when a
correctness check failed or could not be made (a backend that raises is recorded, the others run).

    python3 bench/unet_forward.py            # SD1.5, batch 16, 64x64 latents (512 px), on a GPU
    python3 bench/unet_forward.py --tiny     # a tiny UNet at small sizes: seconds on a CPU
"""

# The imports below must follow the sys.path and environment lines before them.
# ruff: noqa: E402
from __future__ import annotations

import argparse
import functools
import gc
import os
import platform
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

# Run as `python3 bench/unet_forward.py` from the repository root, perflow_jax not installed:
# the repository root goes first on the import path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# JAX takes 75% of GPU memory at start by default; PyTorch shares the GPU in this process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import diffusers
import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import torch

from bench.common import error_string, fmt, mfu, now, out_dir, peak_flops, print_table, time_calls, write_json
from perflow_jax import weights
from perflow_jax.flops import cost_flops
from perflow_jax.models import reference_configs
from perflow_jax.models.attention import _auto_backend, dot_product_attention
from perflow_jax.models.unet import UNet2DConditionModel, UNetConfig
from tests.helpers.parity import nchw_to_nhwc, nhwc_to_nchw, relative_error

JAX_BACKENDS = ("xla", "auto", "cudnn")
TEXT_LEN = 77
PARITY_BATCH = 2
# float32 networks agree with PyTorch to ~1e-6 (tests/helpers/parity.py); bfloat16 keeps 8 significant
# bits, and a few dozen layers accumulate ~1e-2 against float32 (tests/test_unet.py).
FLOAT32_TOL = 1e-4
BFLOAT16_TOL = 5e-2
# SD1.5's UNet at 64x64 latents and 77 text tokens, 2 FLOPs per multiply-add.
SD15_FLOPS_PER_SAMPLE = 803e9
# tests/helpers/networks.py TINY_UNETS["sd1"]: SD1.x's layout at toy widths.
TINY_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, help="samples per call (default 16; 4 with --tiny)")
    parser.add_argument("--size", type=int, help="latent height and width (default 64; 16 with --tiny)")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per implementation (at least 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    parser.add_argument("--tiny", action="store_true", help="a tiny UNet at small sizes (CPU smoke run)")
    args = parser.parse_args(argv)
    args.batch = args.batch or (4 if args.tiny else 16)
    args.size = args.size or (16 if args.tiny else 64)
    if args.batch % PARITY_BATCH:
        parser.error(f"--batch {args.batch}: use a multiple of {PARITY_BATCH} (the float32 reference runs in chunks)")
    if args.iters < 20 and not args.tiny:
        parser.error(f"--iters {args.iters}: time at least 20 calls for a stable median")
    return args


def random_inputs(batch: int, size: int, in_channels: int, context_dim: int) -> dict[str, np.ndarray]:
    """sample: [B, C, H, W] (PyTorch layout), timesteps: [B], context: [B, 77, D]; all float32."""
    rng = np.random.default_rng(0)
    return {
        "sample": rng.standard_normal((batch, in_channels, size, size), np.float32),
        "timesteps": rng.integers(0, 1000, batch).astype(np.float32),
        "context": rng.standard_normal((batch, TEXT_LEN, context_dim), np.float32),
    }


def attention_shapes(cfg: UNetConfig, batch: int, size: int) -> list[tuple[str, tuple, tuple]]:
    """(label, q shape, k/v shape) of each distinct attention call in the UNet, [B, T, H, D]."""
    n = len(cfg.block_out_channels)
    levels = {i for i, kind in enumerate(cfg.down_block_types) if kind.startswith("CrossAttn")}
    levels |= {n - 1 - i for i, kind in enumerate(cfg.up_block_types) if kind.startswith("CrossAttn")}
    levels.add(n - 1)  # the mid block
    shapes = []
    for level in sorted(levels):
        side = size
        for _ in range(level):
            side = -(-side // 2)  # Downsample2D: 3x3 conv, stride 2, padding 1
        tokens, heads = side * side, cfg.heads[level]
        head_dim = cfg.block_out_channels[level] // heads
        q = (batch, tokens, heads, head_dim)
        shapes.append((f"self {tokens}x{tokens} d{head_dim}", q, q))
        shapes.append((f"cross {tokens}x{TEXT_LEN} d{head_dim}", q, (batch, TEXT_LEN, heads, head_dim)))
    return shapes


def attention_picks(cfg: UNetConfig, batch: int, size: int) -> list[dict]:
    """What ``auto`` picks for each attention shape in bfloat16, and what cuDNN says when traced."""
    picks = []
    for label, q_shape, k_shape in attention_shapes(cfg, batch, size):
        q, k = jax.ShapeDtypeStruct(q_shape, jnp.bfloat16), jax.ShapeDtypeStruct(k_shape, jnp.bfloat16)
        try:
            jax.eval_shape(lambda q, k: jax.nn.dot_product_attention(q, k, k, implementation="cudnn"), q, k)
            cudnn_trace = "accepted"
        except Exception as error:  # any refusal is the finding
            cudnn_trace = error_string(error)
        picks.append(
            {
                "shape": label,
                "q": q_shape,
                "kv": k_shape,
                "auto": _auto_backend(q, k, False),
                "cudnn_trace": cudnn_trace,
            }
        )
    return picks


def cudnn_runs(picks: list[dict]) -> None:
    """Compile and run cuDNN attention at each shape (batch 2), against XLA's; adds to ``picks``."""
    key = jax.random.key(0)
    for pick in picks:
        q_shape, kv_shape = (PARITY_BATCH, *pick["q"][1:]), (PARITY_BATCH, *pick["kv"][1:])
        kq, kk, kv, key = jax.random.split(key, 4)
        q = jax.random.normal(kq, q_shape, jnp.bfloat16)
        k = jax.random.normal(kk, kv_shape, jnp.bfloat16)
        v = jax.random.normal(kv, kv_shape, jnp.bfloat16)
        try:
            expected = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, backend="xla"))(q, k, v)
            actual = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, backend="cudnn"))(q, k, v)
            pick["cudnn_run_rel_err_vs_xla"] = relative_error(actual, expected)
        except Exception as error:
            pick["cudnn_run"] = error_string(error)


def aot_compile(model: UNet2DConditionModel, *args) -> tuple:
    """jit(model.apply) lowered and compiled for ``args`` = (params, sample, timesteps, context).

    Returns the compiled function and a dict: trace_s, compile_s, and the FLOPs of one call
    from XLA's cost analysis before and after its optimisations (flops_per_call_lowered,
    flops_per_call_compiled).
    """

    def forward(params, sample, timesteps, context):
        return model.apply({"params": params}, sample, timesteps, context)

    start = time.perf_counter()
    lowered = jax.jit(forward).lower(*args)
    traced = time.perf_counter()
    compiled = lowered.compile()
    return compiled, {
        "trace_s": traced - start,
        "compile_s": time.perf_counter() - traced,
        "flops_per_call_lowered": cost_flops(lowered),
        "flops_per_call_compiled": cost_flops(compiled),
    }


def run_torch(unet, inputs: dict, device: str, args, results: dict) -> tuple[np.ndarray | None, np.ndarray | None]:
    """PyTorch: the float32 output at the parity batch, then bfloat16 timing at the full batch.

    Returns the float32 output [2, C, H, W] and the bfloat16 output [B, C, H, W] as float32
    numpy arrays, None for a stage that raised (its error is in ``results["errors"]``).
    """
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out32 = out16 = None

    def tensor(name, dtype, batch=None):
        return torch.from_numpy(inputs[name][:batch]).to(device, dtype)

    @torch.no_grad()
    def forward(sample, timesteps, context):
        return unet(sample, timesteps, context).sample

    try:
        unet.to(device)
        batch = PARITY_BATCH
        out32 = (
            forward(
                tensor("sample", torch.float32, batch),
                tensor("timesteps", torch.float32, batch),
                tensor("context", torch.float32, batch),
            )
            .cpu()
            .numpy()
        )
    except Exception as error:
        results["errors"]["torch float32"] = error_string(error)
        traceback.print_exc()
    try:
        unet.to(torch.bfloat16)
        torch.backends.cudnn.benchmark = device == "cuda"  # cuDNN picks its conv algorithms, as XLA autotunes
        args16 = (
            tensor("sample", torch.bfloat16),
            tensor("timesteps", torch.float32),
            tensor("context", torch.bfloat16),
        )
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        stats = time_calls(functools.partial(forward, *args16), lambda _: sync(), args.iters, args.warmup)
        results["implementations"]["torch"] = {**stats, "device": device, "cudnn_benchmark": device == "cuda"}
        out16 = forward(*args16).float().cpu().numpy()
    except Exception as error:
        results["errors"]["torch"] = error_string(error)
        traceback.print_exc()
    return out32, out16


def jax_float32(cfg: UNetConfig, params, sample, timesteps, context, results: dict) -> np.ndarray | None:
    """The JAX float32 output [B, H, W, C] at full matmul precision, computed in parity-batch chunks.

    One compilation at the parity batch serves both the parity check and the reference for the
    bfloat16 runs. None if it raised (its error is in ``results["errors"]``).
    """
    try:
        model = UNet2DConditionModel(cfg, dtype=jnp.float32, attention_backend="xla")
        chunks = [slice(i, i + PARITY_BATCH) for i in range(0, len(sample), PARITY_BATCH)]
        with jax.default_matmul_precision("highest"):
            first = chunks[0]
            forward, compile_times = aot_compile(model, params, sample[first], timesteps[first], context[first])
        results["jax_float32"] = compile_times
        return np.concatenate([np.asarray(forward(params, sample[c], timesteps[c], context[c])) for c in chunks])
    except Exception as error:
        results["errors"]["jax float32"] = error_string(error)
        traceback.print_exc()
        return None


def run(args, results: dict, save: Callable) -> None:
    """All stages, recording into ``results`` and calling ``save()`` after each."""
    clock = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - clock:6.1f}s] {message}", flush=True)

    on_gpu = jax.default_backend() == "gpu"
    config = TINY_UNET if args.tiny else reference_configs.SD15_UNET
    cfg = UNetConfig.from_dict(config)
    setup, bf16_err = results["setup_s"], results["parity"]["bf16_rel_err"]

    log("building the diffusers UNet (float32, torch.manual_seed(0))")
    start = time.perf_counter()
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel.from_config(config).eval()
    setup["torch_build"] = time.perf_counter() - start
    results["parameters"] = sum(p.numel() for p in unet.parameters())

    log("converting its weights to Flax parameters")
    start = time.perf_counter()
    state = {key: value.numpy() for key, value in unet.state_dict().items()}  # views, no copy
    params = weights.state_dict_to_params(state, UNet2DConditionModel(cfg).abstract_params(), name="unet")
    del state
    setup["convert"] = time.perf_counter() - start

    inputs = random_inputs(args.batch, args.size, cfg.in_channels, cfg.cross_attention_dim[0])
    results["attention"] = attention_picks(cfg, args.batch, args.size)
    save()

    torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    log(f"PyTorch on {torch_device}: float32 at batch {PARITY_BATCH}, then bfloat16 timing")
    torch32, torch16 = run_torch(unet, inputs, torch_device, args, results)
    del unet
    gc.collect()
    if torch_device == "cuda":
        torch.cuda.empty_cache()  # JAX allocates next, on the same GPU
    save()

    log(f"JAX float32 (matmul precision highest) at batch {PARITY_BATCH}, in chunks up to batch {args.batch}")
    start = time.perf_counter()
    params32 = jax.device_put(params)
    del params
    setup["params_to_device"] = time.perf_counter() - start
    sample = nchw_to_nhwc(inputs["sample"])
    timesteps, context = inputs["timesteps"], inputs["context"]
    reference = jax_float32(cfg, params32, sample, timesteps, context, results)
    if reference is not None and torch32 is not None:
        results["parity"]["float32_rel_err_jax_vs_torch"] = relative_error(
            nhwc_to_nchw(reference[:PARITY_BATCH]), torch32
        )
    if reference is not None and torch16 is not None:
        bf16_err["torch"] = relative_error(torch16, nhwc_to_nchw(reference))
    save()

    params16 = jax.jit(lambda tree: jax.tree.map(lambda p: p.astype(jnp.bfloat16), tree))(params32)
    del params32
    call_args = (
        params16,
        jnp.asarray(sample, jnp.bfloat16),
        jnp.asarray(timesteps),
        jnp.asarray(context, jnp.bfloat16),
    )
    for backend in JAX_BACKENDS:
        name = f"jax-{backend}"
        if backend == "cudnn" and not on_gpu:
            results["errors"][name] = f"skipped: cuDNN attention needs an NVIDIA GPU (platform {jax.default_backend()})"
            continue
        log(f"{name}: compile, check against float32, time")
        try:
            model = UNet2DConditionModel(cfg, dtype=jnp.bfloat16, attention_backend=backend)
            compiled, compile_times = aot_compile(model, *call_args)
            row = results["implementations"][name] = compile_times
            if reference is not None:
                bf16_err[name] = relative_error(compiled(*call_args), reference)
            row.update(
                time_calls(functools.partial(compiled, *call_args), jax.block_until_ready, args.iters, args.warmup)
            )
        except Exception as error:
            results["errors"][name] = error_string(error)
            traceback.print_exc()
        save()

    if on_gpu:
        log(f"cuDNN attention per shape (batch {PARITY_BATCH}) against XLA")
        cudnn_runs(results["attention"])
    log("done")


def summarise(args, results: dict) -> None:
    """FLOPs per sample, samples/s and share of peak per implementation; the list of failed checks."""
    impls = results["implementations"]
    sd15_512 = not args.tiny and args.size == 64
    xla_flops = impls.get("jax-xla", {}).get("flops_per_call_compiled")
    measured = xla_flops / args.batch if xla_flops else None
    flops = {"reference_sd15_512": SD15_FLOPS_PER_SAMPLE if sd15_512 else None, "cost_analysis_jax_xla": measured}
    if sd15_512 and measured:
        flops["ratio_cost_analysis_to_reference"] = measured / SD15_FLOPS_PER_SAMPLE
    if measured and (not sd15_512 or abs(measured / SD15_FLOPS_PER_SAMPLE - 1) < 0.1):
        flops["per_sample"], flops["source"] = measured, "cost_analysis of jax-xla"
    elif sd15_512:
        flops["per_sample"], flops["source"] = SD15_FLOPS_PER_SAMPLE, "SD1.5 reference (cost analysis missing or off)"
    else:
        flops["per_sample"], flops["source"] = None, "none"
    results["flops"] = flops
    peak = peak_flops(results["device_kind"])
    results["peak_bf16_flops"] = peak
    for row in impls.values():
        if "median_ms" in row:
            row["samples_per_s"] = args.batch / (row["median_ms"] / 1e3)
            row["share_of_peak"] = mfu(flops["per_sample"], row["samples_per_s"], peak)

    parity, failures = results["parity"], results["failures"]
    err32 = parity.get("float32_rel_err_jax_vs_torch")
    if err32 is None:
        failures.append("float32 parity JAX vs PyTorch was not measured (see errors)")
    elif not err32 <= FLOAT32_TOL:
        failures.append(f"float32 parity JAX vs PyTorch: relative error {err32:.2e} > {FLOAT32_TOL:.0e}")
    for backend in JAX_BACKENDS:
        name = f"jax-{backend}"
        err = parity["bf16_rel_err"].get(name)
        if err is not None and not err <= BFLOAT16_TOL:
            failures.append(f"{name} bfloat16 vs JAX float32: relative error {err:.2e} > {BFLOAT16_TOL:.0e}")
        elif err is None and backend != "cudnn":  # cuDNN may refuse; xla and auto must always run
            failures.append(f"{name} bfloat16 output was not checked against float32 (see errors)")


def print_report(results: dict) -> None:
    print("\nattention: what auto picks per shape (cuDNN trace check; cuDNN run vs XLA at batch 2)")
    for pick in results.get("attention", []):
        run = pick.get("cudnn_run_rel_err_vs_xla")
        run = f"{run:.1e}" if run is not None else pick.get("cudnn_run", "-")
        print(f"  {pick['shape']:<24} auto={pick['auto']:<6} cudnn trace: {pick['cudnn_trace'][:80]}; run: {run}")
    for name, error in results["errors"].items():
        print(f"error {name}: {error.splitlines()[0][:300]}")
    parity, flops = results["parity"], results["flops"]
    err32 = parity.get("float32_rel_err_jax_vs_torch")
    print(
        f"\nfloat32 parity JAX vs PyTorch (batch {PARITY_BATCH}): " + (f"{err32:.2e}" if err32 is not None else "n/a")
    )
    ratio = flops.get("ratio_cost_analysis_to_reference")
    per_sample = flops["per_sample"]
    print(
        "FLOPs per sample used for share of peak: "
        + (f"{per_sample / 1e9:.1f} G ({flops['source']})" if per_sample else "n/a")
        + (f"; jax-xla cost analysis / 803 G reference = {ratio:.3f}" if ratio else "")
    )
    batch = results["batch"]
    for name, row in results["implementations"].items():
        if "flops_per_call_compiled" in row:
            counts = [row[f"flops_per_call_{stage}"] for stage in ("lowered", "compiled")]
            counts = "/".join(f"{c / batch / 1e9:.1f}" if c else "n/a" for c in counts)
            print(f"  {name} cost analysis, GFLOP per sample before/after XLA optimisation: {counts}")
    print(f"\n{results['device_kind']}, batch {results['batch']}, {results['size']}x{results['size']} latents")
    columns = "implementation, compile s, median ms, min ms, samples/s, vs torch, share of peak, bf16 rel. err"
    torch_ms = results["implementations"].get("torch", {}).get("median_ms")
    rows = []
    for name, row in results["implementations"].items():
        compile_s = row["trace_s"] + row["compile_s"] if "compile_s" in row else None
        median_ms = row.get("median_ms")
        rows.append(
            [
                name,
                fmt(compile_s, "{:.1f}"),
                fmt(median_ms, "{:.2f}"),
                fmt(row.get("min_ms"), "{:.2f}"),
                fmt(row.get("samples_per_s"), "{:.1f}"),
                fmt(torch_ms / median_ms if median_ms and torch_ms else None, "{:.2f}x"),
                fmt(row.get("share_of_peak"), "{:.1%}"),
                fmt(parity["bf16_rel_err"].get(name), "{:.1e}"),
            ]
        )
    print_table(columns.split(", "), rows)
    for failure in results["failures"]:
        print(f"FAILED: {failure}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = out_dir() / "unet_forward.json"
    device = jax.devices()[0]
    results = {
        "benchmark": "unet_forward",
        "date": now(),
        "command": shlex.join(["python3", *sys.argv]),
        "device_kind": device.device_kind,
        "platform": jax.default_backend(),
        "torch_device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "flax": flax.__version__,
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "torch_cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "diffusers": diffusers.__version__,
            "numpy": np.__version__,
        },
        "unet": "tiny (tests/helpers/networks.py TINY_UNETS['sd1'])" if args.tiny else "SD1.5",
        "batch": args.batch,
        "size": args.size,
        "text_len": TEXT_LEN,
        "iters": args.iters,
        "warmup": args.warmup,
        "dtype": "bfloat16 parameters and compute (JAX); bfloat16 module (PyTorch)",
        "setup_s": {},
        "parity": {"float32_tol": FLOAT32_TOL, "bf16_tol": BFLOAT16_TOL, "bf16_rel_err": {}},
        "implementations": {},
        "errors": {},
        "failures": [],
    }

    def save():
        write_json(path, results)

    try:
        run(args, results, save)
    except Exception as error:  # write what was measured, then fail
        results["errors"]["run"] = error_string(error)
        traceback.print_exc()
    summarise(args, results)
    save()
    print_report(results)
    print(f"\nresults: {path}")
    return 1 if results["failures"] or "run" in results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
