"""4-step SD1.5 sampling at 512 px with classifier-free guidance, end to end, JAX against diffusers.

Both sides sample the same random SD1.5 pipeline (diffusers' and transformers' own initialisation
under torch.manual_seed(0), converted with ``weights.state_dict_to_params``) with the same token
ids and the same initial noise: text encoder (prompts and the empty prompt), 4 PeRFlow steps
(diff_eps, K=4) with CFG 4.5, each a UNet pass on the conditional and unconditional halves, and
the VAE decode.
- this project: ``pipeline.Generator``, one jitted, ahead-of-time compiled function (the one
  ``python -m perflow_jax.sample`` runs), bfloat16 compute;
- diffusers: ``StableDiffusionPipeline`` with ``perflow_jax.torch.PeRFlowScheduler``, float16 on
  a GPU (the reference's setting; float32 on a CPU), given the same token ids' text embeddings
  by its own text encoder (``prompt`` strings through a tokenizer, as users call it).
Per batch size (1: latency, 16: throughput): compile time (JAX), median ms of ``--iters`` calls
after 2 warm-ups, images/s. First a float32 parity check at batch 1 (final images, both sides in
float32). A markdown table goes to stdout, everything to ``$OUT/sample.json``.

    python3 bench/sample.py            # on a GPU: SD1.5, batch 1 and 16
    python3 bench/sample.py --tiny     # tiny networks, 32 px: a CPU check of the script
"""

# The imports below must follow the sys.path and environment lines before them.
# ruff: noqa: E402
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # PyTorch shares the GPU

import diffusers
import jax
import numpy as np
import torch
import transformers

import perflow_jax.torch  # noqa: F401  (PeRFlowScheduler)
from bench.common import error_string, time_calls
from perflow_jax import models, pipeline, sharding, weights
from perflow_jax.demo.tokenizer import write_tiny_clip_tokenizer
from perflow_jax.models import reference_configs
from tests.helpers.parity import relative_error

STEPS, GUIDANCE = 4, 4.5
PROMPT = "a photo of a cat"
TINY = {  # SD1.x's layout at toy widths (tests/helpers/networks.py)
    "unet": dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32, attention_head_dim=4,
                 norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=8),
    "vae": dict(block_out_channels=(16, 32, 32), norm_num_groups=8, latent_channels=4, layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3),
    "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=77, vocab_size=1000),
}  # fmt: skip
FULL = {"unet": reference_configs.SD15_UNET, "vae": reference_configs.SD_VAE,
        "text_encoder": reference_configs.SD15_TEXT_ENCODER}  # fmt: skip


def torch_pipeline(configs: dict, tokenizer_dir: Path) -> diffusers.StableDiffusionPipeline:
    torch.manual_seed(0)
    tokenizer = write_tiny_clip_tokenizer(tokenizer_dir)
    text = {**configs["text_encoder"], "vocab_size": max(configs["text_encoder"].get("vocab_size", 0), len(tokenizer))}
    return diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL(**configs["vae"]).eval(),
        text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**text)).eval(),
        tokenizer=tokenizer,
        unet=diffusers.UNet2DConditionModel(**configs["unet"]).eval(),
        scheduler=perflow_jax.torch.PeRFlowScheduler(prediction_type="diff_eps", num_time_windows=4),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def jax_generate(pipe, dtype: str, resolution: int) -> pipeline.Generator:
    """This project's one jitted generate over the diffusers pipeline's weights, computing in ``dtype``."""
    modules, params = {}, {}
    for name in ("unet", "vae", "text_encoder"):
        network = getattr(pipe, name)
        config = network.config.to_dict() if hasattr(network.config, "to_dict") else dict(network.config)
        modules[name] = models.from_config(type(network).__name__, config, dtype=weights.DTYPES[dtype])
        state = {k: v.float().numpy() for k, v in network.state_dict().items()}
        params[name] = weights.cast_params(
            weights.state_dict_to_params(state, modules[name].abstract_params(), name=name), dtype
        )
    text = pipeline.TextEncoders(modules["text_encoder"], resolution=resolution)
    jax_pipe = pipeline.Pipeline(modules["unet"], text, modules["vae"], pipe.scheduler.alphas_cumprod.numpy())
    settings = pipeline.GenerateSettings(num_steps=STEPS, guidance=GUIDANCE, parameterization="diff_eps")
    mesh = sharding.make_mesh((-1, 1))
    placed = sharding.place(
        {"unet": params["unet"], "text": {"text_encoder": params["text_encoder"]}, "vae": params["vae"]},
        sharding.replicated(mesh),
    )
    return pipeline.Generator(jax_pipe, settings, placed, lambda prompts: {"input_ids": ids_of(pipe, prompts)}, mesh)


def ids_of(pipe, prompts: list[str]) -> np.ndarray:
    return np.asarray(pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True).input_ids, np.int32)


def run(args, results: dict, save) -> bool:
    configs = TINY if args.tiny else FULL
    resolution = 32 if args.tiny else 512
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as folder:
        pipe = torch_pipeline(configs, Path(folder) / "tokenizer")
    pipe.set_progress_bar_config(disable=True)
    latent = resolution // 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    ok = True

    def noise_of(batch: int) -> np.ndarray:
        return np.random.default_rng(0).standard_normal((batch, 4, latent, latent)).astype(np.float32)

    def torch_call(batch: int):
        prompts, latents = [PROMPT] * batch, torch.from_numpy(noise_of(batch)).to(device, pipe.unet.dtype)
        return lambda: pipe(prompts, latents=latents, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                            height=resolution, width=resolution, output_type="np").images  # fmt: skip

    def jax_call(generator: pipeline.Generator, batch: int):
        """(compile seconds, a call of the compiled generate on placed inputs, returning the images)."""
        args = generator.inputs([PROMPT] * batch, noise_of(batch).transpose(0, 2, 3, 1))
        compiled, compile_s = generator.compiled(args)
        return compile_s, lambda: compiled(*args)[0]

    # 1. float32 parity at batch 1, on this device, TF32 off on both sides.
    pipe.to(device, torch.float32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    generator32 = jax_generate(pipe, "float32", resolution)
    with jax.default_matmul_precision("highest"):
        _, call32 = jax_call(generator32, 1)
        error = relative_error(np.asarray(call32()), torch_call(1)())
    torch.backends.cudnn.allow_tf32 = True
    results["parity_float32_relative_error"] = error
    ok = error < 1e-4  # float32 networks agree to ~1e-6 (tests/helpers/parity.py); 4 steps, CFG and the VAE add little
    print(f"float32 parity, final images: relative error {error:.2e}", flush=True)
    del generator32
    save()

    # 2. timings: JAX bfloat16, diffusers float16 (float32 on a CPU).
    torch_dtype = torch.float16 if device == "cuda" else torch.float32
    pipe.to(device, torch_dtype)
    generator = jax_generate(pipe, "bfloat16", resolution)
    wait_torch = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
    for batch in args.batches:
        for name in ("jax", "diffusers"):
            key = f"{name}_batch{batch}"
            try:
                compile_s, call = jax_call(generator, batch) if name == "jax" else (0.0, torch_call(batch))
                wait = jax.block_until_ready if name == "jax" else wait_torch
                timing = time_calls(call, wait, iters=args.iters, warmup=2)
                results[key] = {"compile_s": compile_s, **timing, "images_per_s": batch / (timing["median_ms"] / 1e3)}
                print(f"{key}: {timing['median_ms']:.1f} ms, {results[key]['images_per_s']:.1f} images/s", flush=True)
            except Exception as error:  # an out-of-memory batch is recorded, the others still run
                results[key] = {"error": error_string(error)}
                ok = False
            save()
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny networks at 32 px (a CPU check)")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    parser.add_argument("--iters", type=int, default=10, help="timed calls per measurement")
    args = parser.parse_args(argv)
    results = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": jax.devices()[0].device_kind,
        "torch_device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": {"jax": jax.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "python": platform.python_version()},  # fmt: skip
        "steps": STEPS, "guidance": GUIDANCE, "tiny": args.tiny,
    }  # fmt: skip
    out = Path(os.environ.get("OUT", ".")) / "sample.json"

    def save():
        out.write_text(json.dumps(results, indent=2) + "\n")

    ok = run(args, results, save)
    print("\n| batch | diffusers ms | diffusers images/s | perflow_jax ms | perflow_jax images/s | JAX compile s |")
    print("|---|---|---|---|---|---|")
    for batch in args.batches:
        t, j = results.get(f"diffusers_batch{batch}", {}), results.get(f"jax_batch{batch}", {})
        print(f"| {batch} | {t.get('median_ms', float('nan')):.1f} | {t.get('images_per_s', float('nan')):.1f} | "
              f"{j.get('median_ms', float('nan')):.1f} | {j.get('images_per_s', float('nan')):.1f} | "
              f"{j.get('compile_s', float('nan')):.1f} |")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
